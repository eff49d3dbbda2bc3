"""``windquant bench``: every allocator on the same env, at several budgets, one leaderboard.

    windquant bench --model smollm2-135m --preset cpu --target-bits 3.0 2.5 2.0 \\
        --allocators all --policy runs/cpu/final_model.zip --hqq --json bench/out.json

Every row's plan is saved as a plan file in a folder beside the JSON (``out_plans/``, named in
the leaderboard's ``plan`` column): ``windquant export PLAN --out DIR`` packs it.

The search (``search``, ``search-nll``, ``search-kl``) runs once per seed at the largest
``--evaluations`` budget; the rows of smaller budgets are the plans it held when it had spent
them, which is what a run with that budget returns.

Zero-shot accuracy columns (pip install -e ".[zeroshot]"; task data must be local):

    HF_DATASETS_OFFLINE=1 windquant bench ... --zero-shot my_mc --task-dir my_tasks/ --zero-shot-limit 200
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import gymnasium as gym

from ..data import eval_windows, load_texts, validation_blocks
from ..errors import ConfigError, UnknownNameError
from ..envs import ENV_ID
from ..eval.divergence import PROXY_METRICS
from ..plan import QuantPlan
from ..allocators.base import PlannedAllocator
from ..allocators.calibrated_knapsack import CALIBRATED_KNAPSACKS
from ..allocators.registry import baseline_allocators
from ..allocators.search import SearchAllocator, SearchConfig
from .episodes import EpisodeResult, as_allocator, heldout_window_nlls, run_allocator
from .leaderboard import add_comparisons, format_table, write_leaderboard

SEARCH_FITNESS = {"search": SearchConfig().fitness, "search-nll": "nll", "search-kl": "kl"}
"""Search allocator names and their fitness (``search``: the default's)."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of evaluations (full proxy passes), e.g. 300") from None
    if not (value >= 1 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"evaluations must be at least 1 (the start plan's own pass), got {text}")
    return value


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (a non-negative integer)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="windquant bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu", help="hyperparams.yml block whose env_kwargs define the env (default: %(default)s)")
    parser.add_argument("--target-bits", type=float, nargs="+", default=[3.0, 2.5, 2.0])
    parser.add_argument("--allocators", nargs="+", default=["all"],
                        help="'all' (the baselines and 'search') or names: " + ", ".join([*baseline_allocators(), *SEARCH_FITNESS])
                             + f"; 'search' is the search with the default fitness ({SearchConfig().fitness}), whatever "
                               "--proxy-metric says")
    parser.add_argument("--evaluations", type=_positive_float, nargs="+", default=[SearchConfig().evaluations], metavar="N",
                        help="the search's budget(s) in full proxy passes, the start plan's included; one row per budget "
                             "(compare a policy trained for E episodes at E + 1) (default: %(default)s)")
    parser.add_argument("--search-start", default="knapsack", choices=("knapsack", *CALIBRATED_KNAPSACKS, "heuristic"),
                        help="the plan the search starts from; a start that spends proxy passes (the calibrated knapsack's "
                             "7) spends them out of --evaluations, so a budget is passes in all, as for a training run "
                             "(default: %(default)s)")
    parser.add_argument("--search-seeds", type=_seed, nargs="+", default=[0], metavar="S",
                        help="seeds of the search; a row per seed, the leaderboard shows the median (default: 0)")
    parser.add_argument("--proxy-metric", choices=PROXY_METRICS,
                        help="what the env measures every plan by (reward and leaderboard): 'nll' (the paper) or 'kl' to the "
                             "unquantized model; default: the preset's (nll)")
    parser.add_argument("--policy", action="append", default=[], help="a saved SB3 model (.zip); MaskablePPO gets masks")
    parser.add_argument("--plan", action="append", default=[], help="a saved plan JSON to replay and validate")
    parser.add_argument("--random-episodes", type=int, default=3, help="episodes of the random allocator")
    parser.add_argument("--eval-windows", type=int, default=128,
                        help="held-out windows spread over the wiki-sample eval split; every plan is compared with the "
                             "calibrated knapsack (else the knapsack) at its target by a paired bootstrap over them "
                             "(default: %(default)s)")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-split", choices=("eval", "validation"), default="eval",
                        help="where the held-out windows come from: 'eval', the wiki-sample eval split (what results "
                             "report); 'validation', the calibration text's validation split (its last fifth, no proxy "
                             "block in it: windquant_gym.data.validation_blocks), where settings are chosen "
                             "(default: %(default)s)")
    parser.add_argument("--hqq", action="store_true", help="add HQQ uniform rows (pip install hqq)")
    parser.add_argument("--hqq-settings", nargs="+", metavar="BITS:GROUP",
                        help="HQQ settings, e.g. 4:64 3:64 2:64 (default: 4:64 4:128 3:64 3:128 2:32 2:64)")
    parser.add_argument("--gptq", action="store_true",
                        help="add GPTQ uniform rows (llm-compressor, calibrated on the proxy's blocks; "
                             "pip install llmcompressor)")
    parser.add_argument("--gptq-settings", nargs="+", metavar="BITS:GROUP",
                        help="GPTQ settings, e.g. 3:64 2:64 (default: 3:64 2:64); the group must divide every decoder "
                             "Linear's in_features (not 128 on SmolLM2)")
    parser.add_argument("--zero-shot", nargs="+", metavar="TASK", default=None,
                        help="lm-eval task names: add each task's main metric as a column, for the unquantized row and "
                             "every plan (HQQ rows: '-'); needs pip install -e \".[zeroshot]\" and the tasks' data present locally")
    parser.add_argument("--zero-shot-limit", type=int, default=None, metavar="N", help="at most N documents per zero-shot task")
    parser.add_argument("--zero-shot-batch-size", type=int, default=8, metavar="N")
    parser.add_argument("--task-dir", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAML files (local data) for --zero-shot; repeatable")
    parser.add_argument("--json", default="bench/leaderboard.json",
                        help="output; .csv and .md are written beside it, and every row's plan in a folder <name>_plans/")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (table build, calibration, the search): for logs and CI")
    parser.add_argument("--seed", type=int, default=None,
                        help="calibration seed: picks the proxy's text (default: the preset's env_kwargs.seed, else 0); "
                             "also seeds the random allocator")
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


def _policy_view(env, model, path: str):
    """``(env as the policy saw it in training, the policy as an allocator)``: its run folder's
    ``config.json`` names the observation (a policy saved elsewhere is taken to see the env's
    own), its ``summary.json`` the proxy passes a warm start spent besides the episodes and
    those the episodes spent."""
    import json

    from ..agents.policy_view import wrap_observation

    config = Path(path).parent / "config.json"
    summary = Path(path).parent / "summary.json"
    allocator = as_allocator(model)
    if summary.exists():
        ran = json.loads(summary.read_text())
        allocator.extra_evaluations = float((ran.get("warm_start") or {}).get("evaluations", 0))
        if ran.get("training_evaluations") is not None:  # what the episodes really spent (racing: less than one each)
            allocator.training_evaluations = float(ran["training_evaluations"])
    hp = json.loads(config.read_text())["hyperparams"] if config.exists() else {}
    view = wrap_observation(env, hp)
    expected, got = model.observation_space.shape, view.observation_space.shape
    if expected != got:
        raise ConfigError(
            f"--policy {path} was trained on observations of shape {expected}, but this env gives {got}"
            f"{' (no config.json beside the policy to say which observation it saw)' if not config.exists() else ''}: "
            "keep the run folder's config.json beside the .zip (windquant train writes it), or pass a policy trained "
            "on WindQuant-v0's own observation."
        )
    return view, allocator


def main(argv: Optional[List[str]] = None) -> int:
    from ..agents.hyperparams import load_hyperparams

    args = build_parser().parse_args(argv)
    if args.zero_shot:
        from .zeroshot import require_lm_eval

        require_lm_eval()  # fail before the env is built when lm-eval is missing
    elif args.task_dir or args.zero_shot_limit is not None:
        raise ConfigError("--task-dir and --zero-shot-limit go with --zero-shot TASK [TASK ...].")
    if args.gptq:
        from .gptq_peer import require_llmcompressor

        require_llmcompressor()  # fail before the env is built when llm-compressor is missing
    hp = load_hyperparams(args.preset)
    env_kwargs = {k: v for k, v in hp["env_kwargs"].items() if k != "seed"}
    seed = args.seed if args.seed is not None else int(hp["env_kwargs"].get("seed", 0))
    baselines = baseline_allocators(seed)
    requested = [n for a in args.allocators for n in ([*baselines, "search"] if a == "all" else [a])]
    unknown = [n for n in requested if n not in baselines and n not in SEARCH_FITNESS]
    if unknown:
        raise UnknownNameError(f"Unknown allocators {unknown}; choose from {[*baselines, *SEARCH_FITNESS]} or 'all'.")
    # "search" is the default fitness's search: one run however it is named
    names = list(dict.fromkeys(f"search-{SEARCH_FITNESS[n]}" if n in SEARCH_FITNESS else n for n in requested))
    policies = {}
    for path in args.policy:
        model = _load_policy(path)
        label = type(model).__name__ if len(args.policy) == 1 else f"{type(model).__name__} ({Path(path).parent.name})"
        policies[f"{type(model).__name__} ({path})" if label in policies else label] = model
    env_kwargs.update({"proxy_metric": args.proxy_metric} if args.proxy_metric else {})
    env = gym.make(ENV_ID, model=args.model, seed=seed, progress=args.progress, **env_kwargs)
    problem = env.unwrapped.problem
    policy_views = {label: _policy_view(env, model, path) for (label, model), path in zip(policies.items(), args.policy)}
    if args.eval_split == "eval":
        held_out = eval_windows(load_texts("wiki-sample", split="eval"), problem.tokenizer, args.eval_seq_len,
                                args.eval_windows)
    else:
        spec = problem.spec
        held_out = validation_blocks(load_texts(spec.calibration, split="calibration"), problem.tokenizer,
                                     args.eval_windows, args.eval_seq_len, (spec.n_samples, spec.seq_len, spec.seed))
    json_path = Path(args.json)
    plans_dir = json_path.parent / f"{json_path.stem}_plans"
    rows: List[Dict[str, Any]] = []
    zero_shot_columns: List[str] = []

    def scored(row: Dict[str, Any], plan=None) -> Dict[str, Any]:
        """``row`` with the zero-shot columns of ``plan`` (None: the unquantized model)."""
        if args.zero_shot:
            columns = _zero_shot_columns(problem, args, plan)
            zero_shot_columns.extend(c for c in columns if c not in zero_shot_columns)
            row.update(columns)
            print(f"{row['allocator']:14} zero-shot: " + ", ".join(f"{k} {v:.3f}" for k, v in columns.items()), flush=True)
        return row

    def record(result: EpisodeResult, seed: Optional[int] = None, budget: Optional[float] = None, episodes: int = 1,
               saved: Optional[str] = None) -> None:
        print(f"{result.allocator:14} target {result.target_bits}: {result.effective_bits:.3f} b (storage "
              f"{result.storage_bits:.3f}), proxy {result.proxy_ppl:.2f}, held-out {result.heldout_ppl:.2f}, "
              f"{result.evaluations if result.evaluations is not None else '?'} evaluations, {result.seconds:.1f} s", flush=True)
        row = result.row()
        row.update({k: v for k, v in (("seed", seed), ("budget", budget)) if v is not None})
        if saved is None:
            saved = _save_plan(plans_dir, problem, row, result.plan, episodes, args)
        row["plan_file"] = os.path.relpath(Path(saved).resolve(), json_path.parent.resolve())  # read beside the JSON
        rows.append(scored(row, result.plan))

    started = time.perf_counter()
    unquantized = heldout_window_nlls(env, None, held_out)
    rows.append(scored({"allocator": "unquantized", "target_bits": None, "evaluations": None, "effective_bits": 16.0,
                        "storage_bits": 16.0, "proxy_ppl": problem.baseline_ppl,
                        "heldout_ppl": math.exp(float(unquantized.mean())), "seconds": 0.0, "fallbacks": 0, "episode": 0,
                        "heldout_window_nll": unquantized.tolist()}))
    for target in args.target_bits:
        env.unwrapped.set_target_bits(target)
        for name in names:
            if name in SEARCH_FITNESS:
                for seed in args.search_seeds:
                    label = name if args.search_start == "knapsack" else f"{name} (from {args.search_start})"
                    for budget, result in _search_rows(env, label, SEARCH_FITNESS[name], seed, args.evaluations, held_out,
                                                       args.search_start, progress=args.progress):
                        record(result, seed, budget)
                continue
            episodes = args.random_episodes if name == "random" else 1
            for result in run_allocator(env, baselines[name], episodes=episodes, heldout=held_out, name=name):
                record(result, episodes=episodes)
        for label, model in policies.items():
            view, allocator = policy_views[label]
            for result in run_allocator(view, allocator, heldout=held_out, name=label):
                record(result)
    for path in args.plan:
        env.unwrapped.set_target_bits(math.ceil(_plan_bits(path) * 1e6) / 1e6)
        for result in run_allocator(env, path, heldout=held_out):
            record(result, saved=path)
    if args.hqq:
        from .peers import hqq_rows

        settings = [tuple(int(x) for x in s.split(":")) for s in args.hqq_settings] if args.hqq_settings else None
        for row in hqq_rows(problem.model, problem.blocks, held_out, **({"settings": settings} if settings else {})):
            rows.append({"target_bits": None, "evaluations": None, **row})
    if args.gptq:
        from .gptq_peer import gptq_rows

        settings = [tuple(int(x) for x in s.split(":")) for s in args.gptq_settings] if args.gptq_settings else None
        for row in gptq_rows(problem.model, problem.blocks, held_out, **({"settings": settings} if settings else {})):
            rows.append({"target_bits": None, "evaluations": None, **row})
    meta = {"model": args.model, "preset": args.preset, "env_kwargs": env_kwargs, "proxy_dtype": problem.proxy_dtype,
            "proxy_metric": env.unwrapped.proxy_metric, "calibration_seed": seed, "search_seeds": args.search_seeds,
            "search_start": args.search_start,
            "search_configs": {n: _search_config(SEARCH_FITNESS[n], max(args.evaluations)).to_dict()
                               for n in names if n in SEARCH_FITNESS},
            "heldout_tokens": int(held_out.numel()), "heldout_split": args.eval_split,
            "plans": str(plans_dir), "seconds": time.perf_counter() - started}
    if args.zero_shot:
        meta["zero_shot"] = {"tasks": args.zero_shot, "limit": args.zero_shot_limit, "task_dirs": args.task_dir,
                             "columns": zero_shot_columns}
    add_comparisons(rows)
    paths = write_leaderboard(rows, json_path, meta, extra=zero_shot_columns)
    print()
    print(format_table(rows, extra=zero_shot_columns))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}; plans in {plans_dir}/ (windquant export PLAN --out DIR)")
    env.close()
    return 0


class _Fixed(PlannedAllocator):
    """Plays a plan found elsewhere (a search's snapshot), reporting what finding it cost."""

    exact = True

    def __init__(self, plan, evaluations: float, seconds: float):
        super().__init__()
        self._plan, self.evaluations, self.search_seconds = plan, evaluations, seconds

    def make_plan(self, env):
        return self._plan


def _search_rows(env, name: str, fitness: str, seed: int, budgets: List[float], held_out,
                 start: str = "knapsack", progress: bool = True) -> List[Tuple[float, EpisodeResult]]:
    """``(budget, result)`` per budget: the search runs once at the largest; smaller budgets get
    its snapshots (each what a run with that budget returns, replayed and measured)."""
    budgets = sorted(set(budgets))
    search = SearchAllocator(_search_config(fitness, budgets[-1]), seed=seed, snapshot_at=budgets[:-1], start=start,
                             progress=progress)
    (final,) = run_allocator(env, search, heldout=held_out, name=name)
    results = []
    for budget in budgets[:-1]:
        snapshot = search.result.snapshots[budget]
        replay = _Fixed(snapshot["plan"], snapshot["evaluations"], snapshot["seconds"])
        (result,) = run_allocator(env, replay, heldout=held_out, name=name)
        result.seconds += replay.search_seconds  # the search's time up to this budget, then the episode
        results.append((budget, result))
    return [*results, (budgets[-1], final)]


def _search_config(fitness: str, budget: float) -> SearchConfig:
    return SearchConfig(evaluations=budget, fitness=fitness)


def _save_plan(folder: Path, problem, row: Dict[str, Any], plan, episodes: int, args) -> Path:
    """The row's plan as a plan file that rebuilds its problem, named after the row (allocator,
    target, the search's budget and seed, the episode when there are several)."""
    parts = [re.sub(r"[^A-Za-z0-9.+_-]+", "_", row["allocator"]).strip("_"), f"{row['target_bits']:g}b"]
    if "budget" in row:
        parts.append(f"{row['budget']:g}ev")
    if "seed" in row:
        parts.append(f"s{row['seed']}")
    if episodes > 1:
        parts.append(f"e{row['episode']}")
    metrics = {k: v for k, v in row.items() if k not in ("allocator", "episode") and v is not None}
    saved = QuantPlan.from_problem(problem, plan, allocator=row["allocator"], proxy_dtype=problem.proxy_dtype,
                                   heldout=f"wiki-sample eval, {args.eval_windows} x {args.eval_seq_len} tokens", **metrics)
    return saved.save(folder / ("-".join(parts) + ".json"))


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
