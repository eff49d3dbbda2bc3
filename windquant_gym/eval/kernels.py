"""Which kernel runs the Linear layers of an inference pass on the CPU.

The proxy forward pass is most of an episode, and 80% of it is float32 matrix products.
PyTorch sends those to MKL's sgemm, which on some CPUs (measured on an AMD EPYC with
AVX-512: 180-220 GFLOP/s) runs well below the oneDNN kernel that PyTorch also ships
(350-480 GFLOP/s on the same shapes). :func:`linear_kernels` routes ``F.linear`` through
oneDNN for the duration of a pass, in float32 throughout (no lower-precision math: results
agree with MKL's to float32 rounding), without touching the model: a
``TorchFunctionMode`` intercepts the call, so nothing is patched and nothing needs
restoring. ``benchmarks/episode_speed.py`` prints both kernels' forward time side by side.

``WINDQUANT_CPU_LINEAR=aten`` turns the routing off (PyTorch's default kernel), e.g. on a
CPU where MKL is the faster one.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError

ENV_VAR = "WINDQUANT_CPU_LINEAR"
CPU_LINEAR_KERNELS = ("onednn", "aten")
"""Accepted values of ``WINDQUANT_CPU_LINEAR``; the first is the default."""


def _onednn_linear_op():
    """oneDNN's fused linear (the op TorchInductor lowers CPU linears to), or None where
    this PyTorch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class _OneDNNLinear(TorchFunctionMode):
    """Sends float32 CPU ``F.linear`` calls that need no gradient to oneDNN; every other call
    (other dtypes, devices, autograd, CPU autocast) goes through unchanged."""

    def __init__(self, op):
        super().__init__()
        self._op = op

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                x.device.type == "cpu"
                and x.dtype == torch.float32
                and weight.dtype == torch.float32
                and weight.device.type == "cpu"
                and (bias is None or bias.dtype == torch.float32)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and not torch.is_autocast_enabled("cpu")  # autocast picks its own dtype and kernel
            ):
                return self._op(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def cpu_linear_kernel() -> str:
    """The kernel choice from ``WINDQUANT_CPU_LINEAR`` (default ``onednn``)."""
    value = os.environ.get(ENV_VAR, CPU_LINEAR_KERNELS[0]).strip().lower()
    if value not in CPU_LINEAR_KERNELS:
        raise ConfigError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a CPU linear kernel; use one of "
            f"{', '.join(CPU_LINEAR_KERNELS)} (e.g. {ENV_VAR}=aten for PyTorch's default), or unset it."
        )
    return value


@contextlib.contextmanager
def linear_kernels(device: torch.device | str) -> Iterator[bool]:
    """Route the Linear layers of a no-grad pass on ``device`` through the chosen CPU kernel.

    Yields whether oneDNN routing is active (False on accelerators, with
    ``WINDQUANT_CPU_LINEAR=aten``, or where the op is missing)."""
    op = _onednn_linear_op() if torch.device(device).type == "cpu" and cpu_linear_kernel() == "onednn" else None
    if op is None:
        yield False
        return
    with _OneDNNLinear(op):
        yield True


PROXY_DTYPES = ("float32", "bfloat16")
"""Precisions of the proxy pass; the first is the default (see :func:`proxy_precision`)."""


def check_proxy_dtype(proxy_dtype: str) -> str:
    if proxy_dtype not in PROXY_DTYPES:
        raise ConfigError(
            f"proxy_dtype must be one of {', '.join(PROXY_DTYPES)}, got {proxy_dtype!r}; float32 is the default, "
            "bfloat16 runs the proxy's matrix products in bf16 (faster, PPL within ~1%: benchmarks/proxy_precision.py)."
        )
    return proxy_dtype


def proxy_precision(device: torch.device | str, proxy_dtype: str):
    """A context for the proxy pass: nothing for ``float32``; bf16 autocast on ``device``
    for ``bfloat16`` (matrix products in bf16, softmax and the loss in float32). The weights
    are not converted in place: the model and its borrowed weights stay as they are."""
    if check_proxy_dtype(proxy_dtype) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
