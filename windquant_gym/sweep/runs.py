"""The runs of a sweep: one folder per (target, seed), what state each is in, and the
``windquant train`` command that starts or resumes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

from .config import SweepArgs

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"


@dataclass(frozen=True)
class SweepRun:
    seed: int
    target_bits: float
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name


def plan_runs(args: SweepArgs) -> List[SweepRun]:
    """Every combination, target-major: ``OUT/bits<target>-seed<seed>``."""
    out = Path(args.out)
    return [SweepRun(seed, float(target), out / f"bits{target:g}-seed{seed}") for target in args.target_bits for seed in args.seeds]


def run_status(folder: Path) -> str:
    """``finished`` (its summary.json is written: the run's last act), ``interrupted`` (a
    complete checkpoint to resume from) or ``new`` (nothing, or a start killed before its
    first checkpoint: started again from scratch)."""
    from ..agents.checkpoints import latest_checkpoint

    folder = Path(folder)
    summary = folder / "summary.json"
    if summary.exists():
        try:
            json.loads(summary.read_text())["results"]
            return FINISHED
        except (ValueError, KeyError):
            pass  # a summary cut short: the run did not finish
    if folder.is_dir() and latest_checkpoint(folder) is not None:
        return INTERRUPTED
    return NEW


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
