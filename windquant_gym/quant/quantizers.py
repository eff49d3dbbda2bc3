"""Batched quantizer fitting (paper C.2), many units and rows at once.

Tensors are ``[U, O, G]``: U units of the same shape, O output rows, G input columns.
One scale ``alpha`` per row of a unit is fitted as ``alpha = alpha0 * r`` with ``r``
starting at 1, by a few ``torch.optim.Adam`` steps on the (optionally activation-weighted)
reconstruction loss with straight-through rounding. Adam is element-wise, so the rows
are fitted independently even though they share one optimizer: batching changes nothing
but speed. Each row keeps its best step, so a fit never ends worse than its start.

The straight-through gradient is written out instead of built by autograd (it is short,
see :func:`scale_gradient`, and saves the graph's memory and time); a test checks it
against autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .bitwidths import BitWidth

#: fp16 range: scales are stored in 16 bits, so fitted scales are rounded to fp16 and
#: clamped into its normal range before codes are computed from them.
FP16_MAX = 65504.0
_FP16_TINY = 6.1035e-05  # 2**-14, the smallest normal fp16 (rounds to exactly 2**-14)
_INT8_MAX = 127


def to_fp16_scale(alpha: torch.Tensor) -> torch.Tensor:
    """Round scales to what a packed file stores (fp16), kept in float32 for arithmetic.
    Zero stays zero (an all-zero or all-protected row), anything else is clamped into
    fp16's normal range so that it neither overflows nor flushes to zero.

    The range, and what it means for weights outside it (tested in tests/test_properties.py):

    * A stored scale is 0 or an fp16 value in ``[2**-14, 65504]`` (normal range: every
      stored scale keeps fp16's full 11-bit precision; subnormals would not).
    * So a dequantized weight is always finite, ``|Q| <= 65504 * max|level|`` (at most
      ``128 * 65504`` for 8 bit), for any finite input, however large: rows beyond what the
      range reaches saturate. Whole models with ``|W| > 65504`` are refused before this
      (:func:`windquant_gym.quant.units.check_weights`): their FP16 skip would be inf.
    * A row whose natural scale is below ``2**-14`` (``max|W| < 127 * 2**-14`` at 8 bit,
      ``max|W| < 2**-14`` at 2 bit) gets the coarser scale ``2**-14``. Quantizers with a zero
      level (LSQ, ternary) then round its small weights to 0 and never move a weight further
      than zeroing it would (``|Q - W| <= |W|``); binary and 2-bit SEQ, which have no zero
      level, output ``+-2**-14 * level``. Either way the error is measured and the table's
      fallback rule sends such a unit to a higher precision if it matters.
    """
    clamped = alpha.clamp(min=_FP16_TINY, max=FP16_MAX)
    return torch.where(alpha > 0, clamped, torch.zeros_like(alpha)).half().float()


def quantize_codes(w: torch.Tensor, alpha: torch.Tensor, spec: BitWidth, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer codes ``k`` of ``w`` at scale ``alpha`` (zero scale gives code for 0.0), and
    for an operator with a zero point at the per-row ``zero`` (same shape as ``alpha``)."""
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    x = w / safe
    if spec.operator == "binary":
        return torch.where(x >= 0, 1, -1).to(torch.int8)
    if spec.clip is not None:
        x = x.clamp(-spec.clip, spec.clip)
    x = x * spec.divisor - spec.shift
    if zero is not None:
        x = x + zero
    return torch.round(x).clamp_(spec.code_min, spec.code_max).to(torch.int8)


def dequantize_codes(codes: torch.Tensor, alpha: torch.Tensor, spec: BitWidth, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``alpha * (k + shift - zero) / divisor`` as float32 (``zero``: the per-row zero point of an
    operator that has one, else 0)."""
    levels = codes.float() + spec.shift
    if zero is not None:
        levels = levels - zero
    return levels * (alpha / spec.divisor)


def fake_quantize(w: torch.Tensor, alpha: torch.Tensor, spec: BitWidth, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize ``w`` at scale ``alpha`` (and zero point ``zero``): the operator's forward."""
    return dequantize_codes(quantize_codes(w, alpha, spec, zero), alpha, spec, zero)


def to_fp16_zero(zero: torch.Tensor) -> torch.Tensor:
    """Zero points as a packed file stores them (fp16, clamped into its finite range), in float32."""
    return zero.clamp(-FP16_MAX, FP16_MAX).half().float()


def scale_gradient(w: torch.Tensor, alpha: torch.Tensor, spec: BitWidth, loss_weight: torch.Tensor):
    """Loss ``sum(loss_weight * (Q - w)^2)`` per row and its straight-through gradient
    with respect to ``alpha``. With ``x = w/alpha`` and ``q`` the level ``(k+shift)/divisor``:
    ``dQ/dalpha = q - x`` where the rounding is passed straight through and no clamp is
    active (LSQ, SEQ), and ``q`` where a clamp holds or for sign (binarization)."""
    x = w / alpha
    if spec.operator == "binary":
        level = torch.where(x >= 0, 1.0, -1.0)
        dq = level
    else:
        clipped = x if spec.clip is None else x.clamp(-spec.clip, spec.clip)
        codes = torch.round(clipped * spec.divisor - spec.shift).clamp_(spec.code_min, spec.code_max)
        level = (codes + spec.shift) / spec.divisor
        if spec.clip is not None:
            active = x.abs() < spec.clip
        else:
            active = (x >= spec.code_min) & (x <= spec.code_max)
        dq = torch.where(active, level - x, level)
    residual = level * alpha - w
    weighted = loss_weight * residual
    loss = (weighted * residual).sum(dim=-1, keepdim=True)
    grad = 2.0 * (weighted * dq).sum(dim=-1, keepdim=True)
    return loss, grad


def initial_scale(w: torch.Tensor, keep: torch.Tensor, spec: BitWidth) -> torch.Tensor:
    """Per-row ``alpha0`` over the unprotected weights (``keep``), ``[..., 1]``."""
    magnitude = w.abs() * keep
    if spec.init == "mean_abs":
        count = keep.sum(dim=-1, keepdim=True).clamp(min=1)
        return magnitude.sum(dim=-1, keepdim=True) / count
    top = magnitude.amax(dim=-1, keepdim=True)
    return top / spec.code_max if spec.operator == "lsq" else top


@dataclass
class FitResult:
    alpha: torch.Tensor
    """``[U, O, 1]`` fitted scales, rounded to fp16 values (float32 dtype)."""
    codes: torch.Tensor
    """``[U, O, G]`` int8 codes (protected positions hold the code of their value too)."""
    initial_loss: torch.Tensor
    """``[U, O, 1]`` loss at the fp16-rounded ``alpha0``."""
    loss: torch.Tensor
    """``[U, O, 1]`` loss at the returned ``alpha``; never above ``initial_loss``."""
    zero: Optional[torch.Tensor] = None
    """``[U, O, 1]`` zero points (fp16 values) of an operator with one (:func:`fit_affine`), else None."""


def fit_scales(
    w: torch.Tensor,
    keep: torch.Tensor,
    loss_weight: torch.Tensor,
    spec: BitWidth,
    steps: int = 10,
    lr: float = 0.1,
) -> FitResult:
    """Fit one scale per row of ``w [U, O, G]`` for ``spec``.

    ``keep`` marks the weights the low-bit quantizer represents (not protected);
    ``loss_weight`` broadcasts against ``w`` (``s_j^2`` for the activation-weighted loss,
    1 for the plain one) and is multiplied by ``keep`` here. An operator with a zero point is
    fitted by :func:`fit_affine` (``steps`` rounds of it; ``lr`` unused).
    """
    if spec.zero_point:
        return fit_affine(w, keep, loss_weight, spec, steps)
    weight = loss_weight * keep
    alpha0 = initial_scale(w, keep, spec)
    # A row with nothing to quantize (all zero or all protected) keeps alpha 0: its codes
    # are irrelevant and its loss 0. Give it a harmless positive scale while fitting.
    fit_alpha0 = torch.where(alpha0 > 0, alpha0, torch.ones_like(alpha0))
    multiplier = torch.ones_like(alpha0, requires_grad=True)
    optimizer = torch.optim.Adam([multiplier], lr=lr)
    best_multiplier = torch.ones_like(alpha0)
    best_loss = None
    for step in range(steps + 1):
        with torch.no_grad():
            loss, grad_alpha = scale_gradient(w, fit_alpha0 * multiplier, spec, weight)
            if best_loss is None:
                best_loss = loss
            else:
                better = loss < best_loss
                best_loss = torch.where(better, loss, best_loss)
                best_multiplier = torch.where(better, multiplier, best_multiplier)
        if step == steps:
            break
        multiplier.grad = grad_alpha * fit_alpha0
        optimizer.step()
        with torch.no_grad():
            multiplier.clamp_(min=1e-3)  # a scale must stay positive
    # Scales are stored in fp16: compare the rounded fit with the rounded start, so the
    # stored result is never worse than the initialization (rounding can reorder them).
    start = to_fp16_scale(alpha0)
    fitted = to_fp16_scale(torch.where(alpha0 > 0, alpha0 * best_multiplier, alpha0))
    start_loss, _ = scale_gradient(w, torch.where(start > 0, start, fit_alpha0), spec, weight)
    fitted_loss, _ = scale_gradient(w, torch.where(fitted > 0, fitted, fit_alpha0), spec, weight)
    alpha = torch.where(fitted_loss <= start_loss, fitted, start)
    codes = quantize_codes(w, alpha, spec)
    return FitResult(alpha=alpha, codes=codes, initial_loss=start_loss, loss=torch.minimum(fitted_loss, start_loss))


def affine_loss(w: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor, spec: BitWidth, weight: torch.Tensor):
    """``(loss [..., 1], codes)``: ``sum(weight * (Q - w)^2)`` per row at ``(alpha, zero)``."""
    codes = quantize_codes(w, alpha, spec, zero)
    residual = dequantize_codes(codes, alpha, spec, zero) - w
    return (weight * residual * residual).sum(dim=-1, keepdim=True), codes


def affine_least_squares(vv: torch.Tensor, vu: torch.Tensor, uu: torch.Tensor, vr: torch.Tensor, ur: torch.Tensor):
    """``(slope, intercept, usable)``: per row, the least-squares ``r ~ slope * v + intercept * u``
    from its Gram entries (``vv = <v, v>``, ``vu = <v, u>``, ``uu = <u, u>``, ``vr = <v, r>``,
    ``ur = <u, r>`` in any inner product: weighted sums, or through a Hessian); ``usable`` where
    the 2 x 2 system is not singular and the slope (a scale) is positive."""
    det = vv * uu - vu * vu
    solvable = det > 1e-12 * uu * vv
    safe_det = torch.where(solvable, det, 1.0)
    slope = (uu * vr - vu * ur) / safe_det
    intercept = (vv * ur - vu * vr) / safe_det
    return slope, intercept, solvable & (slope > 0)


def fit_affine(w: torch.Tensor, keep: torch.Tensor, loss_weight: torch.Tensor, spec: BitWidth, steps: int = 10) -> FitResult:
    """Scale and zero point per row of ``w [U, O, G]`` for an affine operator (``spec.zero_point``).

    Starts at min-max over the unprotected weights (``alpha = (max - min) / code_max``,
    ``z = -min / alpha``: the grid spans the row), then ``steps`` rounds of Lloyd-style
    alternation: codes at the current ``(alpha, z)``, then the weighted least-squares ``(alpha, c)``
    of ``Q = alpha * k + c`` for those codes (a 2 x 2 solve per row), ``z = -c / alpha``. Both are
    rounded to fp16 every round and each row keeps its best round, so the stored fit is never
    worse than the min-max start (``loss <= initial_loss``). A constant row is represented
    exactly at its start (``alpha = |value|``, one level on it)."""
    weight = loss_weight * keep
    big = torch.finfo(w.dtype).max
    low = torch.where(keep, w, big).amin(dim=-1, keepdim=True)
    high = torch.where(keep, w, -big).amax(dim=-1, keepdim=True)
    has_weights = keep.any(dim=-1, keepdim=True)
    low, high = torch.where(has_weights, low, 0.0), torch.where(has_weights, high, 0.0)
    span = (high - low) / (spec.code_max - spec.code_min)
    alpha0 = torch.where(span > 0, span, low.abs())
    zero0 = torch.where(alpha0 > 0, spec.code_min - low / torch.where(alpha0 > 0, alpha0, 1.0), 0.0)
    alpha, zero = to_fp16_scale(alpha0), to_fp16_zero(zero0)
    # an all-zero or all-protected row: alpha 0 stores 0 (its codes are irrelevant)
    best_loss, _ = affine_loss(w, alpha, zero, spec, weight)
    initial_loss = best_loss
    best_alpha, best_zero = alpha, zero
    s0 = weight.sum(dim=-1, keepdim=True)
    t0 = (weight * w).sum(dim=-1, keepdim=True)
    for _ in range(steps):
        codes = quantize_codes(w, best_alpha, spec, best_zero).float()
        s1 = (weight * codes).sum(dim=-1, keepdim=True)
        s2 = (weight * codes * codes).sum(dim=-1, keepdim=True)
        t1 = (weight * codes * w).sum(dim=-1, keepdim=True)
        slope, intercept, usable = affine_least_squares(s2, s1, s0, t1, t0)
        alpha = to_fp16_scale(torch.where(usable, slope, best_alpha))
        zero = to_fp16_zero(torch.where(usable, -intercept / torch.where(usable, slope, 1.0), best_zero))
        loss, _ = affine_loss(w, alpha, zero, spec, weight)
        better = usable & (loss < best_loss)
        if not bool(better.any()):
            break
        best_loss = torch.where(better, loss, best_loss)
        best_alpha = torch.where(better, alpha, best_alpha)
        best_zero = torch.where(better, zero, best_zero)
    codes = quantize_codes(w, best_alpha, spec, best_zero)
    return FitResult(alpha=best_alpha, codes=codes, initial_loss=initial_loss, loss=best_loss, zero=best_zero)


def protect_salient(w: torch.Tensor, act_scale: torch.Tensor, n_protected: int) -> torch.Tensor:
    """Boolean mask ``[U, O, G]`` of the ``n_protected`` weights of each unit with the
    largest ``|W_ij| * s_j`` (AWQ saliency)."""
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if n_protected <= 0:
        return mask
    saliency = (w.abs() * act_scale).flatten(1)
    index = saliency.topk(n_protected, dim=1, sorted=False).indices
    mask.view(w.shape[0], -1).scatter_(1, index, True)
    return mask


def int8_outliers(w: torch.Tensor, protected: torch.Tensor):
    """Per-row symmetric INT8 of the protected weights: ``(scale [U,O,1], codes int8 [U,O,G])``
    (codes are zero where not protected). Scales are stored in fp16. One scale per row, not
    per unit: salient weights span a wide range, and with one scale per unit their INT8
    error was measured to be 95% of a whole 8-bit unit's error on SmolLM2."""
    top = (w.abs() * protected).amax(dim=-1, keepdim=True)
    scale = to_fp16_scale(top / _INT8_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / safe).clamp_(-_INT8_MAX, _INT8_MAX) * protected
    return scale, codes.to(torch.int8)
