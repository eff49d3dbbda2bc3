"""Content fingerprints that key caches and tie plans to the model they were made for."""

from __future__ import annotations

import hashlib
from typing import Iterable, Tuple

import torch


def _update_with_tensor(digest, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    digest.update(str((tuple(data.shape), str(data.dtype))).encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def tensors_fingerprint(named: Iterable[Tuple[str, torch.Tensor]], *extra: str) -> str:
    """blake2b (16 bytes, hex) over names, shapes, dtypes and exact bytes of the tensors,
    then over the ``extra`` strings."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        digest.update(name.encode())
        _update_with_tensor(digest, tensor)
    for text in extra:
        digest.update(text.encode())
    return digest.hexdigest()
