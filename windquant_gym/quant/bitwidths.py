"""Per-bit-width behaviour as lookup tables (the hqq way), indexed by action.

Every non-skip action's quantizer is written in one form::

    k = clamp(round(clip(W / alpha) * divisor - shift), code_min, code_max)   (integer code)
    Q = alpha * (k + shift) / divisor                                         (dequantized)

so fitting, dequantizing and packing share one code path and differ only by the numbers
in :data:`BIT_WIDTHS`. Formulas follow ParetoQ (``models/utils_quant.py``):

* 1 bit, elastic binarization: ``alpha * sign(W)``, init ``mean(|W|)``.
* 1.58 bit, SEQ n=1.5 shift 0: levels ``{-2/3, 0, 2/3} * alpha``, init ``max(|W|)``.
* 2 bit, SEQ n=2 shift 0.5: levels ``{+-0.25, +-0.75} * alpha``, init ``max(|W|)``.
* 3, 4, 8 bit, signed LSQ: ``alpha * clamp(round(W/alpha), -2^(b-1), 2^(b-1)-1)``,
  init ``max(|W|) / (2^(b-1) - 1)``.

``bits`` is what the paper's effective-bit formula charges; ``stored_bits`` is what a
packed file spends per code (ternary packs 5 trits per byte: 8/5 = 1.6 bits).

The asymmetric grid (:data:`ASYMMETRIC_BIT_WIDTHS`, ``QuantConfig.grid="asymmetric"``, issue 26)
replaces the 2-, 3- and 4-bit operators by the affine one GPTQ, AWQ and HQQ use at those widths:
``k = clamp(round(W / alpha + z), 0, 2^b - 1)``, ``Q = alpha * (k - z)``, with a zero point ``z``
(fp16, in code units) stored per row of a unit beside its scale: the same one form with a per-row
``shift`` of ``-z``. Its storage pays 16 more bits per row of a unit; its effective bits (eq. 6) do
not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

from ..errors import ConfigError

#: Bits per weight of each action, in action-index order. Index 0 is "skip" (kept in FP16).
ACTION_BITS: Tuple[float, ...] = (16, 8, 4, 3, 2, 1.58, 1)
SKIP_ACTION = 0
N_ACTIONS = len(ACTION_BITS)
MIN_BITS, MAX_BITS = float(min(ACTION_BITS)), float(max(ACTION_BITS))


def check_bits(value: Union[float, Sequence[float]], name: str = "target_bits", example: str = "target_bits=2.0"):
    """``value`` (a number of bits per weight, or a list of them) as float(s) in the action
    space's range [1, 16]; else a :class:`ConfigError` naming ``name``, the bad value(s) and
    ``example``. The one place that range is checked (env targets, precision rules, sweeps)."""
    many = isinstance(value, (list, tuple))
    values = list(value) if many else [value]

    def ok(v) -> bool:
        if isinstance(v, bool):  # float(True) is 1.0, never meant as a bit width
            return False
        try:
            v = float(v)
        except (TypeError, ValueError):
            return False
        return not math.isnan(v) and MIN_BITS <= v <= MAX_BITS

    bad = [v for v in values if not ok(v)]
    if bad:
        shown = bad if many else bad[0]
        raise ConfigError(f"{name} must lie in [{MIN_BITS:g}, {MAX_BITS:g}] bits per weight (the action space's range), "
                          f"got {shown!r}; e.g. {example}.")
    return [float(v) for v in values] if many else float(values[0])


@dataclass(frozen=True)
class BitWidth:
    """How one action quantizes a row of a unit."""

    bits: float
    """Nominal bits per quantized weight (paper eq. 6)."""
    stored_bits: float
    """Bits per code in a packed file."""
    operator: str
    """'lsq', 'seq' or 'binary' (names from ParetoQ)."""
    divisor: float
    shift: float
    code_min: int
    code_max: int
    clip: Optional[float]
    """SEQ clamps ``W/alpha`` to +-clip before scaling; None for the others."""
    init: str
    """'mean_abs', 'max_abs' (LSQ divides it by ``code_max``) or 'min_max' (affine)."""
    zero_point: bool = False
    """A zero point ``z`` per row of a unit is stored beside the scale (fp16, code units):
    ``Q = alpha * (k + shift - z) / divisor``; without one ``z`` is 0."""

    @property
    def levels(self) -> Tuple[float, ...]:
        """The values ``Q / alpha`` can take, ascending."""
        codes = range(self.code_min, self.code_max + 1)  # with a zero point: before subtracting z
        if self.operator == "binary":
            codes = (-1, 1)
        return tuple((k + self.shift) / self.divisor for k in codes)


def _lsq(bits: int) -> BitWidth:
    top = 2 ** (bits - 1) - 1
    return BitWidth(bits, bits, "lsq", 1.0, 0.0, -top - 1, top, None, "max_abs")


def _affine(bits: int) -> BitWidth:
    return BitWidth(bits, bits, "affine", 1.0, 0.0, 0, 2**bits - 1, None, "min_max", zero_point=True)


_TERNARY = BitWidth(1.58, 1.6, "seq", 1.5, 0.0, -1, 1, 0.99, "max_abs")
_BINARY = BitWidth(1, 1, "binary", 1.0, 0.0, -1, 1, None, "mean_abs")

#: Indexed like ACTION_BITS; entry 0 (skip) is None. The paper's (symmetric) operators.
BIT_WIDTHS: Tuple[Optional[BitWidth], ...] = (
    None,
    _lsq(8),
    _lsq(4),
    _lsq(3),
    BitWidth(2, 2, "seq", 2.0, 0.5, -2, 1, 0.99, "max_abs"),
    _TERNARY,
    _BINARY,
)

#: The asymmetric grid: affine 4-, 3- and 2-bit operators with a zero point per row; 8 bit,
#: ternary and binary as in :data:`BIT_WIDTHS`.
ASYMMETRIC_BIT_WIDTHS: Tuple[Optional[BitWidth], ...] = (
    None,
    _lsq(8),
    _affine(4),
    _affine(3),
    _affine(2),
    _TERNARY,
    _BINARY,
)

#: ``QuantConfig.grid`` -> the operator of each action.
GRIDS: Dict[str, Tuple[Optional[BitWidth], ...]] = {"symmetric": BIT_WIDTHS, "asymmetric": ASYMMETRIC_BIT_WIDTHS}


def has_zero_points(grid: str) -> bool:
    """Whether some operator of ``grid`` stores a zero point per row (a table then keeps ``zeros``)."""
    return any(spec is not None and spec.zero_point for spec in bit_widths(grid))


def bit_widths(grid: str = "symmetric") -> Tuple[Optional[BitWidth], ...]:
    """The operators (indexed by action) of the grid ``grid`` (a :data:`GRIDS` key)."""
    try:
        return GRIDS[grid]
    except (KeyError, TypeError):
        raise ConfigError(f"grid must be one of {sorted(GRIDS)}, got {grid!r}; 'symmetric' is the paper's.") from None

#: Bits of one stored scale (per row of a unit, and per unit for its INT8 outliers).
SCALE_BITS = 16
#: Bits of one protected (salient) weight.
OUTLIER_BITS = 8
#: Bits of a skipped weight.
SKIP_BITS = 16


def action_index(bits: float) -> int:
    """The action index whose nominal bit width is ``bits`` (1.58 for ternary)."""
    for index, value in enumerate(ACTION_BITS):
        if abs(value - bits) < 1e-9:
            return index
    from ..errors import ConfigError

    raise ConfigError(f"No action has {bits} bits; choose one of {list(ACTION_BITS)}.")
