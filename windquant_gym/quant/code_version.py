"""The version of the code that fits a table: a hash of the ``quant`` package's source, part of
every table's cache key and stored in each table, so no table the old code fitted is reused."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List

from ..cache import source_version


def fitting_sources() -> List[Path]:
    """The source files whose code decides a table's entries: the whole ``quant`` package
    (quantizers, compensation, accounting, config, ...). A change to any of them changes
    every table key, so no table the old code fitted is reused."""
    return sorted(Path(__file__).parent.glob("*.py"))


@functools.lru_cache(maxsize=None)
def fitting_code_version() -> str:
    """A hash of :func:`fitting_sources`, part of every table's cache key."""
    return source_version(fitting_sources())
