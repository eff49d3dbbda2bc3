"""Sweeps: one training per (seed, target) combination, fanned out as Ray tasks on this
machine or on a Ray cluster, resumable, ending in one leaderboard (``windquant sweep``)."""

from .config import SweepArgs
from .runs import SweepRun, plan_runs, run_status
from .execute import SweepResult, run_sweep

__all__ = ["SweepArgs", "SweepRun", "SweepResult", "plan_runs", "run_status", "run_sweep"]
