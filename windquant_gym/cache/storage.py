"""The on-disk caches (converted models, calibration statistics, quantization tables):
safe under crashes and under several processes sharing one cache folder.

- Writes go to a temporary file named after the writing process (pid and a random part, so
  two processes never write the same temporary file) and are renamed into place: a crash
  leaves a stray temporary file, never a half-written entry.
- One builder per entry at a time: a process that needs an entry another process is building
  waits on a file lock (``<entry>.lock``, via the ``filelock`` package), then reads the result.
- A damaged entry (truncated, half-written by an older version, another format) is reported
  in a :class:`~windquant_gym.errors.CacheWarning` naming the file, and rebuilt.
- What is cached is listed and removed by :mod:`windquant_gym.cache.listing` (``windquant
  cache list`` / ``windquant cache clear``), which knows every kind of entry; this module knows
  none of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from ..errors import CacheWarning

T = TypeVar("T")

CACHE_KINDS = ("models", "calibration", "tables", "kernels")
"""The cache's sub-folders: converted models, calibration statistics, quantization tables, and
which CPU kernel was measured faster on this machine."""


def temporary_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process and call (the pid in it tells
    ``windquant cache clear`` whether its writer still runs)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def staging_prefix(path: Path) -> str:
    """The prefix of a temporary folder beside ``path`` (``tempfile.mkdtemp(prefix=...)``)."""
    return f".{Path(path).name}.partial-{os.getpid()}-"


_WRITER = re.compile(r"\.(?:partial-)?(\d+)-[0-9a-z_]+(?:\.tmp)?$")


def _writer_alive(path: Path) -> bool:
    """Whether the process that writes this temporary file or folder still runs (on this
    machine; a name without a pid counts as alive for an hour)."""
    match = _WRITER.search(path.name)
    if match is None:
        try:
            return time.time() - path.stat().st_mtime < 3600
        except OSError:
            return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def source_version(paths: Iterable[Path]) -> str:
    """A hash of the bytes of ``paths`` (source files): part of a cache key, so that a change
    to the code that computes an entry never reuses an entry the old code computed."""
    digest = hashlib.blake2b(digest_size=8)
    for path in paths:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is synced and renamed to ``path``
    (readers see the old entry or the new one, never a part); on error it is removed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextmanager
def build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``<path>.lock`` while building the entry ``path``; say so when another process
    holds it (it is building the same entry: we wait and then read its result)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"windquant: another process is building this {what} ({path}); waiting for it", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def damage_errors() -> tuple:
    """What reading a damaged entry raises: safetensors' header and size checks, JSON and
    metadata errors, a format or key mismatch (:class:`TableMismatchError` is a ValueError),
    a file cut short. Not: out of memory, permissions, a missing library (those are raised)."""
    from safetensors import SafetensorError

    return (SafetensorError, ValueError, KeyError, EOFError)


def load_entry(path: Path, load: Callable[[Path], T], what: str) -> Optional[T]:
    """``load(path)``, or None when there is no entry, or when it is damaged (with a
    :class:`CacheWarning` naming the file; the caller rebuilds it, and its atomic write
    replaces the damaged file)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except damage_errors() as error:
        warnings.warn(
            f"The {what} cache file {path} is damaged or of another format ({type(error).__name__}: "
            f"{str(error)[:200]}); rebuilding it.",
            CacheWarning,
            stacklevel=3,
        )
        return None


def load_or_build(path: Path, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[T, Path], None],
                  what: str, reload: bool = False) -> T:
    """The cached entry at ``path``, else ``build()`` it and ``save(value, path)`` it (``save``
    writes through :func:`atomic_path`); one process builds while the others wait for its result.
    ``reload=True``: the builder too returns ``load(path)`` (for entries that ``load``
    memory-maps: the built copy is freed, and the builder shares the file's pages with every
    other reader instead of holding a private copy)."""
    path = Path(path)
    found = load_entry(path, load, what)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(path, what):
        # another process may have built it while we waited (a damaged entry warns only once)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)
            found = load_entry(path, load, what)
        if found is not None:
            return found
        value = build()
        save(value, path)
    if reload:
        found = load_entry(path, load, what)
        if found is not None:
            return found
    return value


# ----- listing and clearing ---------------------------------------------------------------------
