"""Building the quantization table: its cache key, its inputs' checks, and the batched fit
of every (unit, action) (:mod:`.fitting` fits one batch of same-shape units)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..cache import load_or_build
from ..errors import ConfigError, DataError, TableMismatchError
from ..fingerprint import tensors_fingerprint
from ..paths import cache_dir
from . import code_version
from .accounting import unit_bit_tables
from .bitwidths import N_ACTIONS, has_zero_points
from .config import QuantConfig
from .fitting import fit_units, stored_actions, unit_errors
from .rotation import rotated_inputs
from .table import TABLE_FORMAT, QuantTable
from .units import Unit, check_weights, find_units, module_names


def describe_model(model: nn.Module) -> str:
    """A short name for ``model`` in cache listings: its folder or hub id, else its class."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(str(name)).name if name else type(model).__name__


def needs_hessians(config: QuantConfig) -> bool:
    """Whether building a table with ``config`` reads the calibration's Hessian blocks."""
    return (config.compensation != "none" or config.error_metric == "output" or config.scale_refit != "none"
            or config.rotation != "none"  # the rotated frame's activation scales come from H
            or config.salient_metric == "obs")


def table_fingerprint(
    model: nn.Module,
    units: List[Unit],
    act_scales: Dict[str, torch.Tensor],
    config: QuantConfig,
    hessians: Optional[Dict[str, torch.Tensor]] = None,
) -> str:
    """Changes when the weights, the calibration (scales, and Hessians when used), the config,
    the table format or the fitting code (:func:`~windquant_gym.quant.code_version.fitting_code_version`) change."""
    names = module_names(units)
    weights = ((f"w:{n}", model.get_submodule(n).weight) for n in names)
    scales = ((f"s:{n}", act_scales[n]) for n in names)
    key = tensors_fingerprint(weights, *[f"format={TABLE_FORMAT}", f"code={code_version.fitting_code_version()}", config.to_json()]) + tensors_fingerprint(scales)[:16]
    if hessians is not None and needs_hessians(config):
        seen = {}
        for n in names:  # shared blocks (q/k/v) are hashed once
            seen.setdefault(id(hessians[n]), (f"h:{n}", hessians[n]))
        key = key[:40] + tensors_fingerprint(seen.values())[:8]
    return key


FIT_BATCH_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}
"""Weights fitted at once by default, per fitting device. The fit's column loop launches the
same few kernels whatever the batch holds, so on a GPU a batch of 2 of LLaMA-8B's 14336 x 256
units leaves it idle; 1 << 26 (about 32 float32 copies of it, 8 GiB of scratch) fills it."""


def build_table(
    model: nn.Module,
    act_scales: Dict[str, torch.Tensor],
    config: QuantConfig = QuantConfig(),
    *,
    hessians: Optional[Dict[str, torch.Tensor]] = None,
    device: Optional[torch.device | str] = None,
    cache: bool | str | Path = True,
    progress: bool = True,
    batch_elements: Optional[int] = None,
    storage_device: Optional[torch.device | str] = None,
    units: Optional[List[Unit]] = None,
) -> QuantTable:
    """Fit every (unit, non-skip action) of ``model`` and return the table.

    ``act_scales`` and ``hessians`` come from :func:`windquant_gym.calibrate` (its
    ``act_scales`` and ``hessians``); the Hessian blocks are needed unless
    ``config.compensation == "none"`` and ``config.error_metric == "activation"``.
    ``cache``: True for the user cache folder, a folder path, or False. A cached table is
    reused when the weights, the calibration, the config and the fitting code match; a
    damaged cached table is rebuilt with a :class:`~windquant_gym.errors.CacheWarning`, and
    processes needing the same table at once build it once (a file lock). ``batch_elements``
    bounds the weights fitted at once (memory, not results; default
    :data:`FIT_BATCH_ELEMENTS` for the fitting device). ``device`` is where the
    fitting runs (default: the model's); ``storage_device`` where the table is kept
    (default: the same; ``"cpu"`` for models too large to hold six quantized copies beside
    them on the GPU). ``units``: the model's units at ``config.chunk_size``, already found and
    checked by the caller (:meth:`QuantProblem.build` passes its own); default: found here.
    """
    if units is None:
        units = find_units(model, config.chunk_size)
        check_weights(model, units)  # NaN / Inf / beyond-fp16 weights never reach the fit
    elif any(u.width > config.chunk_size for u in units):
        raise ConfigError(f"build_table got units cut at another chunk size than config.chunk_size={config.chunk_size}; "
                          "pass units=find_units(model, config.chunk_size) or none.")
    _check_act_scales(model, units, act_scales)
    if needs_hessians(config):
        _check_hessians(model, units, hessians, config)
    else:
        hessians = None
    fingerprint = table_fingerprint(model, units, act_scales, config, hessians)
    fit_device = torch.device(device) if device is not None else _model_device(model)
    if batch_elements is None:
        batch_elements = FIT_BATCH_ELEMENTS.get(fit_device.type, FIT_BATCH_ELEMENTS["cpu"])
    storage = torch.device(storage_device) if storage_device is not None else fit_device

    def fit() -> QuantTable:
        started = time.perf_counter()
        table = _fit_all(model, units, act_scales, hessians, config, fit_device, progress, batch_elements, fingerprint, storage)
        table.build_seconds = time.perf_counter() - started
        table.model_name = describe_model(model)
        return table

    if not cache:
        return fit()
    folder = cache_dir("tables") if cache is True else Path(cache)
    path = folder / f"{fingerprint}.safetensors"
    # on the CPU the table is read memory-mapped (safetensors): processes that need it (vector-env
    # workers, sweep runs) share one copy of its pages, the builder too once it has written it
    return load_or_build(path, lambda p: _load_table(p, storage, fingerprint), fit, QuantTable.save, "quantization table",
                         reload=storage.type == "cpu")


def _load_table(path: Path, device: torch.device, fingerprint: str) -> QuantTable:
    table = QuantTable.load(path, device=device)
    if table.fingerprint != fingerprint:
        raise TableMismatchError(f"it holds the table {table.fingerprint}, its name says {fingerprint}")
    return table


def _check_act_scales(model: nn.Module, units: List[Unit], act_scales: Dict[str, torch.Tensor]) -> None:
    """Every module needs a finite, non-negative ``[in_features]`` activation scale."""
    names = module_names(units)
    missing = [n for n in names if n not in act_scales]
    if missing:
        raise TableMismatchError(f"act_scales lacks {len(missing)} modules, e.g. {missing[0]!r}; run calibrate() on this model.")
    for name in names:
        scale = act_scales[name]
        in_features = model.get_submodule(name).weight.shape[1]
        shape = tuple(getattr(scale, "shape", ()))
        if shape != (in_features,):
            raise TableMismatchError(
                f"act_scales[{name!r}] has shape {shape}, the module has {in_features} input features: these "
                "scales belong to another model; run calibrate() on this one."
            )
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise DataError(
                f"act_scales[{name!r}] holds NaN, Inf or negative values (min {float(scale.min())}, max "
                f"{float(scale.max())}): the calibration pass overflowed. Calibrate in float32 or bfloat16, "
                "on text the model handles."
            )


def _check_hessians(model, units: List[Unit], hessians, config: QuantConfig) -> None:
    """Every module needs finite ``[n_chunks, chunk_size, chunk_size]`` blocks at the config's chunk size."""
    if not hessians:
        raise ConfigError(
            f"QuantConfig(compensation={config.compensation!r}, error_metric={config.error_metric!r}, "
            f"scale_refit={config.scale_refit!r}, rotation={config.rotation!r}, salient_metric={config.salient_metric!r}) "
            "needs the calibration's Hessian blocks: pass hessians=calibration.hessians (calibrate() collects them), or use "
            "QuantConfig(compensation='none', error_metric='activation', scale_refit='none', rotation='none', "
            "salient_metric='activation'), which needs only act_scales."
        )
    for name in module_names(units):
        hessian = hessians.get(name)
        in_features = model.get_submodule(name).weight.shape[1]
        n_chunks = -(-in_features // config.chunk_size)
        size = min(config.chunk_size, in_features)
        shape = tuple(getattr(hessian, "shape", ()))
        if hessian is None or len(shape) != 3 or shape[0] != n_chunks or shape[1] != shape[2] or shape[1] < size:
            raise TableMismatchError(
                f"hessians[{name!r}] has shape {shape if hessian is not None else 'missing'}, the table needs "
                f"{n_chunks} blocks of {size} x {size} (chunk_size {config.chunk_size}, {in_features} inputs): "
                "calibrate() this model with the same chunk size as the QuantConfig."
            )
        if not bool(torch.isfinite(hessian).all()):
            raise DataError(
                f"hessians[{name!r}] holds NaN or Inf: the calibration pass overflowed. Calibrate in float32 or "
                "bfloat16, on text the model handles."
            )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _fit_all(model, units, act_scales, hessians, config, device, progress, batch_elements, fingerprint, storage) -> QuantTable:
    n_units = len(units)
    n_weights, n_salient, _, _ = unit_bit_tables([u.out_features for u in units], [u.width for u in units], config.salient_rate)
    errors = {kind: np.full((n_units, N_ACTIONS), np.nan) for kind in ("plain", "act", "output")}
    energy = {kind: np.full(n_units, np.nan) for kind in ("plain", "act", "output")}
    codes, scales, zeros, protected_masks, outlier_codes, outlier_scales = {}, {}, {}, {}, {}, {}
    with_zeros = has_zero_points(config.grid)
    rotated = config.rotation != "none"
    for name in module_names(units):
        weight = model.get_submodule(name).weight
        out_f, in_f = weight.shape
        n_chunks = -(-in_f // config.chunk_size)
        codes[name] = torch.empty((N_ACTIONS - 1, out_f, in_f), dtype=torch.int8, device=storage)
        scales[name] = torch.empty((N_ACTIONS - 1, out_f, n_chunks), dtype=torch.float16, device=storage)
        if with_zeros:
            zeros[name] = torch.zeros((N_ACTIONS - 1, out_f, n_chunks), dtype=torch.float16, device=storage)
        protected_masks[name] = torch.zeros((out_f, in_f), dtype=torch.bool, device=storage)
        outlier_codes[name] = torch.zeros((out_f, in_f), dtype=torch.int8, device=storage)
        outlier_scales[name] = torch.zeros((out_f, n_chunks), dtype=torch.float16, device=storage)

    groups = defaultdict(list)  # same shape -> one batched fit
    for unit in units:
        groups[(unit.out_features, unit.width)].append(unit)
    bar = tqdm(total=n_units, desc="quantization table", unit="unit", disable=not progress)
    for (out_f, width), members in groups.items():
        per_batch = max(1, batch_elements // (out_f * width))
        for start in range(0, len(members), per_batch):
            batch = members[start : start + per_batch]
            w = torch.stack([_unit_weight(model, u, device) for u in batch])
            s = torch.stack([act_scales[u.module][u.col_start : u.col_end].to(device, torch.float32) for u in batch])[:, None, :]
            hessian = None if hessians is None else torch.stack([_unit_hessian(hessians, u, config, device) for u in batch])
            index = [u.index for u in batch]
            if rotated:  # fitted, and its errors measured, in the unit's rotated frame
                original, (w, hessian, s) = w, rotated_inputs(w, hessian, width)
            fitted = fit_units(w, s, hessian, config, int(n_salient[index[0]]))
            if rotated:  # skip stores the model's own columns in fp16, not the rotated ones
                skip = unit_errors(w, rotated_inputs(original.half().float(), None, width)[0], s, hessian)
                for kind, value in zip(("plain", "act", "output"), skip):
                    getattr(fitted, f"error_{kind}")[:, 0] = value
            for kind in errors:
                errors[kind][index] = getattr(fitted, f"error_{kind}")
                energy[kind][index] = getattr(fitted, f"energy_{kind}")
            for j, unit in enumerate(batch):
                cols, chunk = slice(unit.col_start, unit.col_end), unit.col_start // config.chunk_size
                for a, (action_codes, action_scales, action_zeros) in enumerate(zip(fitted.codes, fitted.scales, fitted.zeros)):
                    codes[unit.module][a, :, cols] = action_codes[j]
                    scales[unit.module][a, :, chunk] = action_scales[j, :, 0].half()
                    if action_zeros is not None:
                        zeros[unit.module][a, :, chunk] = action_zeros[j, :, 0].half()
                protected_masks[unit.module][:, cols] = fitted.protected[j]
                outlier_codes[unit.module][:, cols] = fitted.outlier_codes[j]
                outlier_scales[unit.module][:, chunk] = fitted.outlier_scale[j, :, 0].half()
            bar.update(len(batch))
    bar.close()

    outlier_index, outlier_values = {}, {}
    for name, mask in protected_masks.items():
        flat = mask.view(-1).nonzero().squeeze(1)
        outlier_index[name] = flat
        outlier_values[name] = outlier_codes[name].view(-1)[flat].clone()
    kind = "act" if config.fit_loss == "activation" else "plain"
    rel = errors[kind] / np.maximum(energy[kind], 1e-30)[:, None]
    return QuantTable(
        units=units,
        config=config,
        fingerprint=fingerprint,
        codes=codes,
        scales=scales,
        zeros=zeros,
        outlier_index=outlier_index,
        outlier_codes=outlier_values,
        outlier_scales=outlier_scales,
        fit_error_plain=errors["plain"],
        fit_error_act=errors["act"],
        fit_error_output=errors["output"],
        energy_plain=energy["plain"],
        energy_act=energy["act"],
        energy_output=energy["output"],
        stored_action=stored_actions(rel, config.fallback_thresholds),
    )


def _unit_weight(model: nn.Module, unit: Unit, device) -> torch.Tensor:
    return model.get_submodule(unit.module).weight.detach()[:, unit.col_start : unit.col_end].to(device, torch.float32)


def _unit_hessian(hessians: Dict[str, torch.Tensor], unit: Unit, config: QuantConfig, device) -> torch.Tensor:
    block = hessians[unit.module][unit.col_start // config.chunk_size]
    return block[: unit.width, : unit.width].to(device, torch.float32)
