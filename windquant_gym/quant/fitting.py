"""Fitting one batch of same-shape units for every non-skip action: the two fits
:attr:`QuantConfig.compensation` chooses between, and the errors the table records.

* ``"none"`` (the paper, C.2): per-row scales fitted by a few Adam steps
  (:func:`.quantizers.fit_scales`), every weight rounded to its nearest level on its own.
* ``"gptq"``: the same scales, then the codes chosen column by column with each column's
  rounding error compensated on the unit's later columns (:mod:`.compensation`), columns
  in GPTQ's activation order.

Both keep the AWQ-salient weights in INT8 (the same for every action) and record, per unit
and action, the plain, activation-weighted and output errors of what they stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .bitwidths import N_ACTIONS, SKIP_ACTION, bit_widths
from .compensation import activation_order, compensated_codes, inverse_cholesky, obs_column_weights, permute_columns, permute_square
from .config import QuantConfig
from .quantizers import affine_least_squares, dequantize_codes, fit_scales, int8_outliers, protect_salient, to_fp16_scale, to_fp16_zero

#: The non-skip actions, in action-index order.
QUANT_ACTIONS = range(1, N_ACTIONS)


@dataclass
class FittedUnits:
    """What one batch of ``U`` units of shape ``[O, G]`` stores, and its errors."""

    codes: List[torch.Tensor]
    """Per non-skip action (index ``action - 1``): int8 ``[U, O, G]``."""
    scales: List[torch.Tensor]
    """Per non-skip action: float32 ``[U, O, 1]`` (fp16 values)."""
    zeros: List[Optional[torch.Tensor]]
    """Per non-skip action: float32 ``[U, O, 1]`` zero points (fp16 values) of an operator with one
    (the asymmetric grid's 2-4 bit), else None."""
    protected: torch.Tensor
    """bool ``[U, O, G]``: the INT8-protected weights."""
    outlier_scale: torch.Tensor
    """float32 ``[U, O, 1]`` (fp16 values) of the protected weights' INT8 codes."""
    outlier_codes: torch.Tensor
    """int8 ``[U, O, G]``, zero where not protected."""
    error_plain: np.ndarray
    """``[U, 7]`` ``||W - Q||^2`` (column 0: FP16 rounding)."""
    error_act: np.ndarray
    """``[U, 7]`` ``||(W - Q) diag(s)||^2`` with ``s`` the mean ``|x|`` per input channel."""
    error_output: np.ndarray
    """``[U, 7]`` ``mean_t ||(W - Q) x_t||^2`` on the calibration tokens (NaN without ``H``)."""
    energy_plain: np.ndarray
    energy_act: np.ndarray
    energy_output: np.ndarray


#: ``QuantConfig.salient_metric`` -> ``(s, hessian, damping) -> [U, 1, G]`` per-column weights ``c``:
#: a unit's protected weights are its largest ``|W_ij| c_j`` (:func:`.quantizers.protect_salient`).
SALIENCY_COLUMNS = {
    "activation": lambda s, hessian, damping: s,  # AWQ: |W_ij| s_j
    "obs": lambda s, hessian, damping: obs_column_weights(hessian, damping),  # |W_ij| / sqrt([H^-1]_jj)
}


@torch.no_grad()
def fit_units(
    w: torch.Tensor, s: torch.Tensor, hessian: Optional[torch.Tensor], config: QuantConfig, n_protected: int
) -> FittedUnits:
    """Fit ``w [U, O, G]`` with activation scales ``s [U, 1, G]`` and Hessian blocks
    ``hessian [U, G, G]`` (``mean_t x x^T``; None only when ``config`` needs none)."""
    protected = protect_salient(w, SALIENCY_COLUMNS[config.salient_metric](s, hessian, config.damping), n_protected)
    outlier_scale, outlier_codes = int8_outliers(w, protected)
    outliers = outlier_codes.float() * outlier_scale
    keep = ~protected
    loss_weight = s * s if config.fit_loss == "activation" else torch.ones_like(s)
    n_units = w.shape[0]
    errors = {kind: np.full((n_units, N_ACTIONS), np.nan) for kind in ("plain", "act", "output")}

    def record(action: int, restored: torch.Tensor) -> None:
        errors["plain"][:, action], errors["act"][:, action], errors["output"][:, action] = unit_errors(w, restored, s, hessian)

    record(SKIP_ACTION, w.half().float())
    if config.compensation == "gptq":
        order = activation_order(hessian)
        hinv = inverse_cholesky(permute_square(hessian, order), config.damping)
        w_ordered, protected_ordered = permute_columns(w, order), permute_columns(protected, order)
        outliers_ordered = permute_columns(outliers, order)
        restore = torch.argsort(order, dim=-1)
    codes, scales, zeros = [], [], []
    operators = bit_widths(config.grid)
    for action in QUANT_ACTIONS:
        spec = operators[action]
        fit = fit_scales(w, keep, loss_weight, spec, config.fit_steps, config.fit_lr)
        action_codes = fit.codes
        if config.compensation == "gptq":
            ordered = compensated_codes(w_ordered, fit.alpha, spec, hinv, protected_ordered, outliers_ordered, zero=fit.zero)
            action_codes = permute_columns(ordered, restore)
        alpha, zero = fit.alpha, fit.zero
        if config.scale_refit == "output":
            alpha, zero = REFITS[spec.zero_point](w, action_codes, alpha, zero, spec, hessian, keep, outliers)
        record(action, torch.where(protected, outliers, dequantize_codes(action_codes, alpha, spec, zero)))
        codes.append(action_codes)
        scales.append(alpha)
        zeros.append(zero)
    energy_output = (np.full(n_units, np.nan) if hessian is None
                     else (torch.bmm(w, hessian) * w).sum(dim=(1, 2)).double().cpu().numpy())
    return FittedUnits(
        codes=codes,
        scales=scales,
        zeros=zeros,
        protected=protected,
        outlier_scale=outlier_scale,
        outlier_codes=outlier_codes,
        error_plain=errors["plain"],
        error_act=errors["act"],
        error_output=errors["output"],
        energy_plain=(w * w).sum(dim=(1, 2)).double().cpu().numpy(),
        energy_act=((w * s) ** 2).sum(dim=(1, 2)).double().cpu().numpy(),
        energy_output=energy_output,
    )


def _row_output_error(residual: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    diff = residual - approx
    return (torch.bmm(diff, hessian) * diff).sum(dim=-1, keepdim=True)


def refit_scales(w: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, spec, hessian: torch.Tensor,
                 keep: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """Per row, the scale that minimises the output error of the given ``codes``.

    With the INT8 outliers fixed, a row stores ``outliers + alpha * v`` (``v`` its levels
    ``(k + shift) / divisor`` on the unprotected weights, 0 on the protected ones), so its output
    error ``(r - alpha v) H (r - alpha v)^T`` with ``r = w - outliers`` is a parabola in ``alpha``
    whose minimum is ``alpha* = v H r^T / v H v^T``. The codes were chosen for the fitted scale
    (compensation moves every later column with it), so ``alpha*`` is a refit, not a new fit:
    rounded to fp16 it replaces ``alpha`` only where it lowers that row's output error, so no
    row ever gets worse. Rows with ``v H v^T = 0`` or a non-positive ``alpha*`` keep ``alpha``.
    Tensors ``[U, O, G]``, ``alpha [U, O, 1]``, ``hessian [U, G, G]``."""
    levels = (codes.float() + spec.shift) / spec.divisor * keep
    residual = w - outliers
    projected = torch.bmm(levels, hessian)
    numerator = (projected * residual).sum(dim=-1, keepdim=True)
    denominator = (projected * levels).sum(dim=-1, keepdim=True)
    usable = (denominator > 0) & (numerator > 0)
    candidate = to_fp16_scale(torch.where(usable, numerator / torch.where(usable, denominator, 1.0), alpha))

    better = _row_output_error(residual, candidate * levels, hessian) < _row_output_error(residual, alpha * levels, hessian)
    return torch.where(better, candidate, alpha)


def refit_affine(w: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor, spec,
                 hessian: torch.Tensor, keep: torch.Tensor, outliers: torch.Tensor):
    """:func:`refit_scales` for an operator with a zero point: per row, the ``(alpha, z)`` that
    minimise the output error of the given ``codes``, ``(alpha, zero)`` returned.

    A row stores ``outliers + alpha * v - alpha z u`` (``v`` the levels ``(k + shift) / divisor``
    and ``u`` the indicator of the unprotected weights, both 0 on the protected ones), linear in
    ``(alpha, c = -alpha z / divisor)``: the 2 x 2 normal equations of ``(r - alpha v - c u) H (...)^T``
    give the minimum. Rounded to fp16 it replaces ``(alpha, zero)`` only where it lowers that row's
    output error and ``alpha > 0``; no row ever gets worse."""
    mask = keep.float()
    levels = (codes.float() + spec.shift) / spec.divisor * mask
    residual = w - outliers
    hv, hu = torch.bmm(levels, hessian), torch.bmm(mask, hessian)
    vv, vu, uu = (hv * levels).sum(-1, keepdim=True), (hv * mask).sum(-1, keepdim=True), (hu * mask).sum(-1, keepdim=True)
    vr, ur = (hv * residual).sum(-1, keepdim=True), (hu * residual).sum(-1, keepdim=True)
    slope, intercept, usable = affine_least_squares(vv, vu, uu, vr, ur)
    new_alpha = to_fp16_scale(torch.where(usable, slope, alpha))
    new_zero = to_fp16_zero(torch.where(usable, -intercept * spec.divisor / torch.where(usable, slope, 1.0), zero))

    def stored(scale, z):
        return dequantize_codes(codes, scale, spec, z) * mask

    better = usable & (_row_output_error(residual, stored(new_alpha, new_zero), hessian)
                       < _row_output_error(residual, stored(alpha, zero), hessian))
    return torch.where(better, new_alpha, alpha), torch.where(better, new_zero, zero)


def _refit_symmetric(w, codes, alpha, zero, spec, hessian, keep, outliers):
    return refit_scales(w, codes, alpha, spec, hessian, keep, outliers), zero


#: ``spec.zero_point`` -> the output-error refit of its row parameters (``scale_refit="output"``).
REFITS = {False: _refit_symmetric, True: refit_affine}


def unit_errors(w: torch.Tensor, approx: torch.Tensor, s: torch.Tensor, hessian: Optional[torch.Tensor]):
    """Per unit: ``||D||^2``, ``||D diag(s)||^2`` and ``tr(D H D^T)`` for ``D = w - approx``."""
    diff = w - approx
    plain = (diff * diff).sum(dim=(1, 2)).double().cpu().numpy()
    act = ((diff * s) ** 2).sum(dim=(1, 2)).double().cpu().numpy()
    if hessian is None:
        return plain, act, np.full(len(plain), np.nan)
    output = (torch.bmm(diff, hessian) * diff).sum(dim=(1, 2)).double().cpu().numpy()
    return plain, act, output


def stored_actions(rel_error: np.ndarray, thresholds) -> np.ndarray:
    """Fallback rule: an action whose own fit exceeds its threshold takes whatever the
    next higher precision stores (recursively, ending at skip)."""
    stored = np.zeros(rel_error.shape, dtype=np.int64)
    for action in QUANT_ACTIONS:
        ok = rel_error[:, action] <= thresholds[action]
        stored[:, action] = np.where(ok, action, stored[:, action - 1])
    return stored
