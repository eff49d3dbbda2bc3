"""Calibration: one forward pass gives every decoder Linear's per-input-channel activation
scale ``s_j = mean_t |x_tj|`` (AWQ), the second moment of its inputs on each unit's columns
(``H = mean_t x_t x_t^T``, only the diagonal blocks of the chunk size: what chunk-local
error compensation and the output error need), and, in the same pass, the unquantized
model's proxy NLL on the same blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

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
    hessians: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Module path -> float32 ``[n_chunks, G, G]``: ``mean_t x_t x_t^T`` over each chunk of
    ``G = chunk_size`` input columns (a last, narrower chunk is zero-padded). Modules that read
    the same input (q/k/v, gate/up) share one tensor. Empty when not collected."""
    chunk_size: Optional[int] = None
    """The chunk size of ``hessians`` (None when they were not collected)."""


def calibrate(
    model: nn.Module,
    units: List[Unit],
    blocks: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    hessians: bool = True,
) -> Calibration:
    """Hooks on every unit's Linear accumulate ``sum |x|`` per input channel (and, with
    ``hessians``, ``sum x x^T`` per chunk of the units' columns) during one perplexity pass
    over ``blocks``; the hooks are removed afterwards, also on error."""
    chunk_size = _chunk_size(units) if hessians else None
    sums: Dict[str, torch.Tensor] = {}
    moments: Dict[str, torch.Tensor] = {}
    owner: Dict[str, str] = {}  # module -> module whose identical input it shares
    counts: Dict[str, int] = {}
    handles = []
    previous = {"input": None, "name": None}

    def make_hook(name: str):
        def hook(_module, inputs):
            raw = inputs[0]
            # q/k/v (and gate/up) are called on the very same tensor object: one moment for all.
            # Holding the previous input keeps it alive, so "is" cannot match a reused address.
            same = raw is previous["input"]
            previous["input"], previous["name"] = raw, (previous["name"] if same else name)
            x = raw.detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums[name] + flat.abs().sum(dim=0) if name in sums else flat.abs().sum(dim=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
            if chunk_size is None:
                return
            source = previous["name"]
            if owner.setdefault(name, source) != source:
                raise RuntimeError(
                    f"{name} shared its input with {owner[name]} in one batch and not in another; "
                    "calibrate with hessians=False for this model."
                )
            if source == name:
                moments[name] = _accumulate_moment(moments.get(name), flat, chunk_size)

        return hook

    try:
        for name in module_names(units):
            handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name)))
        nll = mean_nll(model, blocks, batch_size=batch_size, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
        previous.clear()
    scales = {name: (sums[name] / counts[name]).cpu() for name in sums}
    normalized = {name: (moment / counts[name]).cpu() for name, moment in moments.items()}
    shared = {name: normalized[source] for name, source in owner.items()}
    return Calibration(act_scales=scales, nll=nll, n_tokens=int(blocks.numel()), hessians=shared, chunk_size=chunk_size)


def _chunk_size(units: List[Unit]) -> int:
    return max(unit.width for unit in units)


def _accumulate_moment(total: Optional[torch.Tensor], flat: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``total + sum_t x_t x_t^T`` per chunk of columns, ``[n_chunks, G, G]`` float32."""
    tokens, in_features = flat.shape
    n_chunks = -(-in_features // chunk_size)
    padded = flat.new_zeros(tokens, n_chunks * chunk_size)
    padded[:, :in_features] = flat
    chunks = padded.view(tokens, n_chunks, chunk_size).transpose(0, 1)  # [C, T, G]
    moment = torch.bmm(chunks.transpose(1, 2), chunks)
    return moment if total is None else total.add_(moment)
