"""Zero-shot task accuracy through lm-eval-harness, with or without a plan applied.

Optional: ``pip install -e ".[zeroshot]"`` (lm-eval >= 0.4). The model is wrapped in
lm-eval's Hugging Face wrapper (``HFLM(pretrained=model, tokenizer=tokenizer)``) and
evaluated in place: with a plan, inside :func:`~windquant_gym.quant.apply.quantized_weights`,
so its own weights are back, bit for bit, afterwards.

Nothing here downloads on purpose, but lm-eval loads task data through ``datasets``: set
``HF_DATASETS_OFFLINE=1`` (and ``HF_HUB_OFFLINE=1``) and use tasks whose data is present
locally, either a built-in task already in the Hugging Face datasets cache or a task YAML of
your own in a folder passed as ``task_dirs`` (``--task-dir``), e.g. a multiple-choice task
over a local JSON Lines file::

    task: my_mc
    dataset_path: json
    dataset_kwargs:
      data_files: {test: /data/my_mc.jsonl}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    metric_list:
      - {metric: acc, aggregation: mean, higher_is_better: true}
"""

from __future__ import annotations

import copy
import difflib
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import ConfigError, DataError, MissingDependencyError, UnknownNameError

INSTALL_HINT = 'pip install -e ".[zeroshot]"  (or pip install "lm-eval>=0.4")'

#: Keys of an lm-eval result entry that are not metrics.
_NOT_METRICS = {"name", "alias", "sample_len", "samples", "sample_count"}


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise MissingDependencyError(
            f"Zero-shot evaluation needs lm-eval-harness (the 'lm-eval' package): {INSTALL_HINT}"
        ) from error
    return lm_eval, HFLM, TaskManager


def _as_dirs(task_dirs) -> List[Path]:
    if task_dirs is None:
        return []
    dirs = [Path(task_dirs)] if isinstance(task_dirs, (str, Path)) else [Path(d) for d in task_dirs]
    missing = [str(d) for d in dirs if not d.exists()]
    if missing:
        raise ConfigError(f"Task folder(s) {missing} do not exist; pass folders holding lm-eval task YAML files.")
    return dirs


def _data_errors() -> Tuple[type, ...]:
    """What ``datasets`` raises when data is not local: OSError covers ConnectionError (offline
    mode, no network), FileNotFoundError (missing data_files) and hub errors."""
    errors: List[type] = [OSError]
    try:
        from datasets.exceptions import DatasetsError

        errors.append(DatasetsError)
    except ImportError:  # older datasets
        pass
    return tuple(errors)


def _task_manager(TaskManager, tasks: List[str], dirs: List[Path]):
    """A TaskManager that knows ``tasks``: the local folders alone when they define every
    task (fast: lm-eval's ~15k built-in YAMLs are not indexed), else built-ins as well.
    Its ``load`` turns "data not present locally" into :class:`DataError`."""
    data_errors = _data_errors()

    class OfflineTaskManager(TaskManager):
        def load(self, task_list):
            try:
                return super().load(task_list)
            except data_errors as error:
                raise DataError(
                    f"Could not load the data of zero-shot task(s) {tasks} ({type(error).__name__}: {error}). "
                    "The data must be present locally: a built-in lm-eval task must already be in the Hugging Face "
                    "datasets cache (set HF_DATASETS_OFFLINE=1 so nothing is fetched), or define the task in a "
                    "local task YAML (e.g. dataset_path: json with dataset_kwargs: {data_files: ...} pointing at a "
                    "local file) inside a folder passed as task_dirs / --task-dir."
                ) from error

    def known(manager, name: str) -> bool:
        return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file())

    if dirs:
        manager = OfflineTaskManager(include_path=[str(d) for d in dirs], include_defaults=False)
        if all(known(manager, name) for name in tasks):
            return manager
    manager = OfflineTaskManager(include_path=[str(d) for d in dirs] or None, include_defaults=True)
    unknown = [name for name in tasks if not known(manager, name)]
    if unknown:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in unknown}
        where = f" or a task YAML under {[str(d) for d in dirs]}" if dirs else "; pass task_dirs / --task-dir for your own YAML tasks"
        raise UnknownNameError(
            f"Unknown zero-shot task(s) {unknown}: not an lm-eval task, group or tag{where}. "
            f"Close matches: {hints}."
        )
    return manager


@contextmanager
def _kept_rng_state(model: torch.nn.Module) -> Iterator[None]:
    """lm-eval seeds python, numpy and torch globally; give the caller its RNG state back."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _metrics(entry: Dict[str, object]) -> Dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``
    (the filter name stays when it is not ``none``); non-numeric values ("N/A") are left out."""
    out: Dict[str, float] = {}
    for key, value in entry.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        out[metric if filter_name in ("", "none") else key] = float(value)
    return out


def main_metric(metrics: Dict[str, float]) -> Tuple[str, float]:
    """The task's main metric: the first one its config lists (lm-eval keeps that order),
    stderr entries aside, e.g. ``acc`` for a task listing ``[acc, acc_norm]``."""
    for name, value in metrics.items():
        if "_stderr" not in name:
            return name, value
    raise DataError(f"lm-eval reported no metric, only {sorted(metrics)}.")


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: Union[str, Sequence[str]],
    *,
    plan=None,
    table=None,
    limit: Optional[Union[int, float]] = None,
    batch_size: int = 8,
    task_dirs: Optional[Union[str, Path, Sequence[Union[str, Path]]]] = None,
) -> Dict[str, Dict[str, float]]:
    """Zero-shot metrics of ``model`` on lm-eval ``tasks``: ``{task: {metric: value}}``.

    ``plan`` (actions, or a :class:`~windquant_gym.plan.QuantPlan`) with its ``table``: the
    model is evaluated with the plan's quantized weights, and has its own back afterwards.
    ``limit``: at most that many documents per task (a float below 1: that fraction).
    ``task_dirs``: folders of local task YAML files (lm-eval's ``include_path``). Tasks run
    with 0 few-shot examples whatever their YAML says. Metric names drop lm-eval's ``,none``
    filter suffix (``acc``, ``acc_stderr``, ``acc_norm``); the first listed is the task's main
    metric (:func:`main_metric`). The caller's tokenizer and RNG state are left as they were.

    Raises :class:`MissingDependencyError` without lm-eval, :class:`UnknownNameError` for a
    task lm-eval does not know, :class:`DataError` when a task's data is not present locally.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"tasks must be one or more lm-eval task names, got {tasks!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ConfigError(f"limit must be a positive number of documents (or a fraction below 1), got {limit!r}.")
    if plan is not None:
        if table is None:
            raise ConfigError("zero_shot(plan=...) needs the QuantTable the plan was made for: pass table=problem.table.")
        if hasattr(plan, "check") and hasattr(plan, "actions"):  # a QuantPlan
            plan.check(table)
            plan = plan.actions
    dirs = _as_dirs(task_dirs)
    lm_eval, HFLM, TaskManager = require_lm_eval()
    from ..quant.apply import quantized_weights

    manager = _task_manager(TaskManager, names, dirs)
    was_training = model.training
    # HFLM calls model.tie_weights(): on a model whose config says "tied" but whose head holds
    # its own tensor that would replace the head. Keep the parameter objects and put them back.
    parameters = {name: module._parameters.get("weight") for name, module in model.named_modules()
                  if "weight" in module._parameters}
    try:
        # HFLM sets a pad token on its tokenizer: give it a copy, not the caller's
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        applied = quantized_weights(model, table, plan) if plan is not None else nullcontext(model)
        with _kept_rng_state(model), applied, torch.no_grad():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=0, limit=limit, task_manager=manager, log_samples=False
            )
    finally:
        model.train(was_training)
        for name, parameter in parameters.items():
            module = model.get_submodule(name)
            if module._parameters.get("weight") is not parameter:
                module._parameters["weight"] = parameter
    if not results or "results" not in results:
        raise DataError(f"lm-eval returned no results for {names}.")
    metrics = {task: _metrics(entry) for task, entry in results["results"].items()}
    return {task: values for task, values in metrics.items() if values}  # a group without aggregate: no entry


__all__ = ["INSTALL_HINT", "main_metric", "require_lm_eval", "zero_shot"]
