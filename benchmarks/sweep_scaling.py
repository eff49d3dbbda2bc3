"""A sweep on local Ray against the same runs one after another (issue 14): wall time, and
whether the results are the same.

    python benchmarks/sweep_scaling.py --preset cpu --seeds 0 1 --target-bits 3.0 2.0 --episodes 20 \
        --out /tmp/sweep_scaling --json benchmarks/results/sweep/scaling.json

First warms the cache (calibration and table, so neither side pays for it), then runs every
(seed, target) as ``windquant train`` one after another with ``--cpus-per-run`` torch threads
each, then the same combinations as ``windquant sweep`` (Ray on this machine, ``--cpus-per-run``
CPUs per run). Prints both wall times, their ratio, and each run's held-out perplexity from
both sides (equal when the runs are deterministic at a fixed thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from windquant_gym.compute.process import cpu_name


def _heldout(folder: Path) -> float:
    summary = json.loads((folder / "summary.json").read_text())
    return summary["results"][summary["returned"]]["heldout_ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--target-bits", type=float, nargs="+", default=[3.0, 2.0])
    parser.add_argument("--episodes", type=int, help="override the preset's episode count (both sides)")
    parser.add_argument("--cpus-per-run", type=int, default=1)
    parser.add_argument("--out", default="/tmp/sweep_scaling", help="scratch folder (emptied first)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from windquant_gym.sweep import SweepArgs, plan_runs, run_sweep
    from windquant_gym.sweep.execute import prepare_problem

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    sweep_args = SweepArgs(model=args.model, preset=args.preset, seeds=args.seeds, target_bits=args.target_bits,
                           out=str(out / "sweep"), episodes=args.episodes, cpus_per_run=args.cpus_per_run, progress=False)
    started = time.perf_counter()
    prepare_problem(sweep_args, {}, os.cpu_count() or 1)
    warm_seconds = time.perf_counter() - started
    print(f"cache warm in {warm_seconds:.0f} s", flush=True)

    # one after another, as a user without a sweep would run them
    sequential_runs = plan_runs(SweepArgs(**{**sweep_args.__dict__, "out": str(out / "sequential")}))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.cpus_per_run), "MKL_NUM_THREADS": str(args.cpus_per_run)}
    started = time.perf_counter()
    for run in sequential_runs:
        argv = [sys.executable, "-m", "windquant_gym.cli", "train", "--model", args.model, "--preset", args.preset,
                "--out", str(run.folder), "--seed", str(run.seed), "--target-bits", repr(run.target_bits), "--no-progress"]
        if args.episodes is not None:
            argv += ["--episodes", str(args.episodes)]
        run.folder.mkdir(parents=True)
        with (run.folder / "train.log").open("w") as log:
            subprocess.run(argv, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"  sequential {run.name}: {time.perf_counter() - started:.0f} s so far", flush=True)
    sequential_seconds = time.perf_counter() - started

    started = time.perf_counter()
    result = run_sweep(sweep_args)
    sweep_seconds = time.perf_counter() - started
    if result.failed:
        raise SystemExit(f"the sweep had failed runs: {result.failed}")

    rows = []
    for seq, par in zip(sequential_runs, plan_runs(sweep_args)):
        rows.append({"run": seq.name, "sequential_heldout": _heldout(seq.folder), "sweep_heldout": _heldout(par.folder)})
    same = all(r["sequential_heldout"] == r["sweep_heldout"] for r in rows)
    print(f"\n{cpu_name()}, {os.cpu_count()} CPUs; {len(rows)} runs of preset {args.preset}"
          f"{f', {args.episodes} episodes' if args.episodes else ''}, {args.cpus_per_run} CPU per run")
    print(f"one after another: {sequential_seconds:.0f} s; windquant sweep (local Ray): {sweep_seconds:.0f} s; "
          f"ratio {sequential_seconds / sweep_seconds:.2f}x")
    for r in rows:
        print(f"  {r['run']:16} held-out PPL sequential {r['sequential_heldout']:.4f}  sweep {r['sweep_heldout']:.4f}")
    print(f"results identical: {same}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "cpu": cpu_name(), "cpus": os.cpu_count(), "preset": args.preset, "model": args.model,
            "episodes": args.episodes, "cpus_per_run": args.cpus_per_run, "cache_warm_seconds": warm_seconds,
            "sequential_seconds": sequential_seconds, "sweep_seconds": sweep_seconds,
            "ratio": sequential_seconds / sweep_seconds, "runs": rows, "identical": same,
            "leaderboard": json.loads(result.leaderboard["json"].read_text())["leaderboard"],
        }, indent=1))


if __name__ == "__main__":
    main()
