"""The quantization table: every unit x every non-skip action, fitted once (DESIGN 1).

A unit's fitted quantizer depends only on its weights, its activation scales and the
action, never on other units' decisions; so the fitting is done here once per
(unit, action) and an episode only assembles weights from stored codes.

Stored compactly per module: int8 codes ``[6, out, in]`` (one slice per non-skip action),
fp16 row scales ``[6, out, chunks]``, and the INT8 outliers (positions, codes, an fp16
scale per row of each unit), which are the same for every action because saliency does not depend on
it. Per unit and action: effective and storage bits, reconstruction errors (plain and
activation-weighted), and the action actually stored after the fallback rule.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import DataError, TableMismatchError
from ..fingerprint import tensors_fingerprint
from ..paths import cache_dir
from .accounting import unit_bit_tables
from .bitwidths import ACTION_BITS, BIT_WIDTHS, N_ACTIONS, SKIP_ACTION
from .config import QuantConfig
from .quantizers import dequantize_codes, fit_scales, int8_outliers, protect_salient
from .units import Unit, check_weights, find_units, module_names

TABLE_FORMAT = 2
_QUANT_ACTIONS = range(1, N_ACTIONS)


@dataclass
class QuantTable:
    """Fitted results for every (unit, action). Arrays are indexed ``[unit, action]``;
    ``effective_bits``/``storage_bits``/``rel_error`` describe what is *stored* for the
    requested action (after fallback), ``fit_rel_error`` what the requested action's own
    fit achieved."""

    units: List[Unit]
    config: QuantConfig
    fingerprint: str
    codes: Dict[str, torch.Tensor]
    scales: Dict[str, torch.Tensor]
    outlier_index: Dict[str, torch.Tensor]
    """Flat indices into ``W.view(-1)`` of the module's protected weights."""
    outlier_codes: Dict[str, torch.Tensor]
    outlier_scales: Dict[str, torch.Tensor]
    """fp16 ``[out, chunks]`` scale of the INT8 outliers of each row of each unit."""
    n_weights: np.ndarray
    n_protected: np.ndarray
    fit_error_plain: np.ndarray
    """``[N, 7]`` ``||W - Q||^2`` of each action's own fit (column 0: FP16 rounding)."""
    fit_error_act: np.ndarray
    """``[N, 7]`` ``||(W - Q) diag(s)||^2``."""
    energy_plain: np.ndarray
    energy_act: np.ndarray
    stored_action: np.ndarray
    """``[N, 7]`` action actually stored when an action is requested (fallback applied)."""
    build_seconds: float = 0.0
    _bits_effective: np.ndarray = field(init=False, repr=False)
    _bits_storage: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _, _, effective, storage = unit_bit_tables(
            [u.out_features for u in self.units], [u.width for u in self.units], self.config.salient_rate
        )
        rows = np.arange(len(self.units))[:, None]
        self._bits_effective = effective[rows, self.stored_action]
        self._bits_storage = storage[rows, self.stored_action]
        self._unit_columns = {}
        for unit in self.units:
            self._unit_columns.setdefault(unit.module, []).append(unit)
        # Protection does not depend on the action: dequantize the outliers once.
        self._outlier_unit, self._outlier_values = {}, {}
        for name, index in self.outlier_index.items():
            in_features = self._unit_columns[name][0].in_features
            rows, chunk = index // in_features, (index % in_features) // self.config.chunk_size
            self._outlier_unit[name] = chunk + self._unit_columns[name][0].index
            scale = self.outlier_scales[name][rows, chunk].float()
            self._outlier_values[name] = self.outlier_codes[name].float() * scale

    # ----- per (unit, action) numbers -------------------------------------------------------
    @property
    def effective_bits(self) -> np.ndarray:
        """``[N, 7]`` paper eq. 6 bits of each unit for each requested action."""
        return self._bits_effective

    @property
    def storage_bits(self) -> np.ndarray:
        """``[N, 7]`` packed-file bits of each unit for each requested action."""
        return self._bits_storage

    @property
    def fit_rel_error(self) -> np.ndarray:
        """``[N, 7]`` relative error of each action's own fit, in ``config.fit_loss``'s metric."""
        if self.config.fit_loss == "activation":
            return self.fit_error_act / np.maximum(self.energy_act, 1e-30)[:, None]
        return self.fit_error_plain / np.maximum(self.energy_plain, 1e-30)[:, None]

    def rel_error(self, kind: str = "activation") -> np.ndarray:
        """``[N, 7]`` relative error of what is stored for each requested action:
        ``kind='activation'`` (``||(W-Q) diag(s)||^2 / ||W diag(s)||^2``) or ``'plain'``."""
        err, energy = (
            (self.fit_error_act, self.energy_act) if kind == "activation" else (self.fit_error_plain, self.energy_plain)
        )
        rows = np.arange(len(self.units))[:, None]
        return err[rows, self.stored_action] / np.maximum(energy, 1e-30)[:, None]

    def module_normalized_error(self) -> np.ndarray:
        """``[N, 7]`` activation-weighted error of what is stored, divided by the full-precision
        energy ``||W diag(s)||^2`` of the unit's whole module: comparable across layers
        (a raw error lets late layers' large activations dominate; DESIGN 6)."""
        module_energy: Dict[str, float] = {}
        for unit, energy in zip(self.units, self.energy_act):
            module_energy[unit.module] = module_energy.get(unit.module, 0.0) + float(energy)
        denominator = np.array([module_energy[u.module] for u in self.units])
        rows = np.arange(len(self.units))[:, None]
        return self.fit_error_act[rows, self.stored_action] / np.maximum(denominator, 1e-30)[:, None]

    @property
    def fallbacks(self) -> np.ndarray:
        """``[N, 7]`` bool: the requested action fell back to a higher precision."""
        return self.stored_action != np.arange(N_ACTIONS)[None, :]

    def plan_bits(self, plan: Sequence[int]) -> Dict[str, float]:
        """Average effective and storage bits per weight of a plan (one action per unit)."""
        actions = self.check_plan(plan)
        rows = np.arange(len(self.units))
        total = float(self.n_weights.sum())
        return {
            "effective_bits": float(self.effective_bits[rows, actions].sum() / total),
            "storage_bits": float(self.storage_bits[rows, actions].sum() / total),
            "fallbacks": int(self.fallbacks[rows, actions].sum()),
        }

    def check_plan(self, plan: Sequence[int]) -> np.ndarray:
        try:
            raw = np.asarray(plan)
        except (TypeError, ValueError):  # ragged nested lists
            raw = np.asarray(plan, dtype=object)
        if raw.shape != (len(self.units),):
            raise TableMismatchError(
                f"A plan needs one action per unit: {len(self.units)} for this table, got shape {raw.shape}."
            )
        if raw.dtype.kind not in "iub":
            try:
                values = raw.astype(np.float64)
            except (TypeError, ValueError):
                values = None
            bad = (
                np.arange(len(raw)) if values is None else np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
            )
            if len(bad):
                value = raw[bad[0]]
                value = value.item() if hasattr(value, "item") else value
                raise TableMismatchError(
                    f"Plan actions must be integer action indices in [0, {N_ACTIONS - 1}]; unit {int(bad[0])} has "
                    f"{value!r} ({len(bad)} such units). Use indices into ACTION_BITS {list(ACTION_BITS)}."
                )
            raw = values
        actions = raw.astype(np.int64)
        if actions.min() < 0 or actions.max() >= N_ACTIONS:
            raise TableMismatchError(
                f"Plan actions must lie in [0, {N_ACTIONS - 1}]; got {actions.min()}..{actions.max()}. Use indices "
                f"into ACTION_BITS {list(ACTION_BITS)} (0 is skip), not bit widths."
            )
        return actions

    # ----- weights --------------------------------------------------------------------------
    def dequantize_unit(self, unit_index: int, action: int, original: torch.Tensor) -> torch.Tensor:
        """The ``[out, width]`` float32 weights stored for ``unit_index`` under the requested
        ``action``. ``original`` is the module's original weight (read for skip only)."""
        unit = self.units[unit_index]
        stored = int(self.stored_action[unit_index, action])
        cols = slice(unit.col_start, unit.col_end)
        if stored == SKIP_ACTION:
            return original[:, cols].to(torch.float16).float()
        chunk = unit.col_start // self.config.chunk_size
        spec = BIT_WIDTHS[stored]
        codes = self.codes[unit.module][stored - 1, :, cols]
        result = dequantize_codes(codes, self.scales[unit.module][stored - 1, :, chunk : chunk + 1].float(), spec)
        index = self.outlier_index[unit.module]
        if index.numel():
            mine = self._outlier_unit[unit.module] == unit_index
            rows = index[mine] // unit.in_features
            columns = index[mine] % unit.in_features - unit.col_start
            result[rows, columns] = self._outlier_values[unit.module][mine]
        return result

    def assemble_module(
        self, module: str, actions: Sequence[int], original: torch.Tensor, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The whole quantized weight of ``module`` for its units' requested ``actions``
        (in unit order), written into ``out`` when given (same shape and dtype as original)."""
        units = self._unit_columns[module]
        if out is None:
            out = torch.empty_like(original)
        stored = [int(self.stored_action[u.index, a]) for u, a in zip(units, actions)]
        for unit, action in zip(units, stored):
            cols = slice(unit.col_start, unit.col_end)
            if action == SKIP_ACTION:
                out[:, cols] = original[:, cols].to(torch.float16)
                continue
            chunk = unit.col_start // self.config.chunk_size
            # .to() is a no-op when the table lives where the model does; from a host-memory
            # table (large models) only the chosen action's codes travel
            scale = self.scales[module][action - 1, :, chunk : chunk + 1].to(out.device, non_blocking=True).float()
            codes = self.codes[module][action - 1, :, cols].to(out.device, non_blocking=True)
            out[:, cols] = dequantize_codes(codes, scale, BIT_WIDTHS[action])
        index = self.outlier_index[module]
        if index.numel():
            unit_of = self._outlier_unit[module]
            kept = torch.tensor([a != SKIP_ACTION for a in stored], device=index.device)[unit_of - units[0].index]
            values = self._outlier_values[module][kept].to(out.device, out.dtype)
            out.view(-1)[index[kept].to(out.device)] = values
        return out

    # ----- persistence ----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name in self.codes:
            tensors[f"codes:{name}"] = self.codes[name].cpu().contiguous()
            tensors[f"scales:{name}"] = self.scales[name].cpu().contiguous()
            tensors[f"outlier_index:{name}"] = self.outlier_index[name].cpu().contiguous()
            tensors[f"outlier_codes:{name}"] = self.outlier_codes[name].cpu().contiguous()
            tensors[f"outlier_scales:{name}"] = self.outlier_scales[name].cpu().contiguous()
        for key in ("n_weights", "n_protected", "fit_error_plain", "fit_error_act", "energy_plain", "energy_act", "stored_action"):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(getattr(self, key)))
        meta = {
            "format": str(TABLE_FORMAT),
            "config": self.config.to_json(),
            "fingerprint": self.fingerprint,
            "units": json.dumps([[u.layer, u.module, u.col_start, u.col_end, u.out_features, u.in_features, u.is_attention, u.is_mlp] for u in self.units]),
            "build_seconds": str(self.build_seconds),
        }
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)  # atomic: a crash mid-write never leaves a half table behind

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> "QuantTable":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata()
            if meta.get("format") != str(TABLE_FORMAT):
                raise TableMismatchError(f"{path} holds table format {meta.get('format')}, expected {TABLE_FORMAT}; delete it to rebuild.")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        units = [
            Unit(i, layer, module, start, end, out_f, in_f, attn, mlp)
            for i, (layer, module, start, end, out_f, in_f, attn, mlp) in enumerate(json.loads(meta["units"]))
        ]
        per_module = defaultdict(dict)
        for key, value in tensors.items():
            if ":" in key:
                kind, name = key.split(":", 1)
                per_module[kind][name] = value
        return cls(
            units=units,
            config=QuantConfig.from_json(meta["config"]),
            fingerprint=meta["fingerprint"],
            codes=per_module["codes"],
            scales=per_module["scales"],
            outlier_index=per_module["outlier_index"],
            outlier_codes=per_module["outlier_codes"],
            outlier_scales=per_module["outlier_scales"],
            build_seconds=float(meta.get("build_seconds", 0.0)),
            **{key: tensors[key].cpu().numpy() for key in ("n_weights", "n_protected", "fit_error_plain", "fit_error_act", "energy_plain", "energy_act", "stored_action")},
        )


def table_fingerprint(model: nn.Module, units: List[Unit], act_scales: Dict[str, torch.Tensor], config: QuantConfig) -> str:
    """Changes when the weights, the calibration scales, or the config change."""
    names = module_names(units)
    weights = ((f"w:{n}", model.get_submodule(n).weight) for n in names)
    scales = ((f"s:{n}", act_scales[n]) for n in names)
    return tensors_fingerprint(weights, *[f"format={TABLE_FORMAT}", config.to_json()]) + tensors_fingerprint(scales)[:16]


def _stored_actions(rel_error: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Fallback rule: an action whose own fit exceeds its threshold takes whatever the
    next higher precision stores (recursively, ending at skip)."""
    stored = np.zeros(rel_error.shape, dtype=np.int64)
    for action in _QUANT_ACTIONS:
        ok = rel_error[:, action] <= thresholds[action]
        stored[:, action] = np.where(ok, action, stored[:, action - 1])
    return stored


def build_table(
    model: nn.Module,
    act_scales: Dict[str, torch.Tensor],
    config: QuantConfig = QuantConfig(),
    *,
    device: Optional[torch.device | str] = None,
    cache: bool | str | Path = True,
    progress: bool = True,
    batch_elements: int = 1 << 23,
    storage_device: Optional[torch.device | str] = None,
) -> QuantTable:
    """Fit every (unit, non-skip action) of ``model`` and return the table.

    ``act_scales`` maps module paths to per-input-channel mean ``|x|`` (see
    :func:`windquant_gym.calibrate`). ``cache``: True for the user cache folder, a folder
    path, or False. A cached table is reused when the weights, scales and config match.
    ``batch_elements`` bounds the weights fitted at once (memory, not results).
    ``device`` is where the fitting runs (default: the model's); ``storage_device`` where
    the table is kept (default: the same; ``"cpu"`` for models too large to hold six
    quantized copies beside them on the GPU).
    """
    units = find_units(model, config.chunk_size)
    check_weights(model, units)  # NaN / Inf / beyond-fp16 weights never reach the fit
    _check_act_scales(model, units, act_scales)
    fingerprint = table_fingerprint(model, units, act_scales, config)
    path = None
    if cache:
        folder = cache_dir("tables") if cache is True else Path(cache)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{fingerprint}.safetensors"
        if path.exists():
            return QuantTable.load(path, device=storage_device or device or _model_device(model))
    device = torch.device(device) if device is not None else _model_device(model)
    storage = torch.device(storage_device) if storage_device is not None else device
    started = time.perf_counter()
    table = _fit_all(model, units, act_scales, config, device, progress, batch_elements, fingerprint, storage)
    table.build_seconds = time.perf_counter() - started
    if path is not None:
        table.save(path)
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


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _fit_all(model, units, act_scales, config, device, progress, batch_elements, fingerprint, storage) -> QuantTable:
    n_units = len(units)
    n_weights, n_salient, _, _ = unit_bit_tables([u.out_features for u in units], [u.width for u in units], config.salient_rate)
    err_plain = np.zeros((n_units, N_ACTIONS))
    err_act = np.zeros((n_units, N_ACTIONS))
    energy_plain = np.zeros(n_units)
    energy_act = np.zeros(n_units)
    codes, scales, protected_masks, outlier_codes, outlier_scales = {}, {}, {}, {}, {}
    for name in module_names(units):
        weight = model.get_submodule(name).weight
        out_f, in_f = weight.shape
        n_chunks = -(-in_f // config.chunk_size)
        codes[name] = torch.empty((N_ACTIONS - 1, out_f, in_f), dtype=torch.int8, device=storage)
        scales[name] = torch.empty((N_ACTIONS - 1, out_f, n_chunks), dtype=torch.float16, device=storage)
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
            index = [u.index for u in batch]
            protected = protect_salient(w, s, int(n_salient[index[0]]))
            o_scale, o_codes = int8_outliers(w, protected)
            outliers = o_codes.float() * o_scale
            keep = ~protected
            loss_weight = s * s if config.fit_loss == "activation" else torch.ones_like(s)
            energy_plain[index] = (w * w).sum(dim=(1, 2)).double().cpu().numpy()
            energy_act[index] = ((w * s) ** 2).sum(dim=(1, 2)).double().cpu().numpy()
            skipped = w.half().float()
            err_plain[index, SKIP_ACTION], err_act[index, SKIP_ACTION] = _errors(w, skipped, s)
            for action in _QUANT_ACTIONS:
                fit = fit_scales(w, keep, loss_weight, BIT_WIDTHS[action], config.fit_steps, config.fit_lr)
                restored = torch.where(protected, outliers, dequantize_codes(fit.codes, fit.alpha, BIT_WIDTHS[action]))
                err_plain[index, action], err_act[index, action] = _errors(w, restored, s)
                for j, unit in enumerate(batch):
                    cols = slice(unit.col_start, unit.col_end)
                    codes[unit.module][action - 1, :, cols] = fit.codes[j]
                    scales[unit.module][action - 1, :, unit.col_start // config.chunk_size] = fit.alpha[j, :, 0].half()
            for j, unit in enumerate(batch):
                cols = slice(unit.col_start, unit.col_end)
                protected_masks[unit.module][:, cols] = protected[j]
                outlier_codes[unit.module][:, cols] = o_codes[j]
                outlier_scales[unit.module][:, unit.col_start // config.chunk_size] = o_scale[j, :, 0].half()
            bar.update(len(batch))
    bar.close()

    outlier_index, outlier_values = {}, {}
    for name, mask in protected_masks.items():
        flat = mask.view(-1).nonzero().squeeze(1)
        outlier_index[name] = flat
        outlier_values[name] = outlier_codes[name].view(-1)[flat].clone()
    rel = (err_act / np.maximum(energy_act, 1e-30)[:, None]) if config.fit_loss == "activation" else (
        err_plain / np.maximum(energy_plain, 1e-30)[:, None]
    )
    return QuantTable(
        units=units,
        config=config,
        fingerprint=fingerprint,
        codes=codes,
        scales=scales,
        outlier_index=outlier_index,
        outlier_codes=outlier_values,
        outlier_scales=outlier_scales,
        n_weights=n_weights,
        n_protected=n_salient,
        fit_error_plain=err_plain,
        fit_error_act=err_act,
        energy_plain=energy_plain,
        energy_act=energy_act,
        stored_action=_stored_actions(rel, config.fallback_thresholds),
    )


def _unit_weight(model: nn.Module, unit: Unit, device) -> torch.Tensor:
    return model.get_submodule(unit.module).weight.detach()[:, unit.col_start : unit.col_end].to(device, torch.float32)


def _errors(w: torch.Tensor, approx: torch.Tensor, s: torch.Tensor):
    diff = w - approx
    plain = (diff * diff).sum(dim=(1, 2))
    act = ((diff * s) ** 2).sum(dim=(1, 2))
    return plain.double().cpu().numpy(), act.double().cpu().numpy()
