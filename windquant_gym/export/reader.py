"""``load_quantized``: rebuild a Hugging Face causal LM from a packed export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ExportFormatError, IncompleteExportError
from .codec import decode_module
from .layout import CONFIG_FILE, PACKED_FILE, REQUIRED_FILES, REST_FILE, read_layout_metadata


def check_export_dir(path: str | Path) -> Path:
    """``path`` as a Path; refuses a missing folder or one lacking a required file."""
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
    return path


def read_packed_weights(path: str | Path) -> dict:
    """``{module.weight: float32 tensor}`` of every packed module of the export at ``path``."""
    from safetensors import safe_open

    file = check_export_dir(path) / PACKED_FILE
    with safe_open(str(file), framework="pt") as handle:
        layouts = read_layout_metadata(handle.metadata(), file)
        keys = set(handle.keys())

        def get(key: str) -> torch.Tensor:
            if key not in keys:
                raise ExportFormatError(f"{file} has no tensor {key!r}, which its layout needs; the file is corrupt. Export again.")
            return handle.get_tensor(key)

        return {f"{name}.weight": decode_module(name, layout, get) for name, layout in layouts.items()}


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of an export folder (``windquant export`` / :func:`export_plan`), its
    quantized Linears dequantized, in ``dtype`` (default float32) on ``device``, eval mode.

    Built with ``AutoModelForCausalLM.from_config(config.json)``; the tokenizer loads with
    ``AutoTokenizer.from_pretrained(path)``. In float32 the quantized Linears equal, bit for
    bit, what the env applies for the export's plan (``plan.json``).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_export_dir(path)
    state = read_packed_weights(path)
    with safe_open(str(path / REST_FILE), framework="pt") as handle:
        tied = json.loads((handle.metadata() or {}).get("tied", "{}"))
        state.update({key: handle.get_tensor(key) for key in handle.keys()})
    for name, source in tied.items():
        if source not in state:
            raise ExportFormatError(f"{path / REST_FILE}: {name!r} is tied to {source!r}, which is missing. Export again.")
        state[name] = state[source]
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}

    config = AutoConfig.from_pretrained(str(path / CONFIG_FILE))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportFormatError(
            f"The export in {str(path)!r} does not fit the model its config.json builds ({type(model).__name__}): "
            f"missing {list(missing)[:3]}{'...' if len(missing) > 3 else ''}, unexpected {list(unexpected)[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}. Export again with this transformers version."
        )
    return model.to(device).eval()
