"""Peer-library baselines for the allocator leaderboard: HQQ (mobiusml/hqq) uniform quantization.

HQQ (Half-Quadratic Quantization) is a calibration-free, per-group asymmetric quantizer:
every group of ``group_size`` weights gets a scale and a zero point, found by HQQ's own
proximal optimizer (``hqq.core.quantize.Quantizer.quantize`` with ``optimize=True``), and
every weight is stored as an ``nbits`` code. We run HQQ's own ``Quantizer`` on each Linear
weight inside the decoder blocks, with the weight parameters of HQQ's
``BaseQuantizeConfig(nbits, group_size)`` (``axis=1``: a group is ``group_size``
consecutive weights of the row-major weight, i.e. along the input dimension; zero rounded
for 4 bit; no quantized meta-data), dequantize the codes back to a float weight and put it
in a *copy* of the model, so the same perplexity code as the env evaluates it. Embeddings
and the LM head stay as they are, exactly as in the env.

What HQQ stores (``HQQLinear`` with its default ``compute_dtype=torch.float16``):

* the codes, bit-packed: 4 bit two per ``uint8``, 2 bit four per ``uint8``, 3 bit ten per
  ``int32`` (3.2 bits per weight, padded to whole words), 8/6/5 bit one per ``uint8``
  (and 1 bit eight per ``uint8``);
* per group one scale and one zero point, both in the compute dtype, i.e. fp16: 32 bits
  per group. (``quant_scale``/``quant_zero`` would quantize them to 8 bit, but HQQ marks
  that deprecated; the config used here does not.)

So ``storage_bits = (packed code bits + 2 * 16 * n_groups) / n_weights``, which is
``nbits + 32 / group_size`` for 4 and 2 bit and ``~3.2 + 32 / group_size`` for 3 bit. It is
computed from the packed tensors HQQ actually returns, summed over the decoder Linears. The
scale and zero are rounded to fp16 before dequantizing, so the evaluated weights match
what the reported storage holds. ``effective_bits`` is the nominal ``nbits``, the number the
paper's eq. 6 would give for a uniform plan without outliers.

Note: HQQ groups the flattened weight, so when ``in_features`` is not a multiple of
``group_size`` (SmolLM2: 576 with g128) a group spans the end of one row and the start of
the next; that is how HQQ itself quantizes such layers. The weight's element count must be
divisible by ``group_size``.
"""

from __future__ import annotations

import copy
import gc
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError, MissingDependencyError
from ..eval.perplexity import perplexity
from ..quant.units import find_units, module_names

#: Default HQQ settings ``(nbits, group_size)``. Our plans store roughly 0.35-0.6 bits per
#: weight above their effective bits; with fp16 scale + zero per group HQQ pays
#: ``32 / group_size`` (g32: +1.0, g64: +0.5, g128: +0.25; 3 bit also +0.2 for packing), so
#: each bit width comes with two group sizes that bracket our overhead:
#: 4b g64 (4.5 storage bits), 4b g128 (4.25), 3b g64 (~3.7), 3b g128 (~3.45),
#: 2b g32 (3.0), 2b g64 (2.5).
DEFAULT_HQQ_SETTINGS: Tuple[Tuple[int, int], ...] = ((4, 64), (4, 128), (3, 64), (3, 128), (2, 32), (2, 64))

#: Bits HQQ spends on each per-group scale and on each zero point (fp16, HQQLinear's default
#: compute dtype).
HQQ_META_BITS = 16


def _hqq():
    try:
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except ImportError as error:
        raise MissingDependencyError(
            "The HQQ peer baseline needs the 'hqq' package (mobiusml/hqq): pip install hqq "
            "(or pip install 'windquant-gym[peers]')"
        ) from error
    return Quantizer, BaseQuantizeConfig


def _check_setting(nbits: int, group_size: int, supported: Sequence[float]) -> None:
    if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits not in supported:
        choices = ", ".join(str(b) for b in supported if isinstance(b, int))
        raise ConfigError(f"HQQ nbits must be one of {choices}, got {nbits!r}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise ConfigError(f"HQQ group_size must be a positive multiple of 8 (HQQ's rule), got {group_size!r}.")


@torch.no_grad()
def hqq_quantize(model: nn.Module, nbits: int, group_size: int) -> Tuple[nn.Module, Dict[str, float]]:
    """A copy of ``model`` whose decoder-block Linear weights are HQQ-quantized and
    dequantized back to the model's dtype; ``model`` itself is not touched.

    Returns ``(quantized_copy, bits)`` with ``bits = {"effective_bits": nbits,
    "storage_bits": packed codes + fp16 scale and zero per group, per weight,
    "code_bits": packed codes alone, per weight, "group_size": group_size, "nbits": nbits}``
    over the decoder Linears (see the module docstring for what HQQ stores).
    """
    Quantizer, BaseQuantizeConfig = _hqq()
    _check_setting(nbits, group_size, Quantizer.SUPPORTED_BITS)
    params = dict(BaseQuantizeConfig(nbits=nbits, group_size=group_size)["weight_quant_params"])
    meta_dtype = torch.float16  # HQQLinear keeps scale and zero in its compute dtype (fp16 default)

    paths = module_names(find_units(model, chunk_size=10**9))
    for path in paths:
        numel = model.get_submodule(path).weight.numel()
        if numel % group_size:
            raise ConfigError(
                f"HQQ group_size {group_size} does not divide the {numel} weights of {path}; "
                "choose a group size that divides every decoder Linear (e.g. 32, 64)."
            )

    quantized = copy.deepcopy(model)
    n_weights, code_bits, meta_bits = 0, 0, 0
    for path in paths:
        weight = quantized.get_submodule(path).weight
        W_q, meta = Quantizer.quantize(
            weight.detach().float(), device=weight.device, compute_dtype=torch.float32, **params
        )
        meta["scale"] = meta["scale"].to(meta_dtype).float()
        meta["zero"] = meta["zero"].to(meta_dtype).float()
        meta["compute_dtype"] = torch.float32
        restored = Quantizer.dequantize(W_q, meta)
        n_weights += weight.numel()
        code_bits += W_q.numel() * W_q.element_size() * 8
        meta_bits += (meta["scale"].numel() + meta["zero"].numel()) * HQQ_META_BITS
        weight.data.copy_(restored.to(dtype=weight.dtype, device=weight.device))
        del W_q, meta, restored
    bits = {
        "effective_bits": float(nbits),
        "storage_bits": (code_bits + meta_bits) / n_weights,
        "code_bits": code_bits / n_weights,
        "group_size": group_size,
        "nbits": nbits,
    }
    return quantized, bits


def hqq_rows(
    model: nn.Module,
    proxy_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    settings: Sequence[Tuple[int, int]] = DEFAULT_HQQ_SETTINGS,
    **perplexity_kwargs,
) -> List[Dict[str, object]]:
    """One leaderboard row per ``(nbits, group_size)`` in ``settings`` (default
    :data:`DEFAULT_HQQ_SETTINGS`: 4b g64, 4b g128, 3b g64, 3b g128, 2b g32, 2b g64).

    Each row: ``allocator`` ("HQQ {n}b g{g}"), ``effective_bits``, ``storage_bits``,
    ``proxy_ppl`` and ``heldout_ppl`` (``windquant_gym.eval.perplexity`` on the given
    ``[n, L]`` token blocks), and ``seconds`` (quantizing plus both evaluations).
    Each quantized copy is freed before the next; ``model`` is left unchanged.
    """
    _hqq()
    return peer_rows("HQQ", hqq_quantize, model, proxy_blocks, heldout_blocks, settings, **perplexity_kwargs)


def peer_rows(
    library: str,
    quantize: Callable[..., Tuple[nn.Module, Dict[str, float]]],
    model: nn.Module,
    proxy_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    settings: Sequence[Tuple[int, int]],
    **perplexity_kwargs,
) -> List[Dict[str, object]]:
    """One row per ``(nbits, group_size)``: ``quantize(model, nbits, group_size)`` returns a
    quantized copy and its bits; the copy is evaluated on both token sets and freed."""
    rows: List[Dict[str, object]] = []
    for nbits, group_size in settings:
        start = time.perf_counter()
        quantized, bits = quantize(model, nbits, group_size)
        proxy = perplexity(quantized, proxy_blocks, **perplexity_kwargs)
        heldout = perplexity(quantized, heldout_blocks, **perplexity_kwargs)
        seconds = time.perf_counter() - start
        del quantized
        gc.collect()
        rows.append(
            {
                "allocator": f"{library} {nbits}b g{group_size}",
                "effective_bits": bits["effective_bits"],
                "storage_bits": bits["storage_bits"],
                "proxy_ppl": proxy,
                "heldout_ppl": heldout,
                "seconds": seconds,
            }
        )
    return rows


__all__ = ["DEFAULT_HQQ_SETTINGS", "HQQ_META_BITS", "hqq_quantize", "hqq_rows"]
