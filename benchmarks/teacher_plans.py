"""A training run's teacher plans at 2.0 / 2.5 / 3.0 bits, as plan files to replay on held-out text.

The warm start calibrates its teacher once (``calibrate_at``: 2.0 bits for ``cpu-quick-kv``) and uses
those scales at every curriculum target; with ``calibrate_at: each`` (``cpu-quick-kv-each``) it calibrates
at every target and each keeps the best of all targets' scales. This writes the plans the run started
from as plan files: read from the run folder's ``warm_start_plans.json`` where it was kept, else rebuilt
from the scales in its ``summary.json`` (or ``warm_start.json``, for a run stopped early; no proxy pass)
on the env of the preset that trained it, so that the start a run had at each budget can be measured
beside the teacher calibrated at that budget (``windquant bench``'s own calibrated-knapsack rows
calibrate at each target). Files: ``teacher_at_A_scales_T.json`` (calibrated at A bits, played at T),
``teacher_each_scales_T.json`` (calibrated at each target):

    python benchmarks/teacher_plans.py RUN_DIR OUT_DIR --preset cpu-quick-kv
    windquant bench --preset cpu --target-bits 2.5 --allocators calibrated-knapsack \\
        --plan OUT_DIR/teacher_at_2_scales_2.5.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym

import windquant_gym  # noqa: F401 (registers WindQuant-v0)
from windquant_gym.agents.hyperparams import load_hyperparams
from windquant_gym.agents.recipe import CALIBRATE_EACH
from windquant_gym.agents.train import _start_plans
from windquant_gym.allocators.calibrated_knapsack import calibrated_knapsack
from windquant_gym.plan import QuantPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path,
                        help="a windquant train run folder (its summary.json or warm_start.json names the teacher and scales)")
    parser.add_argument("out", type=Path, help="folder for the plan files")
    parser.add_argument("--preset", default="cpu-quick-kv", help="the preset that trained the run (its env)")
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 2.5, 3.0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    # summary.json, or warm_start.json (written when the warm start ends) for a run stopped before its end
    summary, warm_file = args.run / "summary.json", args.run / "warm_start.json"
    if summary.exists():
        warm = json.loads(summary.read_text())["warm_start"]
    elif warm_file.exists():
        warm = json.loads(warm_file.read_text())
    else:
        raise SystemExit(f"{args.run}: neither summary.json nor warm_start.json; pass a windquant train run folder.")
    if not warm or "scales" not in warm:
        raise SystemExit(f"{args.run}: the warm start has no calibrated teacher (no 'scales'); pass a run "
                         "warm-started on a calibrated knapsack (calibrated-knapsack, -kv or -fisher).")
    hp = load_hyperparams(args.preset)
    kwargs = {k: v for k, v in hp["env_kwargs"].items() if k != "seed"}
    base = gym.make("WindQuant-v0", model=args.model, seed=hp["env_kwargs"].get("seed", 0), progress=False, **kwargs).unwrapped
    each = warm["calibrate_at"] == CALIBRATE_EACH  # calibrated at every target: scales keyed by target
    kept = _start_plans(args.run, None)  # the run folder's warm_start_plans.json, when it was stored
    args.out.mkdir(parents=True, exist_ok=True)
    for target in args.targets:
        scales = warm["scales"].get(f"{target:g}") if each else warm["scales"]
        if target not in kept and scales is None:
            raise SystemExit(f"{args.run}: the teacher was calibrated at each curriculum target, not at {target:g} bits; "
                             f"pass --targets {' '.join(sorted(warm['scales']))}.")
        plan = kept[target] if target in kept else calibrated_knapsack(warm["demonstrations"]).plan_at(base, target, scales)
        bits = base.problem.table.plan_bits(plan)
        if each:
            label, name = f"{warm['demonstrations']} (calibrated at each target)", f"teacher_each_scales_{target:g}.json"
        else:
            at = float(warm["calibrate_at"])
            label, name = f"{warm['demonstrations']} (scales of {at:g} bits)", f"teacher_at_{at:g}_scales_{target:g}.json"
        path = QuantPlan.from_problem(base.problem, plan, allocator=label, target_bits=target,
                                      effective_bits=bits["effective_bits"], storage_bits=bits["storage_bits"]
                                      ).save(args.out / name)
        print(f"{target:g} bits: {bits['effective_bits']:.4f} effective, scales {scales} -> {path}")


if __name__ == "__main__":
    main()
