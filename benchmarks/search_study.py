"""How far the search goes, and how much of its proxy gain reaches held-out text.

Runs the search (windquant_gym.allocators.SearchAllocator's ``evolve``) from the knapsack's plan
on the env of a preset, once per (target, fitness, seed, fitness tokens) at the largest budget,
and records the plan it held at every smaller budget (what a run with that budget returns).
Every plan is then measured on the proxy (NLL and KL on the env's calibration blocks) and on
held-out text (wiki-sample eval windows); the search itself never sees the held-out text.

    python benchmarks/search_study.py --targets 3.0 2.5 2.0 --fitness nll --seeds 0 \\
        --evaluations 100 300 1000 --out benchmarks/results/search_study.jsonl
    python benchmarks/search_study.py --targets 2.5 2.0 --fitness nll --seeds 0 --evaluations 300 \\
        --tokens 64 --out benchmarks/results/search_study.jsonl      # fitness on 64 other calibration blocks
    python benchmarks/search_study.py --summary benchmarks/results/search_study.jsonl

Rows are appended to ``--out`` as they finish (one JSON object per plan); a rerun skips the runs
already there, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from windquant_gym.compute.process import cpu_name




def _run_key(row) -> tuple:
    return (row["target_bits"], row["fitness"], row["seed"], row["fitness_tokens"], row["budget"])


def run(args) -> None:
    import gymnasium as gym
    import numpy as np
    import torch

    import windquant_gym as wq
    from windquant_gym.agents.hyperparams import load_hyperparams
    from windquant_gym.allocators import KnapsackAllocator, ProxyFitness, SearchConfig, evolve
    from windquant_gym.data import eval_windows, load_texts, sample_token_blocks
    from windquant_gym.eval.perplexity import perplexity

    wq.keep_freed_memory()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_run_key(json.loads(line)) for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    hp = load_hyperparams(args.preset)
    env_kwargs = {k: v for k, v in hp["env_kwargs"].items() if k != "seed"}
    env = gym.make("WindQuant-v0", model=args.model, seed=args.calibration_seed, **env_kwargs).unwrapped
    problem = env.problem
    held_out = eval_windows(load_texts("wiki-sample", split="eval"), problem.tokenizer, 256, args.eval_windows)
    other = None
    if args.tokens:  # other calibration text than the proxy's, from the same (calibration) split
        other = sample_token_blocks(load_texts("wiki-sample", split="calibration"), problem.tokenizer, args.tokens,
                                    problem.blocks.shape[1], seed=args.calibration_seed + 1000)
        shared = sum(bool((other == block).all(dim=1).any()) for block in problem.blocks)
        print(f"fitness on {args.tokens} other blocks ({other.numel()} tokens; {shared} of them also proxy blocks)")
    tokens_label = "proxy" if other is None else f"{other.numel()} other"

    def measure(plan):
        losses = problem.proxy_losses(plan, kl=True)
        with wq.quantized_weights(problem.model, problem.table, plan):
            heldout = perplexity(problem.model, held_out, batch_size=problem.batch_size)
        bits = problem.table.plan_bits(plan)
        return {"proxy_ppl": math.exp(losses.nll), "proxy_kl": losses.kl, "heldout_ppl": heldout, **bits}

    budgets = sorted(args.evaluations)
    common = {"model": args.model, "preset": args.preset, "calibration_seed": args.calibration_seed,
              "heldout_tokens": int(held_out.numel()), "cpu": cpu_name(), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    for target in args.targets:
        env.set_target_bits(target)
        env.reset()
        start = KnapsackAllocator().make_plan(env)
        start_row = None
        for fitness_name in args.fitness:
            for seed in args.seeds:
                keys = [(target, fitness_name, seed, tokens_label, b) for b in budgets]
                if all(k in done for k in keys):
                    continue
                if start_row is None:
                    start_row = measure(start)
                    print(f"target {target}: knapsack proxy {start_row['proxy_ppl']:.2f}, held-out {start_row['heldout_ppl']:.2f}")
                fitness = ProxyFitness(problem, fitness_name, other)
                config = SearchConfig(evaluations=budgets[-1], fitness=fitness_name)
                result = evolve(start, fitness, env.table.unit_effective_bits, env.rule_mask, env.budget_bits, config,
                                seed=seed, stored=env.table.stored_action, snapshot_at=budgets[:-1], progress=True)
                marks = {**result.snapshots, budgets[-1]: {"plan": result.plan, "fitness": result.fitness,
                                                           "evaluations": result.evaluations, "seconds": result.seconds}}
                for budget in budgets:
                    mark = marks[budget]
                    row = {**common, "target_bits": target, "fitness": fitness_name, "seed": seed,
                           "fitness_tokens": tokens_label, "budget": budget, "evaluations": mark["evaluations"],
                           "search_seconds": mark["seconds"], "fitness_value": mark["fitness"],
                           "start_fitness": result.start_fitness, "generations_total": result.generations,
                           "accepted_total": result.accepted, "knapsack": start_row, **measure(mark["plan"]),
                           "plan": np.asarray(mark["plan"]).tolist(), "search_config": config.to_dict()}
                    with out.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"target {target} {fitness_name} seed {seed} {tokens_label} @{budget}: proxy "
                          f"{row['proxy_ppl']:.2f} (knapsack {start_row['proxy_ppl']:.2f}), held-out {row['heldout_ppl']:.2f} "
                          f"(knapsack {start_row['heldout_ppl']:.2f}), {mark['seconds']:.0f} s", flush=True)
    env.close()


def summary(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    groups = defaultdict(list)
    for row in rows:
        groups[(row["target_bits"], row["fitness"], row["fitness_tokens"], row["budget"])].append(row)
    print(f"{len(rows)} plans from {path}; CPU: {rows[0]['cpu']}, torch {rows[0]['torch']}, {rows[0]['threads']} threads\n")
    print("| target | fitness | fitness tokens | budget | seeds | proxy PPL: knapsack -> search (median) | "
          "held-out PPL: knapsack -> search, median [min-max] | held-out change | share of the proxy gain kept | minutes (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (target, fitness, tokens, budget), members in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        knapsack = members[0]["knapsack"]
        proxy = statistics.median(m["proxy_ppl"] for m in members)
        held = [m["heldout_ppl"] for m in members]
        median = statistics.median(held)
        proxy_gain = math.log(knapsack["proxy_ppl"] / proxy)
        held_gain = math.log(knapsack["heldout_ppl"] / median)
        kept = f"{held_gain / proxy_gain:.0%}" if proxy_gain > 0 else "-"
        minutes = statistics.median(m["search_seconds"] for m in members) / 60
        print(f"| {target} | {fitness} | {tokens} | {budget:g} | {len(members)} | {knapsack['proxy_ppl']:.2f} -> {proxy:.2f} | "
              f"{knapsack['heldout_ppl']:.2f} -> {median:.2f} [{min(held):.2f}-{max(held):.2f}] | "
              f"{median / knapsack['heldout_ppl'] - 1:+.1%} | {kept} | {minutes:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--calibration-seed", type=int, default=0, help="the env's seed: which calibration blocks")
    parser.add_argument("--targets", type=float, nargs="+", default=[3.0, 2.5, 2.0])
    parser.add_argument("--fitness", nargs="+", default=["nll"], choices=["nll", "kl"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--evaluations", type=float, nargs="+", default=[100, 300], help="budgets; one run at the largest")
    parser.add_argument("--tokens", type=int, default=0,
                        help="measure the fitness on this many other calibration blocks (0: the proxy's own blocks)")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/search_study.jsonl")
    parser.add_argument("--summary", metavar="JSONL", help="print the tables of a finished study and exit")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        started = time.perf_counter()
        run(args)
        print(f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
