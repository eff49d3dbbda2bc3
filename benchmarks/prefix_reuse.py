"""What starting each proxy pass at the first changed decoder layer (``QuantProblem.reuse_prefix``,
issue 21) saves a search, side by side in one process: the same search (same start, seed and
budget) with the store and without, alternating, on one problem.

    python benchmarks/prefix_reuse.py --model smollm2-135m --preset cpu --evaluations 24 --repeats 2

Prints the share of decoder-layer runs the store skipped (a count: the same on any machine), the
search's wall time each way (medians) and their ratio, and checks that both searches measured the
same fitness at every generation and returned the same plan (the store changes no float).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import gymnasium as gym
import numpy as np
import torch

import windquant_gym as wq
from windquant_gym.agents import load_hyperparams
from windquant_gym.allocators import ProxyFitness, SearchConfig, evolve
from windquant_gym.allocators.calibrated_knapsack import calibrated_knapsack
from windquant_gym.compute.process import cpu_name
from windquant_gym.envs.windquant import quant_config_from_kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu", help="hyperparams.yml block whose env_kwargs define the problem")
    parser.add_argument("--target-bits", type=float, default=2.0)
    parser.add_argument("--evaluations", type=float, default=24, help="the search's budget in full proxy passes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env_kwargs = load_hyperparams(args.preset)["env_kwargs"]
    model, tokenizer = wq.load_model(args.model)
    config = quant_config_from_kwargs(env_kwargs["chunk_size"], env_kwargs.get("salient_rate", 0.03),
                                      env_kwargs.get("quant_config") or {})
    problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", config, n_samples=env_kwargs["n_calibration_samples"],
                                    seq_len=env_kwargs["calibration_seq_len"], seed=int(env_kwargs.get("seed", 0)),
                                    progress=False)
    env = gym.make("WindQuant-v0", model=model, problem=problem, target_bits=args.target_bits).unwrapped
    start = np.asarray(calibrated_knapsack("calibrated-knapsack").make_plan(env), dtype=np.int64)
    search = SearchConfig(evaluations=args.evaluations)
    print(f"{args.model}, preset {args.preset}, {len(problem.units)} units, search from the calibrated knapsack at "
          f"{args.target_bits} bits, {args.evaluations:g} evaluations, seed {args.seed}; {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    seconds = {True: [], False: []}
    results = {}
    shares = []
    for _ in range(args.repeats):
        for reuse in (True, False):
            view = dataclasses.replace(problem, reuse_prefix=reuse)  # its own store, empty
            result = evolve(start, ProxyFitness(view, "nll"), env.table.unit_effective_bits, env.rule_mask,
                            env.budget_bits, search, seed=args.seed, stored=env.table.stored_action, progress=False)
            seconds[reuse].append(result.seconds)
            results[reuse] = result
            if reuse:
                store = view._prefix
                shares.append(store.layers_skipped / max(1, store.layers_skipped + store.layers_run))
    same = (np.array_equal(results[True].plan, results[False].plan) and results[True].history == results[False].history)
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"decoder-layer runs skipped: {statistics.median(shares):.1%} "
          f"({results[True].generations} generations, {results[True].offspring} offspring)")
    print(f"search seconds, store on: {on:.1f}  off: {off:.1f}  ratio on/off: {on / off:.3f} "
          f"(medians of {args.repeats}, alternating)")
    print(f"same fitness at every generation and the same plan: {same}")
    if not same:
        raise SystemExit("the store changed a measurement: a bug")


if __name__ == "__main__":
    main()
