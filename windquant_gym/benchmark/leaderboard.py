"""Leaderboard: per-episode rows aggregated per (allocator, target), printed and written as
JSON (every episode), CSV and Markdown (means).

``extra``: more numeric columns to average and show after the standard ones, e.g. the
zero-shot ``"{task}/{metric}"`` columns of ``windquant bench --zero-shot`` (a row without
one shows "-")."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

COLUMNS = ("allocator", "target_bits", "effective_bits", "storage_bits", "proxy_ppl", "heldout_ppl", "seconds", "episodes")


def aggregate(rows: List[Dict[str, Any]], extra: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Mean of each numeric column per (allocator, target), in first-seen order."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["allocator"], row.get("target_bits"))].append(row)
    table = []
    for (allocator, target), members in groups.items():
        entry = {"allocator": allocator, "target_bits": target, "episodes": len(members)}
        for key in ("effective_bits", "storage_bits", "proxy_ppl", "heldout_ppl", "seconds", *extra):
            values = [m[key] for m in members if isinstance(m.get(key), (int, float))]
            entry[key] = sum(values) / len(values) if values else None
        table.append(entry)
    return table


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key in ("proxy_ppl", "heldout_ppl") and (value >= 1e4 or not math.isfinite(value)):
            return f"{value:.3g}"
        return f"{value:.2f}" if key in ("proxy_ppl", "heldout_ppl", "seconds") else f"{value:.3f}"
    return str(value)


def format_table(rows: List[Dict[str, Any]], markdown: bool = False, extra: Sequence[str] = ()) -> str:
    table = aggregate(rows, extra)
    header = ["allocator", "target", "effective bits", "storage bits", "proxy PPL", "held-out PPL", "seconds", "n", *extra]
    lines = [[_cell(r[k], k) for k in (*COLUMNS, *extra)] for r in table]
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
    """Write ``json_path`` (all episodes + meta), and ``.csv`` / ``.md`` (means) beside it."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta or {}, "episodes": rows, "leaderboard": aggregate(rows, extra)}, indent=1))
    csv_path, md_path = json_path.with_suffix(".csv"), json_path.with_suffix(".md")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=(*COLUMNS, *extra))
        writer.writeheader()
        writer.writerows(aggregate(rows, extra))
    md_path.write_text(format_table(rows, markdown=True, extra=extra) + "\n")
    return {"json": json_path, "csv": csv_path, "md": md_path}
