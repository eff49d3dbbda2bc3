"""Paired-bootstrap comparisons between plans measured in different runs, from the per-window
held-out NLL their files kept (no forward pass): ``windquant bench`` JSONs (``episodes``)
and training fronts (``front.json``) are read alike.

    python benchmarks/paired.py bench/search_2.json runs/front_s0/front.json=front \\
        --reference "search-nll (from calibrated-knapsack)" --markdown

``FILE=LABEL`` appends `` [LABEL]`` to that file's allocator names; a search's rows are named with
their budget (``search-nll @213ev``). Every row is compared with the
reference allocator's row at the same target (median row when several seeds), or with
``--reference-label LABEL`` with the same allocator's row from the file labelled LABEL. Files are
refused unless their unquantized model's window NLLs agree (the same held-out windows).
``--match storage`` pairs rows whose storage bits agree (within ``--storage-tolerance``) instead
of their targets: engines whose effective bits cost different storage (e.g. INT8 outliers, whose
positions eq. 6 does not count) compared at the same file size. A change whose 95% interval contains 0 is written "tie".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from windquant_gym.eval.bootstrap import describe_change, paired_bootstrap


def read_rows(path: Path, label: Optional[str]) -> tuple:
    """``(rows with windows, unquantized window NLL or None)`` of one file."""
    data = json.loads(path.read_text())
    if "episodes" in data:  # windquant bench
        rows = data["episodes"]
        unquantized = next((r["heldout_window_nll"] for r in rows if r["allocator"] == "unquantized"
                            and r.get("heldout_window_nll")), None)
        rows = [r for r in rows if r["allocator"] != "unquantized"]
    else:  # a training front
        rows = data["rows"]
        unquantized = data.get("meta", {}).get("unquantized_heldout_window_nll")
    kept = []
    for row in rows:
        if row.get("heldout_window_nll") is None:
            continue
        name = row["allocator"] + (f" @{row['budget']:g}ev" if row.get("budget") is not None else "") + (
            f" [{label}]" if label else "")
        kept.append({"allocator": name, "target_bits": float(row["target_bits"]), "seed": row.get("seed"),
                     "evaluations": row.get("evaluations"), "effective_bits": row["effective_bits"],
                     "storage_bits": row["storage_bits"], "proxy_ppl": row["proxy_ppl"], "heldout_ppl": row["heldout_ppl"],
                     "windows": np.asarray(row["heldout_window_nll"])})
    return kept, unquantized


def _same_allocator(name: str, label: str) -> str:
    """``name`` with its `` [LABEL]`` replaced by `` [label]``."""
    base = name.rsplit(" [", 1)[0] if name.endswith("]") else name
    return f"{base} [{label}]"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="FILE or FILE=LABEL")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--reference", help="allocator name every row is compared with (after labels)")
    group.add_argument("--reference-label", metavar="LABEL",
                       help="compare each row with the same allocator's row of the file labelled LABEL (engine A/B: "
                            "every allocator against itself on the reference engine)")
    parser.add_argument("--match", choices=("target", "storage"), default="target",
                        help="which rows pair: the same target bits (default), or storage bits within "
                             "--storage-tolerance (plans of engines whose effective bits cost different storage, "
                             "e.g. fewer INT8 outliers at a higher target)")
    parser.add_argument("--storage-tolerance", type=float, default=0.015, metavar="BITS",
                        help="with --match storage: the most two paired rows' storage bits per weight may differ")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="write the comparisons here too")
    args = parser.parse_args(argv)
    rows: List[Dict[str, Any]] = []
    windows_of: Dict[str, Any] = {}
    for spec in args.files:
        path, _, label = spec.partition("=")
        kept, unquantized = read_rows(Path(path), label or None)
        if unquantized is not None:
            windows_of[path] = np.asarray(unquantized)
        rows += kept
    known = list(windows_of.values())
    for path, windows in windows_of.items():
        if windows.shape != known[0].shape or not np.allclose(windows, known[0], rtol=1e-5, atol=1e-6):
            raise SystemExit(f"{path}: its unquantized held-out windows differ from {next(iter(windows_of))}'s; "
                             "compare files measured on the same windows (same --eval-windows / eval_windows).")
    if args.storage_tolerance < 0:
        raise SystemExit(f"--storage-tolerance must be >= 0 bits per weight, got {args.storage_tolerance}; e.g. 0.015.")
    out = []
    for row in sorted(rows, key=lambda r: r["target_bits"]):
        if args.match == "target":
            here = [r for r in rows if r["target_bits"] == row["target_bits"]]
        else:
            here = [r for r in rows if abs(r["storage_bits"] - row["storage_bits"]) <= args.storage_tolerance]
        reference = args.reference or _same_allocator(row["allocator"], args.reference_label)
        refs = sorted((r for r in here if r["allocator"] == reference), key=lambda r: r["heldout_ppl"])
        if not refs:
            continue
        ref = refs[len(refs) // 2]  # the median seed's row
        if row["windows"].shape != ref["windows"].shape:
            raise SystemExit(f"{row['allocator']} at {row['target_bits']:g} bits was measured on {row['windows'].size} "
                             f"held-out windows, {reference} on {ref['windows'].size}: compare files measured on the "
                             "same windows (same --eval-windows / eval_windows).")
        result = paired_bootstrap(ref["windows"], row["windows"])
        out.append({**{k: v for k, v in row.items() if k != "windows"}, "reference": reference,
                    "reference_seed": ref["seed"], "reference_target_bits": ref["target_bits"], **result.to_dict()})
    header = ("target", "allocator", "seed", "evaluations", "effective", "storage", "proxy PPL", "held-out PPL",
              f"vs {args.reference or f'the same allocator [{args.reference_label}]'}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] if args.markdown else []
    for r in out:
        versus = "(reference)" if r["allocator"] == r["reference"] and r["seed"] == r["reference_seed"] else (
            describe_change(r["change"], r["low"], r["high"]))
        if r["reference_target_bits"] != r["target_bits"] and versus != "(reference)":
            versus += f" (against its {r['reference_target_bits']:g}-bit row)"
        cells = (f"{r['target_bits']:g}", r["allocator"], "-" if r["seed"] is None else str(r["seed"]),
                 "-" if r["evaluations"] is None else f"{r['evaluations']:g}", f"{r['effective_bits']:.3f}",
                 f"{r['storage_bits']:.3f}", f"{r['proxy_ppl']:.2f}", f"{r['heldout_ppl']:.2f}", versus)
        lines.append("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
