"""What a model's problem will need in memory, estimated before anything large is allocated.

A 1B-class model on a 24 GiB machine should learn that it does not fit from a sentence, not
from a ``MemoryError`` (or the kernel's OOM killer) twenty minutes into the table build.
:func:`estimate_memory` adds up, from the model's shapes alone, what
:meth:`~windquant_gym.QuantProblem.build` and the episodes after it allocate beside the
model already in memory:

table          six int8 codes per decoder Linear weight (one per non-skip action), fp16 row
               scales per unit and action, the INT8 outliers (index, code, scale)
table_build    while the table is fitted: a bool mask and an int8 outlier code per weight,
               and one batch of units in fitting (``batch_elements`` weights, float32, the
               fit's copies of it)
hessians       the calibration's ``[chunks, G, G]`` float32 blocks, one per distinct input
assembly       the plan's weights, float32: every quantized Linear's (``stream=False``) or
               one decoder layer's (``stream=True``)
activations    one proxy batch through the widest layer and the LM head's logits chunk

The peak is ``resident + table + hessians + activations + max(table_build, assembly)``: the
build's scratch is freed before the first episode (the activations' memory, first used by the
calibration pass, stays in the heap throughout). The ``resident`` part
is this process as it stands (interpreter, torch, the model). :func:`check_memory` compares
the rest with what the machine (or its cgroup) has available and raises
:class:`~windquant_gym.errors.InsufficientMemoryError` naming the parts and the fixes;
``WINDQUANT_MEMORY_CHECK=off`` skips it (e.g. where swap is meant to take the excess).
``benchmarks/scale.py`` prints the estimate beside the measured peak per model size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import ConfigError, InsufficientMemoryError
from .eval.perplexity import LOGITS_BYTES
from .quant.module_kinds import module_kind

ENV_VAR = "WINDQUANT_MEMORY_CHECK"
FIT_COPIES = 32
"""Float32 copies of a batch of units that the fit holds at once (weights, scales, codes and
residuals per action, compensation's running error): measured on SmolLM2-135M with GPTQ
compensation, the table stage's peak RSS stood 1.9 GiB above calibration's, of which the table
is 0.63 GiB and the masks 0.2 GiB (benchmarks/scale.py)."""
SHARED_INPUT_KINDS = ({0, 1, 2}, {4, 5})
""":func:`~.quant.module_kinds.module_kind` roles that read one input tensor (q/k/v, gate/up), so
the calibration keeps one Hessian for the set."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, per part (see the module docstring)."""

    resident: int
    table: int
    table_build: int
    hessians: int
    assembly: int
    activations: int
    weights: int
    """Decoder Linear weights (the count the parts are made of)."""
    streamed_assembly: int
    """What ``assembly`` would be with ``stream=True`` (one decoder layer's weights)."""

    @property
    def additional(self) -> int:
        """What comes on top of ``resident`` at the peak. The activations count in both phases:
        calibration's pass comes first, and what it freed stays in the process's heap (malloc
        keeps freed memory for reuse, see :func:`~windquant_gym.keep_freed_memory`)."""
        return self.table + self.hessians + self.activations + max(self.table_build, self.assembly)

    @property
    def peak(self) -> int:
        return self.resident + self.additional

    def parts(self) -> Dict[str, int]:
        return {"table": self.table, "table build": self.table_build, "hessians": self.hessians,
                "assembled weights": self.assembly, "activations": self.activations}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {_gib(value)}" for name, value in self.parts().items())
        return f"{_gib(self.additional)} beside the {_gib(self.resident)} already resident ({parts})"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _input_groups(names: List[str]) -> List[List[str]]:
    """``names`` grouped by the input they read (q/k/v and gate/up of one layer share)."""
    groups: Dict[tuple, List[str]] = {}
    for name in names:
        kind = module_kind(name)
        shared = next((i for i, kinds in enumerate(SHARED_INPUT_KINDS) if kind in kinds), None)
        key = (name.rpartition(".")[0], shared) if shared is not None else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def estimate_memory(model: nn.Module, module_names: List[str], chunk_size: int, *, batch_size: int, seq_len: int,
                    salient_rate: float = 0.0, stream: bool = False, batch_elements: int = 1 << 23,
                    resident: Optional[int] = None) -> MemoryEstimate:
    """The estimate for ``model``'s quantized Linears ``module_names`` (see module docstring).

    ``resident``: bytes already in memory (default: this process's RSS now)."""
    if chunk_size < 1 or batch_size < 1 or seq_len < 1:
        raise ConfigError(f"estimate_memory needs positive chunk_size, batch_size and seq_len, got {chunk_size}, "
                          f"{batch_size}, {seq_len}.")
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in module_names}
    weights = sum(o * i for o, i in shapes.values())
    chunks = {name: -(-i // chunk_size) for name, (o, i) in shapes.items()}
    outliers = int(weights * salient_rate)
    table = (6 * weights  # int8 codes, one slice per non-skip action
             + sum(7 * 2 * o * chunks[n] for n, (o, i) in shapes.items())  # fp16 scales: 6 actions + outliers'
             + outliers * (8 + 1))  # int64 index, int8 code
    largest_unit = max(o * min(i, chunk_size) for o, i in shapes.values())
    fit_batch = min(weights, max(batch_elements, largest_unit))  # a batch holds at least one unit
    table_build = 2 * weights + FIT_COPIES * 4 * fit_batch
    hessians = sum(4 * chunks[group[0]] * chunk_size**2 for group in _input_groups(module_names))
    per_layer: Dict[str, int] = {}
    for name, (o, i) in shapes.items():
        layer = name.rpartition(".")[0].rpartition(".")[0]  # "model.layers.3.self_attn.q_proj" -> "model.layers.3"
        per_layer[layer] = per_layer.get(layer, 0) + o * i
    streamed = 4 * max(per_layer.values())
    assembly = streamed if stream else 4 * weights
    widest = max(max(o, i) for o, i in shapes.values())
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 1) or 1
    tokens = batch_size * seq_len
    # a decoder layer's live float32 tensors (residual, norms, q/k/v, MLP's two widest) and
    # the attention scores where the math path materialises them
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else widest
    logits = 3 * min(LOGITS_BYTES, 4 * tokens * vocab)  # one LM-head chunk, its log-softmax, the loss's temporaries
    activations = 4 * tokens * (6 * widest) + 4 * batch_size * heads * seq_len**2 + logits
    return MemoryEstimate(resident=current_rss_bytes() if resident is None else int(resident), table=int(table),
                          table_build=int(table_build), hessians=int(hessians), assembly=int(assembly),
                          activations=int(activations), weights=int(weights), streamed_assembly=int(streamed))


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def current_rss_bytes() -> int:
    """This process's resident set now (``VmRSS``)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's own high-water resident set (``VmHWM``; ``ru_maxrss`` would carry a
    parent's peak across fork and exec)."""
    return _status_bytes("VmHWM")


def available_memory_bytes() -> Optional[int]:
    """What the kernel can give this process now: ``MemAvailable``, lowered to the cgroup's
    headroom (``memory.max - memory.current``) where a limit is set; None where neither can
    be read (then nothing is checked)."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read().strip())
            headroom = max(0, int(limit) - used)
            available = headroom if available is None else min(available, headroom)
    except (OSError, ValueError):
        pass
    return available


def memory_check_enabled() -> bool:
    value = os.environ.get(ENV_VAR, "on").strip().lower()
    if value not in ("on", "off"):
        raise ConfigError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} must be on (default) or off (skip the check).")
    return value == "on"


AUTO_STREAM_SHARE = 0.4
"""``stream="auto"`` assembles one decoder layer at a time when the whole-model estimate's
:attr:`~MemoryEstimate.additional` would take more than this share of the available memory:
LLaMA-3.2-1B's shape on a 24 GiB machine (10.9 GiB of ~22 available; not streamed, its
measured peak was 20.7 GiB) streams, SmolLM2-135M (~3 GiB) and -360M (~4.2 GiB) do not."""


def choose_stream(whole: MemoryEstimate, streamed: MemoryEstimate, device: torch.device | str = "cpu",
                  available: Optional[int] = None) -> bool:
    """What ``stream="auto"`` means for a problem with these two estimates (``stream=False`` and
    ``stream=True``; the streamed pass runs every proxy block as one batch, so its activations
    are larger): True when streaming needs less in all and the whole-model estimate would take
    more than :data:`AUTO_STREAM_SHARE` of what is available. On an accelerator, and where the
    available memory cannot be read, False (pass ``stream=True`` there)."""
    if torch.device(device).type != "cpu" or streamed.additional >= whole.additional:
        return False
    available = available_memory_bytes() if available is None else available
    return available is not None and whole.additional > AUTO_STREAM_SHARE * available


def resolve_stream(model: nn.Module, module_names: List[str], chunk_size: int, *, batch_size: int, n_blocks: int,
                   seq_len: int, salient_rate: float = 0.0, stream: bool | str = "auto",
                   device: torch.device | str = "cpu") -> Tuple[bool, MemoryEstimate]:
    """``stream`` (True, False or ``"auto"``: :func:`choose_stream`) resolved for a problem of
    ``n_blocks`` proxy blocks, with the estimate that goes with it. A streamed pass runs every
    block as one batch (each forward re-assembles every layer), so its activations are
    estimated at ``n_blocks``, the whole-model pass's at ``batch_size``."""
    if not (isinstance(stream, bool) or stream == "auto"):
        raise ConfigError(f"stream must be True, False or 'auto', got {stream!r}; 'auto' streams when memory is short.")

    def estimate(streamed: bool) -> MemoryEstimate:
        return estimate_memory(model, module_names, chunk_size, batch_size=n_blocks if streamed else batch_size,
                               seq_len=seq_len, salient_rate=salient_rate, stream=streamed)

    if stream != "auto":
        return stream, estimate(stream)
    whole, streamed = estimate(False), estimate(True)
    chosen = choose_stream(whole, streamed, device)
    return chosen, streamed if chosen else whole


def check_memory(estimate: MemoryEstimate, device: torch.device | str = "cpu", available: Optional[int] = None) -> None:
    """Raise :class:`InsufficientMemoryError` when ``estimate.additional`` exceeds the host's
    available memory (CPU models; on an accelerator its own allocator reports). The message
    names the parts and what would make it fit."""
    if torch.device(device).type != "cpu" or not memory_check_enabled():
        return
    available = available_memory_bytes() if available is None else available
    if available is None or estimate.additional <= available:
        return
    fixes = []
    # what streaming takes off the peak (the build's scratch may be the larger part anyway)
    saved = max(estimate.table_build, estimate.assembly) - max(estimate.table_build, estimate.streamed_assembly)
    if saved > 0:
        fixes.append(f"QuantProblem.build(..., stream=True) and gym.make(..., problem=problem) (one decoder layer's "
                     f"weights assembled at a time: {_gib(saved)} less)")
    fixes += ["a machine (or container limit) with more memory",
              f"{ENV_VAR}=off to try anyway (e.g. with swap)"]
    raise InsufficientMemoryError(
        f"QuantProblem.build needs about {estimate.describe()} for {estimate.weights / 1e6:.0f}M quantized weights; "
        f"{_gib(available)} is available: " + "; or ".join(fixes) + "."
    )
