"""``export_plan``: write a plan's packed model to a folder (layout in :mod:`.layout`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, OutputExistsError, TableMismatchError
from ..plan import QuantPlan
from ..problem import QuantProblem
from ..quant.table import QuantTable
from ..quant.units import module_names
from .codec import encode_module
from .hf_quantizer import export_quantization_config
from .layout import OLD_REST_FILE, PACKED_FILE, PLAN_FILE, ModuleLayout, layout_metadata

#: Relative tolerance of the model <-> table check (float32 sums in another order).
_ENERGY_RTOL = 1e-4


def export_plan(
    plan: QuantPlan | str | Path | Sequence[int],
    source: QuantProblem | QuantTable,
    out_dir: str | Path,
    *,
    model: Optional[nn.Module] = None,
    tokenizer=None,
    overwrite: bool = False,
    rest_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``plan`` applied to ``source``'s model as a packed export in ``out_dir``.

    ``plan``: a :class:`QuantPlan`, the path of its JSON, or one action per unit.
    ``source``: the :class:`QuantProblem` the plan was made on, or its :class:`QuantTable`
    together with ``model=`` (and ``tokenizer=``, to write the tokenizer files).
    Writes ``model.safetensors`` (the quantized Linears packed, every other tensor in
    ``rest_dtype``, under the model's state-dict names), ``plan.json``, ``config.json`` (with
    the ``quantization_config`` that ``AutoModelForCausalLM.from_pretrained`` reads after
    ``import windquant_gym``) and the tokenizer files. ``out_dir`` must be new or empty unless
    ``overwrite=True`` (files of the same name are then replaced; other files are left alone).
    Returns ``out_dir``. Read it back with :func:`windquant_gym.load_quantized` or
    ``from_pretrained``; sizes with :func:`packed_size`.
    """
    table, model, tokenizer = _resolve_source(source, model, tokenizer)
    plan = _resolve_plan(plan, table, getattr(model.config, "name_or_path", "") or type(model).__name__)
    plan.check(table)
    check_model_matches_table(model, table)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tensors, layouts = _packed_tensors(table, model, plan.actions)
        tensors.update(_rest_tensors(model, {f"{name}.weight" for name in layouts}, rest_dtype))
        _save(tensors, staging / PACKED_FILE, layout_metadata(layouts))
        plan.save(staging / PLAN_FILE)
        config = copy.deepcopy(model.config)
        config.quantization_config = export_quantization_config(layouts, table.config.chunk_size, _plan_summary(plan, table))
        config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / OLD_REST_FILE).is_file():  # a format-1 export overwritten: its second file would mislead
            (out_dir / OLD_REST_FILE).unlink()
        for item in staging.iterdir():
            target = out_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _plan_summary(plan: QuantPlan, table: QuantTable) -> Dict:
    bits = table.plan_bits(plan.actions)
    summary = {"model": plan.model, "table_fingerprint": plan.table_fingerprint,
               "effective_bits": float(bits["effective_bits"]), "storage_bits": float(bits["storage_bits"])}
    if "target_bits" in plan.metrics:
        summary["target_bits"] = plan.metrics["target_bits"]
    if plan.problem is not None:
        summary["problem"] = json.loads(json.dumps(dataclasses.asdict(plan.problem), default=str))
    return summary


def _resolve_source(source, model, tokenizer) -> Tuple[QuantTable, nn.Module, object]:
    if isinstance(source, QuantProblem):
        return source.table, model if model is not None else source.model, tokenizer if tokenizer is not None else source.tokenizer
    if isinstance(source, QuantTable):
        if model is None:
            raise ConfigError(
                "export_plan got a QuantTable but no model: pass model=... (the model the table was built from) "
                "and tokenizer=..., or pass the QuantProblem instead of its table."
            )
        return source, model, tokenizer
    raise ConfigError(f"export_plan needs a QuantProblem or a QuantTable as source, got {type(source).__name__}.")


def _resolve_plan(plan, table: QuantTable, model_name: str) -> QuantPlan:
    if isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, (str, Path)):
        return QuantPlan.load(plan)
    return QuantPlan.from_table(table, plan, model_name)


def check_model_matches_table(model: nn.Module, table: QuantTable) -> None:
    """Refuse a model whose decoder Linears are not the ones ``table`` was fitted on
    (shape, then each unit's ``sum W^2`` against the table's record)."""
    units_by_module: Dict[str, list] = {}
    for unit in table.units:
        units_by_module.setdefault(unit.module, []).append(unit)
    for name, units in units_by_module.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise TableMismatchError(
                f"The model ({type(model).__name__}) has no Linear {name!r}, which the table quantizes: the plan and "
                "table are for another architecture. Pass the model the plan was made for."
            ) from None
        expected = (units[0].out_features, units[0].in_features)
        if tuple(weight.shape) != expected:
            raise TableMismatchError(
                f"{name}.weight has shape {tuple(weight.shape)}, the table has {expected}: another model. "
                "Pass the model the plan was made for."
            )
        with torch.no_grad():
            w = weight.detach().float()
            energy = np.array([float((w[:, u.col_start : u.col_end] ** 2).sum()) for u in units])
        recorded = table.energy_plain[[u.index for u in units]]
        bad = ~np.isclose(energy, recorded, rtol=_ENERGY_RTOL, atol=1e-12)
        if bad.any():
            i = int(np.argmax(bad))
            raise TableMismatchError(
                f"{name} columns {units[i].col_start}:{units[i].col_end} have sum(W^2) = {energy[i]:.6g}, the table "
                f"recorded {recorded[i]:.6g}: these are not the weights the table (and plan) were made from. Pass the "
                "model the plan was made for, with its original (unquantized) weights."
            )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"Output {str(out_dir)!r} exists and is not a folder; choose a folder path for the export.")
    if out_dir.is_dir() and not overwrite:
        entries = sorted(p.name for p in out_dir.iterdir())
        if entries:
            raise OutputExistsError(
                f"Output folder {str(out_dir)!r} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); choose a new "
                "or empty folder, or pass overwrite=True (CLI: --overwrite) to replace the export's files in it."
            )


def _packed_tensors(table: QuantTable, model: nn.Module, actions: Sequence[int]):
    actions = table.check_plan(actions)
    tensors: Dict[str, torch.Tensor] = {}
    layouts: Dict[str, ModuleLayout] = {}
    for name in module_names(table.units):
        units = [u for u in table.units if u.module == name]
        module_tensors, layouts[name] = encode_module(
            table, units, [int(actions[u.index]) for u in units], model.get_submodule(name).weight
        )
        tensors.update({f"{name}.{local}": tensor for local, tensor in module_tensors.items()})
    return tensors, layouts


def _rest_tensors(model: nn.Module, packed: set, dtype: torch.dtype):
    """Every state-dict tensor not packed, floating ones cast to ``dtype``. A tensor the model
    ties to another (the head to the embeddings, per its config) is written once, as
    ``save_pretrained`` does: ``from_pretrained`` ties it again."""
    rest: Dict[str, torch.Tensor] = {}
    seen: Dict[tuple, str] = {}
    ties = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name in packed:
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity in seen and ties:
            continue
        seen.setdefault(identity, name)
        value = tensor.detach().cpu()
        rest[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous().clone()
    return rest


def _save(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
