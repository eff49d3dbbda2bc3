"""Hyperparameter search over a preset with Ray Tune and Optuna (``windquant tune``).

Each trial is one ``windquant train`` run (in the trial's Ray actor) with hyperparameters
sampled by Optuna from a search space YAML, scored by its returned plan's **proxy**
perplexity (what the run itself chooses by; the held-out perplexity is recorded beside it,
never used to choose). The search space maps hyperparameter keys of
``agents/hyperparams.yml`` (dotted for nested ones) to a distribution::

    learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
    clip_range: {uniform: [0.05, 0.3]}
    episodes_per_update: {choice: [2, 4, 8]}
    warm_start.epochs: {randint: [50, 200]}     # upper bound exclusive

A re-run of the same command restores the Tune experiment: finished trials are kept, and an
interrupted trial continues from its run's checkpoint. At the end ``OUT/trials.{json,csv,md}``
list every trial and ``OUT/best_hyperparams.yml`` holds the best trial's hyperparameters as a
block usable with ``windquant train --hyperparams OUT/best_hyperparams.yml --preset tuned``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from ..errors import ConfigError, MissingDependencyError
from ..quant.bitwidths import check_bits

DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None}
"""Distribution name -> number of arguments (None: a non-empty list of options)."""

PIP_HINT = 'pip install -e ".[tune]" (Ray Tune and Optuna)'


@dataclass(frozen=True)
class TuneArgs:
    space: str
    """Search space YAML (see the module docstring)."""
    model: str = "smollm2-135m"
    """A load_model name or local folder."""
    preset: str = "cpu"
    """The hyperparameter block the sampled values are merged over."""
    trials: int = 16
    """Trials Optuna proposes in all."""
    target_bits: float = 2.0
    """Each trial trains at this fixed target."""
    seed: int = 0
    """The agent seed of every trial (so trials differ by their hyperparameters only)."""
    search_seed: int = 0
    """Optuna's sampler seed."""
    episodes: Optional[int] = None
    """Override the preset's episode count."""
    out: str = "runs/tune"
    calibration_seed: Optional[int] = None
    hyperparams: Optional[str] = None
    """Another hyperparameter YAML holding ``preset``."""
    device: str = "auto"
    address: Optional[str] = None
    """An existing Ray cluster; None starts Ray on this machine."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: Optional[int] = None
    """Trials at once (default: as many as the resources allow)."""
    num_cpus: Optional[int] = None
    """CPUs of the local Ray instance (default: all); ignored with ``address``."""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}; e.g. --trials 16.")
        check_bits(self.target_bits, "target_bits", "--target-bits 2.0")
        if not self.cpus_per_trial > 0 or self.gpus_per_trial < 0:
            raise ConfigError(f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {self.cpus_per_trial} and "
                              f"{self.gpus_per_trial}.")


def load_space(path: str | Path, hp: Dict[str, Any]) -> Dict[str, tuple]:
    """Read and check a search space: ``{dotted key: (distribution, arguments)}``; every key
    must name a hyperparameter of ``hp`` (the preset)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Search space file {path} does not exist; write one (see `windquant tune --help`).")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path} must map hyperparameter keys to distributions, e.g. "
                          "'learning_rate: {loguniform: [1.0e-5, 1.0e-3]}'.")
    space = {}
    for key, spec in raw.items():
        _check_key(str(key), hp, path)
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{path}: {key}: {spec!r} is not a distribution; use one of "
                              f"{sorted(DISTRIBUTIONS)}, e.g. {{uniform: [0.05, 0.3]}}.")
        kind, values = next(iter(spec.items()))
        arity = DISTRIBUTIONS[kind]
        if not isinstance(values, list) or (arity is not None and len(values) != arity) or not values:
            want = f"{arity} numbers [low, high]" if arity else "a non-empty list of options"
            raise ConfigError(f"{path}: {key}: {kind} takes {want}, got {values!r}.")
        if arity is not None and not values[0] < values[1]:
            raise ConfigError(f"{path}: {key}: {kind} needs low < high, got {values!r}.")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{path}: {key}: loguniform needs low > 0, got {values!r}.")
        space[str(key)] = (kind, values)
    return space


def _check_key(key: str, hp: Dict[str, Any], path: Path) -> None:
    node = hp
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = sorted(node) if isinstance(node, dict) else []
            where = ".".join(parts[:depth]) or "the preset"
            raise ConfigError(f"{path}: {key!r} is not a hyperparameter of the preset ({where} has {known}).")
        node = node[part]


def nest(flat: Dict[str, Any]) -> Dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (what the preset's YAML looks like)."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _ray_tune():
    try:
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401  (OptunaSearch imports it lazily: fail here, with the pip command)
    except ImportError as error:
        raise MissingDependencyError(f"windquant tune needs Ray Tune and Optuna ({error.name} is missing): {PIP_HINT}.") from error
    return tune, OptunaSearch


def _param_space(tune, space: Dict[str, tuple]) -> Dict[str, Any]:
    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint, "choice": tune.choice}
    return {key: (make[kind](values) if kind == "choice" else make[kind](*values)) for key, (kind, values) in space.items()}


def run_trial(config: Dict[str, Any], args: TuneArgs, forwarded: Dict[str, str]) -> None:
    """One trial: train with the sampled hyperparameters (resuming the trial's run when it was
    interrupted), report its proxy and held-out perplexity to Tune."""
    import os

    import torch
    from ray import tune

    from ..agents.train import TrainArgs, train
    from .runs import INTERRUPTED, run_status

    os.environ.update(forwarded)
    torch.set_num_threads(max(1, int(args.cpus_per_trial)))
    folder = Path(args.out) / "trials" / tune.get_context().get_trial_id()
    if run_status(folder) == INTERRUPTED:
        train_args = TrainArgs(resume=str(folder), progress=False)
    else:
        train_args = TrainArgs(model=args.model, preset=args.preset, out=str(folder), episodes=args.episodes,
                               target_bits=args.target_bits, seed=args.seed, calibration_seed=args.calibration_seed,
                               device=args.device, progress=False, hyperparams=args.hyperparams,
                               overrides=nest(config), overwrite=True)
    summary = train(train_args)
    returned = summary["results"][summary["returned"]]
    tune.report({"proxy_ppl": returned["proxy_ppl"], "heldout_ppl": returned["heldout_ppl"],
                 "effective_bits": returned["effective_bits"], "evaluations": summary.get("policy_evaluations", summary["evaluations"]),
                 "run": str(folder)})


def run_tune(args: TuneArgs) -> Dict[str, Any]:
    """Run (or restore and finish) the search; write the trials table and the best block."""
    import ray

    from ..agents.hyperparams import load_hyperparams
    from .execute import absolute_paths, connect, forwarded_env, prepare_problem
    from .config import SweepArgs

    args = absolute_paths(args, space=args.space)
    hp = load_hyperparams(args.preset, args.hyperparams)
    space = load_space(args.space, hp)
    tune, OptunaSearch = _ray_tune()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_search_folder(args, hp, space)
    owned = not ray.is_initialized()
    if owned:
        connect(ray, args.address, args.num_cpus)
    try:
        # the problem (calibration, table) once, before trials fan out
        sweep_args = SweepArgs(model=args.model, preset=args.preset, seeds=[args.seed], target_bits=[args.target_bits],
                               out=str(out), calibration_seed=args.calibration_seed, hyperparams=args.hyperparams,
                               device=args.device, progress=False)
        ray.get(ray.remote(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial, max_calls=1)(prepare_problem)
                .remote(sweep_args, forwarded_env(), max(1, int(args.cpus_per_trial))))
        trainable = tune.with_resources(tune.with_parameters(run_trial, args=args, forwarded=forwarded_env()),
                                        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        experiment = out / "tune"
        if tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
        else:
            search = OptunaSearch(metric="proxy_ppl", mode="min", seed=args.search_seed)
            tuner = tune.Tuner(
                trainable, param_space=_param_space(tune, space),
                tune_config=tune.TuneConfig(search_alg=search, num_samples=args.trials,
                                            max_concurrent_trials=args.max_concurrent),
                run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1),
            )
        grid = tuner.fit()
    finally:
        if owned:
            ray.shutdown()
    return write_trials(args, hp, grid)


# what a restored search must share with the command that started it
_SEARCH_SHAPING = ("model", "preset", "trials", "target_bits", "seed", "search_seed", "episodes", "calibration_seed",
                   "hyperparams", "device")


def _check_search_folder(args: TuneArgs, hp: Dict[str, Any], space: Dict[str, tuple]) -> None:
    """Record what shapes the search in ``OUT/search.json``, or refuse a re-run that differs
    (Tune would restore the old search under the new arguments)."""
    from ..cache import atomic_path

    path = Path(args.out) / "search.json"
    wanted = json.loads(json.dumps({**{k: getattr(args, k) for k in _SEARCH_SHAPING}, "space": space,
                                    "hyperparameters": hp}, sort_keys=True, default=str))
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path} is damaged; restore it, or pick another --out.") from None
        differ = sorted(k for k in wanted if saved.get(k) != wanted[k])
        if differ:
            raise ConfigError(f"{args.out} holds a search with other {', '.join(differ)}: re-run it with its own "
                              "settings to finish it, or pick another --out.")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(wanted, indent=1))


def write_trials(args: TuneArgs, hp: Dict[str, Any], grid) -> Dict[str, Any]:
    from ..agents.hyperparams import merge_hyperparams

    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trials.append({"trial": metrics.get("trial_id") or Path(result.path).name, "config": dict(result.config or {}),
                       "proxy_ppl": metrics.get("proxy_ppl"), "heldout_ppl": metrics.get("heldout_ppl"),
                       "effective_bits": metrics.get("effective_bits"), "evaluations": metrics.get("evaluations"),
                       "run": metrics.get("run"), "error": _first_line(result.error) if result.error else None})
    finished = [t for t in trials if isinstance(t["proxy_ppl"], (int, float)) and math.isfinite(t["proxy_ppl"])]
    finished.sort(key=lambda t: t["proxy_ppl"])
    out = Path(args.out)
    report = {"meta": asdict(args), "trials": trials,
              "best": finished[0] if finished else None}
    (out / "trials.json").write_text(json.dumps(report, indent=1, default=str))
    keys = sorted({k for t in trials for k in t["config"]})
    with (out / "trials.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", *keys, "proxy_ppl", "heldout_ppl", "error"])
        for t in trials:
            writer.writerow([t["trial"], *(t["config"].get(k) for k in keys), t["proxy_ppl"], t["heldout_ppl"], t["error"]])
    lines = ["| trial | " + " | ".join(keys) + " | proxy PPL | held-out PPL |", "|---" * (len(keys) + 3) + "|"]
    for t in finished + [t for t in trials if t not in finished]:
        cells = [_fmt(t["config"].get(k)) for k in keys]
        lines.append(f"| {t['trial']} | " + " | ".join(cells) + f" | {_fmt(t['proxy_ppl'])} | {_fmt(t['heldout_ppl'])} |")
    (out / "trials.md").write_text("\n".join(lines) + "\n\nChosen by proxy PPL (lowest first); held-out PPL is reported, never used to choose.\n")
    if finished:
        best = merge_hyperparams(hp, nest(finished[0]["config"]))
        if args.episodes is not None:  # what the trials trained for
            best["episodes"] = args.episodes
        (out / "best_hyperparams.yml").write_text(
            f"# windquant tune: the best of {len(finished)} trials by proxy PPL ({finished[0]['trial']}), over preset "
            f"{args.preset!r}\n# use: windquant train --hyperparams {out / 'best_hyperparams.yml'} --preset tuned\n"
            + yaml.safe_dump({"default": best, "tuned": {}}, sort_keys=False))
    return report


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
