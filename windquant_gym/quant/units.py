"""Units: column chunks of every Linear inside a causal LM's decoder blocks (DESIGN 2)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError, ModelStructureError
from .module_kinds import is_attention, is_mlp
from .quantizers import FP16_MAX  # skipped units and scales are fp16: beyond it is inf



@dataclass(frozen=True)
class Unit:
    """``chunk_size`` consecutive input columns of one Linear weight ``W[out, in]``, all rows."""

    index: int
    layer: int
    """Index of the decoder block that holds the module."""
    module: str
    """Dotted path of the ``nn.Linear`` in the model (``model.get_submodule(module)``)."""
    col_start: int
    col_end: int
    out_features: int
    in_features: int
    is_attention: bool
    is_mlp: bool

    @property
    def width(self) -> int:
        return self.col_end - self.col_start

    @property
    def n_weights(self) -> int:
        return self.out_features * self.width


def find_decoder_layers(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks, found by shape rather than by name: the
    ``nn.ModuleList`` of same-class blocks holding Linear layers with the most parameters."""
    best: Tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        found = ""
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
                kinds = sorted({type(m).__name__ for m in module[0].modules() if not list(m.children())})
                found = (
                    f" Its nn.ModuleList {name!r} holds {len(module)} {type(module[0]).__name__} blocks whose "
                    f"layers are {', '.join(kinds) or 'empty'}, none of them torch.nn.Linear."
                )
                break
        raise ModelStructureError(
            f"{type(model).__name__} has no list of decoder blocks with nn.Linear layers (an "
            f"nn.ModuleList of identical blocks, like model.model.layers in Llama).{found} windquant_gym "
            "quantizes only nn.Linear weights inside such blocks (GPT-2's transformers Conv1D is not one): "
            "pass a Hugging Face causal LM with nn.Linear projections, e.g. a Llama, Qwen2 or SmolLM2."
        )
    return best[1], best[2]


def find_units(model: nn.Module, chunk_size: int = 256) -> List[Unit]:
    """All units of ``model``: layer by layer, module order inside a layer, chunk by chunk."""
    chunk_size = positive_int(chunk_size, "chunk_size", "the paper uses 256")
    prefix, layers = find_decoder_layers(model)
    units: List[Unit] = []
    for layer_index, block in enumerate(layers):
        for local_name, module in block.named_modules():
            if not isinstance(module, nn.Linear) or module.weight.ndim != 2:
                continue
            path = f"{prefix}.{layer_index}.{local_name}" if prefix else f"{layer_index}.{local_name}"
            out_features, in_features = module.weight.shape
            for start in range(0, in_features, chunk_size):
                units.append(
                    Unit(
                        index=len(units),
                        layer=layer_index,
                        module=path,
                        col_start=start,
                        col_end=min(start + chunk_size, in_features),
                        out_features=out_features,
                        in_features=in_features,
                        is_attention=is_attention(local_name),
                        is_mlp=is_mlp(local_name),
                    )
                )
    if not units:
        raise ModelStructureError(
            f"The decoder blocks of {type(model).__name__} hold no nn.Linear weights to quantize."
        )
    return units


def positive_int(value, name: str, hint: str) -> int:
    """``value`` as an int >= 1 (numpy integers accepted; bools, floats and strings not)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; {hint}.")
    return int(number)


def check_weights(model: nn.Module, units: List[Unit]) -> None:
    """Refuse NaN, Inf, or beyond-float16 weights in any unit's module, naming the module.

    Run before calibration and before the table is built: a non-finite weight would turn the
    calibration pass and every fit into NaN without saying where it came from. One pass per
    module (``amax(|W|)`` propagates NaN), so it costs far less than calibrating."""
    for name in module_names(units):
        weight = model.get_submodule(name).weight.detach()
        top = float(weight.abs().amax())
        if math.isfinite(top) and top <= FP16_MAX:
            continue
        finite = torch.isfinite(weight)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(weight).sum())
            n_inf = int(torch.isinf(weight).sum())
            row, column = (~finite).nonzero()[0].tolist()
            raise ModelStructureError(
                f"Module {name!r} holds {n_nan} NaN and {n_inf} Inf weights (the first at row {row}, column "
                f"{column}: {float(weight[row, column])}); windquant_gym refuses non-finite weights before "
                "calibrating or fitting anything. Reload the checkpoint, or redo the dtype conversion or edit "
                "that produced them."
            )
        raise ModelStructureError(
            f"Module {name!r} has weights up to {top:.4g} in magnitude, beyond float16's range ({FP16_MAX:g}): "
            "skipped units are kept in FP16 and scales are stored in fp16, where they would become inf. "
            "Check the checkpoint; a model with such weights cannot be quantized by windquant_gym."
        )


def module_names(units: List[Unit]) -> List[str]:
    """Distinct module paths in unit order."""
    return list(dict.fromkeys(unit.module for unit in units))
