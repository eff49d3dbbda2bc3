"""Bit accounting (DESIGN 4): two honest numbers, never printed as one another.

* **effective bits** (paper eq. 6): ``16 n`` for a skipped unit, else ``b n_q + 8 n_p``.
* **storage bits**: what a packed file needs. For a quantized unit of ``O`` rows and ``G``
  columns: ``stored_bits(b) n_q`` for the codes (ternary packs 5 trits per byte, 1.6 bits),
  ``16 O`` for the per-row fp16 scales, and when it has outliers ``8 n_p`` for their INT8
  values, ``16 O`` for their per-row fp16 scales, ``ceil(log2 G)`` bits per outlier for its
  column inside its row and ``ceil(log2(G+1))`` bits per row for how many outliers the row
  has (a CSR layout: far cheaper than a flat index into the unit). A skipped unit costs ``16 n``.
  An operator with a zero point (the asymmetric grid) adds ``16 O`` for the per-row fp16 zero points.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .bitwidths import BIT_WIDTHS, N_ACTIONS, OUTLIER_BITS, SCALE_BITS, SKIP_ACTION, SKIP_BITS, bit_widths


def n_protected(n_weights: int, salient_rate: float) -> int:
    """Protected (INT8) weights in a unit of ``n_weights``: ``floor(rate * n)``."""
    return int(math.floor(salient_rate * n_weights + 1e-9))


def effective_bits(n_weights: int, n_salient: int, action: int) -> float:
    """Paper eq. 6 for one unit."""
    if action == SKIP_ACTION:
        return float(SKIP_BITS * n_weights)
    return BIT_WIDTHS[action].bits * (n_weights - n_salient) + OUTLIER_BITS * n_salient


def storage_bits(out_features: int, width: int, n_salient: int, action: int, operators=BIT_WIDTHS) -> float:
    """Bits a packed file spends on one unit (see module docstring); ``operators``: the grid's
    operator per action (:func:`~windquant_gym.quant.bitwidths.bit_widths`)."""
    n_weights = out_features * width
    if action == SKIP_ACTION:
        return float(SKIP_BITS * n_weights)
    spec = operators[action]
    row_parameters = 2 if spec.zero_point else 1  # the scale, and the zero point where there is one
    bits = spec.stored_bits * (n_weights - n_salient) + row_parameters * SCALE_BITS * out_features
    if n_salient:
        column_bits = max(1, math.ceil(math.log2(width)))
        count_bits = math.ceil(math.log2(width + 1))
        bits += (OUTLIER_BITS + column_bits) * n_salient + (SCALE_BITS + count_bits) * out_features
    return float(bits)


def unit_bit_tables(out_features: Sequence[int], widths: Sequence[int], salient_rate: float, grid: str = "symmetric"):
    """``(n_weights [N], n_protected [N], effective [N, 7], storage [N, 7])`` in bits, float64,
    for the operators of ``grid`` (``QuantConfig.grid``)."""
    operators = bit_widths(grid)
    n_units = len(widths)
    n_weights = np.array([o * g for o, g in zip(out_features, widths)], dtype=np.int64)
    n_salient = np.array([n_protected(int(n), salient_rate) for n in n_weights], dtype=np.int64)
    effective = np.zeros((n_units, N_ACTIONS))
    storage = np.zeros((n_units, N_ACTIONS))
    for i in range(n_units):
        for action in range(N_ACTIONS):
            effective[i, action] = effective_bits(int(n_weights[i]), int(n_salient[i]), action)
            storage[i, action] = storage_bits(out_features[i], widths[i], int(n_salient[i]), action, operators)
    return n_weights, n_salient, effective, storage
