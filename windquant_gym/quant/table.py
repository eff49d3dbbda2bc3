"""The quantization table: every unit x every non-skip action, fitted once (DESIGN 1).
This module is the container and its persistence; :mod:`.build` builds one (cache key,
checks, batched driver) and :mod:`.fitting` fits a batch of units.

A unit's fitted quantizer depends only on its weights, its activation scales and the
action, never on other units' decisions; so the fitting is done here once per
(unit, action) and an episode only assembles weights from stored codes.

Stored compactly per module: int8 codes ``[6, out, in]`` (one slice per non-skip action),
fp16 row scales ``[6, out, chunks]``, and the INT8 outliers (positions, codes, an fp16
scale per row of each unit), which are the same for every action because saliency does not depend on
it. Per unit and action: effective and storage bits, reconstruction errors (plain,
activation-weighted and output), and the action actually stored after the fallback rule.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..cache import atomic_path
from . import code_version
from ..errors import TableMismatchError
from .accounting import unit_bit_tables
from .bitwidths import ACTION_BITS, N_ACTIONS, SKIP_ACTION, bit_widths, has_zero_points
from .config import QuantConfig
from .quantizers import dequantize_codes
from .rotation import to_model_frame
from .units import Unit

#: Bumped when what a saved table holds changes (3: output errors, compensation; 4: weight
#: counts derived from the units, no longer stored).
TABLE_FORMAT = 4
_ARRAYS = ("fit_error_plain", "fit_error_act", "fit_error_output", "energy_plain",
           "energy_act", "energy_output", "stored_action")


@dataclass
class QuantTable:
    """Fitted results for every (unit, action). Arrays are indexed ``[unit, action]``;
    ``unit_effective_bits``/``unit_storage_bits``/``rel_error`` describe what is *stored*
    for the requested action (after fallback), ``fit_rel_error`` what the requested
    action's own fit achieved."""

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
    fit_error_plain: np.ndarray
    """``[N, 7]`` ``||W - Q||^2`` of each action's own fit (column 0: FP16 rounding)."""
    fit_error_act: np.ndarray
    """``[N, 7]`` ``||(W - Q) diag(s)||^2``."""
    fit_error_output: np.ndarray
    """``[N, 7]`` ``mean_t ||(W - Q) x_t||^2`` on the calibration tokens (NaN when the table
    was built without Hessians: ``compensation='none'``, ``error_metric='activation'``)."""
    energy_plain: np.ndarray
    energy_act: np.ndarray
    energy_output: np.ndarray
    stored_action: np.ndarray
    """``[N, 7]`` action actually stored when an action is requested (fallback applied)."""
    build_seconds: float = 0.0
    model_name: Optional[str] = None
    """The model the table was fitted on, as recorded in the cache (``windquant cache list``)."""
    zeros: Dict[str, torch.Tensor] = field(default_factory=dict)
    """fp16 ``[6, out, chunks]`` per-row zero points per module, like ``scales``; only for a grid
    whose operators have one (``config.grid == 'asymmetric'``; entries of the actions without a zero
    point hold 0), empty otherwise."""
    n_weights: np.ndarray = field(init=False, repr=False)
    """``[N]`` weights of each unit (derived from the units)."""
    n_protected: np.ndarray = field(init=False, repr=False)
    """``[N]`` INT8-protected weights of each unit (derived from the units and ``salient_rate``)."""
    _bits_effective: np.ndarray = field(init=False, repr=False)
    _bits_storage: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.operators = bit_widths(self.config.grid)
        if has_zero_points(self.config.grid) and set(self.zeros) != set(self.codes):
            raise TableMismatchError(
                f"A table of grid {self.config.grid!r} needs the zero points of every module; it has them for "
                f"{len(self.zeros)} of {len(self.codes)}: the file is incomplete, delete it to rebuild."
            )
        self.n_weights, self.n_protected, effective, storage = unit_bit_tables(
            [u.out_features for u in self.units], [u.width for u in self.units], self.config.salient_rate, self.config.grid
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
    def unit_effective_bits(self) -> np.ndarray:
        """``[N, 7]`` total paper eq. 6 bits of each unit (not per weight) for each requested
        action. :meth:`plan_bits` gives a plan's average per weight."""
        return self._bits_effective

    @property
    def unit_storage_bits(self) -> np.ndarray:
        """``[N, 7]`` total packed-file bits of each unit (not per weight) for each requested action."""
        return self._bits_storage

    @property
    def effective_bits(self) -> np.ndarray:
        """Deprecated name of :attr:`unit_effective_bits` (per-unit totals, not per weight)."""
        warnings.warn("QuantTable.effective_bits is now unit_effective_bits (per-unit totals).", DeprecationWarning,
                      stacklevel=2)
        return self._bits_effective

    @property
    def storage_bits(self) -> np.ndarray:
        """Deprecated name of :attr:`unit_storage_bits` (per-unit totals, not per weight)."""
        warnings.warn("QuantTable.storage_bits is now unit_storage_bits (per-unit totals).", DeprecationWarning,
                      stacklevel=2)
        return self._bits_storage

    def _metric(self, kind: str):
        """``(error [N, 7], energy [N])`` of ``kind``: 'activation', 'output' or 'plain'."""
        arrays = {
            "activation": (self.fit_error_act, self.energy_act),
            "output": (self.fit_error_output, self.energy_output),
            "plain": (self.fit_error_plain, self.energy_plain),
        }
        if kind not in arrays:
            raise TableMismatchError(f"Error kind must be one of {sorted(arrays)}, got {kind!r}.")
        error, energy = arrays[kind]
        if kind == "output" and np.isnan(error).any():
            raise TableMismatchError(
                "This table holds no output errors: it was built without the calibration's Hessians "
                "(QuantConfig(compensation='none', error_metric='activation')). Read kind='activation', or rebuild "
                "with hessians=calibration.hessians."
            )
        return error, energy

    @property
    def fit_rel_error(self) -> np.ndarray:
        """``[N, 7]`` relative error of each action's own fit, in ``config.fit_loss``'s metric."""
        if self.config.fit_loss == "activation":
            return self.fit_error_act / np.maximum(self.energy_act, 1e-30)[:, None]
        return self.fit_error_plain / np.maximum(self.energy_plain, 1e-30)[:, None]

    def rel_error(self, kind: Optional[str] = None) -> np.ndarray:
        """``[N, 7]`` relative error of what is stored for each requested action, in the
        metric ``kind`` (default ``config.error_metric``): ``'output'``
        (``tr(D H D^T) / tr(W H W^T)``, ``D = W - Q``), ``'activation'``
        (``||D diag(s)||^2 / ||W diag(s)||^2``) or ``'plain'``."""
        err, energy = self._metric(kind or self.config.error_metric)
        rows = np.arange(len(self.units))[:, None]
        return err[rows, self.stored_action] / np.maximum(energy, 1e-30)[:, None]

    def stored_error(self, kind: Optional[str] = None) -> np.ndarray:
        """``[N, 7]`` raw error (not relative) of what is stored for each requested action,
        in the metric ``kind`` (default ``config.error_metric``)."""
        err, _ = self._metric(kind or self.config.error_metric)
        return err[np.arange(len(self.units))[:, None], self.stored_action]

    def module_normalized_error(self, kind: Optional[str] = None) -> np.ndarray:
        """``[N, 7]`` error of what is stored, in the metric ``kind`` (default
        ``config.error_metric``), divided by the full-precision energy of the unit's whole
        module in that metric: comparable across layers (a raw error lets late layers'
        large activations dominate; DESIGN 6)."""
        _, energies = self._metric(kind or self.config.error_metric)
        module_energy: Dict[str, float] = {}
        for unit, energy in zip(self.units, energies):
            module_energy[unit.module] = module_energy.get(unit.module, 0.0) + float(energy)
        denominator = np.array([module_energy[u.module] for u in self.units])
        return self.stored_error(kind) / np.maximum(denominator, 1e-30)[:, None]

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
            "effective_bits": float(self._bits_effective[rows, actions].sum() / total),
            "storage_bits": float(self._bits_storage[rows, actions].sum() / total),
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
        if stored == SKIP_ACTION:
            return original[:, unit.col_start : unit.col_end].to(torch.float16).float()
        return to_model_frame(self._fitted_frame_unit(unit, stored, self.codes[unit.module].device), self.config.rotation)

    def _fitted_frame_unit(self, unit: Unit, stored: int, device) -> torch.Tensor:
        """``[out, width]`` float32 weights of ``unit`` at the (non-skip) ``stored`` action, with its
        INT8 outliers, in the frame they were fitted in (rotated when ``config.rotation`` says so)."""
        result = self._dequantized_codes(unit, stored, device)
        rows, columns, values = self._unit_outliers(unit)
        if rows.numel():
            result[rows.to(device), columns.to(device)] = values.to(device)
        return result

    def _dequantized_codes(self, unit: Unit, stored: int, device) -> torch.Tensor:
        """``[out, width]`` float32 grid values of ``unit`` at the (non-skip) ``stored`` action,
        without its outliers, in the frame they were fitted in."""
        chunk = unit.col_start // self.config.chunk_size
        # .to() is a no-op when the table lives where the model does; from a host-memory
        # table (large models) only the chosen action's codes travel
        codes = self.codes[unit.module][stored - 1, :, unit.col_start : unit.col_end].to(device, non_blocking=True)
        scale = self.scales[unit.module][stored - 1, :, chunk : chunk + 1].to(device, non_blocking=True).float()
        return dequantize_codes(codes, scale, self.operators[stored], self._zero(unit.module, stored, chunk, device))

    def _unit_outliers(self, unit: Unit):
        """``(rows, columns within the unit, float32 values)`` of ``unit``'s INT8 outliers (cached)."""
        cache = self.__dict__.setdefault("_outliers_by_unit", {})
        if unit.index not in cache:
            index = self.outlier_index[unit.module]
            mine = self._outlier_unit[unit.module] == unit.index
            cache[unit.index] = (index[mine] // unit.in_features, index[mine] % unit.in_features - unit.col_start,
                                 self._outlier_values[unit.module][mine])
        return cache[unit.index]

    def stored_actions_of(self, module: str, actions: Sequence[int]) -> List[int]:
        """The actions stored (after fallback) for ``module``'s units under the requested ``actions``."""
        return [int(self.stored_action[u.index, a]) for u, a in zip(self._unit_columns[module], actions)]

    def assemble_module(
        self, module: str, actions: Sequence[int], original: torch.Tensor, out: Optional[torch.Tensor] = None,
        held: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """The whole quantized weight of ``module`` for its units' requested ``actions``
        (in unit order), written into ``out`` when given (the original's shape; any float dtype).
        ``held``: the stored actions whose weights ``out`` already holds for this module and
        ``original`` (:meth:`stored_actions_of` of the plan last assembled into it); units whose
        stored action is the same are not written again (a search or a new episode changes few)."""
        units = self._unit_columns[module]
        if out is None:
            out = torch.empty_like(original)
        stored = self.stored_actions_of(module, actions)
        if held is not None and len(held) != len(stored):
            raise ValueError(f"held lists {len(held)} units, {module} has {len(stored)}.")
        changed = [True] * len(stored) if held is None else [a != h for a, h in zip(stored, held)]
        rotated = self.config.rotation != "none"
        for unit, action, write in zip(units, stored, changed):
            if not write:
                continue
            cols = slice(unit.col_start, unit.col_end)
            if action == SKIP_ACTION:
                out[:, cols] = original[:, cols].to(torch.float16)
            elif rotated:  # back from the unit's own rotated frame, its outliers (fitted there) included
                out[:, cols] = to_model_frame(self._fitted_frame_unit(unit, action, out.device), self.config.rotation)
            else:  # the outliers follow, scattered for the whole module at once
                out[:, cols] = self._dequantized_codes(unit, action, out.device)
        if rotated:
            return out
        index = self.outlier_index[module]
        if index.numel() and any(changed):
            unit_of = self._outlier_unit[module]
            # the rewritten quantized units' outliers (an unchanged unit's are in place already)
            kept = torch.tensor([a != SKIP_ACTION and w for a, w in zip(stored, changed)], device=index.device)[unit_of - units[0].index]
            values = self._outlier_values[module][kept].to(out.device, out.dtype)
            out.view(-1)[index[kept].to(out.device)] = values
        return out

    def _zero(self, module: str, action: int, chunk: int, device) -> Optional[torch.Tensor]:
        """``[out, 1]`` zero points of ``module``'s unit at ``chunk`` for ``action``, or None
        when the action's operator has none."""
        if not self.operators[action].zero_point:
            return None
        return self.zeros[module][action - 1, :, chunk : chunk + 1].to(device, non_blocking=True).float()

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
            if name in self.zeros:
                tensors[f"zeros:{name}"] = self.zeros[name].cpu().contiguous()
        for key in _ARRAYS:
            tensors[key] = torch.from_numpy(np.ascontiguousarray(getattr(self, key)))
        meta = {
            "format": str(TABLE_FORMAT),
            "config": self.config.to_json(),
            "fingerprint": self.fingerprint,
            "units": json.dumps([[u.layer, u.module, u.col_start, u.col_end, u.out_features, u.in_features, u.is_attention, u.is_mlp] for u in self.units]),
            "build_seconds": str(self.build_seconds),
        }
        if self.model_name:
            meta["model"] = self.model_name
        meta["code"] = code_version.fitting_code_version()
        with atomic_path(Path(path)) as tmp:  # a crash mid-write never leaves a half table behind
            save_file(tensors, str(tmp), metadata=meta)

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
            zeros=per_module["zeros"],
            build_seconds=float(meta.get("build_seconds", 0.0)),
            model_name=meta.get("model"),
            **{key: tensors[key].cpu().numpy() for key in _ARRAYS},
        )
