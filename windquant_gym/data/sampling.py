"""Token blocks for calibration and the proxy perplexity (paper: 64 x 256)."""

from __future__ import annotations

from typing import Optional, Sequence

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
    texts: Sequence[str], tokenizer, n_samples: int = 64, seq_len: int = 256, seed: int = 0,
    stream: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[n_samples, seq_len]`` token blocks: distinct non-overlapping windows of the token
    stream, chosen by a seeded generator (same seed, same blocks) and kept in text order.
    ``stream``: ``token_stream(texts, tokenizer)`` when the caller has it already (it is then
    not tokenized again)."""
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
    stream = token_stream(texts, tokenizer) if stream is None else stream
    starts = _block_starts(len(stream), n_samples, seq_len, seed)
    return torch.stack([stream[i : i + seq_len] for i in starts])


def _block_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """Token offsets of :func:`sample_token_blocks`' blocks, ascending."""
    windows = n_tokens // seq_len
    if windows < n_samples:
        raise DataError(
            f"The text gives {n_tokens} tokens: {windows} blocks of {seq_len}, fewer than the {n_samples} "
            f"requested. Give more text, or lower n_samples / seq_len."
        )
    return np.sort(np.random.default_rng(seed).choice(windows, size=n_samples, replace=False)) * seq_len


#: The calibration text's last fifth (by tokens) is kept for validation: the statistics set
#: (:func:`statistics_blocks`) is drawn from the first four fifths, the validation blocks
#: (:func:`validation_blocks`) from the last, and neither overlaps a proxy block, so choices
#: made on validation are made on text no fit and no proxy pass has read.
VALIDATION_SHARE = 0.2
#: Seeds of the two draws, apart from the proxy's (``seed``): same text, other blocks.
_STATISTICS_SEED, _VALIDATION_SEED = 1_000_003, 2_000_003


def split_starts(n_tokens: int, n_samples: int, seq_len: int, proxy: tuple, validation: bool) -> np.ndarray:
    """Token offsets (ascending) of :func:`statistics_blocks` (``validation=False``) or
    :func:`validation_blocks` in a calibration stream of ``n_tokens``: ``n_samples`` windows of
    ``seq_len`` from the split's region, none overlapping a proxy block ``proxy = (n, L, seed)``."""
    if n_samples < 1 or seq_len < 2:
        raise DataError(f"Need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}; e.g. 64 x 256.")
    proxy_samples, proxy_len, proxy_seed = proxy
    avoid = _block_starts(n_tokens, proxy_samples, proxy_len, proxy_seed)
    cut = int(n_tokens * (1.0 - VALIDATION_SHARE))
    lo, hi = (cut, n_tokens) if validation else (0, cut)
    starts = lo + np.arange((hi - lo) // seq_len) * seq_len
    # a block [s, s + L) meets a proxy block [a, a + P) unless s + L <= a or a + P <= s
    clear = np.ones(len(starts), dtype=bool)
    for a in avoid:
        clear &= (starts + seq_len <= a) | (a + proxy_len <= starts)
    candidates = starts[clear]
    if len(candidates) < n_samples:
        what = "validation split" if validation else "statistics set"
        raise DataError(
            f"The {what} needs {n_samples} blocks of {seq_len} tokens that do not overlap the proxy's blocks, but the "
            f"text has room for only {len(candidates)}; give more calibration text, or fewer / shorter blocks."
        )
    seed = (_VALIDATION_SEED if validation else _STATISTICS_SEED) + proxy_seed
    return np.sort(np.random.default_rng(seed).choice(candidates, size=n_samples, replace=False))


def statistics_blocks(texts: Sequence[str], tokenizer, n_samples: int, seq_len: int, proxy: tuple,
                      stream: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[n_samples, seq_len]`` blocks for the activation scales and Hessian blocks when they are
    measured apart from the proxy (:attr:`QuantConfig.hessian_blocks`): from the first
    ``1 - VALIDATION_SHARE`` of the calibration text, disjoint from the proxy's blocks
    ``proxy = (n_samples, seq_len, seed)`` and from :func:`validation_blocks`. ``stream`` as for
    :func:`sample_token_blocks`."""
    return _split_blocks(texts, tokenizer, n_samples, seq_len, proxy, False, stream)


def validation_blocks(texts: Sequence[str], tokenizer, n_samples: int, seq_len: int, proxy: tuple) -> torch.Tensor:
    """``[n_samples, seq_len]`` blocks of the calibration text's last ``VALIDATION_SHARE``, disjoint
    from the proxy's blocks ``proxy = (n_samples, seq_len, seed)`` and from :func:`statistics_blocks`:
    where settings are chosen (never on the eval split)."""
    return _split_blocks(texts, tokenizer, n_samples, seq_len, proxy, True)


def _split_blocks(texts, tokenizer, n_samples: int, seq_len: int, proxy: tuple, validation: bool,
                  stream: Optional[torch.Tensor] = None) -> torch.Tensor:
    if stream is None:
        stream = token_stream(_documents(texts), tokenizer)
    starts = split_starts(len(stream), n_samples, seq_len, proxy, validation)
    return torch.stack([stream[i : i + seq_len] for i in starts])


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
