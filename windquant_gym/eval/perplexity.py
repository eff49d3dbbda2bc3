"""Perplexity and KL divergence with bounded memory: the LM head's logits are computed a
chunk of positions at a time, at most ``LOGITS_BYTES`` of float32 logits per chunk (2048
positions on SmolLM2's 49k vocabulary, 784 on LLaMA-3's 128k), so 64 x 256 tokens never
hold all 3-8 GB of logits."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from .divergence import DEFAULT_TOPK, TopKReference, coarse_kl_sum, rest_log_prob
from ..compute.kernels import linear_kernels

LOGITS_BYTES = 2048 * 49152 * 4
"""Float32 logits per LM-head chunk by default (~400 MB; the log-softmax needs as much again)."""


def logits_chunk_for(vocab_size: int, logits_bytes: int = LOGITS_BYTES) -> int:
    """Positions per LM-head chunk such that their float32 logits fit in ``logits_bytes``."""
    return max(1, logits_bytes // (4 * vocab_size))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logit_chunks(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    logits_chunk: Optional[int],
    progress: bool,
    on_batch: Optional[Callable[[], None]],
    desc: str = "perplexity",
) -> Iterator[Tuple[int, slice, torch.Tensor, torch.Tensor]]:
    """The one loop every pass shares: the decoder on ``batch_size`` blocks at a time, then
    the LM head on ``logits_chunk`` positions at a time. Yields ``(first block of the batch,
    positions within the batch's flattened [b * (L - 1)] predictions, float32 logits
    [c, vocab], next-token targets [c])``. Linear layers run on the CPU kernel measured faster for the model (.kernels)."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    device = _device_of(model)
    if logits_chunk is None:
        logits_chunk = logits_chunk_for(head.weight.shape[0])
    elif isinstance(logits_chunk, bool) or not isinstance(logits_chunk, numbers.Integral) or logits_chunk < 1:
        raise ConfigError(f"logits_chunk must be a positive int (positions per LM-head chunk), got {logits_chunk!r}; "
                          "leave it None to bound the logits to ~400 MB.")
    with linear_kernels(device, model):
        for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", disable=not progress):
            ids = blocks[start : start + batch_size].to(device)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].reshape(-1, head.in_features)
            targets = ids[:, 1:].reshape(-1)
            for i in range(0, len(targets), logits_chunk):
                logits = head(hidden[i : i + logits_chunk]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                yield start, slice(i, i + logits_chunk), logits, targets[i : i + logits_chunk]
            if on_batch is not None:
                on_batch()


@dataclass(frozen=True)
class TokenLosses:
    """What one pass measured: the mean next-token NLL (nats) and, when a reference was
    given, the mean KL divergence to it (nats per position)."""

    nll: float
    kl: Optional[float]
    n_positions: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.nll < 700 else math.inf


@torch.inference_mode()
def token_losses(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    reference: Optional[TopKReference] = None,
    logits_chunk: Optional[int] = None,
    progress: bool = False,
    on_batch: Optional[Callable[[], None]] = None,
) -> TokenLosses:
    """Mean NLL over all ``[n, L]`` token blocks, and with ``reference`` (made by
    :func:`topk_reference` on the same blocks) the mean top-k KL to it, in one pass.
    ``on_batch`` is called after every batch (used for cooperative interruption)."""
    if reference is not None and tuple(reference.rest_log_prob.shape) != (len(blocks), blocks.shape[1] - 1):
        raise ConfigError(
            f"The KL reference covers {tuple(reference.rest_log_prob.shape)} positions, the blocks "
            f"{(len(blocks), blocks.shape[1] - 1)}: make it with topk_reference() on the same blocks (or .rows() of them)."
        )
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    for start, positions, logits, targets in _logit_chunks(model, blocks, batch_size, logits_chunk, progress, on_batch):
        if reference is None:
            nll_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        else:
            log_q = logits.log_softmax(-1)  # cross_entropy is nll_loss(log_softmax): the same NLL
            nll_sum += F.nll_loss(log_q, targets, reduction="sum").item()
            batch = slice(start, start + batch_size)
            k = reference.k
            kl_sum += coarse_kl_sum(
                log_q,
                reference.log_probs[batch].reshape(-1, k)[positions].to(log_q.device),
                reference.token_ids[batch].reshape(-1, k)[positions].to(log_q.device),
                reference.rest_log_prob[batch].reshape(-1)[positions].to(log_q.device),
            ).item()
        count += targets.numel()
    return TokenLosses(nll_sum / count, kl_sum / count if reference is not None else None, count)


@torch.inference_mode()
def topk_reference(
    model: nn.Module, blocks: torch.Tensor, k: int = DEFAULT_TOPK, batch_size: int = 8, progress: bool = False
) -> TopKReference:
    """The model's top-``k`` next-token distributions on ``blocks`` (one pass), on the CPU."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"k must be a positive int (tokens kept per position), got {k!r}; the default is {DEFAULT_TOPK}.")
    n, length = len(blocks), blocks.shape[1] - 1
    vocab = model.get_output_embeddings().weight.shape[0]
    k = min(int(k), vocab)
    log_probs = torch.empty(n * length, k)
    token_ids = torch.empty(n * length, k, dtype=torch.int32)  # half the memory of int64; gathers widen a chunk
    rest = torch.empty(n * length)
    for start, positions, logits, _ in _logit_chunks(model, blocks, batch_size, None, progress, None, "KL reference"):
        offset = start * length
        log_p = logits.log_softmax(-1)
        top = log_p.topk(k, dim=-1)
        where = slice(offset + positions.start, offset + positions.start + len(top.values))
        log_probs[where], token_ids[where] = top.values.cpu(), top.indices.cpu()
        rest[where] = rest_log_prob(log_p, top.indices).cpu()
    return TopKReference(log_probs.view(n, length, k), token_ids.view(n, length, k), rest.view(n, length))


@torch.inference_mode()
def block_nlls(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    logits_chunk: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    """``[n]`` float64: the mean next-token NLL (nats) of each of the ``[n, L]`` token blocks,
    from one pass. Every block predicts ``L - 1`` tokens, so their mean is :func:`mean_nll`;
    kept per block so that two plans can be compared window by window (a paired bootstrap,
    :mod:`windquant_gym.eval.bootstrap`)."""
    per_block = torch.zeros(len(blocks), dtype=torch.float64)
    predicted = blocks.shape[1] - 1
    for start, positions, logits, targets in _logit_chunks(model, blocks, batch_size, logits_chunk, progress, None,
                                                           "held-out windows"):
        losses = F.cross_entropy(logits, targets, reduction="none").double().cpu()
        owner = start + torch.arange(positions.start, positions.start + len(targets)) // predicted
        per_block.index_add_(0, owner, losses)
    return per_block / predicted


def mean_nll(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    logits_chunk: Optional[int] = None,
    progress: bool = False,
    on_batch: Optional[Callable[[], None]] = None,
) -> float:
    """Mean next-token negative log-likelihood (nats) over all ``[n, L]`` token blocks."""
    return token_losses(model, blocks, batch_size, None, logits_chunk, progress, on_batch).nll


def perplexity(model: nn.Module, blocks: torch.Tensor, **kwargs) -> float:
    """``exp(mean_nll)``; used both for the proxy (calibration blocks) and held-out text."""
    return math.exp(mean_nll(model, blocks, **kwargs))
