"""The native decode kernel of :class:`~windquant_gym.export.packed_linear.PackedLinear`:
``packed_gemv.c`` compiled once per machine, called through ctypes.

Why native: the table path in tensor ops costs ~30 small torch ops per module and an int32
index tensor four times the size of the codes per call; on SmolLM2-135M it decoded at 0.3x
the float32 model (benchmarks/RESULTS.md, issue 23). The C kernel does the same arithmetic
(tables of partial sums per byte value, one gather per code byte) in one call per module,
reading each code byte once.

It is compiled at first use with the system's C compiler (``$CC``, else ``cc``) with
``-O3 -march=native -fopenmp`` into ``<cache>/kernels/native/`` under a name that hashes the
source, the compiler, the flags and the CPU (its model and flags), so a cache shared between machines
never hands one CPU another's instructions. Without a compiler, or when it fails, the module
warns once (:class:`~windquant_gym.errors.NativeKernelWarning`) and PackedLinear keeps its tensor-op path: results
are the same to float32 rounding. ``WINDQUANT_NATIVE_GEMV=off`` skips the kernel,
``=on`` makes its absence an error (:class:`~windquant_gym.errors.MissingDependencyError`).
CUDA tensors always take the tensor-op path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import List, Optional

from ..cache.storage import atomic_path
from ..errors import ConfigError, MissingDependencyError, NativeKernelWarning
from ..paths import cache_dir

SOURCE = Path(__file__).with_name("packed_gemv.c")
ENV_VAR = "WINDQUANT_NATIVE_GEMV"
_MODES = ("auto", "on", "off")

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False


def mode() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value not in _MODES:
        raise ConfigError(f"{ENV_VAR}={value!r} is not one of {', '.join(_MODES)}; unset it for 'auto'.")
    return value


FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")


def compiler() -> Optional[List[str]]:
    """The C compiler command the kernel is built with (``$CC``, e.g. ``gcc`` or ``ccache gcc``,
    else ``cc``), its program resolved on PATH; None when there is none."""
    command = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    program = shutil.which(command[0])
    return None if program is None else [program, *command[1:]]


def _cpu_identity() -> str:
    """Model name and flags from /proc/cpuinfo (``-march=native`` depends on both)."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not model and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif not flags and line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                if model and flags:
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}"


def library_path(cc: List[str]) -> Path:
    """Where the compiled kernel for this source, compiler, flags and CPU lives (not created)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    identity = "\n".join([version, " ".join(cc), " ".join(FLAGS), _cpu_identity()])
    key = hashlib.sha256(SOURCE.read_bytes() + identity.encode()).hexdigest()[:16]
    return cache_dir("kernels", "native") / f"packed_gemv-{key}.so"


def _build(cc: List[str], target: Path) -> None:
    with atomic_path(target) as tmp:
        command = [*cc, *FLAGS, "-o", str(tmp), str(SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{done.stderr.strip()[-2000:]}")


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.wq_packed_gemv.argtypes = [i64, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.wq_packed_gemv.restype = ctypes.c_int
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The kernel's library, compiled on first use; None when it is off or cannot be built
    (warned once), or :class:`MissingDependencyError` under ``WINDQUANT_NATIVE_GEMV=on``."""
    global _library, _tried
    wanted = mode()
    if wanted == "off":
        return None
    if _tried:
        if _library is None and wanted == "on":
            raise MissingDependencyError(f"{ENV_VAR}=on but the native decode kernel could not be built (see the warning above).")
        return _library
    with _lock:
        if not _tried:
            _library = _load_or_build(wanted)
            _tried = True
    return _library


def _load_or_build(wanted: str) -> Optional[ctypes.CDLL]:
    cc = compiler()
    try:
        if cc is None:
            raise RuntimeError(f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH")
        path = library_path(cc)
        if path.is_file():
            try:
                return _bind(path)
            except OSError:  # damaged (e.g. an interrupted copy of the cache): build it again
                path.unlink(missing_ok=True)
        _build(cc, path)
        return _bind(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        if wanted == "on":
            raise MissingDependencyError(
                f"{ENV_VAR}=on but the native decode kernel could not be built: {exc}. Install a C compiler with "
                f"OpenMP (e.g. `apt install gcc`), point $CC at one, or set {ENV_VAR}=auto to fall back."
            ) from exc
        warnings.warn(
            f"windquant's native decode kernel could not be built ({exc}); PackedLinear decodes with tensor ops "
            f"(same results, slower). Install a C compiler (e.g. `apt install gcc`) or set {ENV_VAR}=off to silence this.",
            NativeKernelWarning,
            stacklevel=3,
        )
        return None


def reset() -> None:
    """Forget the loaded library (tests: a changed ``$CC`` or mode is seen again)."""
    global _library, _tried
    with _lock:
        _library, _tried = None, False
