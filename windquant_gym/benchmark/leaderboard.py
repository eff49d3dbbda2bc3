"""Leaderboard: per-episode rows aggregated per (allocator, target, evaluations), printed and
written as JSON (every episode), CSV and Markdown (one line per group).

A group of several episodes (seeds of a search, episodes of the random allocator) shows the
median of each number, the held-out perplexity's range (min-max) beside it, and the plan file
of its episode with the lowest proxy perplexity (proxy KL where the env measured KL): the one
a user would pick without looking at held-out text. A search's rows are grouped by the budget
asked for (``budget``); ``evaluations`` is what it spent (a generation that would not fit in
the budget is not started).

``extra``: more numeric columns to aggregate and show after the standard ones, e.g. the
zero-shot ``"{task}/{metric}"`` columns of ``windquant bench --zero-shot`` (a row without
one shows "-")."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

COLUMNS = ("allocator", "target_bits", "budget", "evaluations", "effective_bits", "storage_bits", "proxy_ppl", "proxy_kl",
           "heldout_ppl", "heldout_min", "heldout_max", "seconds", "episodes", "plan_file")
_NUMERIC = ("budget", "evaluations", "effective_bits", "storage_bits", "proxy_ppl", "proxy_kl", "heldout_ppl", "seconds")
_HEADER = {"target_bits": "target", "budget": "budget", "evaluations": "evaluations", "effective_bits": "effective bits",
           "storage_bits": "storage bits", "proxy_ppl": "proxy PPL", "proxy_kl": "proxy KL", "heldout_ppl": "held-out PPL",
           "heldout_range": "held-out min-max", "episodes": "n", "plan_file": "plan"}


def _measured(value: Any) -> bool:
    """A number, not NaN (which would poison a median); an infinite perplexity stays in."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def aggregate(rows: List[Dict[str, Any]], extra: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Median of each numeric column per (allocator, target, budget), in first-seen order; the
    budget is a search's ``budget`` where a row has one, else its ``evaluations``."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["allocator"], row.get("target_bits"), row.get("budget", row.get("evaluations")))].append(row)
    table = []
    for (allocator, target, _), members in groups.items():
        entry: Dict[str, Any] = {"allocator": allocator, "target_bits": target, "episodes": len(members)}
        for key in (*_NUMERIC, *extra):
            values = [m[key] for m in members if _measured(m.get(key))]
            entry[key] = statistics.median(values) if values else None
        heldout = [m["heldout_ppl"] for m in members if _measured(m.get("heldout_ppl"))]
        entry["heldout_min"], entry["heldout_max"] = (min(heldout), max(heldout)) if len(heldout) > 1 else (None, None)
        # the plan a user would pick without held-out text: the best by the metric the env measured
        ranked = [m for m in members if m.get("plan_file")]
        score = lambda m: m.get("proxy_kl") if m.get("proxy_metric") == "kl" else m.get("proxy_ppl")
        ranked.sort(key=lambda m: score(m) if _measured(score(m)) else math.inf)
        entry["plan_file"] = ranked[0]["plan_file"] if ranked else None
        table.append(entry)
    return table


def _number(value: float, key: str) -> str:
    if key in ("proxy_ppl", "heldout_ppl") and (value >= 1e4 or not math.isfinite(value)):
        return f"{value:.3g}"
    if key == "proxy_kl":
        return f"{value:.4f}"
    if key in ("budget", "evaluations"):  # counts of proxy passes, fractional only when a stage was
        return f"{value:g}"
    return f"{value:.2f}" if key in ("proxy_ppl", "heldout_ppl", "seconds") else f"{value:.3f}"


def _cell(entry: Dict[str, Any], key: str) -> str:
    if key == "heldout_range":
        low, high = entry.get("heldout_min"), entry.get("heldout_max")
        return "-" if low is None else f"{_number(low, 'heldout_ppl')}-{_number(high, 'heldout_ppl')}"
    value = entry.get(key)
    if value is None:
        return "-"
    if key == "plan_file":
        return Path(value).name
    if isinstance(value, float):
        return _number(value, key)
    return str(value)


def _columns(table: List[Dict[str, Any]], extra: Sequence[str]) -> List[str]:
    """What a printed table shows: the held-out range as one column, and budget, proxy KL, range
    and plan only where some row has one."""
    shown = [c for c in COLUMNS if c not in ("heldout_min", "heldout_max")]
    shown.insert(shown.index("heldout_ppl") + 1, "heldout_range")
    present = lambda c: any(r.get("heldout_min" if c == "heldout_range" else c) is not None for r in table)
    return [c for c in [*shown, *extra] if c not in ("budget", "proxy_kl", "heldout_range", "plan_file") or present(c)]


def format_table(rows: List[Dict[str, Any]], markdown: bool = False, extra: Sequence[str] = ()) -> str:
    table = aggregate(rows, extra)
    columns = _columns(table, extra)
    header = [_HEADER.get(c, c) for c in columns]
    lines = [[_cell(r, c) for c in columns] for r in table]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header)] + [fmt(c) for c in lines])


def write_leaderboard(
    rows: List[Dict[str, Any]], json_path: str | Path, meta: Dict[str, Any] | None = None, extra: Sequence[str] = ()
) -> Dict[str, Path]:
    """Write ``json_path`` (all episodes + meta), and ``.csv`` / ``.md`` (one line per group) beside it."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows, extra)
    json_path.write_text(json.dumps({"meta": meta or {}, "episodes": rows, "leaderboard": table}, indent=1))
    csv_path, md_path = json_path.with_suffix(".csv"), json_path.with_suffix(".md")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, *extra], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    md_path.write_text(format_table(rows, markdown=True, extra=extra) + "\n")
    return {"json": json_path, "csv": csv_path, "md": md_path}
