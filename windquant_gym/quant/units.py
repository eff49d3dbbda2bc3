"""Units: column chunks of every Linear inside a causal LM's decoder blocks (DESIGN 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch.nn as nn

from ..errors import ConfigError, ModelStructureError

_ATTENTION_TAGS = ("attn", "attention")
_MLP_TAGS = ("mlp", "ffn", "feed_forward")


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
        raise ModelStructureError(
            f"{type(model).__name__} has no list of decoder blocks with nn.Linear layers (an "
            "nn.ModuleList of identical blocks, like model.model.layers in Llama); windquant_gym "
            "quantizes only such Linears. Pass a Hugging Face causal LM."
        )
    return best[1], best[2]


def find_units(model: nn.Module, chunk_size: int = 256) -> List[Unit]:
    """All units of ``model``: layer by layer, module order inside a layer, chunk by chunk."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}; the paper uses 256.")
    prefix, layers = find_decoder_layers(model)
    units: List[Unit] = []
    for layer_index, block in enumerate(layers):
        for local_name, module in block.named_modules():
            if not isinstance(module, nn.Linear) or module.weight.ndim != 2:
                continue
            path = f"{prefix}.{layer_index}.{local_name}" if prefix else f"{layer_index}.{local_name}"
            lowered = local_name.lower()
            is_attention = any(tag in lowered for tag in _ATTENTION_TAGS)
            is_mlp = any(tag in lowered for tag in _MLP_TAGS)
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
                        is_attention=is_attention,
                        is_mlp=is_mlp,
                    )
                )
    if not units:
        raise ModelStructureError(
            f"The decoder blocks of {type(model).__name__} hold no nn.Linear weights to quantize."
        )
    return units


def module_names(units: List[Unit]) -> List[str]:
    """Distinct module paths in unit order."""
    return list(dict.fromkeys(unit.module for unit in units))
