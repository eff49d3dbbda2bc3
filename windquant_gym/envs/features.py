"""The static part of the observation (paper Table 1): per-unit weight and calibration
statistics, computed once per env, vectorised over units of the same shape."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

from ..quant.units import Unit

#: Column order of :func:`unit_features`: dims 0-4, 9-13 of the observation.
STATIC_FEATURES = (
    "mean", "std", "abs_mean", "sparsity", "outlier_frac",
    "calib_mean", "calib_std", "calib_max", "is_attention", "is_mlp",
)


@torch.no_grad()
def unit_features(model: nn.Module, units: List[Unit], act_scales: Dict[str, torch.Tensor]) -> np.ndarray:
    """``[N, 10]`` float64: weight mean, std, mean |W|, fraction |W| < 1e-6, fraction
    |W| > 0.5 * P99(|W|); activation-scale mean, std, max; is_attention, is_mlp."""
    out = np.zeros((len(units), len(STATIC_FEATURES)))
    groups = defaultdict(list)
    for unit in units:
        groups[(unit.out_features, unit.width)].append(unit)
    for members in groups.values():
        for start in range(0, len(members), 64):
            batch = members[start : start + 64]
            # on the weights' own device: at 8B a GPU does these reductions over 7e9 weights in
            # seconds, where copying them to the host and selecting there takes minutes
            w = torch.stack([
                model.get_submodule(u.module).weight.detach()[:, u.col_start : u.col_end].float().flatten()
                for u in batch
            ])
            s = torch.stack([act_scales[u.module][u.col_start : u.col_end].float().to(w.device) for u in batch])
            magnitude = w.abs()
            k = max(1, int(round(0.99 * w.shape[1])))
            p99 = magnitude.kthvalue(k, dim=1, keepdim=True).values
            rows = [u.index for u in batch]
            zeros = torch.zeros(len(batch), device=w.device)
            columns = torch.stack([
                w.mean(1).double(), (w.std(1, unbiased=False) if w.shape[1] > 1 else zeros).double(),
                magnitude.mean(1).double(), (magnitude < 1e-6).double().mean(1),
                (magnitude > 0.5 * p99).double().mean(1), s.mean(1).double(),
                (s.std(1, unbiased=False) if s.shape[1] > 1 else zeros).double(), s.amax(1).double(),
            ], dim=1)
            out[rows, :8] = columns.cpu().numpy()
    out[:, 8] = [float(u.is_attention) for u in units]
    out[:, 9] = [float(u.is_mlp) for u in units]
    return out
