"""Packed symbols -> uint8 symbols in torch, on the tensor's device (CPU or CUDA).

The inverse of the numpy packers of :mod:`.packing` for streams cut into whole groups (a
packed module pads each unit to whole groups, see :func:`group_symbols`), written with
tensor ops only so that a :class:`~windquant_gym.export.packed_linear.PackedLinear` unpacks
its codes where they live. One function per packer kind, chosen from a table.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Union

import torch

from .packing import BitPacker, RadixPacker

Packer = Union[BitPacker, RadixPacker]


def group_symbols(packer: Packer) -> int:
    """Symbols of the smallest whole-byte group (8 for 3-bit, 5 for ternary, 8/bits else)."""
    if isinstance(packer, RadixPacker):
        return packer.per_byte
    return math.lcm(packer.bits, 8) // packer.bits


def group_bytes(packer: Packer) -> int:
    if isinstance(packer, RadixPacker):
        return 1
    return math.lcm(packer.bits, 8) // 8


def padded_symbols(packer: Packer, n: int) -> int:
    """``n`` rounded up to whole groups."""
    per = group_symbols(packer)
    return -(-n // per) * per


_SHIFTS: Dict[tuple, torch.Tensor] = {}


def _shifts(bits: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (bits, count, dtype, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(count, dtype=torch.int64, device=device).mul(bits).to(dtype)
    return _SHIFTS[key]


def _unpack_bits(packer: BitPacker, data: torch.Tensor) -> torch.Tensor:
    bits = packer.bits
    per, nbytes = group_symbols(packer), group_bytes(packer)
    mask = (1 << bits) - 1
    if nbytes == 1:  # 8, 4, 2, 1 bits: every byte holds whole symbols; stay in uint8
        if bits == 8:
            return data
        shifts = _shifts(bits, per, torch.uint8, data.device)
        return (data.unsqueeze(1) >> shifts).bitwise_and_(mask).reshape(-1)
    # a group of bytes (3 for 3-bit) holds whole symbols: gather it into one little-endian int32
    groups = data.view(-1, nbytes).to(torch.int32)
    word = groups[:, 0].clone()
    for j in range(1, nbytes):
        word |= groups[:, j] << (8 * j)
    shifts = _shifts(bits, per, torch.int32, data.device)
    return (word.unsqueeze(1) >> shifts).bitwise_and_(mask).to(torch.uint8).reshape(-1)


_POWERS: Dict[tuple, torch.Tensor] = {}


def _unpack_radix(packer: RadixPacker, data: torch.Tensor) -> torch.Tensor:
    key = (packer.radix, packer.per_byte, data.device)
    if key not in _POWERS:
        _POWERS[key] = torch.tensor([packer.radix ** j for j in range(packer.per_byte)], dtype=torch.uint8, device=data.device)
    return torch.remainder(torch.div(data.unsqueeze(1), _POWERS[key], rounding_mode="floor"), packer.radix).reshape(-1)


_UNPACKERS: Dict[type, Callable] = {BitPacker: _unpack_bits, RadixPacker: _unpack_radix}


def unpack_symbols(packer: Packer, data: torch.Tensor) -> torch.Tensor:
    """The uint8 symbols of ``data`` (uint8, whole groups: ``len(data)`` a multiple of
    :func:`group_bytes`), ``group_symbols`` per group, on ``data``'s device."""
    return _UNPACKERS[type(packer)](packer, data)
