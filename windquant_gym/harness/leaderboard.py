"""Leaderboard: per-episode rows aggregated per (allocator, target, evaluations), printed and
written as JSON (every episode), CSV and Markdown (one line per group).

A group of several episodes (seeds of a search, episodes of the random allocator) shows the
median of each number, the held-out perplexity's range (min-max) beside it, and the plan file
of its episode with the lowest proxy perplexity (proxy KL where the env measured KL): the one
a user would pick without looking at held-out text. A search's rows are grouped by the budget
asked for (``budget``); ``evaluations`` is what it spent (a generation that would not fit in
the budget is not started).

Held-out comparisons (:func:`add_comparisons`): every row that kept its per-window held-out
NLL is compared with the reference allocator's row at the same target (the calibrated
knapsack where the board has it, else the knapsack) by a paired bootstrap over the windows
(:mod:`windquant_gym.eval.bootstrap`); the ``vs`` column shows the change of held-out PPL
and its 95% interval, and "tie" when the interval contains 0. A group of several episodes
shows the median change and how many of its members were better / tied / worse.

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

from ..eval.bootstrap import describe_change, paired_bootstrap

COLUMNS = ("allocator", "target_bits", "budget", "evaluations", "effective_bits", "storage_bits", "proxy_ppl", "proxy_kl",
           "heldout_ppl", "heldout_min", "heldout_max", "vs", "heldout_change", "heldout_change_low", "heldout_change_high",
           "verdicts", "seconds", "episodes", "plan_file")
_NUMERIC = ("budget", "evaluations", "effective_bits", "storage_bits", "proxy_ppl", "proxy_kl", "heldout_ppl",
            "heldout_change", "heldout_change_low", "heldout_change_high", "seconds")
REFERENCES = ("calibrated-knapsack", "knapsack")
"""Allocators other rows are compared with on held-out windows, the first present at a target."""
_HEADER = {"target_bits": "target", "budget": "budget", "evaluations": "evaluations", "effective_bits": "effective bits",
           "storage_bits": "storage bits", "proxy_ppl": "proxy PPL", "proxy_kl": "proxy KL", "heldout_ppl": "held-out PPL",
           "heldout_range": "held-out min-max", "vs_cell": "held-out vs reference (95% interval)", "episodes": "n",
           "plan_file": "plan"}


def add_comparisons(rows: List[Dict[str, Any]], references: Sequence[str] = REFERENCES, seed: int = 0) -> None:
    """Compare, in place, every row that holds ``heldout_window_nll`` with the first row of the
    first allocator of ``references`` present at its target (paired bootstrap over windows):
    sets ``vs`` (the reference's name), ``heldout_change`` (``PPL / PPL_ref - 1``), its
    interval ``heldout_change_low`` / ``_high`` and ``heldout_verdict`` (better / tie / worse)."""
    by_target: Dict[Any, Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row.get("heldout_window_nll") is not None:
            by_target[row.get("target_bits")].setdefault(row["allocator"], row)
    for row in rows:
        windows = row.get("heldout_window_nll")
        present = by_target.get(row.get("target_bits"), {})
        name = next((r for r in references if r in present), None)
        if windows is None or name is None or row["allocator"] == name:
            continue
        other = present[name]["heldout_window_nll"]
        if len(other) != len(windows):
            continue  # measured on other windows: not comparable
        result = paired_bootstrap(other, windows, seed=seed)
        row.update(vs=name, heldout_change=result.change, heldout_change_low=result.low, heldout_change_high=result.high,
                   heldout_verdict=result.verdict)


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
        verdicts = [m["heldout_verdict"] for m in members if m.get("heldout_verdict")]
        entry["vs"] = next((m["vs"] for m in members if m.get("vs")), None)
        entry["verdicts"] = _verdict_counts(verdicts) if verdicts else None
        # the plan a user would pick without held-out text: the best by the metric the env measured
        ranked = [m for m in members if m.get("plan_file")]
        score = lambda m: m.get("proxy_kl") if m.get("proxy_metric") == "kl" else m.get("proxy_ppl")
        ranked.sort(key=lambda m: score(m) if _measured(score(m)) else math.inf)
        entry["plan_file"] = ranked[0]["plan_file"] if ranked else None
        table.append(entry)
    return table


def _verdict_counts(verdicts: List[str]) -> str:
    """``"tie"`` for one member; ``"better 2, tie 1"`` for several."""
    if len(verdicts) == 1:
        return verdicts[0]
    return ", ".join(f"{v} {verdicts.count(v)}" for v in ("better", "tie", "worse") if v in verdicts)


def _vs_cell(entry: Dict[str, Any]) -> str:
    change = entry.get("heldout_change")
    if change is None:
        return "-"
    if entry.get("episodes", 1) > 1:  # several members: the median change and the members' verdicts
        return f"{change:+.1%} (median; {entry['verdicts']})"
    return describe_change(change, entry["heldout_change_low"], entry["heldout_change_high"])


def _number(value: float, key: str) -> str:
    if key in ("proxy_ppl", "heldout_ppl") and (value >= 1e4 or not math.isfinite(value)):
        return f"{value:.3g}"
    if key == "proxy_kl":
        return f"{value:.4f}"
    if key in ("budget", "evaluations"):  # counts of proxy passes, fractional only when a stage was
        return f"{value:g}"
    return f"{value:.2f}" if key in ("proxy_ppl", "heldout_ppl", "seconds") else f"{value:.3f}"


def _cell(entry: Dict[str, Any], key: str) -> str:
    if key == "vs_cell":
        return _vs_cell(entry)
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
    hidden = ("heldout_min", "heldout_max", "vs", "heldout_change", "heldout_change_low", "heldout_change_high", "verdicts")
    shown = [c for c in COLUMNS if c not in hidden]
    shown.insert(shown.index("heldout_ppl") + 1, "heldout_range")
    shown.insert(shown.index("heldout_range") + 1, "vs_cell")
    source = {"heldout_range": "heldout_min", "vs_cell": "heldout_change"}
    present = lambda c: any(r.get(source.get(c, c)) is not None for r in table)
    optional = ("budget", "proxy_kl", "heldout_range", "vs_cell", "plan_file")
    return [c for c in [*shown, *extra] if c not in optional or present(c)]


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
