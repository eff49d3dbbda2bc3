"""Process-wide CPU memory settings for long runs: opt-in, because they are the process's.

An episode allocates the same large tensors over and over (the LM head's logits are
~400 MB per 2048 tokens on a 49k vocabulary), and so does the table build. glibc's malloc
serves large blocks with fresh ``mmap`` pages and hands freed memory back to the kernel, so
every pass faults all of it in again: measured on SmolLM2-135M (2-core CPU), ~490k page
faults and ~0.5 s of a 2.0 s proxy forward pass, and 41 s of kernel time in a table build.
:func:`keep_freed_memory` makes malloc serve everything from its heap and keep what is
freed for reuse (the remedy PyTorch's CPU tuning guide reaches with jemalloc or tcmalloc):
measured on the same forward pass, faults 477k -> 0 per pass and 2.0 -> 1.45 s; table build
kernel time 41 -> 1.8 s. The cost is memory held, not given back until exit: resident size
1.80 GB instead of a 1.45 GB peak over ten passes (aligned allocations fragment the heap).

The ``windquant`` command, ``benchmarks/`` and ``examples/`` turn it on for their own
process. From a script of yours, call ``windquant_gym.keep_freed_memory()`` once at the
start, or set ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824``
before Python starts. ``WINDQUANT_KEEP_FREED_MEMORY=0`` makes the call a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from ..errors import ConfigError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_ENV_VAR = "WINDQUANT_KEEP_FREED_MEMORY"


def keep_freed_memory(trim_threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc malloc to allocate from its heap only and to keep up to
    ``trim_threshold_bytes`` of freed memory at the heap's top for reuse.

    Returns True if glibc accepted both settings; False where the C library is not glibc
    (macOS, musl, Windows) or ``WINDQUANT_KEEP_FREED_MEMORY=0``: nothing changes there.
    Under an allocator preloaded in glibc's place (``LD_PRELOAD`` jemalloc or tcmalloc, which
    already reuse freed memory) the settings reach glibc only and change nothing."""
    if isinstance(trim_threshold_bytes, bool) or not isinstance(trim_threshold_bytes, int) or not 0 < trim_threshold_bytes < 2**31:
        raise ConfigError(
            f"trim_threshold_bytes must be a positive int below 2**31, got {trim_threshold_bytes!r}; "
            "the default 1 << 30 keeps up to 1 GiB of freed memory."
        )
    setting = os.environ.get(_ENV_VAR, "1").strip()
    if setting not in ("0", "1"):
        raise ConfigError(f"{_ENV_VAR}={setting!r} must be 1 (default) or 0 (leave malloc as it is).")
    if setting == "0":
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success; both settings or neither are reported as applied.
    return bool(mallopt(_M_MMAP_MAX, 0)) & bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes))


def _glibc_mallopt():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


PARENT_PID_VAR = "WINDQUANT_PARENT_PID"
"""Set by ``windquant sweep`` for the runs it starts: the Ray worker process they belong to."""


def die_with_parent() -> None:
    """In a run a sweep started (``$WINDQUANT_PARENT_PID`` set): on Linux, ask to be killed
    when that parent dies (a cancelled sweep, a lost worker), rather than train on as an
    orphan writing into the run folder; exit at once if it is already gone. Called by the
    ``windquant`` command itself, not in a ``preexec_fn`` (unsafe in a threaded parent)."""
    parent = os.environ.get(PARENT_PID_VAR)
    if not parent or not parent.isdigit():
        return
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before the request took effect
        raise SystemExit(f"windquant: the sweep's worker (pid {parent}) is gone; not starting this run.")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for naming the machine beside every figure."""
    import platform

    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
