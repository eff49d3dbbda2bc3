"""Perplexity with bounded memory: the LM head's logits are computed a chunk of tokens at a
time, so 64 x 256 tokens on a 49k vocabulary need ~0.2 GB of logits instead of 3.2 GB."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .kernels import linear_kernels


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def mean_nll(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    logits_chunk: int = 2048,
    progress: bool = False,
    on_batch: Optional[Callable[[], None]] = None,
) -> float:
    """Mean next-token negative log-likelihood (nats) over all ``[n, L]`` token blocks.

    Runs the decoder, then the LM head on ``logits_chunk`` positions at a time; on the CPU
    the Linear layers run on oneDNN (see :mod:`.kernels`).
    ``on_batch`` is called after every batch (used for cooperative interruption)."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    device = _device_of(model)
    total, count = 0.0, 0
    batches = range(0, len(blocks), batch_size)
    with linear_kernels(device):
        for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            ids = blocks[start : start + batch_size].to(device)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].reshape(-1, head.in_features)
            targets = ids[:, 1:].reshape(-1)
            for i in range(0, len(targets), logits_chunk):
                logits = head(hidden[i : i + logits_chunk]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                total += F.cross_entropy(logits, targets[i : i + logits_chunk], reduction="sum").item()
            count += targets.numel()
            if on_batch is not None:
                on_batch()
    return total / count


def perplexity(model: nn.Module, blocks: torch.Tensor, **kwargs) -> float:
    """``exp(mean_nll)``; used both for the proxy (calibration blocks) and held-out text."""
    return math.exp(mean_nll(model, blocks, **kwargs))
