"""What the cache holds, for ``windquant cache list`` / ``windquant cache clear``: the one
place that knows each kind of entry (converted models, calibrations, tables, kernel choices) and whether the
current code could still read it. The storage itself (:mod:`.storage`) knows none of them."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import ConfigError
from ..paths import cache_dir, model_cache_dir
from .storage import CACHE_KINDS, _writer_alive


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
        from ..quant.code_version import fitting_code_version
        from ..quant.table import TABLE_FORMAT

        return meta.get("format") == str(TABLE_FORMAT) and meta.get("code") == fitting_code_version()
    from ..problem import calibration_code_version

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
            elif kind == "kernels" and path.is_dir() and path.name == "native":
                entries += _native_kernel_entries(path)
            elif path.is_dir():
                if kind == "models" and path.name not in converted_model_names():
                    continue  # not ours (WINDQUANT_MODEL_CACHE may be a shared folder)
                entries.append(CacheEntry(kind, path, _folder_size(path), stat.st_mtime, path.name, "converted model"))
            elif kind == "kernels" and path.suffix == ".json":
                from ..compute.kernel_choice import describe_entry

                entries.append(CacheEntry(kind, path, stat.st_size, stat.st_mtime, "-", describe_entry(path)))
            elif path.suffix == ".safetensors":
                model, detail = _describe_safetensors(kind, path)
                entries.append(CacheEntry(kind, path, stat.st_size, stat.st_mtime, model, detail))
    return entries


def _native_kernel_entries(folder: Path) -> List[CacheEntry]:
    """The compiled decode kernels (:mod:`windquant_gym.export.native_gemv`): the one this
    source, compiler and CPU would load, and stale others."""
    from ..export import native_gemv

    cc = native_gemv.compiler()
    try:
        current = native_gemv.library_path(cc).name if cc else None
    except (OSError, subprocess.SubprocessError):  # a compiler that does not answer: nothing is current
        current = None
    entries = []
    for path in sorted(folder.glob("*.so")):
        stat = path.stat()
        detail = ("native decode kernel (this source, compiler and CPU)" if path.name == current
                  else "stale native decode kernel (other source, compiler or CPU)")
        entries.append(CacheEntry("kernels", path, stat.st_size, stat.st_mtime, "-", detail))
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
    from ..models.loading import CONVERTED_MODELS

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
