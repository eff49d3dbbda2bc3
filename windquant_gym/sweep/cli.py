"""``windquant sweep``: seeds x targets of one preset as Ray tasks, then one leaderboard."""

from __future__ import annotations

import argparse
from typing import List

from .config import SweepArgs


def main(argv: List[str]) -> int:
    defaults = SweepArgs()
    parser = argparse.ArgumentParser(
        prog="windquant sweep",
        description="Train one run per (seed, target) as Ray tasks, on this machine or a Ray cluster (--address); "
        "re-running the same command skips finished runs and resumes interrupted ones. Writes OUT/<run>/ and "
        "OUT/leaderboard.{json,csv,md}. Needs Ray: pip install -e \".[sweep]\".",
    )
    parser.add_argument("--model", default=defaults.model, help="load_model name or local folder (default: %(default)s)")
    parser.add_argument("--preset", default=defaults.preset, help="block of agents/hyperparams.yml (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds, help="agent seeds (default: 0 1 2)")
    parser.add_argument("--target-bits", type=float, nargs="+", default=defaults.target_bits,
                        help="one run per target, trained at that fixed target (default: 3.0 2.5 2.0)")
    parser.add_argument("--out", default=defaults.out, help="sweep folder (default: %(default)s)")
    parser.add_argument("--episodes", type=int, help="override the preset's episode count")
    parser.add_argument("--calibration-seed", type=int, help="override the preset's calibration seed")
    parser.add_argument("--hyperparams", help="another hyperparameter YAML")
    parser.add_argument("--device", default=defaults.device, help="where each run's LM runs (default: %(default)s)")
    parser.add_argument("--address", help="an existing Ray cluster (e.g. auto, ray://HOST:10001); default: start Ray here")
    parser.add_argument("--cpus-per-run", type=float, help="CPUs (and torch threads) per run; default: the preset's sweep_resources.cpus, else 1")
    parser.add_argument("--gpus-per-run", type=float, help="GPU fraction per run; default: the preset's sweep_resources.gpus, else 0")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--retries", type=int, default=0, help="times Ray retries a failed run, resuming it (default: 0)")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    from .execute import run_sweep

    result = run_sweep(SweepArgs(
        model=ns.model, preset=ns.preset, seeds=ns.seeds, target_bits=ns.target_bits, out=ns.out, episodes=ns.episodes,
        calibration_seed=ns.calibration_seed, hyperparams=ns.hyperparams, device=ns.device, address=ns.address,
        cpus_per_run=ns.cpus_per_run, gpus_per_run=ns.gpus_per_run, num_cpus=ns.num_cpus, retries=ns.retries,
        progress=not ns.no_progress,
    ))
    print((result.leaderboard["md"]).read_text())
    return 1 if result.failed else 0
