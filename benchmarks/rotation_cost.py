"""What the rotated frame (``QuantConfig.rotation="hadamard"``, issue 26) costs an episode, side by
side in one process: the plan's weight assembly and a whole proxy pass, with and without the
rotation, on the same plan (each table's calibrated knapsack would differ; one plan keeps the
work the same), alternating.

    python benchmarks/rotation_cost.py --model smollm2-135m --preset cpu --repeats 5

The rotated table restores each quantized unit as ``Q R^T`` (one ``[O, G] x [G, G]`` product per
unit and assembly); the proxy's forward is the same either way. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import windquant_gym as wq
from windquant_gym.agents import load_hyperparams
from windquant_gym.compute.process import cpu_name
from windquant_gym.envs.windquant import quant_config_from_kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu", help="hyperparams.yml block whose env_kwargs define the problem")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env_kwargs = load_hyperparams(args.preset)["env_kwargs"]
    model, tokenizer = wq.load_model(args.model)
    base = quant_config_from_kwargs(env_kwargs["chunk_size"], env_kwargs.get("salient_rate", 0.03),
                                    env_kwargs.get("quant_config") or {})
    problems = {}
    for rotation in ("none", "hadamard"):
        problems[rotation] = wq.QuantProblem.build(
            model, tokenizer, "wiki-sample", dataclasses.replace(base, rotation=rotation),
            n_samples=env_kwargs["n_calibration_samples"], seq_len=env_kwargs["calibration_seq_len"],
            seed=int(env_kwargs.get("seed", 0)), progress=False)
    n_units = len(problems["none"].units)
    one = [3 if i % 2 else 4 for i in range(n_units)]  # 3 and 2 bit alternating: every unit quantized
    other = [4 if i % 2 else 3 for i in range(n_units)]  # every unit's action differs from `one`'s
    some = list(one)
    for i in torch.randperm(n_units, generator=torch.Generator().manual_seed(0))[: n_units // 10].tolist():
        some[i] = 2  # a tenth of the units at 4 bit: what a search's step or the next episode changes, roughly
    print(f"{args.model}, {n_units} units, plans: 3 and 2 bit alternating, {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = {"assembly, every unit changed": (one, other), "assembly, a tenth of the units changed": (one, some),
            "proxy pass, every unit changed (assembly included)": (one, other)}
    times = {(row, r): [] for row in rows for r in problems}
    for _ in range(args.repeats):
        for row, plans in rows.items():
            for rotation, problem in problems.items():
                problem.assembler().assemble(plans[1])  # untimed: the buffers hold the row's other plan
                for plan in plans:  # each call follows the other plan: what changed between them is rewritten
                    started = time.perf_counter()
                    if row.startswith("proxy"):
                        problem.proxy_nll(plan)
                    else:
                        problem.assembler().assemble(plan)
                    times[(row, rotation)].append(time.perf_counter() - started)
    for row in rows:
        none, rotated = statistics.median(times[(row, "none")]), statistics.median(times[(row, "hadamard")])
        print(f"{row:52} unrotated {none:7.3f} s   rotated {rotated:7.3f} s   ratio {rotated / none:.2f}x "
              f"(median of {2 * args.repeats})")


if __name__ == "__main__":
    wq.keep_freed_memory()
    main()
