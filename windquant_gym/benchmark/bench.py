"""``windquant bench``: every allocator on the same env, at several budgets, one leaderboard.

    windquant bench --model smollm2-135m --preset cpu --target-bits 3.0 2.5 2.0 \\
        --allocators all --policy runs/cpu/final_model.zip --hqq --json bench/out.json

Zero-shot accuracy columns (pip install -e ".[zeroshot]"; task data must be local):

    HF_DATASETS_OFFLINE=1 windquant bench ... --zero-shot my_mc --task-dir my_tasks/ --zero-shot-limit 200
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import gymnasium as gym

from ..data import eval_windows, load_texts
from ..errors import ConfigError, UnknownNameError
from ..envs import ENV_ID
from ..eval.perplexity import perplexity
from .allocators import baseline_allocators
from .harness import run_allocator
from .leaderboard import format_table, write_leaderboard


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="windquant bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu", help="hyperparams.yml block whose env_kwargs define the env (default: %(default)s)")
    parser.add_argument("--target-bits", type=float, nargs="+", default=[3.0, 2.5, 2.0])
    parser.add_argument("--allocators", nargs="+", default=["all"], help="'all' or names: " + ", ".join(baseline_allocators()))
    parser.add_argument("--policy", action="append", default=[], help="a saved SB3 model (.zip); MaskablePPO gets masks")
    parser.add_argument("--plan", action="append", default=[], help="a saved plan JSON to replay and validate")
    parser.add_argument("--random-episodes", type=int, default=3, help="episodes of the random allocator")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows spread over the wiki-sample eval split")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--hqq", action="store_true", help="add HQQ uniform rows (pip install hqq)")
    parser.add_argument("--hqq-settings", nargs="+", metavar="BITS:GROUP",
                        help="HQQ settings, e.g. 4:64 3:64 2:64 (default: 4:64 4:128 3:64 3:128 2:32 2:64)")
    parser.add_argument("--zero-shot", nargs="+", metavar="TASK", default=None,
                        help="lm-eval task names: add each task's main metric as a column, for the unquantized row and "
                             "every plan (HQQ rows: '-'); needs pip install -e \".[zeroshot]\" and the tasks' data present locally")
    parser.add_argument("--zero-shot-limit", type=int, default=None, metavar="N", help="at most N documents per zero-shot task")
    parser.add_argument("--zero-shot-batch-size", type=int, default=8, metavar="N")
    parser.add_argument("--task-dir", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAML files (local data) for --zero-shot; repeatable")
    parser.add_argument("--json", default="bench/leaderboard.json", help="output; .csv and .md are written beside it")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _load_policy(path: str):
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import A2C, DQN, PPO

    for algorithm in (MaskablePPO, PPO, A2C, DQN):
        try:
            return algorithm.load(path, device="cpu")
        except Exception:  # the zip names its class only implicitly: try the known ones
            continue
    raise ConfigError(f"--policy {path}: not a saved MaskablePPO, PPO, A2C or DQN model (a .zip from model.save()); "
                      "pass e.g. runs/cpu/final_model.zip.")


def main(argv: Optional[List[str]] = None) -> int:
    from ..agents.hyperparams import load_hyperparams

    args = build_parser().parse_args(argv)
    if args.zero_shot:
        from .zeroshot import require_lm_eval

        require_lm_eval()  # fail before the env is built when lm-eval is missing
    elif args.task_dir or args.zero_shot_limit is not None:
        raise ConfigError("--task-dir and --zero-shot-limit go with --zero-shot TASK [TASK ...].")
    hp = load_hyperparams(args.preset)
    env = gym.make(ENV_ID, model=args.model, seed=args.seed, **hp["env_kwargs"])
    problem = env.unwrapped.problem
    held_out = eval_windows(load_texts("wiki-sample", split="eval"), problem.tokenizer, args.eval_seq_len, args.eval_windows)
    baselines = baseline_allocators(args.seed)
    names = list(baselines) if "all" in args.allocators else args.allocators
    unknown = [n for n in names if n not in baselines]
    if unknown:
        raise UnknownNameError(f"Unknown allocators {unknown}; choose from {list(baselines)} or 'all'.")
    allocators: Dict[str, object] = {n: baselines[n] for n in names}
    for path in args.policy:
        model = _load_policy(path)
        label = type(model).__name__ if len(args.policy) == 1 else f"{type(model).__name__} ({Path(path).parent.name})"
        allocators[label] = model
    rows = []
    zero_shot_columns: List[str] = []

    def scored(row: Dict[str, Any], plan=None) -> Dict[str, Any]:
        """``row`` with the zero-shot columns of ``plan`` (None: the unquantized model)."""
        if args.zero_shot:
            columns = _zero_shot_columns(problem, args, plan)
            zero_shot_columns.extend(c for c in columns if c not in zero_shot_columns)
            row.update(columns)
            print(f"{row['allocator']:14} zero-shot: " + ", ".join(f"{k} {v:.3f}" for k, v in columns.items()), flush=True)
        return row

    started = time.perf_counter()
    rows.append(scored({"allocator": "unquantized", "target_bits": None, "effective_bits": 16.0, "storage_bits": 16.0,
                        "proxy_ppl": problem.baseline_ppl, "heldout_ppl": perplexity(problem.model, held_out),
                        "seconds": 0.0, "fallbacks": 0, "episode": 0}))
    for target in args.target_bits:
        env.unwrapped.set_target_bits(target)
        for name, allocator in allocators.items():
            episodes = args.random_episodes if name == "random" else 1
            for result in run_allocator(env, allocator, episodes=episodes, heldout=held_out, name=name):
                print(f"{name:14} target {target}: {result.effective_bits:.3f} b (storage {result.storage_bits:.3f}), "
                      f"proxy {result.proxy_ppl:.2f}, held-out {result.heldout_ppl:.2f}, {result.seconds:.1f} s", flush=True)
                rows.append(scored(result.row(), result.plan))
    for path in args.plan:
        env.unwrapped.set_target_bits(math.ceil(_plan_bits(path) * 1e6) / 1e6)
        for result in run_allocator(env, path, heldout=held_out):
            rows.append(scored(result.row(), result.plan))
    if args.hqq:
        from .peers import hqq_rows

        settings = [tuple(int(x) for x in s.split(":")) for s in args.hqq_settings] if args.hqq_settings else None
        for row in hqq_rows(problem.model, problem.blocks, held_out, **({"settings": settings} if settings else {})):
            rows.append({"target_bits": None, **row})
    meta = {"model": args.model, "preset": args.preset, "env_kwargs": hp["env_kwargs"], "proxy_dtype": problem.proxy_dtype,
            "heldout_tokens": int(held_out.numel()), "seconds": time.perf_counter() - started}
    if args.zero_shot:
        meta["zero_shot"] = {"tasks": args.zero_shot, "limit": args.zero_shot_limit, "task_dirs": args.task_dir,
                             "columns": zero_shot_columns}
    paths = write_leaderboard(rows, args.json, meta, extra=zero_shot_columns)
    print()
    print(format_table(rows, extra=zero_shot_columns))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    env.close()
    return 0


def _zero_shot_columns(problem, args, plan=None) -> Dict[str, float]:
    """``{"task/metric": value}``: the main metric of every task lm-eval reports for ``args.zero_shot``."""
    from .zeroshot import main_metric, zero_shot

    results = zero_shot(problem.model, problem.tokenizer, args.zero_shot, plan=plan,
                        table=problem.table if plan is not None else None, limit=args.zero_shot_limit,
                        batch_size=args.zero_shot_batch_size, task_dirs=args.task_dir or None)
    columns = {}
    for task, metrics in results.items():
        metric, value = main_metric(metrics)
        columns[f"{task}/{metric}"] = value
    return columns


def _plan_bits(path: str) -> float:
    from ..plan import QuantPlan

    return float(QuantPlan.load(path).metrics.get("target_bits", 16.0))
