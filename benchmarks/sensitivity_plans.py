"""The Fisher-weighted calibrated knapsack's plans (``calibrated-knapsack-fisher``) for several
label seeds of its sensitivity measurement, as plan files to replay on held-out text, with what
the measurement costs beside a proxy pass (one run, one machine):

    python benchmarks/sensitivity_plans.py OUT_DIR --preset cpu-quick-kv --seeds 0 1 2
    windquant bench --model smollm2-135m --preset cpu --target-bits 2.5 --allocators calibrated-knapsack \\
        --plan OUT_DIR/fisher_s0_2.5.json ...

Each seed calibrates its groups at each target (10 proxy passes per target, as ``windquant
bench``'s rows do); files ``fisher_sS_T.json`` and ``sensitivity_plans.json`` (the scales, proxy
PPL, passes and seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import gymnasium as gym

import windquant_gym  # noqa: F401 (registers WindQuant-v0)
from windquant_gym.agents.hyperparams import load_hyperparams
from windquant_gym.allocators.calibrated_knapsack import CALIBRATED_KNAPSACKS, CalibratedKnapsack
from windquant_gym.plan import QuantPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the plan files")
    parser.add_argument("--preset", default="cpu-quick-kv", help="the preset whose env (engine, proxy) the plans are made on")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 2.5, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="label seeds of the sensitivity measurement")
    args = parser.parse_args()
    hp = load_hyperparams(args.preset)
    kwargs = {k: v for k, v in hp["env_kwargs"].items() if k != "seed"}
    env = gym.make("WindQuant-v0", model=args.model, seed=hp["env_kwargs"].get("seed", 0), progress=False, **kwargs).unwrapped
    problem = env.problem
    args.out.mkdir(parents=True, exist_ok=True)
    groups = CALIBRATED_KNAPSACKS["calibrated-knapsack-fisher"].groups
    record = {"preset": args.preset, "seeds": {}}
    for seed in args.seeds:
        measured = time.perf_counter()
        problem.module_sensitivity(seed=seed)
        seconds = time.perf_counter() - measured
        rows = {}
        for target in args.targets:
            rule = CalibratedKnapsack(groups=groups, calibrate_at=target, name="calibrated-knapsack-fisher",
                                      sensitivity="fisher", sensitivity_seed=seed)
            scales, nll = rule.calibrate(env)
            plan = rule.plan_at(env, target)
            bits = problem.table.plan_bits(plan)
            QuantPlan.from_problem(problem, plan, allocator=f"calibrated-knapsack-fisher (label seed {seed})",
                                   target_bits=target, effective_bits=bits["effective_bits"],
                                   storage_bits=bits["storage_bits"]).save(args.out / f"fisher_s{seed}_{target:g}.json")
            rows[f"{target:g}"] = {"scales": scales, "proxy_ppl": math.exp(nll), "evaluations": rule.evaluations}
            print(f"seed {seed}, {target:g} bits: scales {scales}, proxy PPL {math.exp(nll):.2f}, {rule.evaluations:g} passes")
        record["seeds"][str(seed)] = {"sensitivity_seconds": seconds, "targets": rows}
        print(f"seed {seed}: sensitivity measured in {seconds:.1f} s")
        last_plan = plan
    # what a proxy pass costs beside it: full passes (no prefix reuse) of a real plan, after a warm-up
    reuse, problem.reuse_prefix = problem.reuse_prefix, False
    try:
        problem.proxy_nll(last_plan)
        started = time.perf_counter()
        for _ in range(3):
            problem.proxy_nll(last_plan)
    finally:
        problem.reuse_prefix = reuse
    record["proxy_pass_seconds"] = pass_seconds = (time.perf_counter() - started) / 3
    for seed, row in record["seeds"].items():
        row["pass_equivalents"] = row["sensitivity_seconds"] / pass_seconds
        print(f"seed {seed}: the sensitivity cost {row['pass_equivalents']:.0f} full proxy passes ({pass_seconds:.2f} s each)")
    (args.out / "sensitivity_plans.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
