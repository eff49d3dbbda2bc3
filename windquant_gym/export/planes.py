"""How a packed module holds one unit's codes in memory: byte-aligned *planes*.

A plane stores one digit of every symbol, ``per_byte`` digits per byte, each row of the unit
padded to whole bytes, so that byte ``g`` of row ``r`` holds the digits of columns
``g*per_byte .. g*per_byte+per_byte-1`` of that row. A symbol is ``sum(multiplier * digit)``
over its width's planes (:data:`PLANES`, a lookup table by stored bits): one plane for 8, 4,
2 and 1 bit and for ternary (5 trits per byte); 3 bit splits into a 2-bit and a 1-bit plane
(multiplier 4), 3 bits per weight, as in the file.

Byte alignment per row is what makes the decode GEMV cheap: for activations ``x``, the
table ``T[g, byte] = sum_j x[g*per_byte + j] * digit_j(byte)`` (a small matmul) turns
``sum_c x_c * s[r, c]`` into one gather and one sum per row, see
:meth:`PackedLinear._lut_products`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Tuple

import numpy as np
import torch

from .packing import BitPacker, RadixPacker


@dataclass(frozen=True)
class Plane:
    """One digit of a symbol: ``(symbol >> shift) % radix``, stored ``per_byte`` per byte."""

    radix: int
    per_byte: int
    shift: int
    """Bits below this digit (``multiplier = 2 ** shift``; 0 for a radix plane)."""

    @property
    def multiplier(self) -> int:
        return 1 << self.shift

    @property
    def packer(self):
        if self.radix ** self.per_byte == 256:
            return BitPacker(8 // self.per_byte)
        return RadixPacker(self.radix, self.per_byte)

    def digits(self, symbols: np.ndarray) -> np.ndarray:
        return (symbols >> self.shift) % self.radix

    def row_bytes(self, width: int) -> int:
        return -(-width // self.per_byte)


#: Planes per stored bits (``BitWidth.stored_bits``).
PLANES: Dict[float, Tuple[Plane, ...]] = {
    8: (Plane(256, 1, 0),),
    4: (Plane(16, 2, 0),),
    3: (Plane(4, 4, 0), Plane(2, 8, 2)),
    2: (Plane(4, 4, 0),),
    1.6: (Plane(3, 5, 0),),
    1: (Plane(2, 8, 0),),
}


def split_planes(planes: Tuple[Plane, ...], symbols: np.ndarray) -> list:
    """``[O, width]`` symbols -> per plane its bytes ``[O * row_bytes]`` (rows padded with 0)."""
    out_f, width = symbols.shape
    pieces = []
    for plane in planes:
        padded = np.zeros((out_f, plane.row_bytes(width) * plane.per_byte), dtype=np.int64)
        padded[:, :width] = plane.digits(symbols)
        pieces.append(plane.packer.pack(padded.reshape(-1)))
    return pieces


def join_planes(planes: Tuple[Plane, ...], pieces, out_f: int, width: int) -> np.ndarray:
    """Inverse of :func:`split_planes`: ``[O, width]`` int64 symbols."""
    symbols = np.zeros((out_f, width), dtype=np.int64)
    for plane, data in zip(planes, pieces):
        cols = plane.row_bytes(width) * plane.per_byte
        digits = plane.packer.unpack(np.asarray(data), out_f * cols).reshape(out_f, cols)[:, :width]
        symbols += digits * plane.multiplier
    return symbols


@lru_cache(maxsize=None)
def _digit_table_cpu(plane: Plane) -> torch.Tensor:
    byte = np.arange(256)
    return torch.tensor(np.stack([(byte // plane.radix ** j) % plane.radix for j in range(plane.per_byte)]), dtype=torch.float32)


_TABLES: Dict[tuple, torch.Tensor] = {}


def digit_table(plane: Plane, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[per_byte, 256]``: digit ``j`` of each byte value (bytes a radix plane never writes
    hold digits too; they are never gathered)."""
    key = (plane, dtype, device)
    if key not in _TABLES:
        _TABLES[key] = _digit_table_cpu(plane).to(device=device, dtype=dtype)
    return _TABLES[key]


def unpack_digits(plane: Plane, data: torch.Tensor, out_f: int, width: int) -> torch.Tensor:
    """Bytes ``[O * row_bytes]`` of one plane -> digits ``[O, width]`` (uint8), on their device."""
    from .torch_unpack import unpack_symbols

    cols = plane.row_bytes(width) * plane.per_byte
    return unpack_symbols(plane.packer, data).view(out_f, cols)[:, :width]
