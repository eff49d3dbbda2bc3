"""The Fisher-weighted rule and the runs warm-started on it against the calibrated knapsack, the
main command and the search of the same seed, from stored per-window held-out NLLs (no forward
pass; RESULTS, "The model's own sensitivity"):

    python benchmarks/fisher_study.py benchmarks/results/engine26/saliency/xeon/fisher/replay \\
        benchmarks/results/engine26/saliency/xeon

Reads ``FISHER/replay_T.json`` (the rule's label seeds, ``seeds/fisher_sS_T.json``, and the runs'
returned plans), ``FISHER/replay_control_T.json`` (the PPO-off runs, when there),
``BASE/replay_xeon_T.json`` (``cpu-quick-kv``'s runs) and ``BASE/search/search_kv_xeon_T.json``
(the search from ``calibrated-knapsack-kv`` at 176 passes); checks that all were measured on the
same held-out windows. A change is A's PPL against B's with its paired-bootstrap 95% interval;
"tie" where it contains 0.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import numpy as np

from seed_table import window_rows  # benchmarks/ (run as a script from the repo root)
from windquant_gym.eval.bootstrap import paired_bootstrap

TARGETS = ("2", "2.5", "3")


def load(fisher: Path, base: Path, target: str) -> dict:
    """``{name: window NLLs}``: rules by allocator, the rule's seeds as ``fisher_sS``, runs by folder."""
    plans = {}
    files = [fisher / f"replay_{target}.json", fisher / f"replay_control_{target}.json", base / f"replay_xeon_{target}.json",
             base / "search" / f"search_kv_xeon_{float(target):.1f}.json"]
    for _, row, windows in window_rows([path for path in files if path.exists()]):
        if row["allocator"] == "unquantized":
            continue
        plan = Path(row.get("plan_file") or "")
        if row["allocator"].startswith("search-nll"):
            name = f"search-kv_s{row['seed']}"
        elif row["allocator"].startswith("plan:"):
            name = plan.stem.rsplit("_", 1)[0] if plan.parent.name == "seeds" else plan.parent.name
        else:
            name = row["allocator"]
        plans.setdefault(name, windows)
    return plans


def change(a: np.ndarray, b: np.ndarray) -> str:
    """A's held-out PPL change against B's."""
    result = paired_bootstrap(b, a)
    verdict = "tie" if result.low <= 0 <= result.high else ("better" if result.high < 0 else "worse")
    return f"{100 * result.change:+.1f}% [{100 * result.low:+.1f}, {100 * result.high:+.1f}] {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fisher", type=Path, help="folder of replay_T.json (and replay_control_T.json)")
    parser.add_argument("base", type=Path, help="folder of replay_xeon_T.json and search/search_kv_xeon_T.json")
    args = parser.parse_args()
    groups = ("fisher", "cpu-quick-fisher", "cpu-quick-fisher-no-ppo", "cpu-quick-kv", "search-kv")
    for target in TARGETS:
        plans = load(args.fisher, args.base, target)
        ppl = {name: math.exp(float(w.mean())) for name, w in plans.items()}
        knapsack = plans["calibrated-knapsack"]
        print(f"\n{target} bits: calibrated knapsack {ppl['calibrated-knapsack']:.2f}")
        for group in groups:
            names = [n for n in sorted(plans) if n.rsplit("_s", 1)[0] == group]
            if names:
                print(f"  {group}: " + ", ".join(f"{ppl[n]:.2f}" for n in names)
                      + f" (median {statistics.median(ppl[n] for n in names):.2f}); vs calibrated knapsack: "
                      + "; ".join(change(plans[n], knapsack) for n in names))
        for seed in (0, 1, 2):
            pairs = [(f"fisher_s{seed}", f"cpu-quick-kv_s{seed}"), (f"fisher_s{seed}", f"search-kv_s{seed}"),
                     (f"cpu-quick-fisher_s{seed}", "fisher_s0"), (f"cpu-quick-fisher_s{seed}", f"cpu-quick-kv_s{seed}"),
                     (f"cpu-quick-fisher_s{seed}", f"search-kv_s{seed}"),
                     (f"cpu-quick-fisher_s{seed}", f"cpu-quick-fisher-no-ppo_s{seed}"),
                     (f"cpu-quick-fisher-no-ppo_s{seed}", "fisher_s0"),
                     (f"cpu-quick-fisher-no-ppo_s{seed}", f"cpu-quick-kv_s{seed}"),
                     (f"cpu-quick-fisher-no-ppo_s{seed}", f"search-kv_s{seed}")]
            for a, b in pairs:
                if a in plans and b in plans:
                    print(f"    {a} against {b}: {change(plans[a], plans[b])}")


if __name__ == "__main__":
    main()
