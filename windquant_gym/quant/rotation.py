"""Incoherence processing inside a unit: a fixed orthogonal rotation of its input columns.

A weight row with a few large entries wastes a low-bit grid on them; multiplied by a random
orthogonal matrix its entries spread evenly (QuIP, QuaRot, QuIP#). Here the rotation acts on
one unit's columns only: the unit's block ``W_u`` (``[O, G]``) is quantized as ``W_u R``
and restored as ``Q R^T``, and ``x_u`` (its ``G`` inputs) would meet ``R^T`` at run time. Since
``W_u x_u = (W_u R)(R^T x_u)``, the output error ``tr(D H D^T)`` with ``H`` the unit's Hessian
block becomes ``tr(D' R^T H R D'^T)``: the fit runs unchanged in the rotated frame (weights
``W_u R``, Hessian ``R^T H R``), and because ``R`` never mixes two units, every unit is still
quantized independently of every other unit's action and the table stays valid for every plan.

``R`` is a randomized Hadamard matrix, ``diag(signs) H_G / sqrt(G)``: exact in every floating
format (entries ``+-1/sqrt(G)``), fixed by ``G`` alone (the signs come from a seeded generator),
so a packed file stores no matrix, only the rotation's name. Widths that are not a power of
two get a block-diagonal matrix of Hadamard blocks over the binary expansion of ``G``
(e.g. 96 = 64 + 32). Measured on SmolLM2-135M (all 720 units, the ``cpu`` preset's engine:
statistics set, GPTQ, refit, 3% INT8 outliers): summed output error 0.09x / 0.37x / 0.58x / 0.67x
/ 0.84x / 0.88x of the unrotated fit at 8 / 4 / 3 / 2 / 1.58 / 1 bits (benchmarks/RESULTS.md,
"Rotation inside a unit")
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch

#: ``QuantConfig.rotation`` values: 'none' (the paper) and 'hadamard' (this module).
ROTATIONS: Tuple[str, ...] = ("none", "hadamard")
#: Seed of the sign vectors: part of what a rotation means (a file names the rotation, not the matrix).
SIGN_SEED = 0x5EED


def _sylvester(n: int) -> torch.Tensor:
    """The ``n x n`` (a power of two) Sylvester Hadamard matrix with entries +-1, float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _rotation_float64(width: int) -> torch.Tensor:
    blocks, start = [], 0
    matrix = torch.zeros(width, width, dtype=torch.float64)
    for bit in reversed(range(width.bit_length())):  # binary expansion, largest block first
        size = 1 << bit
        if width - start >= size:
            blocks.append((start, size))
            start += size
    for begin, size in blocks:
        matrix[begin : begin + size, begin : begin + size] = _sylvester(size) / size ** 0.5
    generator = torch.Generator().manual_seed(SIGN_SEED + width)
    signs = torch.randint(0, 2, (width,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * matrix


def rotation_matrix(width: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The unit rotation ``R`` (``[width, width]``, orthogonal) for a unit of ``width`` columns:
    weights are fitted as ``W R``, restored as ``Q R^T``, and inputs meet it as ``x R``.
    Cached per width, device and dtype (assembling a plan asks for it once per unit): do not
    write into the returned tensor."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"rotation_matrix needs a positive integer width, got {width!r}.")
    return _rotation(width, torch.device(device) if device is not None else torch.device("cpu"), dtype)


@functools.lru_cache(maxsize=64)
def _rotation(width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _rotation_float64(width).to(device=device, dtype=dtype)


def rotated_inputs(w: torch.Tensor, hessian, width: int):
    """``(W R, R^T H R, sqrt(diag(R^T H R)))`` for a batch ``w [U, O, G]`` and ``hessian [U, G, G]``
    (or None: then only ``W R``, with None for the other two). The last is the rotated inputs'
    RMS per column, the rotated frame's activation scale (the mean ``|x|`` of the unrotated
    frame is not known there; the RMS is what the Hessian holds)."""
    rotation = rotation_matrix(width, w.device)
    w_rotated = w @ rotation
    if hessian is None:
        return w_rotated, None, None
    h_rotated = rotation.T @ hessian @ rotation
    h_rotated = (h_rotated + h_rotated.transpose(1, 2)) / 2  # exactly symmetric for the Cholesky
    scale = torch.diagonal(h_rotated, dim1=-2, dim2=-1).clamp_min(0).sqrt()[:, None, :]
    return w_rotated, h_rotated, scale


def unrotate(weights: torch.Tensor) -> torch.Tensor:
    """Rotated-frame weights ``[..., O, G]`` back to the model's frame: ``Q R^T`` (float32)."""
    return weights.float() @ rotation_matrix(weights.shape[-1], weights.device).T


def to_model_frame(weights: torch.Tensor, rotation: str) -> torch.Tensor:
    """A quantized unit's weights ``[..., O, G]`` as fitted under ``QuantConfig.rotation`` (or a
    layout's ``rotation``), in the model's frame: :func:`unrotate` for 'hadamard', as is for 'none'."""
    return weights if rotation == "none" else unrotate(weights)
