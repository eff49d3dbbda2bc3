"""The sweep's leaderboard: per target and allocator, held-out perplexity (median and min-max
over seeds) of the learned runs' returned plans and of the bench allocators' plans, beside the
baselines every training run measured on the same held-out windows (the knapsack at the same
budget, the unquantized model), written as JSON, CSV and Markdown by
:func:`windquant_gym.harness.leaderboard.write_leaderboard`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from ..harness.leaderboard import write_leaderboard
from .config import SweepArgs
from .runs import BENCH_FILE, FINISHED, status_of

LEADERBOARD = "leaderboard.json"


def run_rows(args: SweepArgs, runs, status: Dict[Any, str] = None) -> List[Dict[str, Any]]:
    """One row per finished training run (its returned plan) and per plan of a finished bench
    run; per target, the knapsack and unquantized rows of its first finished training run (they
    do not depend on the agent seed), unless a bench run measures them."""
    rows, baselines = [], []
    seen_targets = set()
    benched = set(args.allocators)
    status = status or {run: status_of(run) for run in runs}
    for run in runs:
        if status[run] != FINISHED:
            continue
        if not run.learned:
            board = json.loads((run.folder / BENCH_FILE).read_text())
            for row in board["episodes"]:
                if row["allocator"] == "unquantized":
                    continue
                plan = row.get("plan_file")
                rows.append({**row, "run": run.name, "plan_file": str(run.folder / plan) if plan else None})
            continue
        summary = json.loads((run.folder / "summary.json").read_text())
        results = summary["results"]
        returned = results[summary["returned"]]
        seconds = summary["setup_seconds"] + summary["train_seconds"]
        # what choosing the returned plan cost (the summary's knapsack row is measured apart)
        evaluations = summary.get("policy_evaluations", summary["evaluations"])
        rows.append({**_row(f"MaskablePPO {args.preset}", run.target_bits, returned, evaluations, seconds),
                     "seed": run.seed, "run": run.name, "returned": summary["returned"],
                     "plan_file": str(run.folder / "returned_plan.json")})
        if run.target_bits not in seen_targets:
            seen_targets.add(run.target_bits)
            if "knapsack" not in benched:
                baselines.append(_row("knapsack", run.target_bits, results["knapsack"], 1, None))
            baselines.append(_row("unquantized", run.target_bits, results["unquantized"], 0, None))
    order = {t: i for i, t in enumerate(args.target_bits)}
    return sorted(rows + baselines, key=lambda r: order.get(r["target_bits"], len(order)))


def _row(allocator: str, target: float, result: Dict[str, Any], evaluations, seconds) -> Dict[str, Any]:
    return {"allocator": allocator, "target_bits": target, "evaluations": evaluations,
            "effective_bits": result["effective_bits"], "storage_bits": result["storage_bits"],
            "proxy_ppl": result["proxy_ppl"], "heldout_ppl": result["heldout_ppl"], "seconds": seconds}


def write_sweep_leaderboard(args: SweepArgs, runs, result) -> Dict[str, Path]:
    status = {run: status_of(run) for run in runs}
    rows = run_rows(args, runs, status)
    meta = {"model": args.model, "preset": args.preset, "seeds": list(args.seeds), "target_bits": list(args.target_bits),
            "episodes": args.episodes, "runs": {run.name: status[run] for run in runs},
            "failed": dict(result.failed)}
    return write_leaderboard(rows, Path(args.out) / LEADERBOARD, meta)
