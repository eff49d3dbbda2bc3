"""``windquant sweep``: seeds x targets of one preset as Ray tasks, then one leaderboard."""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("--allocators", nargs="+", default=defaults.allocators, metavar="NAME",
                        help="'learned' (a training run per seed) and/or windquant bench allocators, e.g. calibrated-knapsack "
                             "(one run per target) or search (one per seed); default: learned")
    parser.add_argument("--search-evaluations", type=float,
                        help="the search allocators' budget in proxy passes (compare a learned run at its evaluations)")
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

    args = SweepArgs(
        model=ns.model, preset=ns.preset, seeds=ns.seeds, target_bits=ns.target_bits, allocators=ns.allocators,
        search_evaluations=ns.search_evaluations, out=ns.out, episodes=ns.episodes,
        calibration_seed=ns.calibration_seed, hyperparams=ns.hyperparams, device=ns.device, address=ns.address,
        cpus_per_run=ns.cpus_per_run, gpus_per_run=ns.gpus_per_run, num_cpus=ns.num_cpus, retries=ns.retries,
        progress=not ns.no_progress,
    )
    try:
        result = run_sweep(args)
    except KeyboardInterrupt:
        print(f"\nwindquant sweep: interrupted; the runs keep their checkpoints: run the same command to resume "
              f"({args.out}).", file=sys.stderr)
        return 130
    print((result.leaderboard["md"]).read_text())
    return 1 if result.failed else 0


def tune_main(argv: List[str]) -> int:
    from .tune import TuneArgs, run_tune

    parser = argparse.ArgumentParser(
        prog="windquant tune",
        description="Search a preset's hyperparameters with Ray Tune and Optuna: each trial is one training at "
        "--target-bits, scored by its returned plan's proxy perplexity (held-out is recorded, never used to choose). "
        "Re-running the command restores the search. Writes OUT/trials.{json,csv,md} and OUT/best_hyperparams.yml. "
        "Needs: pip install -e \".[tune]\".",
    )
    parser.add_argument("--space", required=True,
                        help="search space YAML: hyperparameter key (dotted for nested) -> {uniform|loguniform|randint: "
                             "[low, high]} or {choice: [options]}")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--target-bits", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="agent seed of every trial (default: 0)")
    parser.add_argument("--search-seed", type=int, default=0, help="Optuna sampler seed (default: 0)")
    parser.add_argument("--episodes", type=int, help="override the preset's episode count")
    parser.add_argument("--out", default="runs/tune")
    parser.add_argument("--calibration-seed", type=int)
    parser.add_argument("--hyperparams", help="another hyperparameter YAML holding --preset")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--address", help="an existing Ray cluster; default: start Ray here")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as the resources allow)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    ns = parser.parse_args(argv)
    report = run_tune(TuneArgs(
        space=ns.space, model=ns.model, preset=ns.preset, trials=ns.trials, target_bits=ns.target_bits, seed=ns.seed,
        search_seed=ns.search_seed, episodes=ns.episodes, out=ns.out, calibration_seed=ns.calibration_seed,
        hyperparams=ns.hyperparams, device=ns.device, address=ns.address, cpus_per_trial=ns.cpus_per_trial,
        gpus_per_trial=ns.gpus_per_trial, max_concurrent=ns.max_concurrent, num_cpus=ns.num_cpus,
    ))
    from pathlib import Path

    print((Path(report["meta"]["out"]) / "trials.md").read_text())
    return 0 if report["best"] else 1
