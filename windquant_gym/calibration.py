"""Calibration: one forward pass gives every decoder Linear's per-input-channel activation
scale ``s_j = mean_t |x_tj|`` (AWQ), and, in the same pass, the unquantized model's proxy
NLL on the same blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn

from .eval.perplexity import mean_nll
from .quant.units import Unit, module_names


@dataclass
class Calibration:
    act_scales: Dict[str, torch.Tensor]
    """Module path -> float32 ``[in_features]`` mean absolute input activation."""
    nll: float
    """Mean token NLL of the model on the calibration blocks (its proxy loss)."""
    n_tokens: int


def calibrate(model: nn.Module, units: List[Unit], blocks: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Calibration:
    """Hooks on every unit's Linear accumulate ``sum |x|`` per input channel during one
    perplexity pass over ``blocks``; the hooks are removed afterwards, also on error."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums[name] + flat.abs().sum(dim=0) if name in sums else flat.abs().sum(dim=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return hook

    try:
        for name in module_names(units):
            handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name)))
        nll = mean_nll(model, blocks, batch_size=batch_size, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    scales = {name: (sums[name] / counts[name]).cpu() for name in sums}
    return Calibration(act_scales=scales, nll=nll, n_tokens=int(blocks.numel()))
