"""The packed export through transformers' door: ``AutoModelForCausalLM.from_pretrained``.

``import windquant_gym`` registers the ``windquant`` quantization method with transformers
(:func:`register_with_transformers`): a ``config.json`` whose ``quantization_config`` has
``quant_method: windquant`` then builds the model with a :class:`PackedLinear` in place of
every quantized Linear (shapes from the config's per-module layout, checked against the
model and against ``model.safetensors``' header before anything loads), the file's tensors
load into its buffers, and each module is prepared (compute form). ``save_pretrained``
writes the file form again; ``model.dequantize()`` swaps the modules for float Linears.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..errors import ExportFormatError, IncompleteExportError
from .layout import FORMAT, FORMAT_VERSION, ModuleLayout, layouts_from_json, layouts_to_json
from .packed_linear import PackedLinear, packed_linears, replace_module

QUANT_METHOD = "windquant"

try:  # transformers is a dependency; the guard keeps the error readable on a broken install
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as exc:  # pragma: no cover
    raise ImportError(f"windquant_gym's packed loader needs transformers with quantizer support ({exc}).") from exc


def _format_version(value: str) -> Optional[int]:
    match = re.fullmatch(r"windquant-packed-(\d+)", str(value))
    return int(match.group(1)) if match else None


class WindQuantConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of a packed export.

    Arguments:
        format: the packed format (``windquant-packed-2``); a newer one is refused by name.
        modules: per quantized Linear its layout (shape, chunk size, stored action and
            outlier count per unit), which builds the :class:`PackedLinear` before loading.
        chunk_size: columns per unit.
        plan: what the plan was made on and what it costs (model, table fingerprint, target,
            effective and storage bits), informational.
    """

    def __init__(self, format: str = FORMAT, modules: Optional[Dict] = None, chunk_size: Optional[int] = None,
                 plan: Optional[Dict] = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.modules = dict(modules or {})
        self.chunk_size = chunk_size
        self.plan = dict(plan or {})
        self.post_init()

    def post_init(self) -> None:
        version = _format_version(self.format)
        if version is None or version > FORMAT_VERSION:
            raise ExportFormatError(
                f"config.json's quantization_config has format {self.format!r}; this windquant_gym reads {FORMAT!r}. "
                "It was written by a newer windquant_gym: upgrade (pip install -U windquant-gym), or export the plan "
                "again with this version (windquant export PLAN --out DIR --overwrite)."
            )
        if version < FORMAT_VERSION:
            raise ExportFormatError(
                f"config.json's quantization_config has format {self.format!r} of an older windquant_gym; this version "
                f"reads {FORMAT!r}. Export the plan again: windquant export PLAN --out DIR --overwrite."
            )

    def layouts(self) -> Dict[str, ModuleLayout]:
        return layouts_from_json(self.modules)


def _check_checkpoint(files, layouts: Dict[str, ModuleLayout]) -> None:
    """Refuse, before anything loads, a ``model.safetensors`` that is truncated, of another
    export, or lacks a packed tensor the layout needs."""
    files = [Path(f) for f in (files or [])]
    if not files:
        return
    header_keys: Dict[str, tuple] = {}
    for file in files:
        with open(file, "rb") as handle:
            raw = handle.read(8)
            size = os.fstat(handle.fileno()).st_size
        if len(raw) < 8:
            raise IncompleteExportError(f"{file} is truncated ({size} bytes). Copy the export again or re-export the plan.")
        length = int.from_bytes(raw, "little")
        try:
            if 8 + length > size:
                raise ValueError(f"its header claims {length:,} bytes")
            with open(file, "rb") as handle:
                handle.seek(8)
                header = json.loads(handle.read(length))
            metadata = header.get("__metadata__") or {}
        except (ValueError, AttributeError) as exc:
            raise IncompleteExportError(
                f"{file} is truncated or corrupt: {size:,} bytes, header unreadable ({exc}). Copy the export again or "
                "re-export the plan (windquant export PLAN --out DIR --overwrite)."
            ) from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size < 8 + length + end:
            raise IncompleteExportError(
                f"{file} is truncated: {size:,} bytes, its header needs {8 + length + end:,}. Copy the export again "
                "or re-export the plan (windquant export PLAN --out DIR --overwrite)."
            )
        if "layout" in metadata and json.loads(metadata["layout"]) != json.loads(json.dumps(layouts_to_json(layouts))):
            raise ExportFormatError(
                f"{file} and config.json describe different packed layouts: the folder mixes files of two exports. "
                "Export the plan again into an empty folder."
            )
        header_keys.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    names = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16"}
    for module, layout in layouts.items():
        for local, (shape, dtype) in layout.tensor_specs().items():
            key = f"{module}.{local}"
            if key not in header_keys:
                raise ExportFormatError(f"{files[0]} has no tensor {key!r}, which config.json's layout needs; the file is "
                                        "corrupt or of another export. Export the plan again.")
            if header_keys[key] != (tuple(shape), names[dtype]):
                raise ExportFormatError(f"{files[0]}: {key!r} is {header_keys[key]}, the layout needs "
                                        f"{(tuple(shape), names[dtype])}. Export the plan again.")


class WindQuantHfQuantizer(HfQuantizer):
    """Loads a windquant packed export (pre-quantized only: a plan is made by the env)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layouts = self.quantization_config.layouts()
        _check_checkpoint(checkpoint_files, layouts)
        for name, layout in layouts.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ExportFormatError(
                    f"config.json's packed layout names {name!r}, which the model it builds ({type(model).__name__}) "
                    "does not have: the folder holds another model's plan. Export the plan with its own model."
                ) from None
            if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != tuple(layout.shape):
                shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
                raise ExportFormatError(
                    f"{name} is {type(old).__name__} {shape} in the model config.json builds, the packed layout has "
                    f"Linear {tuple(layout.shape)}: another model's plan. Export the plan with its own model."
                )
            with torch.device("meta"):
                new = PackedLinear(layout, bias=old.bias is not None, dtype=old.weight.dtype)
            replace_module(model, name, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in packed_linears(model):
            stuck = [k for k, v in module._buffers.items() if v is not None and v.device.type == "meta"]
            if stuck:
                raise ExportFormatError(f"{name}: {stuck} did not load from model.safetensors. Export the plan again.")
            module.prepare()
        return model

    def get_state_dict_and_metadata(self, model):
        layouts = {name: module.layout for name, module in packed_linears(model)}
        return None, {"windquant_format": FORMAT, "layout": json.dumps(layouts_to_json(layouts))}

    def _dequantize(self, model, dtype=None):
        for name, module in packed_linears(model):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module._device(), dtype=dtype or torch.float32)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            replace_module(model, name, linear)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_with_transformers() -> None:
    """Register ``quant_method: windquant`` with transformers (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(WindQuantConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(WindQuantHfQuantizer)


def export_quantization_config(layouts: Dict[str, ModuleLayout], chunk_size: int, plan: Dict) -> Dict:
    """The ``quantization_config`` dict an export writes into ``config.json``."""
    return WindQuantConfig(FORMAT, layouts_to_json(layouts), chunk_size, plan).to_dict()
