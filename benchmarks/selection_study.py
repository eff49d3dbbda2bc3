"""How well does a measurement rank the plans a learned run returns? From stored per-window NLLs (no
forward pass): the same plans replayed on the validation split (``windquant bench --eval-split
validation``) and on the eval split (``windquant bench``, the held-out windows results report).

    python benchmarks/selection_study.py --validation val_2.json --eval replay_2.json replay_lr_2.json

Prints, over the replayed plans (rows ``plan:...``, matched in order and checked by their proxy PPL):
the rank correlation (Spearman) of the proxy PPL and of the validation PPL with the held-out PPL,
that of a random k-window subset of the validation windows (mean and 5-95% over draws), and the
one that chooses k on the validation split alone: a k-window subset's ranking against the other
windows' (what `selection.windows` in agents/hyperparams.yml was chosen by; issue 21).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

import numpy as np


def _plans(path: Path) -> List[dict]:
    return [r for r in json.loads(path.read_text())["episodes"] if r["allocator"].startswith("plan:")]


def _rank(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--validation", type=Path, required=True, help="windquant bench --eval-split validation JSON")
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="windquant bench JSONs of the same plans")
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    validation = _plans(args.validation)
    held_out = [row for path in args.eval for row in _plans(path)]
    if len(validation) != len(held_out) or len(validation) < 3:
        raise SystemExit(f"{len(validation)} validation rows against {len(held_out)} eval rows: replay the same plans, "
                         "in the same order, at least 3")
    proxy = np.array([r["proxy_ppl"] for r in held_out])
    if not np.allclose(proxy, [r["proxy_ppl"] for r in validation], rtol=1e-3):
        raise SystemExit("the two files' plans differ (their proxy PPL): replay the same plans in the same order")
    heldout = np.array([r["heldout_ppl"] for r in held_out])
    windows = np.array([r["heldout_window_nll"] for r in validation])
    n = windows.shape[1]
    print(f"{len(heldout)} plans; held-out PPL {heldout.min():.2f}-{heldout.max():.2f} (median {np.median(heldout):.2f})")
    print(f"rank correlation with held-out: proxy {spearman(proxy, heldout):.2f}, "
          f"validation ({n} windows) {spearman(windows.mean(1), heldout):.2f}")
    rng = np.random.default_rng(args.seed)
    for k in args.windows:
        if not 1 <= k < n:
            continue
        against_eval, against_rest = [], []
        for _ in range(args.draws):
            order = rng.permutation(n)
            subset, rest = windows[:, order[:k]].mean(1), windows[:, order[k:]].mean(1)
            against_eval.append(spearman(subset, heldout))
            against_rest.append(spearman(subset, rest))
        low, high = np.percentile(against_eval, [5, 95])
        low_r, high_r = np.percentile(against_rest, [5, 95])
        print(f"  {k:3d} validation windows: with held-out {np.mean(against_eval):.2f} [{low:.2f}, {high:.2f}]; "
              f"with the other {n - k} validation windows {np.mean(against_rest):.2f} [{low_r:.2f}, {high_r:.2f}]")
    print(f"chosen by the proxy: held-out {heldout[np.argmin(proxy)]:.2f}; by the validation split: "
          f"{heldout[np.argmin(windows.mean(1))]:.2f}; best held-out {heldout.min():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
