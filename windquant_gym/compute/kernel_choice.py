"""Which CPU kernel is faster for a model's Linear layers, measured on this machine once.

Neither of the two float32 kernels PyTorch ships wins everywhere: oneDNN ran a SmolLM2 pass
1.8-2.0x faster than MKL's sgemm on a 2-core AMD EPYC, and 0.90x MKL on a 2-core Xeon with
AMX (benchmarks/RESULTS.md). So the choice is a measurement, not an assumption: at first use
both kernels multiply the model's own weight shapes (random values, ``rows`` tokens, a few
interleaved rounds, the median), and the result is written to the cache
(``<cache>/kernels/``, one small JSON per machine, thread count, torch version and shape set),
read back by every later process. ``windquant cache list kernels`` shows the entries with
their timings; ``windquant cache clear kernels`` measures again (e.g. after the first
measurement ran beside a heavy job). ``WINDQUANT_CPU_LINEAR=onednn|aten`` skips all of it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.storage import atomic_path
from ..errors import CacheWarning
from ..paths import cache_dir
from .process import cpu_name

CHOICE_FORMAT = 1
"""Bumped when what a kernel-choice entry holds changes."""
MEASURE_ROWS = 512
"""Tokens per timed product (a proxy batch is 1024-2048 rows; 512 keeps the measurement ~1 s
at 135M while the ranking of the two kernels is the same)."""
MEASURE_ROUNDS = 7
MIN_SPEEDUP = 1.03
"""oneDNN is chosen only when it is at least this much faster: within noise, PyTorch's own
kernel stays."""

Shape = Tuple[int, int, int]
"""``(in_features, out_features, count)`` of the Linear layers that share the shape."""

# SmolLM2-135M's decoder shapes: the set measured when no model is given
DEFAULT_SHAPES: Tuple[Shape, ...] = ((576, 576, 60), (576, 192, 60), (576, 1536, 60), (1536, 576, 30))

_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class KernelChoice:
    """What was measured and chosen."""

    kernel: str
    """``"onednn"`` or ``"aten"``."""
    onednn_seconds: float
    """One pass over every shape (each shape's fastest product, weighted by its count)."""
    aten_seconds: float
    machine: str
    threads: int
    torch_version: str
    shapes: Tuple[Shape, ...]
    rows: int
    format: int = CHOICE_FORMAT

    @property
    def speedup(self) -> float:
        """aten's time over oneDNN's (> 1: oneDNN is faster)."""
        return self.aten_seconds / self.onednn_seconds


def linear_shapes(model: Optional[nn.Module]) -> Tuple[Shape, ...]:
    """The distinct float weight shapes of ``model``'s Linear layers (LM head included), with
    how many layers share each; :data:`DEFAULT_SHAPES` for None."""
    if model is None:
        return DEFAULT_SHAPES
    counts: Dict[Tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            key = (module.in_features, module.out_features)
            counts[key] = counts.get(key, 0) + 1
    return tuple(sorted((i, o, n) for (i, o), n in counts.items())) or DEFAULT_SHAPES


def cpu_flags() -> Tuple[str, ...]:
    """The vector / matrix extensions the choice may depend on, from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return tuple(f for f in _CPU_FLAGS if f in present)
    except OSError:
        pass
    return ()


def machine_description() -> str:
    return " ".join([cpu_name(), platform.machine(), *cpu_flags()])


def _entry_path(shapes: Sequence[Shape], threads: int) -> Path:
    key = json.dumps([CHOICE_FORMAT, machine_description(), threads, torch.__version__, [list(s) for s in shapes]])
    return cache_dir("kernels") / f"cpu_linear-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def time_kernels(op: Callable, shapes: Sequence[Shape], rows: int = MEASURE_ROWS,
                 rounds: int = MEASURE_ROUNDS) -> Tuple[float, float]:
    """Seconds of one pass over ``shapes`` on oneDNN's ``op`` and on ``F.linear``: each shape's
    product weighted by its count, at its fastest of ``rounds`` (after a warm-up). The two
    kernels alternate product by product, and the fastest time is the one least disturbed
    by whatever else the machine runs."""
    generator = torch.Generator().manual_seed(0)
    operands = [(torch.randn(rows, i, generator=generator), torch.randn(o, i, generator=generator), n)
                for i, o, n in shapes]
    kernels = {"onednn": lambda x, w: op(x, w, None, "none", [], ""), "aten": lambda x, w: F.linear(x, w)}
    best = {name: [float("inf")] * len(operands) for name in kernels}
    with torch.no_grad():
        for run in kernels.values():  # warm-up: oneDNN builds its primitives on the first call
            for x, w, _ in operands:
                run(x, w)
        for _ in range(rounds):
            for k, (x, w, _) in enumerate(operands):
                for name, run in kernels.items():
                    start = time.perf_counter()
                    run(x, w)
                    best[name][k] = min(best[name][k], time.perf_counter() - start)
    counts = [n for _, _, n in operands]
    return tuple(sum(t * n for t, n in zip(best[name], counts)) for name in ("onednn", "aten"))


def _read(path: Path) -> Optional[KernelChoice]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CHOICE_FORMAT:
            raise ValueError(f"format {data.get('format')}")
        data["shapes"] = tuple(tuple(s) for s in data["shapes"])
        choice = KernelChoice(**data)
        if choice.kernel not in ("onednn", "aten"):
            raise ValueError(f"kernel {choice.kernel!r}")
        return choice
    except (ValueError, TypeError, KeyError) as error:
        warnings.warn(f"{path}: damaged kernel-choice entry ({error}); measuring again.", CacheWarning, stacklevel=3)
        return None


_CHOSEN: Dict[Tuple[Tuple[Shape, ...], int], KernelChoice] = {}


def choose_cpu_linear_kernel(op: Callable, model: Optional[nn.Module] = None, *, cache: bool = True,
                             timer: Callable = time_kernels) -> KernelChoice:
    """The faster of oneDNN (``op``) and PyTorch's default for ``model``'s Linear shapes at the
    current thread count: from this process's memory, else the cache, else measured now (and
    cached). ``cache=False`` measures without reading or writing the cache."""
    shapes, threads = linear_shapes(model), torch.get_num_threads()
    if cache and (shapes, threads) in _CHOSEN:
        return _CHOSEN[(shapes, threads)]
    path = _entry_path(shapes, threads)
    choice = _read(path) if cache else None
    if choice is None:
        onednn, aten = timer(op, shapes)
        choice = KernelChoice(
            kernel="onednn" if aten >= MIN_SPEEDUP * onednn else "aten", onednn_seconds=float(onednn),
            aten_seconds=float(aten), machine=machine_description(), threads=threads,
            torch_version=torch.__version__, shapes=shapes, rows=MEASURE_ROWS,
        )
        if cache:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(asdict(choice), indent=1))
    if cache:
        _CHOSEN[(shapes, threads)] = choice
    return choice


def describe_entry(path: Path) -> str:
    """One line for ``windquant cache list``."""
    choice = _read(path)
    if choice is None:
        return "damaged (measured again on next use)"
    return (f"CPU linear kernel: {choice.kernel} (oneDNN {choice.onednn_seconds * 1e3:.1f} ms, PyTorch's "
            f"{choice.aten_seconds * 1e3:.1f} ms; {choice.threads} threads, {len(choice.shapes)} shapes)")
