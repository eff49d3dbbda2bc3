"""Token blocks for calibration and the proxy perplexity (paper: 64 x 256)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import DataError


def token_stream(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined by the end-of-text token, as one 1-D tensor."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


def sample_token_blocks(
    texts: Sequence[str], tokenizer, n_samples: int = 64, seq_len: int = 256, seed: int = 0
) -> torch.Tensor:
    """``[n_samples, seq_len]`` token blocks: distinct non-overlapping windows of the token
    stream, chosen by a seeded generator (same seed, same blocks) and kept in text order."""
    if n_samples < 1 or seq_len < 2:
        raise DataError(f"Need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}.")
    stream = token_stream(texts, tokenizer)
    windows = len(stream) // seq_len
    if windows < n_samples:
        raise DataError(
            f"The text gives {len(stream)} tokens: {windows} blocks of {seq_len}, fewer than the {n_samples} "
            f"requested. Give more text, or lower n_samples / seq_len."
        )
    picked = np.sort(np.random.default_rng(seed).choice(windows, size=n_samples, replace=False))
    return torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in picked])


def eval_windows(texts: Sequence[str], tokenizer, seq_len: int = 256, max_windows: int | None = None) -> torch.Tensor:
    """Held-out protocol: the text concatenated and cut into consecutive non-overlapping
    windows of ``seq_len``; ``max_windows`` keeps that many spread evenly over the text."""
    stream = token_stream(texts, tokenizer)
    windows = len(stream) // seq_len
    if windows < 1:
        raise DataError(f"The text gives {len(stream)} tokens, fewer than one window of {seq_len}.")
    blocks = stream[: windows * seq_len].view(windows, seq_len)
    if max_windows is not None and max_windows < windows:
        blocks = blocks[np.linspace(0, windows - 1, max_windows).round().astype(int)]
    return blocks
