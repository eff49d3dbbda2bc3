"""Minimum-precision rules (paper 3.2.2): masks that keep early layers, attention
projections and MLP gates at or above a bit width."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List

import numpy as np

from ..errors import ConfigError
from ..quant.bitwidths import ACTION_BITS, check_bits
from ..quant.module_kinds import is_mlp_gate
from ..quant.units import Unit


@dataclass(frozen=True)
class PrecisionRules:
    """Lowest bit width allowed per kind of unit. 1.0 everywhere means no rule."""

    early_layers: int = 0
    """How many first decoder layers count as early."""
    early_min_bits: float = 2.0
    """Minimum bits in the early layers."""
    attention_min_bits: float = 1.0
    """Minimum bits of attention projections."""
    mlp_gate_min_bits: float = 1.0
    """Minimum bits of MLP gate projections (modules whose name contains 'gate')."""

    def __post_init__(self) -> None:
        if not isinstance(self.early_layers, int) or isinstance(self.early_layers, bool) or self.early_layers < 0:
            raise ConfigError(f"early_layers must be an integer >= 0, got {self.early_layers!r}; e.g. early_layers=2.")
        for name in ("early_min_bits", "attention_min_bits", "mlp_gate_min_bits"):
            bits = check_bits(getattr(self, name), f"PrecisionRules.{name}", f"one of {sorted(set(ACTION_BITS))}")
            object.__setattr__(self, name, bits)  # frozen; "3" and 3 mean 3.0

    def unit_minimum(self, unit: Unit) -> float:
        minimum = 1.0
        if unit.layer < self.early_layers:
            minimum = max(minimum, self.early_min_bits)
        if unit.is_attention:
            minimum = max(minimum, self.attention_min_bits)
        if unit.is_mlp and is_mlp_gate(unit.module):
            minimum = max(minimum, self.mlp_gate_min_bits)
        return minimum

    def allowed(self, units: List[Unit]) -> np.ndarray:
        """``[N, 7]`` bool: actions whose nominal bits meet each unit's minimum (skip always)."""
        bits = np.asarray(ACTION_BITS, dtype=float)
        minimum = np.array([self.unit_minimum(u) for u in units])
        return bits[None, :] >= minimum[:, None] - 1e-9

    def to_dict(self) -> dict:
        return asdict(self)
