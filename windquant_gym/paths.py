"""Where windquant_gym keeps converted models, calibration statistics and tables."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (``$WINDQUANT_CACHE``, else ``$XDG_CACHE_HOME/windquant_gym``, else
    ``~/.cache/windquant_gym``), not created."""
    root = os.environ.get("WINDQUANT_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(xdg, "windquant_gym")
    return Path(root)


def cache_dir(*parts: str) -> Path:
    """:func:`cache_root` with ``parts`` appended, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_cache_dir() -> Path:
    """Where converted models are kept: ``$WINDQUANT_MODEL_CACHE``, else ``cache_dir("models")``.
    A separate variable so that a fresh cache (tests, a sweep's own folder) can still share
    one converted copy of a model, which is slow to make."""
    root = os.environ.get("WINDQUANT_MODEL_CACHE")
    if root is None:
        return cache_dir("models")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
