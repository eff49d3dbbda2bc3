"""How each action's integer codes are stored: a lookup table indexed by action.

An action's codes (``BitWidth.code_min .. code_max``, or ``{-1, +1}`` for binarization)
are mapped to symbols ``0 .. len(codes)-1`` in ascending order, then packed by the packer
whose ``stored_bits`` equals the action's ``BitWidth.stored_bits`` (the number the storage
accounting charges). Nothing here branches on the bit width: :data:`CODE_FORMATS` is built
from :data:`~windquant_gym.quant.bitwidths.BIT_WIDTHS` and :data:`PACKERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import ExportFormatError
from ..quant.bitwidths import ACTION_BITS, BIT_WIDTHS, GRIDS, BitWidth
from .packing import BitPacker, RadixPacker

Packer = Union[BitPacker, RadixPacker]

#: Packer per stored bits per code (``BitWidth.stored_bits``).
PACKERS: Dict[float, Packer] = {
    8: BitPacker(8),
    4: BitPacker(4),
    3: BitPacker(3),
    2: BitPacker(2),
    1.6: RadixPacker(radix=3, per_byte=5),
    1: BitPacker(1),
}

_LUT_OFFSET = 128  # int8 code -> LUT index


@dataclass(frozen=True)
class CodeFormat:
    """The stored form of one action's codes."""

    action: int
    spec: BitWidth
    label: str
    """Tensor-name tag, an attribute name (e.g. ``w4``, ``w1_58``; ``w4a`` for the asymmetric
    grid's affine 4 bit): the packed module's buffers are ``<label>_codes`` and ``<label>_scales``
    (and ``<label>_zeros`` for an operator with a zero point)."""
    codes: Tuple[int, ...]
    """The int8 codes the quantizer emits, ascending; symbol ``i`` stands for ``codes[i]``."""
    packer: Packer

    def __post_init__(self) -> None:
        if self.packer.radix < len(self.codes) or self.packer.stored_bits != self.spec.stored_bits:
            raise ValueError(f"{self.packer} cannot store the {len(self.codes)} codes of {self.spec}.")
        steps = {b - a for a, b in zip(self.codes, self.codes[1:])}
        if len(steps) > 1:  # PackedLinear folds code = base + step * symbol into its scales
            raise ValueError(f"The codes {self.codes} of {self.spec} are not evenly spaced.")

    @property
    def code_step(self) -> int:
        """``codes[i] = codes[0] + code_step * i``: symbols map to codes by an affine map."""
        return self.codes[1] - self.codes[0] if len(self.codes) > 1 else 1

    @property
    def weight_affine(self) -> Tuple[float, float]:
        """``(a, b)`` with weight ``= alpha * (a * symbol + b)``: ``alpha * (code + shift) / divisor``
        written in the symbol, which is what a packed module unpacks. With a zero point ``z`` the
        row's ``b`` is ``b - z * zero_coefficient``."""
        spec = self.spec
        return self.code_step / spec.divisor, (self.codes[0] + spec.shift) / spec.divisor

    @property
    def zero_point(self) -> bool:
        """Whether each row of a unit also stores a zero point (``<label>_zeros``)."""
        return self.spec.zero_point

    @property
    def zero_coefficient(self) -> float:
        """``1 / divisor``: what a zero point ``z`` takes off a row's ``b``."""
        return 1.0 / self.spec.divisor

    def encode(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """int8 codes -> symbols (int64); refuses a code the quantizer cannot emit."""
        values = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes).reshape(-1).astype(np.int64)
        symbols = _symbol_lut(self.codes)[values + _LUT_OFFSET]
        if symbols.size and symbols.min() < 0:
            bad = sorted(set(values[symbols < 0].tolist()))[:5]
            raise ExportFormatError(
                f"Codes {bad} are not {self.spec.bits}-bit codes (allowed {list(self.codes)}); "
                "the table is corrupt: delete it from the cache to rebuild it."
            )
        return symbols

    def decode(self, symbols: np.ndarray) -> torch.Tensor:
        """symbols -> int8 codes."""
        return torch.from_numpy(np.asarray(self.codes, dtype=np.int8)[np.asarray(symbols, dtype=np.int64)])

    def pack(self, codes) -> np.ndarray:
        return self.packer.pack(self.encode(codes))

    def unpack(self, data, n: int) -> torch.Tensor:
        return self.decode(self.packer.unpack(data, n))

    def n_bytes(self, n: int) -> int:
        return self.packer.n_bytes(n)


@lru_cache(maxsize=None)
def _symbol_lut(codes: Tuple[int, ...]) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int64)
    lut[np.asarray(codes) + _LUT_OFFSET] = np.arange(len(codes))
    return lut


def _format(action: int, spec: Optional[BitWidth]) -> Optional[CodeFormat]:
    if spec is None:
        return None
    # levels are (k + shift) / divisor, so the codes are level * divisor - shift
    codes = tuple(int(round(level * spec.divisor - spec.shift)) for level in spec.levels)
    label = f"w{ACTION_BITS[action]:g}".replace(".", "_") + ("a" if spec.zero_point else "")
    return CodeFormat(action, spec, label, codes, PACKERS[spec.stored_bits])


#: Indexed by action like ``BIT_WIDTHS``; entry 0 (skip, stored as fp16) is None.
CODE_FORMATS: Tuple[Optional[CodeFormat], ...] = tuple(_format(a, spec) for a, spec in enumerate(BIT_WIDTHS))

#: ``QuantConfig.grid`` -> the stored form of each action (the same format object where the
#: operators agree, so a symmetric and an asymmetric export share their 8-bit, ternary, binary forms).
GRID_FORMATS: Dict[str, Tuple[Optional[CodeFormat], ...]] = {
    grid: tuple(CODE_FORMATS[a] if spec == BIT_WIDTHS[a] else _format(a, spec) for a, spec in enumerate(operators))
    for grid, operators in GRIDS.items()
}


def code_formats(grid: str = "symmetric") -> Tuple[Optional[CodeFormat], ...]:
    """The stored form of each action on ``grid``; an unknown grid is refused by name."""
    try:
        return GRID_FORMATS[grid]
    except (KeyError, TypeError):
        raise ExportFormatError(f"The export knows the grids {sorted(GRID_FORMATS)}, not {grid!r}: a file of a newer "
                                "windquant_gym; upgrade it, or export again with this one.") from None
