"""Does a bf16 proxy rank plans as the float32 proxy does? (issue 5: a cheaper forward)

    python benchmarks/proxy_precision.py                    # smollm2-135m, cpu preset

Collects plans from every baseline allocator (and, with ``--policy``, trained policies) at
several budgets, then scores each plan's proxy NLL twice on the same table and the same
weights: in float32, and with ``proxy_dtype="bfloat16"`` (bf16 autocast on the model's
device: matrix products in bf16, reductions in float32). The reference side is always
float32, whatever the preset says.
Prints the time of each pass, the relative PPL differences, Spearman's rank correlation
and the pairs of plans the two proxies order differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from itertools import combinations

import gymnasium as gym
import numpy as np

import windquant_gym as wq
from windquant_gym.agents import load_hyperparams
from windquant_gym.allocators import RandomAllocator, baseline_allocators
from windquant_gym.harness import run_allocator


def ranks(values):
    order = np.argsort(values)
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--target-bits", type=float, nargs="+", default=[3.0, 2.5, 2.0])
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--policy", action="append", default=[], help="a trained MaskablePPO zip (repeatable)")
    args = parser.parse_args()

    env_kwargs = dict(load_hyperparams(args.preset)["env_kwargs"], proxy_dtype="float32")  # the reference side
    env = gym.make(wq.ENV_ID, model=args.model, **env_kwargs)
    problem = env.unwrapped.problem
    allocators = dict(baseline_allocators())
    allocators.pop("random")
    allocators.update({f"random-{s}": RandomAllocator(s) for s in range(args.random_seeds)})
    if args.policy:
        from sb3_contrib import MaskablePPO

        allocators.update({f"policy-{i}": MaskablePPO.load(p, device="cpu") for i, p in enumerate(args.policy)})
    plans = {}
    for target in args.target_bits:
        env.unwrapped.set_target_bits(target)
        for name, allocator in allocators.items():
            plans[f"{name}@{target:g}"] = run_allocator(env, allocator, name=name)[0].plan

    def score(scorer: wq.QuantProblem):
        seconds, ppl = [], {}
        scorer.proxy_nll(plans[next(iter(plans))])  # warm-up
        for name, plan in plans.items():
            ppl[name] = math.exp(scorer.proxy_nll(plan))
            seconds.append(scorer.last_timing["forward_seconds"])
        return ppl, statistics.median(seconds)

    bf16_problem = dataclasses.replace(problem, proxy_dtype="bfloat16")  # same table, weights and blocks
    fp32, fp32_seconds = score(problem)
    bf16, bf16_seconds = score(bf16_problem)
    names = list(plans)
    a = np.log([fp32[n] for n in names])
    b = np.log([bf16[n] for n in names])
    rel = np.array([bf16[n] / fp32[n] - 1 for n in names])
    spearman = float(np.corrcoef(ranks(a), ranks(b))[0, 1])
    flips = [(x, y) for x, y in combinations(names, 2) if (fp32[x] - fp32[y]) * (bf16[x] - bf16[y]) < 0]

    print(f"\n{args.model}, preset {args.preset}: {len(names)} plans, proxy {tuple(problem.blocks.shape)} tokens")
    print(f"{'plan':22} {'fp32 PPL':>12} {'bf16 PPL':>12} {'rel diff':>9}")
    for n, r in sorted(zip(names, rel), key=lambda item: fp32[item[0]]):
        print(f"{n:22} {fp32[n]:12.2f} {bf16[n]:12.2f} {r:+9.4f}")
    print(f"unquantized: fp32 {problem.baseline_ppl:.3f}, bf16 {bf16_problem.baseline_ppl:.3f}")
    print(f"\nforward pass, median: fp32 {fp32_seconds:.3f} s, bf16 autocast {bf16_seconds:.3f} s "
          f"({fp32_seconds / bf16_seconds:.2f}x)")
    print(f"relative PPL difference bf16 vs fp32: median {np.median(np.abs(rel)):.4f}, max {np.abs(rel).max():.4f}")
    print(f"Spearman rank correlation: {spearman:.4f}; pairs ordered differently: {len(flips)} of {len(names) * (len(names) - 1) // 2}")
    for x, y in flips:
        print(f"  {x} vs {y}: fp32 {fp32[x]:.2f} / {fp32[y]:.2f} ({fp32[x] / fp32[y] - 1:+.3%}), "
              f"bf16 {bf16[x]:.2f} / {bf16[y]:.2f}")
    env.close()


if __name__ == "__main__":
    wq.keep_freed_memory()  # our process: reuse freed memory (windquant_gym/compute/process.py)
    main()
