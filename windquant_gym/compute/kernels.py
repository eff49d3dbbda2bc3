"""Which kernel runs the Linear layers of an inference pass on the CPU.

The proxy forward pass is most of an episode, and 80% of it is float32 matrix products.
PyTorch sends those to MKL's sgemm; it also ships oneDNN's kernel, and which of the two is
faster depends on the CPU (oneDNN 1.8-2.0x faster on a 2-core AMD EPYC with AVX-512, 0.90x on
a 2-core Xeon with AMX). :func:`linear_kernels` routes ``F.linear`` through oneDNN for the
duration of a pass where a measurement on this machine found it faster
(:mod:`.kernel_choice`: the model's own shapes, once per machine, cached), in float32
throughout (no lower-precision math: results agree with MKL's to float32 rounding), without
touching the model: a ``TorchFunctionMode`` intercepts the call, so nothing is patched and
nothing needs restoring. ``benchmarks/episode_speed.py`` prints both kernels' forward time
side by side.

``WINDQUANT_CPU_LINEAR=onednn`` or ``=aten`` (PyTorch's default kernel) overrides the
measurement; ``auto`` (the default) measures. Only x86 CPUs are routed (ARM builds keep their
default).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError

ENV_VAR = "WINDQUANT_CPU_LINEAR"
CPU_LINEAR_KERNELS = ("auto", "onednn", "aten")
"""Accepted values of ``WINDQUANT_CPU_LINEAR``; the first is the default (chosen by measurement)."""


@functools.lru_cache(maxsize=None)  # looked up once, not on every pass
def _onednn_linear_op():
    """oneDNN's fused linear (the op TorchInductor lowers CPU linears to), or None where
    this PyTorch build lacks it or the CPU is not x86 (measured only there; on ARM the
    default kernel stays)."""
    if not torch.backends.mkldnn.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled()


def _routable(x, weight, bias) -> bool:
    """A float32, strided, CPU, well-shaped linear that needs no gradient and no autocast;
    anything else keeps PyTorch's own kernel (and its error messages)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type == "cpu"
               and t.dtype == torch.float32 for t in tensors):
        return False
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return False
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not _cpu_autocast_enabled()  # autocast picks its own dtype and kernel


class _OneDNNLinear(TorchFunctionMode):
    """Sends float32 CPU ``F.linear`` calls that need no gradient to oneDNN; every other call
    (other dtypes, devices, shapes, layouts, autograd, CPU autocast) goes through unchanged.
    A ``TorchFunctionMode`` of the caller's that is active outside this one sees the routed
    calls as ``mkldnn._linear_pointwise``, not ``F.linear`` (FLOP counters, for one)."""

    def __init__(self, op):
        super().__init__()
        self._op = op

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if len(args) > 0 else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _routable(x, weight, bias):
                return self._op(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def cpu_linear_kernel() -> str:
    """The setting of ``WINDQUANT_CPU_LINEAR`` (default ``auto``: measured)."""
    value = os.environ.get(ENV_VAR, CPU_LINEAR_KERNELS[0]).strip().lower()
    if value not in CPU_LINEAR_KERNELS:
        raise ConfigError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a CPU linear kernel; use one of "
            f"{', '.join(CPU_LINEAR_KERNELS)} (e.g. {ENV_VAR}=aten for PyTorch's default), or unset it to "
            "choose by measurement."
        )
    return value


def chosen_cpu_linear_kernel(model: Optional[nn.Module] = None) -> str:
    """``"onednn"`` or ``"aten"``: the setting of ``WINDQUANT_CPU_LINEAR``, or with ``auto``
    the faster for ``model``'s Linear shapes on this machine (measured at first use, then read
    from the cache; :func:`~.kernel_choice.choose_cpu_linear_kernel`). ``aten`` where this
    PyTorch build has no oneDNN linear."""
    setting = cpu_linear_kernel()
    op = _onednn_linear_op()
    if op is None or setting == "aten":
        return "aten"
    if setting == "onednn":
        return "onednn"
    from .kernel_choice import choose_cpu_linear_kernel

    return choose_cpu_linear_kernel(op, model).kernel


@contextlib.contextmanager
def linear_kernels(device: torch.device | str, model: Optional[nn.Module] = None) -> Iterator[bool]:
    """Route the Linear layers of a no-grad pass on ``device`` through the chosen CPU kernel
    (for ``model``'s shapes, see :func:`chosen_cpu_linear_kernel`).

    Yields whether oneDNN routing is active (False on accelerators, where PyTorch's kernel was
    measured faster or is set, or where the op is missing)."""
    if torch.device(device).type != "cpu" or chosen_cpu_linear_kernel(model) != "onednn":
        yield False
        return
    with _OneDNNLinear(_onednn_linear_op()):
        yield True


PROXY_DTYPES = ("float32", "bfloat16")
"""Precisions of the proxy pass; the first is the default (see :func:`proxy_precision`)."""
AUTO_PROXY_DTYPE = "auto"
"""Asks for bf16 where the device multiplies in bf16 natively, float32 elsewhere
(:func:`resolve_proxy_dtype`); a problem always holds the resolved name."""


def check_proxy_dtype(proxy_dtype) -> str:
    """The proxy precision's name (``torch.bfloat16`` is taken for ``"bfloat16"``), or a
    ConfigError naming the choices."""
    if isinstance(proxy_dtype, torch.dtype):
        proxy_dtype = str(proxy_dtype).replace("torch.", "")
    if proxy_dtype not in PROXY_DTYPES:
        raise ConfigError(
            f"proxy_dtype must be one of {', '.join(PROXY_DTYPES + (AUTO_PROXY_DTYPE,))}, got {proxy_dtype!r}; float32 "
            "is the default, bfloat16 runs the proxy's matrix products in bf16 (faster where the hardware has bf16 "
            "units; PPL within ~1%: benchmarks/proxy_precision.py), auto picks bfloat16 where it does."
        )
    return proxy_dtype


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: a CPU with avx512_bf16 or AMX, or a CUDA
    GPU that supports bf16. (oneDNN's own bf16 check also accepts plain AVX-512, where bf16 is
    emulated and no faster than float32, so the CPU's flags decide.)"""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    from .kernel_choice import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags())) and _cpu_has_native_bf16()


def resolve_proxy_dtype(proxy_dtype, device: torch.device | str) -> str:
    """``proxy_dtype`` checked, with ``"auto"`` resolved for ``device``: ``"bfloat16"`` where
    :func:`has_native_bf16`, else ``"float32"``."""
    if proxy_dtype == AUTO_PROXY_DTYPE:
        return "bfloat16" if has_native_bf16(device) else "float32"
    return check_proxy_dtype(proxy_dtype)


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_if_bf16_is_emulated(device: torch.device | str, proxy_dtype: str) -> None:
    """A bf16 proxy on a CPU without native bf16 instructions (:func:`has_native_bf16`) is
    emulated, and slower."""
    if proxy_dtype == "bfloat16" and torch.device(device).type == "cpu" and not has_native_bf16(device):
        warnings.warn(
            "proxy_dtype='bfloat16' on a CPU without native bf16 support: the proxy's products are emulated and "
            "likely slower than float32; use proxy_dtype='float32' (the default) here.",
            RuntimeWarning,
            stacklevel=3,
        )


def proxy_weight_dtype(proxy_dtype: str) -> Optional[torch.dtype]:
    """The dtype a plan's weights are assembled in for the proxy pass: bf16 for the bf16 proxy
    (autocast would cast them to it on every call; assembled in it, they are cast once per plan,
    to the same values), None (the weights' own) for float32."""
    return torch.bfloat16 if check_proxy_dtype(proxy_dtype) == "bfloat16" else None


def proxy_precision(device: torch.device | str, proxy_dtype: str):
    """A context for the proxy pass: nothing for ``float32``; bf16 autocast on ``device``
    for ``bfloat16`` (matrix products in bf16, softmax and the loss in float32). The weights
    are not converted in place: the model and its borrowed weights stay as they are."""
    if check_proxy_dtype(proxy_dtype) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
