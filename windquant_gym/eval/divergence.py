"""KL divergence to the unquantized model, with a bounded reference.

Holding the unquantized model's full next-token distributions costs ``tokens x vocab``
floats (3.2 GB for 16k tokens of SmolLM2's 49k vocabulary), so the reference keeps, per
position, only its ``k`` most likely tokens (log-probabilities and ids) and the log of the
mass left over. The divergence measured against it is the exact KL between the two
distributions coarsened onto ``k + 1`` outcomes, those ``k`` tokens and "any other token":

    KL_k(p || q) = sum_{i in top-k(p)} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

It is never negative, it is 0 when the quantized model gives the reference's distribution,
and it never exceeds the full KL (coarsening cannot increase a divergence), which it
approaches as ``k`` grows. ``DEFAULT_TOPK = 128`` keeps 91% of the probability mass on
average on SmolLM2-135M (64 tokens: 88%, 1024: 98%); the search and the env's
``proxy_metric="kl"`` use it. A reference costs one pass of the unquantized model and
``8 k + 4`` bytes per position (2.1 MB for the cpu preset's 16 x 127 predicted positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

DEFAULT_TOPK = 128
"""Tokens kept per position in a :class:`TopKReference` (see the module docstring)."""
PROXY_METRICS = ("nll", "kl")
"""How a plan is scored on the proxy tokens: its mean next-token NLL on the text, or its mean
top-k KL divergence to the unquantized model's next-token distributions there."""


def check_proxy_metric(value, name: str = "proxy_metric") -> str:
    """``value`` if it names a proxy metric, else a ConfigError naming the choices."""
    if not isinstance(value, str) or value not in PROXY_METRICS:
        raise ConfigError(
            f"{name} must be one of {', '.join(map(repr, PROXY_METRICS))}, got {value!r}: 'nll' scores a plan by the "
            "proxy loss on the calibration text (the paper), 'kl' by its KL divergence to the unquantized model there."
        )
    return value


@dataclass(frozen=True)
class TopKReference:
    """The unquantized model's next-token distributions on ``[n, L]`` token blocks, at each
    of the ``L - 1`` predicted positions: its ``k`` most likely tokens and the rest's mass."""

    log_probs: torch.Tensor
    """``[n, L - 1, k]`` float32 log-probabilities of the top-k tokens, descending."""
    token_ids: torch.Tensor
    """``[n, L - 1, k]`` int32 ids of those tokens."""
    rest_log_prob: torch.Tensor
    """``[n, L - 1]`` float32 log of the probability of every other token (``-inf``: none)."""

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[-1])

    def rows(self, rows) -> "TopKReference":
        """The reference of ``blocks[rows]``."""
        index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return TopKReference(self.log_probs[index], self.token_ids[index], self.rest_log_prob[index])


def rest_log_prob(log_probs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """``log`` of the probability of every token but ``top_ids``, per row of the ``[c, vocab]``
    log-probabilities: a log-sum-exp over the others, exact even when they hold a tiny mass
    (``1 - sum(top)`` would be float rounding there), ``-inf`` when there are none.
    Overwrites ``log_probs`` (the caller's scratch copy) to avoid a second ``[c, vocab]`` buffer."""
    return log_probs.scatter_(1, top_ids, -math.inf).logsumexp(-1)


def coarse_kl_sum(log_q: torch.Tensor, reference_log_probs: torch.Tensor, reference_ids: torch.Tensor,
                  reference_rest: torch.Tensor) -> torch.Tensor:
    """Sum over positions of ``KL_k(p || q)`` for one chunk: ``log_q`` is ``[c, vocab]`` (a
    log-softmax, overwritten), the reference tensors ``[c, k]`` and ``[c]``."""
    reference_ids = reference_ids.long()
    top_q = log_q.gather(1, reference_ids)
    kl_top = (reference_log_probs.exp() * (reference_log_probs - top_q)).sum(-1)
    rest_q = rest_log_prob(log_q, reference_ids)  # finite wherever the rest holds tokens: a log-sum-exp does not underflow
    p_rest = reference_rest.exp()
    kl_rest = torch.where(p_rest > 0, p_rest * (reference_rest - rest_q), torch.zeros_like(p_rest))
    return (kl_top + kl_rest).sum()
