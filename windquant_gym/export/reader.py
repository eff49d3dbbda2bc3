"""``load_quantized``: a packed export as a Hugging Face causal LM that stays packed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ExportFormatError, IncompleteExportError
from .codec import decode_module
from .layout import CONFIG_FILE, OLD_REST_FILE, PACKED_FILE, REQUIRED_FILES, read_layout_metadata

#: Files of which a tokenizer needs at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_export_dir(path: str | Path) -> Path:
    """``path`` as a Path; refuses a missing folder, one lacking a required file, or one of
    an older export format."""
    path = Path(path)
    if not path.is_dir():
        raise IncompleteExportError(
            f"No export folder at {str(path)!r}; write one with `windquant export PLAN --out {path}` "
            "or windquant_gym.export_plan(plan, problem, out_dir)."
        )
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise IncompleteExportError(
            f"Export folder {str(path)!r} lacks {missing} (it needs {list(REQUIRED_FILES)}): an interrupted or partial "
            f"copy. Export again: `windquant export PLAN --out {path} --overwrite`."
        )
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ExportFormatError(f"{path / CONFIG_FILE} is not readable JSON ({exc}). Export again.") from None
    if "quantization_config" not in config:
        older = " (it has rest.safetensors: format 1 of an older windquant_gym)" if (path / OLD_REST_FILE).is_file() else ""
        raise ExportFormatError(
            f"{path / CONFIG_FILE} has no quantization_config{older}: not a packed export this version reads. "
            f"Export the plan again: `windquant export PLAN --out {path} --overwrite`."
        )
    return path


def load_tokenizer(path: str | Path):
    """The tokenizer saved with an export; a named error when the export has none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise IncompleteExportError(
            f"Export folder {str(path)!r} has no tokenizer (none of {list(TOKENIZER_FILES)}): it was exported without one. "
            "Export again with the tokenizer (export_plan(plan, problem, ...) writes the problem's; with a QuantTable pass "
            "tokenizer=...), or load the base model's: AutoTokenizer.from_pretrained(BASE_MODEL)."
        )
    return AutoTokenizer.from_pretrained(str(path))


def read_packed_weights(path: str | Path) -> dict:
    """``{module.weight: float32 tensor}`` of every packed module of the export at ``path``."""
    from safetensors import safe_open

    file = check_export_dir(path) / PACKED_FILE
    with safe_open(str(file), framework="pt") as handle:
        layouts = read_layout_metadata(handle.metadata(), file)
        keys = set(handle.keys())

        def reader(module: str):
            def get(local: str) -> torch.Tensor:
                key = f"{module}.{local}"
                if key not in keys:
                    raise ExportFormatError(f"{file} has no tensor {key!r}, which its layout needs; the file is corrupt. Export again.")
                return handle.get_tensor(key)
            return get

        return {f"{name}.weight": decode_module(name, layout, reader(name)) for name, layout in layouts.items()}


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   dequantize: bool = False) -> nn.Module:
    """The causal LM of an export folder (``windquant export`` / :func:`export_plan`), eval mode.

    ``AutoModelForCausalLM.from_pretrained(path)`` (after ``import windquant_gym``) with the
    quantized Linears as :class:`~windquant_gym.export.PackedLinear` modules that hold the packed
    codes and compute from them; everything else in ``dtype`` (default float32), on ``device``.
    ``dequantize=True`` gives plain float Linears instead (``model.dequantize()``): in float32
    they equal, bit for bit, what the env applies for the export's plan (``plan.json``). The
    tokenizer: :func:`load_tokenizer`.
    """
    from transformers import AutoModelForCausalLM

    from .hf_quantizer import register_with_transformers

    register_with_transformers()
    path = check_export_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if dequantize:
        model = model.dequantize(dtype=dtype)
    return model.to(device).eval()

