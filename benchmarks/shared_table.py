"""Parallel envs share one quantization table (issue 24, part 5).

    python benchmarks/shared_table.py --model smollm2-135m --preset cpu --json shared.json

On the CPU the table is read from the cache memory-mapped (safetensors maps the file; the
process that builds it reads it back the same way), so ``SubprocVecEnv`` workers and sweep
runs on one machine hold one copy of its pages between them. Three layouts, each after one
full episode in every worker, memory read from each worker's ``/proc/PID/smaps_rollup``:

alone     1 worker
shared    N workers, the table mapped from the cache file (what the package does)
private   N workers, each with the table copied into memory of its own (what it would cost
          without the mapping)

Printed per layout: each worker's RSS (counts a shared page in every process that maps it),
PSS (a shared page split between its mappers: the sum is the machine's real cost), private
bytes (USS), and the sums against one worker's. The model's own float32 weights are private
to each worker in every layout (each loads the model), so the sum cannot fall to one worker's.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List


def smaps_rollup(pid: int) -> Dict[str, int]:
    """``Rss``, ``Pss``, private and shared bytes of process ``pid``."""
    fields: Dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0),
            "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
            "shared": fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0)}


def make_env(model: str, env_kwargs: Dict, private: bool):
    def thunk():
        import gymnasium as gym

        import windquant_gym  # noqa: F401  (registers WindQuant-v0 in the worker)

        env = gym.make("WindQuant-v0", model=model, progress=False, **env_kwargs)
        if private:  # what every worker would hold without the mapping: a copy of its own, tensor by tensor
            import gc

            import numpy as np

            from windquant_gym.quant.table import _ARRAYS

            table = env.unwrapped.table
            for kind in ("codes", "scales", "outlier_index", "outlier_codes", "outlier_scales"):
                setattr(table, kind, {name: tensor.clone() for name, tensor in getattr(table, kind).items()})
            for key in _ARRAYS:  # these too are views of the file's pages
                setattr(table, key, np.array(getattr(table, key), copy=True))
            gc.collect()  # nothing refers to the mapping any more: it is unmapped (checked below)
        return env

    return thunk


def run_layout(model: str, env_kwargs: Dict, workers: int, private: bool) -> List[Dict[str, int]]:
    import numpy as np
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = SubprocVecEnv([make_env(model, env_kwargs, private) for _ in range(workers)])
    try:
        vec.reset()
        done = np.zeros(workers, dtype=bool)
        while not done.all():  # every worker plays one whole episode (the last action allowed)
            masks = vec.env_method("action_masks")
            actions = np.array([int(np.flatnonzero(m)[-1]) for m in masks])
            _, _, dones, _ = vec.step(actions)
            done |= dones
        samples = [smaps_rollup(process.pid) for process in vec.processes]
        for sample, process in zip(samples, vec.processes):
            with open(f"/proc/{process.pid}/maps") as handle:
                sample["table_mapped"] = any("/tables/" in line for line in handle)
        return samples
    finally:
        vec.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu", help="block of agents/hyperparams.yml whose env_kwargs are used")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.workers < 2:
        raise SystemExit(f"--workers must be at least 2 to share anything, got {args.workers}.")
    from windquant_gym.agents import load_hyperparams
    from windquant_gym.compute.process import cpu_name

    env_kwargs = dict(load_hyperparams(args.preset)["env_kwargs"])
    # the table is built (or found) first, in a worker of its own, so that every layout reads it from
    # the cache and this process maps nothing a worker's PSS would be split with
    run_layout(args.model, env_kwargs, 1, private=False)
    layouts = {"alone": run_layout(args.model, env_kwargs, 1, private=False),
               "shared": run_layout(args.model, env_kwargs, args.workers, private=False),
               "private": run_layout(args.model, env_kwargs, args.workers, private=True)}
    one = layouts["alone"][0]
    print(f"{args.model}, preset {args.preset}, {args.workers} workers; {cpu_name()}, {os.cpu_count()} cores")
    print(f"{'layout':8s} {'worker RSS GiB':>22s} {'sum RSS':>8s} {'sum PSS':>8s} {'sum private':>12s}   "
          f"sum PSS / one worker's")
    for name, samples in layouts.items():
        rss = " / ".join(f"{s['rss'] / 2**30:.2f}" for s in samples)
        total = {k: sum(s[k] for s in samples) for k in ("rss", "pss", "private")}
        print(f"{name:8s} {rss:>22s} {total['rss'] / 2**30:8.2f} {total['pss'] / 2**30:8.2f} "
              f"{total['private'] / 2**30:12.2f}   {total['pss'] / one['pss']:.2f}")
    print("table file mapped: " + ", ".join(f"{name} {[s['table_mapped'] for s in samples]}" for name, samples in layouts.items()))
    shared = sum(s["pss"] for s in layouts["shared"])
    private = sum(s["pss"] for s in layouts["private"])
    print(f"shared over private (sum PSS): {shared / private:.2f}; saved {(private - shared) / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "preset": args.preset, "workers": args.workers,
                                               "cpu": cpu_name(), "layouts": layouts}, indent=1))


if __name__ == "__main__":
    main()
