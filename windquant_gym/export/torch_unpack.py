"""Packed symbols -> uint8 symbols in torch, on the tensor's device (CPU or CUDA).

The inverse of the numpy packers of :mod:`.packing` for byte-aligned streams (the planes of
:mod:`.planes`: 8, 4, 2, 1 bits, 5 trits per byte), written with tensor ops only so that a :class:`~windquant_gym.export.packed_linear.PackedLinear` unpacks
its codes where they live. One function per packer kind, chosen from a table.
"""

from __future__ import annotations

from typing import Callable, Dict, Union

import torch

from .packing import BitPacker, RadixPacker

Packer = Union[BitPacker, RadixPacker]


_SHIFTS: Dict[tuple, torch.Tensor] = {}


def _shifts(bits: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (bits, count, dtype, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(count, dtype=torch.int64, device=device).mul(bits).to(dtype)
    return _SHIFTS[key]


def _unpack_bits(packer: BitPacker, data: torch.Tensor) -> torch.Tensor:
    """8, 4, 2 or 1 bits: every byte holds whole symbols (the planes' packers); stay in uint8."""
    bits = packer.bits
    if 8 % bits:
        raise ValueError(f"{bits}-bit symbols cross bytes; a packed module stores them in byte-aligned planes")
    if bits == 8:
        return data
    shifts = _shifts(bits, 8 // bits, torch.uint8, data.device)
    return (data.unsqueeze(1) >> shifts).bitwise_and_((1 << bits) - 1).reshape(-1)


_POWERS: Dict[tuple, torch.Tensor] = {}


def _unpack_radix(packer: RadixPacker, data: torch.Tensor) -> torch.Tensor:
    key = (packer.radix, packer.per_byte, data.device)
    if key not in _POWERS:
        _POWERS[key] = torch.tensor([packer.radix ** j for j in range(packer.per_byte)], dtype=torch.uint8, device=data.device)
    return torch.remainder(torch.div(data.unsqueeze(1), _POWERS[key], rounding_mode="floor"), packer.radix).reshape(-1)


_UNPACKERS: Dict[type, Callable] = {BitPacker: _unpack_bits, RadixPacker: _unpack_radix}


def unpack_symbols(packer: Packer, data: torch.Tensor) -> torch.Tensor:
    """The uint8 symbols of ``data`` (uint8), ``8 / bits`` (or ``per_byte``) per byte, on
    ``data``'s device."""
    return _UNPACKERS[type(packer)](packer, data)
