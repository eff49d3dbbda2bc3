"""Does a bf16 proxy rank plans as the float32 proxy does? (issue 5: a cheaper forward)

    python benchmarks/proxy_precision.py                    # smollm2-135m, cpu preset

Collects plans from every baseline allocator (and, with ``--policy``, trained policies) at
several budgets, then scores each plan's proxy NLL twice on the same table and the same
weights: in float32, and with ``proxy_dtype="bfloat16"`` (bf16 autocast on the model's
device: matrix products in bf16, reductions in float32). The reference side is always
float32, whatever the preset says.
Prints the time of each pass, the relative PPL differences, Spearman's rank correlation
and the pairs of plans the two proxies order differently.

Plans from different allocators sit percents apart; the choices a search or keep-the-best
makes are between neighbours. ``--neighbours N`` scores N neighbours of the calibrated
knapsack's plan at the lowest target (1-3 swaps of the actions of two units of the same
shape: the same bits) in both precisions and prints how often the two proxies agree on
whether a neighbour is better than its start, by the size of the float32 difference.

Speed, side by side in one process: the float32 pass, the bf16 pass as it was (autocast
over float32 weight buffers: every weight cast to bf16 on every call) and as it is (the
plan's weights assembled in bf16 once: the same values), each with its assembly.
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
    parser.add_argument("--neighbours", type=int, default=0, help="neighbours of the calibrated knapsack's plan to rank")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per path (median)")
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
    print(achieved_against_peak(problem, fp32_seconds, bf16_seconds))
    print(f"relative PPL difference bf16 vs fp32: median {np.median(np.abs(rel)):.4f}, max {np.abs(rel).max():.4f}")
    print(f"Spearman rank correlation: {spearman:.4f}; pairs ordered differently: {len(flips)} of {len(names) * (len(names) - 1) // 2}")
    for x, y in flips:
        print(f"  {x} vs {y}: fp32 {fp32[x]:.2f} / {fp32[y]:.2f} ({fp32[x] / fp32[y] - 1:+.3%}), "
              f"bf16 {bf16[x]:.2f} / {bf16[y]:.2f}")
    timing = time_paths(problem, bf16_problem, plans[next(iter(plans))], args.repeats)
    print("\nproxy pass with a plan applied (assembly + forward), median of "
          f"{args.repeats}: " + ", ".join(f"{k} {v:.3f} s" for k, v in timing.items()))
    print(f"bf16 as it is over float32: {timing['float32'] / timing['bf16 (bf16 buffers)']:.2f}x; over bf16 as it was: "
          f"{timing['bf16 (autocast over float32 buffers)'] / timing['bf16 (bf16 buffers)']:.2f}x")
    if args.neighbours:
        start_name = f"calibrated-knapsack@{min(args.target_bits):g}"
        rank_neighbours(problem, bf16_problem, np.asarray(plans[start_name]), args.neighbours)
    env.close()


def achieved_against_peak(problem: wq.QuantProblem, fp32_seconds: float, bf16_seconds: float) -> str:
    """The pass's Linear FLOPs per second against a large product's, fp32 and bf16, measured in this process
    (the practical peak; scale.py's reference)."""
    import torch
    from episode_speed import linear_gflop
    from scale import gemm_peak_gflops

    gflop = linear_gflop(problem.model, problem.blocks)
    device = next(problem.model.parameters()).device
    peak32, peak16 = gemm_peak_gflops(torch.float32, device), gemm_peak_gflops(torch.bfloat16, device)
    return (f"{gflop:.0f} GFLOP per pass: fp32 {gflop / fp32_seconds:.0f} GFLOP/s against a large fp32 product's "
            f"{peak32:.0f} ({gflop / fp32_seconds / peak32:.0%}); bf16 {gflop / bf16_seconds:.0f} against a bf16 "
            f"product's {peak16:.0f} ({gflop / bf16_seconds / peak16:.0%})")


def time_paths(problem: wq.QuantProblem, bf16_problem: wq.QuantProblem, plan, repeats: int) -> dict:
    """Median seconds of one proxy pass with ``plan`` (assembly included) on each path, interleaved."""
    import time

    import torch

    from windquant_gym.compute.kernels import proxy_precision
    from windquant_gym.eval.perplexity import token_losses
    from windquant_gym.quant.apply import WeightAssembler, quantized_weights

    float32_buffers = WeightAssembler(problem.model, problem.table)  # the bf16 pass before bf16 buffers

    def autocast_over_float32():
        with quantized_weights(problem.model, problem.table, plan, float32_buffers), \
                proxy_precision(next(problem.model.parameters()).device, "bfloat16"):
            return token_losses(problem.model, problem.blocks, problem.batch_size).nll

    paths = {"float32": lambda: problem.proxy_nll(plan), "bf16 (autocast over float32 buffers)": autocast_over_float32,
             "bf16 (bf16 buffers)": lambda: bf16_problem.proxy_nll(plan)}
    seconds = {name: [] for name in paths}
    for name, run in paths.items():
        run()  # warm-up: buffers, lazy inits
    assert paths["bf16 (bf16 buffers)"]() == autocast_over_float32()  # the same bf16 weights, the same NLL
    for _ in range(repeats):
        for name, run in paths.items():
            t = time.perf_counter()
            with torch.no_grad():
                run()
            seconds[name].append(time.perf_counter() - t)
    return {name: statistics.median(values) for name, values in seconds.items()}


def neighbours_of(plan: np.ndarray, problem: wq.QuantProblem, count: int, seed: int = 0):
    """``count`` distinct plans 1-3 swaps away from ``plan``: two units of the same shape exchange
    their actions, so the bits stay exactly the same."""
    rng = np.random.default_rng(seed)
    shapes = np.array([hash((u.out_features, u.width)) for u in problem.units])
    seen, out = {tuple(plan)}, []
    while len(out) < count:
        child = plan.copy()
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(plan)))
            alike = np.flatnonzero((shapes == shapes[i]) & (child != child[i]))
            if alike.size:
                j = int(rng.choice(alike))
                child[i], child[j] = child[j], child[i]
        if tuple(child) not in seen:
            seen.add(tuple(child))
            out.append(child)
    return out


def rank_neighbours(problem: wq.QuantProblem, bf16_problem: wq.QuantProblem, start: np.ndarray, count: int) -> None:
    """How often the bf16 proxy agrees with float32 on whether a neighbour beats its start."""
    base = {"fp32": problem.proxy_nll(start), "bf16": bf16_problem.proxy_nll(start)}
    deltas = []
    for child in neighbours_of(start, problem, count):
        deltas.append((problem.proxy_nll(child) - base["fp32"], bf16_problem.proxy_nll(child) - base["bf16"]))
    d = np.array(deltas)  # NLL change against the start: [fp32, bf16]
    agree = np.sign(d[:, 0]) == np.sign(d[:, 1])
    print(f"\n{count} neighbours of the calibrated knapsack's plan (start proxy PPL fp32 {math.exp(base['fp32']):.2f}, "
          f"bf16 {math.exp(base['bf16']):.2f}); NLL changes' correlation {np.corrcoef(d[:, 0], d[:, 1])[0, 1]:.4f}")
    print(f"{'|fp32 PPL change|':>20} {'neighbours':>11} {'same verdict':>13} {'better (fp32)':>14}")
    gap = np.abs(np.expm1(d[:, 0]))
    for low, high in ((0, 0.001), (0.001, 0.003), (0.003, 0.01), (0.01, np.inf)):
        rows = (gap >= low) & (gap < high)
        if rows.any():
            print(f"{f'{low:.1%}-{high:.1%}':>20} {int(rows.sum()):11d} {agree[rows].mean():13.1%} {(d[rows, 0] < 0).mean():14.1%}")
    print(f"{'all':>20} {len(d):11d} {agree.mean():13.1%} {(d[:, 0] < 0).mean():14.1%}")


if __name__ == "__main__":
    wq.keep_freed_memory()  # our process: reuse freed memory (windquant_gym/compute/process.py)
    main()
