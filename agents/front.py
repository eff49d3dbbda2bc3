"""The size/quality front of a run: at every budget it trained on, the policy's one-pass plan
beside the calibrated knapsack's and the knapsack's, on the same held-out windows.

``windquant train`` writes it at the end of a run over several targets (``front.json``:
``{"rows": [...], "meta": {...}}``, ``front.csv``, ``front.md``, the plans in
``front_plans/``); ``windquant plot RUN`` draws it (held-out PPL against storage bits).
Every row says what choosing its plan cost in proxy passes (``evaluations``) and, against
the calibrated knapsack at its budget, the paired-bootstrap change of held-out PPL with its
95% interval ("tie" when it contains 0).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..harness.episodes import plan_window_nlls
from ..harness.leaderboard import add_comparisons
from ..eval.bootstrap import describe_change
from ..plan import QuantPlan

FRONT_COLUMNS = ("allocator", "target_bits", "evaluations", "effective_bits", "storage_bits", "proxy_ppl", "heldout_ppl",
                 "vs", "heldout_change", "heldout_change_low", "heldout_change_high", "heldout_verdict", "plan_file")
"""Columns of ``front.csv`` (``front.json`` rows also keep ``heldout_window_nll``)."""


class HeldoutCache:
    """Per-window held-out NLL of plans, each plan measured once however many rows name it."""

    def __init__(self, problem, windows: torch.Tensor):
        self.problem, self.windows = problem, windows
        self._seen: Dict[bytes, List[float]] = {}

    def __len__(self) -> int:
        """How many held-out passes were made (one per distinct plan)."""
        return len(self._seen)

    def __call__(self, plan: Optional[Sequence[int]]) -> List[float]:
        key = b"unquantized" if plan is None else np.asarray(plan, dtype=np.int64).tobytes()
        if key not in self._seen:
            self._seen[key] = plan_window_nlls(self.problem, plan, self.windows).tolist()
        return self._seen[key]


def front_row(problem, heldout: HeldoutCache, allocator: str, target: float, plan: Sequence[int], proxy_ppl: float,
              evaluations: float, plans_dir: Path, **plan_metrics: Any) -> Dict[str, Any]:
    """One measured row of the front, its plan saved as a plan file in ``plans_dir``."""
    bits = problem.table.plan_bits(plan)
    windows = heldout(plan)
    row = {"allocator": allocator, "target_bits": float(target), "evaluations": float(evaluations),
           "effective_bits": bits["effective_bits"], "storage_bits": bits["storage_bits"], "proxy_ppl": float(proxy_ppl),
           "heldout_ppl": math.exp(float(np.mean(windows))), "heldout_window_nll": windows}
    slug = allocator.replace(" ", "-").replace("(", "").replace(")", "")
    path = QuantPlan.from_problem(problem, plan, target_bits=float(target), allocator=allocator, evaluations=float(evaluations),
                                  effective_bits=bits["effective_bits"], storage_bits=bits["storage_bits"],
                                  proxy_ppl=float(proxy_ppl), proxy_dtype=problem.proxy_dtype, **plan_metrics,
                                  ).save(plans_dir / f"{slug}-{target:g}b.json")
    row["plan_file"] = str(Path(path).relative_to(plans_dir.parent))
    return row


def write_front(rows: List[Dict[str, Any]], out: Path, meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """Compare every row with the calibrated knapsack at its budget (paired bootstrap), then
    write ``front.json`` / ``front.csv`` / ``front.md`` in ``out``."""
    add_comparisons(rows, references=("calibrated-knapsack", "knapsack"))
    out = Path(out)
    paths = {"json": out / "front.json", "csv": out / "front.csv", "md": out / "front.md"}
    paths["json"].write_text(json.dumps({"rows": rows, "meta": dict(meta or {})}, indent=1, default=float))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FRONT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(format_front(rows) + "\n")
    return paths


def format_front(rows: List[Dict[str, Any]]) -> str:
    """The front as a Markdown table, one line per (target, allocator)."""
    header = ("target", "allocator", "evaluations", "effective bits", "storage bits", "proxy PPL", "held-out PPL",
              "vs calibrated knapsack (95% interval)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: (r["target_bits"], r["allocator"])):
        if row.get("heldout_change") is None:
            versus = "(reference)" if row["allocator"] == "calibrated-knapsack" else "-"
        else:
            versus = describe_change(row["heldout_change"], row["heldout_change_low"], row["heldout_change_high"])
        lines.append(f"| {row['target_bits']:g} | {row['allocator']} | {row['evaluations']:g} | {row['effective_bits']:.3f} | "
                     f"{row['storage_bits']:.3f} | {row['proxy_ppl']:.2f} | {row['heldout_ppl']:.2f} | {versus} |")
    return "\n".join(lines)


def read_front(run_dir: str | Path) -> List[Dict[str, Any]]:
    """The rows of a run folder's ``front.json``."""
    return json.loads((Path(run_dir) / "front.json").read_text())["rows"]


__all__ = ["FRONT_COLUMNS", "HeldoutCache", "format_front", "front_row", "read_front", "write_front"]
