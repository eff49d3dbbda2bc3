"""Peer-library baseline for the allocator leaderboard: GPTQ uniform quantization from
llm-compressor (vllm-project/llm-compressor).

Written against llmcompressor 0.14.0.1 with compressed-tensors 0.19.0 (its pinned version;
``pip install llmcompressor``: pure-Python wheels, runs on the CPU, nothing to compile). That
release pins ``transformers<=5.17.0`` (and ``torch>=2.10,<=2.14.0``); it ran unchanged with
transformers 5.24.0 and torch 2.13.0 here (installed over the pin, pip reports the conflict).

What runs: llm-compressor's own ``oneshot`` entry point with a ``GPTQModifier`` whose one
config group targets exactly the decoder-block Linears the env quantizes (embeddings and the
LM head stay as they are, as in the env), with the weight arguments of llm-compressor's
``W{n}A16`` preset schemes except the group size: integer codes, ``strategy="group"``
(a group is ``group_size`` consecutive input columns of one output row), static weights,
and the library defaults for everything else: **symmetric** (``QuantizationArgs``'s
default, and every ``W{n}A16`` preset's; ``symmetric=False`` is the ``*_ASYM`` variant),
``memoryless_minmax`` observer, static activation ordering, ``block_size=128``,
``dampening_frac=0.01``, and the sequential calibration pipeline (one decoder layer at a
time, each layer calibrated on the outputs of the already-quantized layers before it). It
is calibrated on the given ``[n, L]`` token blocks (the env's calibration blocks, so the
proxy perplexity of these rows is measured on GPTQ's own calibration text). GPTQ runs on a
deep copy; the codes and scales are read back from it and dequantized into a second, plain
copy of the model (no quantization hooks), so the env's own perplexity code evaluates it.

What llm-compressor stores (compressed-tensors' ``pack-quantized`` format, which ``oneshot``
writes for integer weights below 8 bit):

* ``weight_packed``: the codes bit-packed densely into ``int32``, ``ceil(in * nbits / 32)``
  words per output row (no padding bits inside a row: 3 bit costs exactly 3 bits when
  ``in * 3`` is a multiple of 32, as for SmolLM2);
* ``weight_scale``: one scale per (row, group), in the checkpoint's dtype: 16 bits for an
  fp16/bf16 checkpoint (GPTQ's usual deployment). On a float32 model the library keeps the
  scales in float32; we count 16 bits and round the scales to fp16 before dequantizing, so
  the evaluated weights are exactly what the counted storage holds (the effect on the
  weights is below fp16's 2^-11 relative precision of the scale);
* only when asymmetric, ``weight_zero_point``: one ``nbits`` code per (row, group), packed
  into ``int32`` along the output dimension;
* ``weight_shape`` (two integers per Linear, not counted). No ``g_idx`` with static
  activation ordering (the groups stay contiguous).

So ``storage_bits = (packed code bits + 16 * n_groups [+ packed zero-point bits]) /
n_weights`` over the decoder Linears, computed from the packed tensors
``compressed_tensors``' own ``pack_to_int32`` returns: ``nbits + 16 / group_size`` when
symmetric and ``in_features * nbits`` is a multiple of 32; ``effective_bits`` is the
nominal ``nbits``, the number the paper's eq. 6 gives for a uniform plan without outliers.

Group sizes: llm-compressor 0.14's group quantization needs ``group_size`` to divide every
quantized Linear's ``in_features`` (its weight observer reshapes each row into whole
groups; ``bypass_divisibility_checks`` only skips the up-front check and then fails in the
observer). SmolLM2-135M has ``in_features`` 576 (q, k, v, o, gate, up) and 1536 (down), so
**g128 is impossible there** (576 = 4.5 x 128); the divisors of gcd(576, 1536) = 192 work,
e.g. g64 (``nbits + 0.25`` storage bits) or g192 (``nbits + 0.083``). A group size that
does not divide every decoder Linear raises :class:`~windquant_gym.errors.ConfigError`
before any work, naming the layers and the group sizes that do.

llm-compressor logs each layer's GPTQ error (loguru); ``LLM_COMPRESSOR_LOG_LEVEL=ERROR``
silences it. A layer whose Hessian cannot be inverted falls back to round-to-nearest with a
logged warning (the library's behaviour; none did on SmolLM2). llm-compressor's ``oneshot`` sets
``TOKENIZERS_PARALLELISM=false`` in the process environment when it is unset (its own doing).
"""

from __future__ import annotations

import copy
import gc
import math
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError, MissingDependencyError
from ..quant.units import find_units, module_names
from .peers import peer_rows

#: Default GPTQ settings ``(nbits, group_size)``: 3 and 2 bit at group 64, the GPTQ-usual
#: power of two closest to g128 that llm-compressor can apply to SmolLM2 (g128 does not
#: divide its 576-wide Linears; see the module docstring). Storage: 3.25 and 2.25 bits.
DEFAULT_GPTQ_SETTINGS: Tuple[Tuple[int, int], ...] = ((3, 64), (2, 64))

#: Bits counted per group scale (fp16/bf16, the dtype of a half-precision checkpoint).
GPTQ_SCALE_BITS = 16

#: The integer weight widths llm-compressor's ``W{n}A16`` schemes cover.
GPTQ_SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)

_INSTALL = "pip install llmcompressor (or pip install 'windquant-gym[gptq]')"


def _llmcompressor():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
        from llmcompressor import oneshot
        from llmcompressor.core import active_session
        from llmcompressor.modifiers.gptq import GPTQModifier
    except ImportError as error:
        raise MissingDependencyError(
            "The GPTQ peer baseline needs llm-compressor (vllm-project/llm-compressor, with its compressed-tensors): "
            f"{_INSTALL}. Its 0.14.0.1 release pins transformers<=5.17.0 and torch<=2.14.0. "
            f"(Import failed: {error})"
        ) from error
    return {
        "oneshot": oneshot,
        "GPTQModifier": GPTQModifier,
        "QuantizationScheme": QuantizationScheme,
        "QuantizationArgs": QuantizationArgs,
        "quantize": quantize,
        "dequantize": dequantize,
        "pack_to_int32": pack_to_int32,
        "active_session": active_session,
    }


def require_llmcompressor() -> None:
    """Raise :class:`~windquant_gym.errors.MissingDependencyError` (naming the pip command)
    unless llm-compressor imports; for CLIs to fail before any model is loaded."""
    _llmcompressor()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_setting(nbits, group_size) -> None:
    if not _is_int(nbits) or nbits not in GPTQ_SUPPORTED_BITS:
        raise ConfigError(
            f"GPTQ nbits must be an integer from {GPTQ_SUPPORTED_BITS[0]} to {GPTQ_SUPPORTED_BITS[-1]} "
            f"(llm-compressor's integer W{{n}}A16 schemes), got {nbits!r}; e.g. nbits=3."
        )
    if not _is_int(group_size) or group_size < 1:
        raise ConfigError(f"GPTQ group_size must be a positive integer (input columns per scale), got {group_size!r}; e.g. 64.")


def _decoder_paths(model: nn.Module) -> List[str]:
    return list(module_names(find_units(model, chunk_size=10**9)))


def _check_divides(model: nn.Module, paths: Sequence[str], group_size: int) -> None:
    widths = {path: model.get_submodule(path).weight.shape[-1] for path in paths}
    bad = [(path, width) for path, width in widths.items() if width % group_size]
    if not bad:
        return
    common = math.gcd(*widths.values())
    fits = [g for g in (16, 32, 64, 128, 256) if common % g == 0] + ([common] if common not in (16, 32, 64, 128, 256) else [])
    shown = ", ".join(f"{path} ({width})" for path, width in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise ConfigError(
        f"GPTQ group_size {group_size} does not divide the in_features of {len(bad)} decoder Linears: {shown}. "
        "llm-compressor's group quantization needs whole groups in every row; choose a divisor of "
        f"{common} (the gcd of all in_features), e.g. {', '.join(str(g) for g in fits) or common}."
    )


def _check_blocks(blocks) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        what = f"a {blocks.dtype} tensor of shape {tuple(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ConfigError(
            f"calibration_blocks must be an [n, L] integer tensor of token ids (e.g. problem.blocks), got {what}."
        )
    if blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise ConfigError(f"calibration_blocks must hold at least one block of 2+ tokens, got shape {tuple(blocks.shape)}.")
    return blocks.long()


class _Pretokenized:
    """Stands in for the processor ``oneshot`` insists on when given calibration data: our
    blocks are token ids already, and a ready DataLoader is never tokenized."""

    def save_pretrained(self, *args, **kwargs) -> None:  # only called when oneshot saves a model
        pass


def _collate(items):
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _calibration_loader(blocks: torch.Tensor, device: torch.device) -> torch.utils.data.DataLoader:
    rows = [{"input_ids": row.to(device), "attention_mask": torch.ones_like(row, device=device)} for row in blocks]
    return torch.utils.data.DataLoader(rows, batch_size=1, shuffle=False, collate_fn=_collate)


def gptq_quantize(
    model: nn.Module,
    calibration_blocks: torch.Tensor,
    nbits: int,
    group_size: int,
    symmetric: bool = True,
    **modifier_kwargs,
) -> Tuple[nn.Module, Dict[str, float]]:
    """A copy of ``model`` whose decoder-block Linear weights are GPTQ-quantized by
    llm-compressor (calibrated on ``calibration_blocks``, ``[n, L]`` token ids) and
    dequantized back to the model's dtype; ``model`` itself is not touched.

    ``symmetric``: the library default (True); False is llm-compressor's ``*_ASYM`` variant
    (an ``nbits`` zero point per group). ``modifier_kwargs`` go to ``GPTQModifier``
    (e.g. ``dampening_frac``, ``block_size``, ``actorder``).

    Returns ``(quantized_copy, bits)`` with ``bits = {"effective_bits": nbits,
    "storage_bits": packed codes + fp16 scale (+ packed zero point) per group, per weight,
    "code_bits": packed codes alone, per weight, "group_size", "nbits", "symmetric"}`` over
    the decoder Linears (see the module docstring for what llm-compressor stores).
    """
    _check_setting(nbits, group_size)
    if not isinstance(symmetric, bool):
        raise ConfigError(f"symmetric must be True (llm-compressor's default) or False, got {symmetric!r}.")
    blocks = _check_blocks(calibration_blocks)
    paths = _decoder_paths(model)
    _check_divides(model, paths, group_size)
    lib = _llmcompressor()

    args = lib["QuantizationArgs"](
        num_bits=nbits, type="int", strategy="group", group_size=group_size, symmetric=symmetric, dynamic=False
    )
    recipe = lib["GPTQModifier"](
        config_groups={"group_0": lib["QuantizationScheme"](targets=list(paths), weights=args)}, **modifier_kwargs
    )
    device = next(model.parameters()).device
    work = copy.deepcopy(model)
    restored: Dict[str, torch.Tensor] = {}
    n_weights, code_bits, meta_bits = 0, 0, 0
    try:
        with tempfile.TemporaryDirectory(prefix="windquant-gptq-") as folder:
            # oneshot re-reads the model's config from config.name_or_path (to refuse models quantized
            # by other methods); an in-memory or hub-named model has no such folder here.
            work.config.save_pretrained(folder)
            work.config.name_or_path = folder
            lib["oneshot"](model=work, dataset=_calibration_loader(blocks, device), recipe=recipe,
                           processor=_Pretokenized(), num_calibration_samples=len(blocks),
                           max_seq_length=blocks.shape[1])
        with torch.no_grad():
            for path in paths:
                module = work.get_submodule(path)
                qargs = module.quantization_scheme.weights
                weight = module.weight.detach()
                scale = module.weight_scale.detach()
                zero = getattr(module, "weight_zero_point", None)
                zero = zero.detach() if zero is not None else torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
                codes = lib["quantize"](weight, scale, zero, qargs, dtype=torch.int8)
                # GPTQ left the weight fake-quantized (codes x scale): check the codes read back reproduce it
                again = lib["dequantize"](codes, scale, zero, qargs, dtype=weight.dtype)
                if not torch.allclose(again, weight, rtol=1e-5, atol=1e-6 * float(scale.abs().max())):
                    raise RuntimeError(
                        f"{path}: llm-compressor's weight is not codes x scale (max diff "
                        f"{float((again - weight).abs().max()):.3g}); this llmcompressor version stores something else."
                    )
                scale16 = scale if scale.element_size() <= 2 else scale.to(torch.float16).to(scale.dtype)
                restored[path] = lib["dequantize"](codes, scale16, zero, qargs, dtype=weight.dtype).cpu()
                n_weights += weight.numel()
                code_bits += lib["pack_to_int32"](codes.cpu(), nbits).numel() * 32
                meta_bits += scale.numel() * GPTQ_SCALE_BITS
                if not symmetric:
                    meta_bits += lib["pack_to_int32"](zero.to(torch.int8).cpu(), nbits, packed_dim=0).numel() * 32
    finally:
        lib["active_session"]().reset()  # the session keeps the work copy otherwise
        del work
        gc.collect()

    quantized = copy.deepcopy(model)
    for path, tensor in restored.items():
        weight = quantized.get_submodule(path).weight
        weight.data.copy_(tensor.to(dtype=weight.dtype, device=weight.device))
    bits = {
        "effective_bits": float(nbits),
        "storage_bits": (code_bits + meta_bits) / n_weights,
        "code_bits": code_bits / n_weights,
        "group_size": group_size,
        "nbits": nbits,
        "symmetric": symmetric,
    }
    return quantized, bits


def gptq_rows(
    model: nn.Module,
    proxy_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    settings: Sequence[Tuple[int, int]] = DEFAULT_GPTQ_SETTINGS,
    **perplexity_kwargs,
) -> List[Dict[str, object]]:
    """One leaderboard row per ``(nbits, group_size)`` in ``settings`` (default
    :data:`DEFAULT_GPTQ_SETTINGS`: 3b g64, 2b g64), GPTQ calibrated on ``proxy_blocks``.

    Each row: ``allocator`` ("GPTQ {n}b g{g}"), ``effective_bits``, ``storage_bits``,
    ``proxy_ppl`` and ``heldout_ppl`` (``windquant_gym.eval.perplexity`` on the given
    ``[n, L]`` token blocks; the proxy blocks are GPTQ's calibration text), and ``seconds``
    (calibrating and quantizing plus both evaluations). Every setting is checked before the
    first runs; each quantized copy is freed before the next; ``model`` is left unchanged.
    """
    settings = [tuple(s) for s in settings]
    paths = _decoder_paths(model)
    for nbits, group_size in settings:
        _check_setting(nbits, group_size)
        _check_divides(model, paths, group_size)
    _check_blocks(proxy_blocks)
    _llmcompressor()

    def quantize(model: nn.Module, nbits: int, group_size: int):
        return gptq_quantize(model, proxy_blocks, nbits, group_size)

    return peer_rows("GPTQ", quantize, model, proxy_blocks, heldout_blocks, settings, **perplexity_kwargs)


__all__ = ["DEFAULT_GPTQ_SETTINGS", "GPTQ_SCALE_BITS", "GPTQ_SUPPORTED_BITS", "gptq_quantize", "gptq_rows", "require_llmcompressor"]
