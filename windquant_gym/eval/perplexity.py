"""Perplexity with bounded memory: the LM head's logits are computed a chunk of positions at
a time, at most ``LOGITS_BYTES`` of float32 logits per chunk (2048 positions on SmolLM2's 49k
vocabulary, 784 on LLaMA-3's 128k), so 64 x 256 tokens never hold all 3-8 GB of logits."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from .kernels import linear_kernels

LOGITS_BYTES = 2048 * 49152 * 4
"""Float32 logits per LM-head chunk by default (~400 MB; the log-softmax needs as much again)."""


def logits_chunk_for(vocab_size: int, logits_bytes: int = LOGITS_BYTES) -> int:
    """Positions per LM-head chunk such that their float32 logits fit in ``logits_bytes``."""
    return max(1, logits_bytes // (4 * vocab_size))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def mean_nll(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    logits_chunk: Optional[int] = None,
    progress: bool = False,
    on_batch: Optional[Callable[[], None]] = None,
) -> float:
    """Mean next-token negative log-likelihood (nats) over all ``[n, L]`` token blocks.

    Runs the decoder, then the LM head on ``logits_chunk`` positions at a time (default:
    :func:`logits_chunk_for` the vocabulary); on the CPU the Linear layers run on oneDNN
    (see :mod:`.kernels`).
    ``on_batch`` is called after every batch (used for cooperative interruption)."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    device = _device_of(model)
    if logits_chunk is None:
        logits_chunk = logits_chunk_for(head.weight.shape[0])
    elif isinstance(logits_chunk, bool) or not isinstance(logits_chunk, numbers.Integral) or logits_chunk < 1:
        raise ConfigError(f"logits_chunk must be a positive int (positions per LM-head chunk), got {logits_chunk!r}; "
                          "leave it None to bound the logits to ~400 MB.")
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
