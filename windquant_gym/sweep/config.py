"""The arguments of a sweep (a typed dataclass, as CleanRL's scripts take them)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..cache import atomic_path
from ..errors import ConfigError
from ..quant.bitwidths import check_bits

SWEEP_FILE = "sweep.json"
"""Written in the sweep folder: what shapes its runs, so a re-run with other settings is refused."""

# what makes two sweeps' runs the same runs: a re-run must agree on these (seeds and targets may grow)
RUN_SHAPING = ("model", "preset", "episodes", "hyperparams", "calibration_seed", "device", "search_evaluations")

LEARNED = "learned"
"""The allocator name of a training run (``windquant train`` with the preset)."""


def allocator_names() -> List[str]:
    """What ``--allocators`` takes: ``learned`` and every ``windquant bench`` allocator."""
    from ..allocators.registry import baseline_allocators
    from ..harness.bench import SEARCH_FITNESS

    return [LEARNED, *baseline_allocators(), *SEARCH_FITNESS]


def seeded(allocator: str) -> bool:
    """Whether an allocator's result depends on the sweep's seeds (one run per seed)."""
    from ..harness.bench import SEARCH_FITNESS

    return allocator == LEARNED or allocator in SEARCH_FITNESS


@dataclass(frozen=True)
class SweepArgs:
    model: str = "smollm2-135m"
    """A load_model name or local folder (on every node of a cluster)."""
    preset: str = "cpu"
    """Hyperparameter block of agents/hyperparams.yml."""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    """Agent seeds; one run per seed and target."""
    target_bits: List[float] = field(default_factory=lambda: [3.0, 2.5, 2.0])
    """One run per target: each trains at that fixed target (``windquant train --target-bits``)."""
    allocators: List[str] = field(default_factory=lambda: [LEARNED])
    """``learned`` (a training run per seed) and/or ``windquant bench`` allocators (e.g.
    ``calibrated-knapsack``: one run per target; ``search``: one per seed and target)."""
    search_evaluations: Optional[float] = None
    """The search allocators' budget in proxy passes (default: the search's own)."""
    out: str = "runs/sweep"
    """Sweep folder: one sub-folder per run, the leaderboard beside them."""
    episodes: Optional[int] = None
    """Override the preset's episode count."""
    calibration_seed: Optional[int] = None
    """Override the preset's calibration seed (the proxy's text)."""
    hyperparams: Optional[str] = None
    """Another hyperparameter YAML (a path every node can read)."""
    device: str = "auto"
    """Where each training run's LM runs ("auto": the GPU Ray gives the task, if any); bench
    runs always use "auto"."""
    address: Optional[str] = None
    """An existing Ray cluster ("auto", or "ray://HOST:10001"); None starts Ray on this machine."""
    cpus_per_run: Optional[float] = None
    """CPUs Ray reserves per run (and its torch threads); default: the preset's ``sweep_resources.cpus``."""
    gpus_per_run: Optional[float] = None
    """GPU (fraction) Ray reserves per run; default: the preset's ``sweep_resources.gpus``."""
    num_cpus: Optional[int] = None
    """CPUs of the local Ray instance (default: all); ignored with ``address``."""
    retries: int = 0
    """Times Ray retries a failed run (a retry resumes from the run's last checkpoint)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.seeds or not self.target_bits:
            raise ConfigError(f"A sweep needs at least one seed and one target, got seeds={self.seeds} and "
                              f"target_bits={self.target_bits}; e.g. --seeds 0 1 --target-bits 3.0 2.0.")
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad:
            raise ConfigError(f"seeds must be integers >= 0, got {bad}; e.g. --seeds 0 1 2.")
        check_bits(list(self.target_bits), "target_bits", "--target-bits 3.0 2.5 2.0")
        for name in ("cpus_per_run", "gpus_per_run"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}.")
        if self.cpus_per_run == 0:
            raise ConfigError("cpus_per_run must be > 0 (a run needs a CPU for its policy); e.g. --cpus-per-run 1.")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}.")
        if self.episodes is not None and self.episodes < 1:
            raise ConfigError(f"episodes must be >= 1, got {self.episodes}.")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.target_bits)) != len(self.target_bits):
            raise ConfigError(f"seeds {self.seeds} and target_bits {self.target_bits} must not repeat a value.")
        known = allocator_names()
        unknown = [a for a in self.allocators if a not in known]
        if not self.allocators or unknown or len(set(self.allocators)) != len(self.allocators):
            raise ConfigError(f"allocators must be distinct names from {known}, got {self.allocators}; e.g. "
                              "--allocators learned calibrated-knapsack search.")
        if self.hyperparams and any(a != LEARNED for a in self.allocators):
            raise ConfigError("--hyperparams applies to training runs only (windquant bench reads the package's presets): "
                              "sweep the bench allocators in a separate --out without --hyperparams.")
        if self.search_evaluations is not None and not self.search_evaluations > 0:
            raise ConfigError(f"search_evaluations must be > 0, got {self.search_evaluations}; e.g. --search-evaluations 211.")

    def run_shaping(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_SHAPING}


def check_sweep_folder(args: SweepArgs, hp: Dict[str, Any]) -> None:
    """Record the sweep's run-shaping settings (and the preset's values, ``hp``) in its folder,
    or refuse a re-run whose settings differ: its finished runs would not be the runs asked for
    (an edited YAML or another package version changes the values under the same preset name)."""
    out = Path(args.out)
    path = out / SWEEP_FILE
    wanted = {**args.run_shaping(), "hyperparameters": json.loads(json.dumps(hp, sort_keys=True, default=str))}
    if path.exists():
        try:
            saved = json.loads(path.read_text())["runs"]
        except (ValueError, KeyError) as error:
            raise ConfigError(f"{path} is damaged ({type(error).__name__}); it records what shaped the runs in {out}: "
                              "restore it, or pick another --out.") from None
        # a field an older version did not record cannot be compared
        differ = {k: (saved[k], wanted[k]) for k in wanted if k in saved and saved[k] != wanted[k]}
        if differ:
            shown = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items() if k != "hyperparameters")
            if "hyperparameters" in differ:
                keys = _changed_keys(differ["hyperparameters"][0], wanted["hyperparameters"])
                shown = ", ".join(filter(None, [shown, f"the preset's values ({', '.join(keys)})"]))
            raise ConfigError(f"{out} holds a sweep with other settings ({shown}); re-run it with its own settings to "
                              "resume it, or pick another --out.")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"runs": wanted, "args": asdict(args)}, indent=1))


def _changed_keys(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
