"""Token blocks for calibration and the proxy perplexity (paper: 64 x 256)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import DataError


def _documents(texts: Sequence[str]) -> list:
    """``texts`` as a list of strings, or a DataError saying what was given instead."""
    if isinstance(texts, (str, bytes)):
        raise DataError(
            f"texts must be a list of documents, got one {type(texts).__name__} ({texts[:40]!r}...); "
            "wrap it in a list: [text]."
        )
    try:
        documents = list(texts)
    except TypeError:
        raise DataError(
            f"texts must be a list of strings, got {type(texts).__name__} ({texts!r}); pass documents as a "
            "list of str, or a corpus name such as 'wiki-sample' where a corpus is accepted."
        ) from None
    wrong = [(i, type(t).__name__) for i, t in enumerate(documents) if not isinstance(t, str)]
    if wrong:
        i, kind = wrong[0]
        raise DataError(
            f"texts must hold strings; document {i} is of type {kind} ({documents[i]!r:.60}) and {len(wrong) - 1} "
            "more are not strings. Convert them to str (decode bytes) first."
        )
    return documents


def token_stream(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined by the end-of-text token, as one 1-D tensor."""
    texts = _documents(texts)
    if tokenizer is None or not callable(tokenizer):
        raise DataError(
            f"A tokenizer is needed to cut text into token blocks, got {tokenizer!r}; pass the tokenizer that "
            "goes with the model (load_model returns both)."
        )
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
        raise DataError(
            f"Need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}; the paper uses 64 x 256."
        )
    texts = _documents(texts)
    if not any(text.strip() for text in texts):
        raise DataError(
            f"The calibration text is empty ({len(texts)} documents, none with any non-blank text); give "
            f"text for {n_samples} blocks of {seq_len} tokens, e.g. the corpus 'wiki-sample'."
        )
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
