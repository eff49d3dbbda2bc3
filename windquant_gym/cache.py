"""The on-disk caches (converted models, calibration statistics, quantization tables):
safe under crashes and under several processes sharing one cache folder.

- Writes go to a temporary file named after the writing process (pid and a random part, so
  two processes never write the same temporary file) and are renamed into place: a crash
  leaves a stray temporary file, never a half-written entry.
- One builder per entry at a time: a process that needs an entry another process is building
  waits on a file lock (``<entry>.lock``, via the ``filelock`` package), then reads the result.
- A damaged entry (truncated, half-written by an older version, another format) is reported
  in a :class:`~windquant_gym.errors.CacheWarning` naming the file, and rebuilt.
- :func:`cache_entries` lists what is cached and :func:`clear_cache` removes it
  (``windquant cache list`` / ``windquant cache clear``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, TypeVar

from .errors import CacheWarning, ConfigError
from .paths import cache_dir, model_cache_dir

T = TypeVar("T")

CACHE_KINDS = ("models", "calibration", "tables")
"""The cache's sub-folders: converted models, calibration statistics, quantization tables."""


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
                  what: str) -> T:
    """The cached entry at ``path``, else ``build()`` it and ``save(value, path)`` it (``save``
    writes through :func:`atomic_path`); one process builds while the others wait for its result."""
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
    return value


# ----- listing and clearing ---------------------------------------------------------------------
@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache."""

    kind: str
    """One of :data:`CACHE_KINDS`."""
    path: Path
    size: int
    """Bytes on disk."""
    modified: float
    """Seconds since the epoch."""
    model: str
    """The model it belongs to, as recorded when it was written ('?' when unknown)."""
    detail: str
    """The config (tables), the token count (calibration); 'damaged' or 'temporary' for files
    a crash left behind."""


def _folder_size(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        try:
            total += item.stat().st_size if item.is_file() else 0
        except OSError:  # renamed or removed meanwhile by a writer
            pass
    return total


def _describe_safetensors(kind: str, path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception:
        return "?", "damaged (rebuilt on next use)"
    model = meta.get("model", "?")
    if not _current(kind, meta):
        return model, "stale: written by other code, never read again (windquant cache clear --stale)"
    if kind == "tables":
        try:
            config = json.loads(meta["config"])
            units = len(json.loads(meta["units"]))
        except (KeyError, ValueError):
            return model, "damaged (rebuilt on next use)"
        shown = ", ".join(f"{k}={config[k]}" for k in ("chunk_size", "compensation", "error_metric", "damping") if k in config)
        return model, f"{units} units, {shown}"
    return model, f"{meta.get('n_tokens', '?')} tokens"


def _current(kind: str, meta) -> bool:
    """Whether this version of the code could read the entry (its key's code version matches)."""
    if kind == "tables":
        from .quant.build import fitting_code_version
        from .quant.table import TABLE_FORMAT

        return meta.get("format") == str(TABLE_FORMAT) and meta.get("code") == fitting_code_version()
    from .problem import calibration_code_version

    return meta.get("code") == calibration_code_version()


def cache_entries(kinds: Sequence[str] = CACHE_KINDS, root: Optional[Path] = None) -> List[CacheEntry]:
    """Everything in the cache folder (``root``, default :func:`~windquant_gym.paths.cache_dir`)."""
    kinds = _check_kinds(kinds)
    entries = []
    for kind in kinds:
        folder = _folder(kind, root)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.endswith(".lock"):
                continue
            try:
                stat = path.stat()
            except OSError:  # a temporary file renamed into place while we listed
                continue
            if path.name.startswith(".") or ".partial" in path.name:
                size = _folder_size(path) if path.is_dir() else stat.st_size
                detail = ("temporary (being written by a running process)" if _writer_alive(path)
                          else "temporary (left by an interrupted write)")
                entries.append(CacheEntry(kind, path, size, stat.st_mtime, "?", detail))
            elif path.is_dir():
                if kind == "models" and path.name not in converted_model_names():
                    continue  # not ours (WINDQUANT_MODEL_CACHE may be a shared folder)
                entries.append(CacheEntry(kind, path, _folder_size(path), stat.st_mtime, path.name, "converted model"))
            elif path.suffix == ".safetensors":
                model, detail = _describe_safetensors(kind, path)
                entries.append(CacheEntry(kind, path, stat.st_size, stat.st_mtime, model, detail))
    return entries


def clear_cache(kinds: Sequence[str] = CACHE_KINDS, root: Optional[Path] = None, stale_only: bool = False) -> List[CacheEntry]:
    """Remove the cache's entries of ``kinds`` (and their lock and temporary files), or with
    ``stale_only`` only those no current key can reach (other code, damaged, temporary);
    returns what was removed."""
    from filelock import FileLock, Timeout

    kinds = _check_kinds(kinds)
    removed = cache_entries(kinds, root)
    # a running writer keeps its temporary file, and an entry being built keeps its lock
    removed = [e for e in removed if "being written" not in e.detail]
    if stale_only:
        removed = [e for e in removed if e.detail.startswith(("stale", "damaged", "temporary"))]
    for entry in removed:
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
    for kind in kinds:
        folder = _folder(kind, root)
        for lock_path in folder.glob("*.lock") if folder.is_dir() else ():
            lock = FileLock(str(lock_path))
            try:
                lock.acquire(timeout=0)
            except Timeout:  # held: a build is running
                continue
            try:
                lock_path.unlink(missing_ok=True)
            finally:
                lock.release()
    return removed


def converted_model_names() -> List[str]:
    """The folders :func:`~windquant_gym.load_model` converts into the model cache."""
    from .models.loading import CONVERTED_MODELS

    return list(CONVERTED_MODELS)


def _folder(kind: str, root: Optional[Path]) -> Path:
    if root is not None:
        return Path(root) / kind
    return model_cache_dir() if kind == "models" else cache_dir(kind)


def _check_kinds(kinds: Sequence[str]) -> List[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in CACHE_KINDS]
    if unknown:
        raise ConfigError(f"Unknown cache kind(s) {unknown}; choose from {list(CACHE_KINDS)} (or none for all).")
    return kinds


def format_entries(entries: Sequence[CacheEntry]) -> str:
    """A table for ``windquant cache list``."""
    if not entries:
        return "(the cache is empty)"
    lines = [f"{'kind':12} {'size':>10} {'modified':16} {'model':24} {'entry':20} detail"]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.modified))
        lines.append(f"{e.kind:12} {_human(e.size):>10} {when:16} {e.model[:24]:24} {e.path.name[:20]:20} {e.detail}")
    lines.append(f"{len(entries)} entries, {_human(sum(e.size for e in entries))}")
    return "\n".join(lines)


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
