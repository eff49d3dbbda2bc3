"""``windquant``: command-line entry point."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _train(argv: List[str]) -> int:
    from .agents.flags import add_dataclass_flags, dataclass_from_namespace
    from .agents.hyperparams import preset_names
    from .agents.train import TrainArgs, train

    parser = argparse.ArgumentParser(prog="windquant train", description="Train MaskablePPO on WindQuant-v0.")
    add_dataclass_flags(parser, TrainArgs, exclude=("overrides",), extra_help={"preset": f"Presets: {', '.join(preset_names())}."},
                        metavars={"resume": "DIR", "out": "DIR"})
    train(dataclass_from_namespace(TrainArgs, parser.parse_args(argv)))
    return 0


def _bench(argv: List[str]) -> int:
    from .harness.bench import main as bench_main

    return bench_main(argv)


def _problem_for_plan(saved, model_name: Optional[str] = None, preset: Optional[str] = None):
    """The QuantProblem a saved plan was made on. A plan file records how to rebuild it (model,
    corpus, calibration seed and sizes, quant config, proxy precision); ``model_name`` replaces
    its model (e.g. a local copy). Plans of older versions record none of it: for those the
    env is rebuilt from ``preset``'s calibration sizes (default ``cpu``) with seed 0 on
    wiki-sample, and a plan made otherwise is refused by its table fingerprint."""
    from .agents.hyperparams import load_hyperparams
    from .errors import ConfigError
    from .models import load_model
    from .problem import QuantProblem

    if saved.problem is not None:
        if preset is not None:
            spec = saved.problem
            raise ConfigError(
                f"--preset is for plan files that do not record their problem; this one does (model {spec.model!r}, "
                f"calibration {spec.calibration!r}, seed {spec.seed}, {spec.n_samples} x {spec.seq_len} tokens): drop --preset."
            )
        return saved.problem_spec(model=model_name).build()
    env_kwargs = load_hyperparams(preset or "cpu")["env_kwargs"]
    model_name = model_name or saved.model or "smollm2-135m"
    model, tokenizer = load_model(model_name)
    return QuantProblem.build(model, tokenizer, "wiki-sample", saved.quant_config,
                              n_samples=env_kwargs["n_calibration_samples"], seq_len=env_kwargs["calibration_seq_len"],
                              proxy_dtype=env_kwargs.get("proxy_dtype", "float32"), model_name=model_name)


def _plot(argv: List[str]) -> int:
    from . import plots

    parser = argparse.ArgumentParser(prog="windquant plot", description="Plots of a run folder or of a saved plan.")
    parser.add_argument("target", help="a run folder (training curves, and its front.png when it has a front.json), a "
                                       "front.json, or a plan JSON (allocation heatmap)")
    parser.add_argument("--out", help="PNG path (default: beside the input)")
    parser.add_argument("--model", help="for a plan: load the model from here instead of the plan's own (e.g. a local copy)")
    parser.add_argument("--preset", help="for a plan of an older version that does not record its problem: the "
                                         "hyperparams.yml block of the env it was made on (default: cpu)")
    ns = parser.parse_args(argv)
    from pathlib import Path

    target = Path(ns.target)
    if target.is_dir():
        print(plots.plot_training_curves(target, ns.out))
        if (target / "front.json").is_file():  # a run over several targets: its size/quality front too
            print(plots.plot_front(target))
        return 0
    if target.suffix == ".json" and target.name.startswith("front"):
        print(plots.plot_front(target, ns.out))
        return 0
    from .plan import QuantPlan

    saved = QuantPlan.load(target)
    problem = _problem_for_plan(saved, ns.model, ns.preset)
    heatmap = plots.plot_plan_file(target, problem.table, ns.out or target.with_suffix(".heatmap.png"))
    distribution = plots.plot_action_distribution([saved.actions], target.with_suffix(".actions.png"),
                                                  labels=[target.stem], units=problem.units)
    print(heatmap, distribution, sep="\n")
    return 0


def _export(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="windquant export",
        description="Write a saved plan as a packed model folder: model.safetensors (the quantized Linears packed, "
        "everything else in fp16), plan.json, config.json (with its quantization_config) and tokenizer. Load it with "
        "AutoModelForCausalLM.from_pretrained(DIR) after `import windquant_gym`, or windquant_gym.load_quantized(DIR).",
    )
    parser.add_argument("plan", help="a plan JSON (best_plan_*.json, final_plan.json of a run)")
    parser.add_argument("--out", required=True, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--model", help="load the model from here instead of the plan's own (e.g. a local copy)")
    parser.add_argument("--preset", help="only for a plan of an older version that does not record its problem: the "
                                         "hyperparams.yml block of the env it was made on (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace the export's files in a non-empty folder")
    parser.add_argument("--rest-dtype", choices=("float16", "float32"), default="float16",
                        help="dtype of the non-quantized tensors (default: %(default)s)")
    ns = parser.parse_args(argv)
    import torch

    from .export import export_plan, packed_size
    from .plan import QuantPlan

    saved = QuantPlan.load(ns.plan)
    problem = _problem_for_plan(saved, ns.model, ns.preset)
    out = export_plan(saved, problem, ns.out, overwrite=ns.overwrite, rest_dtype=getattr(torch, ns.rest_dtype))
    print(f"wrote {out}")
    print(packed_size(out).summary())
    return 0


def _cache(argv: List[str]) -> int:
    from .cache.listing import CACHE_KINDS, cache_entries, clear_cache, format_entries
    from .paths import cache_dir, model_cache_dir

    parser = argparse.ArgumentParser(
        prog="windquant cache",
        description=f"List or clear the cache ({cache_dir()}; converted models in {model_cache_dir()}). "
        "Set WINDQUANT_CACHE (and WINDQUANT_MODEL_CACHE for converted models) to move it.",
    )
    parser.add_argument("action", choices=("list", "clear"), help="list: what is cached (model, config, size); clear: remove it")
    parser.add_argument("kinds", nargs="*", choices=[[], *CACHE_KINDS], metavar="KIND",
                        help=f"only these kinds: {', '.join(CACHE_KINDS)} (default: all)")
    parser.add_argument("--stale", action="store_true",
                        help="clear only what no current key reads: entries of other code versions, damaged or temporary files")
    ns = parser.parse_args(argv)
    kinds = ns.kinds or CACHE_KINDS
    if ns.action == "list":
        print(format_entries(cache_entries(kinds)))
        return 0
    removed = clear_cache(kinds, stale_only=ns.stale)
    print(f"removed {len(removed)} entries ({sum(e.size for e in removed) / 2**20:.1f} MiB) of {', '.join(kinds)}")
    return 0


def _sweep(argv: List[str]) -> int:
    from .sweep.cli import main as sweep_main

    return sweep_main(argv)


def _tune(argv: List[str]) -> int:
    from .sweep.cli import tune_main

    return tune_main(argv)


COMMANDS = {"train": _train, "bench": _bench, "plot": _plot, "export": _export, "cache": _cache, "sweep": _sweep,
            "tune": _tune}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: windquant {" + ",".join(COMMANDS) + "} [options]   (windquant COMMAND --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


def run() -> int:
    """The ``windquant`` console script: a named error prints its message (value and fix),
    not a traceback; ``main`` raises it, for callers and tests."""
    from .errors import WindQuantError
    from .compute.process import die_with_parent, keep_freed_memory

    try:
        die_with_parent()  # a run started by windquant sweep does not outlive its Ray worker
        keep_freed_memory()  # this process is ours: reuse freed memory (see compute/process.py)
        return main()
    except WindQuantError as error:
        print(f"windquant: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
