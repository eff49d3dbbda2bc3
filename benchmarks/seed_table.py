"""Several agent seeds and search seeds side by side, from stored per-window held-out NLLs (no
forward pass): the learned runs' replayed plans (``windquant bench --plan .../returned_plan_T.json``),
the searches and the calibrated knapsack (``windquant bench ... --search-seeds S``).

    python benchmarks/seed_table.py --replay bench/cpu_replay.json bench/cpu_replay_s12.json \\
        --search bench/search_s*_*.json --markdown

A replayed plan's run is the folder it was read from (``cpu_s1``, ``cpu-no-ppo_s1``, ``cpu_noppo_s0``:
kind ``cpu`` / ``cpu-no-ppo``, seed 1 / 1 / 0); a run's ``best_plan_T.json`` (its best plan by the proxy,
where it returned another) is kind ``<kind> (best by proxy)``. Per target: each kind's held-out PPL per seed and
the median; each run against the calibrated knapsack, against the search of the same seed,
(the ``--main`` run only, default ``cpu``) against its PPO-off ``--control`` of the same seed, and
(every other run, e.g. the ablations ``cpu-no-shaping``) against the main run of the same seed, by a paired bootstrap over
the windows; "tie" when the 95% interval contains 0.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from windquant_gym.eval.bootstrap import paired_bootstrap

SEARCH_PREFIX = "search-nll (from "
RULES = ("calibrated-knapsack-kv", "calibrated-knapsack-fisher")


def _run_of(plan_file: str) -> Tuple[str, int]:
    name = Path(plan_file).parent.name
    match = re.fullmatch(r"(.+?)_s(\d+)", name)
    if match is None:
        raise SystemExit(f"cannot read a run and seed from {plan_file!r} (expected a folder like cpu_s1)")
    kind = match.group(1).replace("cpu_noppo", "cpu-no-ppo")
    if Path(plan_file).name.startswith("best_plan"):  # the run's best plan by the proxy, beside what it returned
        kind += " (best by proxy)"
    return kind, int(match.group(2))


def window_rows(paths: List[Path]):
    """``(path, row, per-window NLLs)`` of every row of these ``windquant bench`` JSONs that kept its
    windows, the unquantized rows included; refuses files measured on other held-out windows."""
    reference = None
    for path in paths:
        for row in json.loads(Path(path).read_text())["episodes"]:
            windows = row.get("heldout_window_nll")
            if windows is None:
                continue
            windows = np.asarray(windows)
            if row["allocator"] == "unquantized":
                if reference is not None and not np.allclose(reference, windows, rtol=1e-6):
                    raise SystemExit(f"{path}: measured on other held-out windows than the first file")
                reference = windows
            yield path, row, windows


def read(replays: List[Path], searches: List[Path], search_start: str = "calibrated-knapsack"):
    """``{target: {(kind, seed): windows}}`` and the unquantized windows (checked equal). The search
    from ``search_start`` is kind ``search`` (each run is compared with it); a search from another
    start is a kind of its own, ``search (from START)``."""
    table: Dict[float, Dict[Tuple[str, int], np.ndarray]] = {}
    reference = None
    for path, row, windows in window_rows([*replays, *searches]):
        if row["allocator"] == "unquantized":
            reference = windows
            continue
        target = float(row["target_bits"])
        if path in replays and row["allocator"].startswith("plan:"):
            key = _run_of(row["plan_file"])
        elif path in replays and row["allocator"] not in ("calibrated-knapsack", *RULES):
            continue  # a replay's reference rows count (a search file's, read later, replace them)
        elif row["allocator"].startswith(SEARCH_PREFIX):
            start = row["allocator"][len(SEARCH_PREFIX):].rstrip(")")
            key = ("search" if start == search_start else f"search (from {start})", int(row["seed"]))
        elif row["allocator"] == "calibrated-knapsack":
            key = ("calibrated-knapsack", 0)
        elif row["allocator"] in RULES:  # another rule measured beside it, e.g. the key-and-value teacher
            key = (row["allocator"], 0)
        else:
            continue
        table.setdefault(target, {})[key] = windows
    return table, reference


def ppl(windows: np.ndarray) -> float:
    return math.exp(float(windows.mean()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replay", nargs="+", type=Path, required=True)
    parser.add_argument("--search", nargs="*", type=Path, default=[])
    parser.add_argument("--json", type=Path, help="write the table here too")
    parser.add_argument("--main", default="cpu", help="the run every other is compared with, seed by seed (a folder "
                        "kind, e.g. cpu-no-action-costs for the runs made under that name)")
    parser.add_argument("--control", default="cpu-no-ppo", help="the main run's PPO-off control (a folder kind)")
    parser.add_argument("--search-start", default="calibrated-knapsack",
                        help="the start of the search each run is compared with (`windquant bench --search-start`)")
    ns = parser.parse_args(argv)
    table, _ = read(ns.replay, ns.search, ns.search_start)
    out = []
    search_name = "search" if ns.search_start == "calibrated-knapsack" else f"search from {ns.search_start}"
    print(f"| target | run | seeds: held-out PPL | median | vs calibrated knapsack, per seed | vs {search_name} (same seed) "
          f"| vs PPO-off control (same seed) | vs `{ns.main}` (same seed) |")
    print("|---|---|---|---|---|---|---|---|")
    for target in sorted(table):
        rows = table[target]
        teacher = rows.get(("calibrated-knapsack", 0))
        kinds = sorted({k for k, _ in rows if k != "calibrated-knapsack"}, key=lambda k: (k != ns.main, k))
        searches = {k for k in kinds if k.startswith("search")}
        if teacher is not None:
            print(f"| {target:g} | calibrated-knapsack | {ppl(teacher):.2f} | {ppl(teacher):.2f} | | | | |")
        for kind in kinds:
            seeds = sorted(s for k, s in rows if k == kind)
            values = [ppl(rows[(kind, s)]) for s in seeds]
            cells = {"vs_teacher": [], "vs_search": [], "vs_control": [], "vs_cpu": []}
            for s in seeds:
                mine = rows[(kind, s)]
                for name, other in (("vs_teacher", ("calibrated-knapsack", 0)), ("vs_search", ("search", s)),
                                    ("vs_control", (ns.control, s)), ("vs_cpu", (ns.main, s))):
                    if other not in rows or other[0] == kind or (name == "vs_control" and kind != ns.main) \
                            or (name in ("vs_search", "vs_cpu") and kind in searches):
                        continue
                    change = paired_bootstrap(rows[other], mine, seed=0)
                    cells[name].append((s, change))
            fmt = lambda items: "; ".join(f"s{s} {c.describe()}" for s, c in items)  # noqa: E731
            print(f"| {target:g} | {kind} | {' / '.join(f's{s} {v:.2f}' for s, v in zip(seeds, values))} | "
                  f"{statistics.median(values):.2f} | {fmt(cells['vs_teacher'])} | {fmt(cells['vs_search'])} | {fmt(cells['vs_control'])} "
                  f"| {fmt(cells['vs_cpu'])} |")
            out.append({"target_bits": target, "run": kind, "seeds": seeds, "heldout_ppl": values,
                        "median": statistics.median(values),
                        **{k: [{"seed": s, **c.to_dict()} for s, c in v] for k, v in cells.items()}})
    if ns.json:
        ns.json.write_text(json.dumps({"rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
