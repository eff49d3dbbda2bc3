"""The runs of a sweep: one folder per (target, seed), what state each is in, and the
``windquant train`` command that starts or resumes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import LEARNED, SweepArgs, seeded

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"


@dataclass(frozen=True)
class SweepRun:
    seed: Optional[int]
    """None for an allocator whose result does not depend on a seed (one run per target)."""
    target_bits: float
    folder: Path
    allocator: str = LEARNED

    @property
    def learned(self) -> bool:
        return self.allocator == LEARNED

    @property
    def name(self) -> str:
        return self.folder.name


def plan_runs(args: SweepArgs) -> List[SweepRun]:
    """Every combination, target-major: ``OUT/bits<target>-seed<seed>`` (training runs),
    ``OUT/bits<target>-<allocator>[-seed<seed>]`` (bench runs)."""
    out = Path(args.out)
    runs = []
    for target in args.target_bits:
        for allocator in args.allocators:
            prefix = f"bits{target:g}" if allocator == LEARNED else f"bits{target:g}-{allocator}"
            if seeded(allocator):
                runs += [SweepRun(seed, float(target), out / f"{prefix}-seed{seed}", allocator) for seed in args.seeds]
            else:
                runs.append(SweepRun(None, float(target), out / prefix, allocator))
    return runs


BENCH_FILE = "leaderboard.json"
"""What a bench run writes (``windquant bench --json``): its last act, so its presence means finished."""


def run_status(folder: Path, learned: bool = True) -> str:
    """``finished`` (a training run's summary.json, a bench run's leaderboard.json is
    written: each one's last act), ``interrupted`` (a training run with a complete
    checkpoint to resume from) or ``new`` (nothing, a start killed before its first
    checkpoint, or a bench run cut short: started again from scratch)."""
    from ..agents.checkpoints import latest_checkpoint

    folder = Path(folder)
    if _readable(folder / ("summary.json" if learned else BENCH_FILE), "results" if learned else "episodes"):
        return FINISHED
    if learned and folder.is_dir() and latest_checkpoint(folder) is not None:
        return INTERRUPTED
    return NEW


def status_of(run: SweepRun) -> str:
    return run_status(run.folder, run.learned)


def _readable(path: Path, key: str) -> bool:
    try:
        json.loads(path.read_text())[key]
        return True
    except (OSError, ValueError, KeyError):  # missing, or cut short: not finished
        return False


def run_argv(run: SweepRun, args: SweepArgs, hp: Dict[str, Any]) -> List[str]:
    """The ``windquant`` command line of a run: ``train`` (or its resume), or ``bench`` for
    one allocator at one target, on the preset's env and held-out windows."""
    if run.learned:
        return train_argv(run, args)
    argv = ["bench", "--model", args.model, "--preset", args.preset, "--target-bits", repr(run.target_bits),
            "--allocators", run.allocator, "--eval-windows", str(hp["eval_windows"]), "--eval-seq-len",
            str(hp["eval_seq_len"]), "--json", str(run.folder / BENCH_FILE)]
    if run.seed is not None:
        argv += ["--search-seeds", str(run.seed)]
    if args.search_evaluations is not None:
        argv += ["--evaluations", repr(float(args.search_evaluations))]
    if args.calibration_seed is not None:
        argv += ["--seed", str(args.calibration_seed)]
    return argv


def train_argv(run: SweepRun, args: SweepArgs) -> List[str]:
    """``windquant train`` arguments that start the run, or resume it from its checkpoint."""
    if run_status(run.folder) == INTERRUPTED:
        return ["train", "--resume", str(run.folder), "--no-progress"]
    argv = ["train", "--model", args.model, "--preset", args.preset, "--out", str(run.folder), "--seed", str(run.seed),
            "--target-bits", repr(run.target_bits), "--device", args.device, "--no-progress", "--overwrite"]
    for flag, value in (("--episodes", args.episodes), ("--calibration-seed", args.calibration_seed),
                        ("--hyperparams", args.hyperparams)):
        if value is not None:
            argv += [flag, str(value)]
    return argv
