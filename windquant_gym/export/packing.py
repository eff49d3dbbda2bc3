"""Dense packing of small unsigned integers ("symbols") into uint8 bytes.

Two packers cover every bit width of the table:

* :class:`BitPacker` (``k`` bits per symbol): a little-endian bit stream, symbol ``i``
  occupying bits ``i*k .. i*k+k-1``; ``ceil(n*k/8)`` bytes for ``n`` symbols (8, 4, 3, 2 and
  1 bit codes, and the outliers' column indices and per-row counts, whatever their width).
* :class:`RadixPacker` (``per_byte`` base-``radix`` digits per byte): ternary packs 5 trits
  per byte (``3^5 = 243 <= 256``), ``ceil(n/5)`` bytes, i.e. 1.6 bits per trit.

Both accept any length (a ragged tail is padded with zero symbols inside the last byte) and
``unpack(pack(x), len(x)) == x`` exactly. :func:`pack_fields`/:func:`unpack_fields`
concatenate several runs of different widths into one bit stream (padded once, at the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import ExportFormatError


def _symbols(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values).reshape(-1).astype(np.int64, copy=False))


def _check_range(symbols: np.ndarray, radix: int, what: str) -> None:
    if symbols.size and (symbols.min() < 0 or symbols.max() >= radix):
        raise ExportFormatError(
            f"{what} holds values {int(symbols.min())}..{int(symbols.max())}, outside 0..{radix - 1}; "
            "map codes to symbols with CodeFormat.encode first."
        )


def _to_bits(symbols: np.ndarray, bits: int) -> np.ndarray:
    """``[n * bits]`` uint8 0/1, least significant bit of each symbol first (``bits <= 32``)."""
    as_bytes = symbols.astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits].reshape(-1)


def _from_bits(stream: np.ndarray, bits: int) -> np.ndarray:
    padded = np.zeros((stream.size // bits, 32), dtype=np.uint8)
    padded[:, :bits] = stream.reshape(-1, bits)
    return np.packbits(padded, axis=1, bitorder="little").view("<u4").reshape(-1).astype(np.int64)


def _group(bits: int) -> Tuple[int, int]:
    """``(symbols, bytes)`` of the smallest whole-byte group of ``bits``-bit symbols."""
    span = math.lcm(bits, 8)
    return span // bits, span // 8


def _pack_grouped(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Same bytes as the bit stream, built a byte-aligned group of symbols at a time in a uint64."""
    per, group_bytes = _group(bits)
    padded = np.zeros(-(-symbols.size // per) * per, dtype=np.uint64)
    padded[: symbols.size] = symbols
    shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
    value = np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype("<u8")
    return value.view(np.uint8).reshape(-1, 8)[:, :group_bytes].reshape(-1)[: -(-symbols.size * bits // 8)]


def _unpack_grouped(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    per, group_bytes = _group(bits)
    groups = -(-n // per)
    rows = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * group_bytes, dtype=np.uint8)
    flat[: raw.size] = raw
    rows[:, :group_bytes] = flat.reshape(groups, group_bytes)
    value = rows.view("<u8").reshape(-1)
    shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
    symbols = (value[:, None] >> shifts) & np.uint64((1 << bits) - 1)
    return symbols.reshape(-1)[:n].astype(np.int64)


def _bytes(data, n_bytes: int, what: str) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size < n_bytes:
        raise ExportFormatError(f"{what}: {data.size} bytes, the layout needs {n_bytes}; the file is truncated or corrupt.")
    return data[:n_bytes]


@dataclass(frozen=True)
class BitPacker:
    """``bits`` bits per symbol, symbols in ``0 .. 2**bits - 1``."""

    bits: int

    @property
    def radix(self) -> int:
        return 1 << self.bits

    @property
    def stored_bits(self) -> float:
        return float(self.bits)

    def n_bytes(self, n: int) -> int:
        return -(-n * self.bits // 8)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise ValueError(f"BitPacker supports 1..32 bits per symbol, not {self.bits}.")

    @property
    def _grouped(self) -> bool:
        return math.lcm(self.bits, 8) <= 64  # a byte-aligned group fits a uint64

    def pack(self, symbols) -> np.ndarray:
        symbols = _symbols(symbols)
        _check_range(symbols, self.radix, f"{self.bits}-bit symbols")
        if self._grouped:
            return _pack_grouped(symbols, self.bits)
        return np.packbits(_to_bits(symbols, self.bits), bitorder="little")

    def unpack(self, data, n: int) -> np.ndarray:
        raw = _bytes(data, self.n_bytes(n), f"{self.bits}-bit stream of {n} symbols")
        if self._grouped:
            return _unpack_grouped(raw, self.bits, n)
        return _from_bits(np.unpackbits(raw, count=n * self.bits, bitorder="little"), self.bits)


@dataclass(frozen=True)
class RadixPacker:
    """``per_byte`` base-``radix`` digits per byte, first symbol in the least significant digit."""

    radix: int
    per_byte: int

    def __post_init__(self) -> None:
        if self.radix ** self.per_byte > 256:
            raise ValueError(f"{self.per_byte} digits of base {self.radix} do not fit a byte.")

    @property
    def stored_bits(self) -> float:
        return 8.0 / self.per_byte

    def n_bytes(self, n: int) -> int:
        return -(-n // self.per_byte)

    def pack(self, symbols) -> np.ndarray:
        symbols = _symbols(symbols)
        _check_range(symbols, self.radix, f"base-{self.radix} symbols")
        padded = np.zeros(self.n_bytes(symbols.size) * self.per_byte, dtype=np.int64)
        padded[: symbols.size] = symbols
        place = self.radix ** np.arange(self.per_byte, dtype=np.int64)
        return (padded.reshape(-1, self.per_byte) @ place).astype(np.uint8)

    def unpack(self, data, n: int) -> np.ndarray:
        raw = _bytes(data, self.n_bytes(n), f"base-{self.radix} stream of {n} symbols").astype(np.int64)
        place = self.radix ** np.arange(self.per_byte, dtype=np.int64)
        digits = (raw[:, None] // place) % self.radix
        return digits.reshape(-1)[:n]


def field_bits(n_values: int) -> int:
    """Bits of an unsigned field that takes ``n_values`` distinct values (at least 1)."""
    return max(1, (int(n_values) - 1).bit_length())


def pack_fields(runs: Sequence[Tuple[np.ndarray, int]]) -> np.ndarray:
    """One little-endian bit stream of several runs ``(values, bits)``, padded once at the end."""
    runs = [(values, bits) for values, bits in runs]
    if len({bits for _, bits in runs}) == 1:  # one width: the fast packer writes the same stream
        return BitPacker(runs[0][1]).pack(np.concatenate([_symbols(v) for v, _ in runs]))
    pieces = []
    for values, bits in runs:
        symbols = _symbols(values)
        _check_range(symbols, 1 << bits, f"{bits}-bit field")
        pieces.append(_to_bits(symbols, bits))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    return np.packbits(stream, bitorder="little")


def fields_n_bytes(runs: Sequence[Tuple[int, int]]) -> int:
    """Bytes :func:`pack_fields` writes for runs of ``(count, bits)``."""
    return -(-sum(n * bits for n, bits in runs) // 8)


def unpack_fields(data, runs: Sequence[Tuple[int, int]]) -> List[np.ndarray]:
    """Inverse of :func:`pack_fields` for runs of ``(count, bits)``."""
    total = sum(n * bits for n, bits in runs)
    raw = _bytes(data, fields_n_bytes(runs), f"bit stream of {len(runs)} runs")
    if len({bits for _, bits in runs}) == 1:
        values = BitPacker(runs[0][1]).unpack(raw, sum(n for n, _ in runs))
        return np.split(values, np.cumsum([n for n, _ in runs])[:-1])
    stream = np.unpackbits(raw, count=total, bitorder="little")
    out, at = [], 0
    for n, bits in runs:
        out.append(_from_bits(stream[at : at + n * bits], bits))
        at += n * bits
    return out
