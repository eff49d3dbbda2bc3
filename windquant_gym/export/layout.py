"""The packed export's file names, tensor names and per-module layout record.

``model.safetensors`` holds every tensor of the model, under the model's own state-dict
names, so that ``AutoModelForCausalLM.from_pretrained`` reads it. A quantized Linear ``M``
(its weight ``[O, I]`` cut into units of ``chunk_size`` columns) is stored only as packed
data, the buffers of :class:`~windquant_gym.export.packed_linear.PackedLinear`:

* ``M.<label>_codes`` uint8: the codes of every unit stored at that bit width (``label`` is
  ``w8 w4 w3 w2 w1_58 w1``), unit after unit, each unit's non-outlier weights in row-major
  order, packed densely (see :mod:`.formats`);
* ``M.<label>_scales`` fp16 ``[units, O]``: their per-row scales (and on the asymmetric grid,
  whose 2-4 bit labels are ``w4a w3a w2a``, ``M.<label>_zeros`` fp16 ``[units, O]``: their
  per-row zero points);
* ``M.fp16`` fp16 ``[O, skipped columns]``: the skipped units side by side;
* ``M.outlier_codes`` int8, ``M.outlier_columns`` (``ceil(log2 G)`` bits each: column inside
  the unit), ``M.outlier_row_counts`` (``ceil(log2(G+1))`` bits per row: CSR row lengths),
  ``M.outlier_scales`` fp16 ``[units, O]``: the INT8 outliers of the quantized units that
  have any, unit after unit.

Everything else (embeddings, norms, an untied head) is stored as it is, in the export's
``rest_dtype``. The per-module layout (shape, chunk size, the action stored per unit, the
outlier count per unit: a few bytes per unit, not counted by the storage accounting) is in
``config.json``'s ``quantization_config`` (which builds the modules before the weights load)
and, as a check, in the safetensors header's metadata (``windquant_format``, ``layout``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import ExportFormatError
from ..quant.bitwidths import N_ACTIONS, SKIP_ACTION
from ..quant.rotation import ROTATIONS
from .formats import CodeFormat, code_formats
from .packing import field_bits, fields_n_bytes

FORMAT = "windquant-packed-2"
FORMAT_VERSION = 2
PACKED_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
#: Files :func:`load_quantized` cannot do without.
REQUIRED_FILES = (PACKED_FILE, CONFIG_FILE, PLAN_FILE)
#: Format 1 kept the unpacked tensors in a second file; its exports are refused by name.
OLD_REST_FILE = "rest.safetensors"

OUTLIER_PARTS = ("codes", "columns", "row_counts", "scales")


def codes_name(label: str) -> str:
    return f"{label}_codes"


def scales_name(label: str) -> str:
    return f"{label}_scales"


def zeros_name(label: str) -> str:
    return f"{label}_zeros"


FP16_NAME = "fp16"


def outlier_name(part: str) -> str:
    return f"outlier_{part}"


@dataclass(frozen=True)
class ModuleLayout:
    """What a reader needs besides the tensors to rebuild one module's weight."""

    shape: Tuple[int, int]
    chunk_size: int
    stored_actions: Tuple[int, ...]
    """Action stored per unit (after the table's fallback), in column order."""
    n_outliers: Tuple[int, ...]
    """INT8 outliers per unit (0 for skipped units: they keep all their weights in fp16)."""
    grid: str = "symmetric"
    """The table's ``QuantConfig.grid``: which operator (and stored form) each action means."""
    rotation: str = "none"
    """The table's ``QuantConfig.rotation``: 'hadamard' when each quantized unit's codes hold
    ``W_u R`` (its weight is ``Q R^T``; :mod:`windquant_gym.quant.rotation` rebuilds ``R`` from the
    unit's width). Skipped (fp16) units are never rotated."""

    @property
    def formats(self) -> Tuple[Optional[CodeFormat], ...]:
        """The stored form of each action in this module (:func:`.formats.code_formats`)."""
        return code_formats(self.grid)

    @property
    def columns(self) -> List[Tuple[int, int]]:
        """``(start, end)`` input columns of each unit."""
        in_features = self.shape[1]
        return [(s, min(s + self.chunk_size, in_features)) for s in range(0, in_features, self.chunk_size)]

    def used_actions(self) -> List[int]:
        """The quantized actions stored in this module, ascending."""
        return sorted({a for a in self.stored_actions if a != SKIP_ACTION})

    def members(self, action: int) -> List[int]:
        """Indices of the units stored at ``action``, in column order."""
        return [i for i, a in enumerate(self.stored_actions) if a == action]

    def n_codes(self, i: int) -> int:
        """Codes unit ``i`` stores: its weights less its outliers."""
        start, end = self.columns[i]
        return self.shape[0] * (end - start) - self.n_outliers[i]

    def with_outliers(self) -> List[int]:
        return [i for i, n in enumerate(self.n_outliers) if n]

    def tensor_specs(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """``{local name: (shape, dtype)}`` of every tensor this module stores (the buffers of
        its :class:`PackedLinear` as they are read from and written to the file)."""
        out_f = self.shape[0]
        columns = self.columns
        specs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for action in self.used_actions():
            fmt = self.formats[action]
            members = self.members(action)
            specs[codes_name(fmt.label)] = ((fmt.n_bytes(sum(self.n_codes(i) for i in members)),), torch.uint8)
            specs[scales_name(fmt.label)] = ((len(members), out_f), torch.float16)
            if fmt.zero_point:
                specs[zeros_name(fmt.label)] = ((len(members), out_f), torch.float16)
        skipped = self.members(SKIP_ACTION)
        if skipped:
            specs[FP16_NAME] = ((out_f, sum(columns[i][1] - columns[i][0] for i in skipped)), torch.float16)
        outliers = self.with_outliers()
        if outliers:
            widths = [columns[i][1] - columns[i][0] for i in outliers]
            sizes = [self.n_outliers[i] for i in outliers]
            specs[outlier_name("codes")] = ((sum(sizes),), torch.int8)
            specs[outlier_name("columns")] = ((fields_n_bytes([(n, field_bits(g)) for n, g in zip(sizes, widths)]),), torch.uint8)
            specs[outlier_name("row_counts")] = ((fields_n_bytes([(out_f, field_bits(g + 1)) for g in widths]),), torch.uint8)
            specs[outlier_name("scales")] = ((len(outliers), out_f), torch.float16)
        return specs

    def to_dict(self) -> Dict:
        data = asdict(self)
        if self.grid == "symmetric":  # the files of the symmetric grid read as before
            del data["grid"]
        if self.rotation == "none":  # and those of the unrotated frame
            del data["rotation"]
        return data

    @classmethod
    def from_dict(cls, data: Dict) -> "ModuleLayout":
        try:
            layout = cls(tuple(int(v) for v in data["shape"]), int(data["chunk_size"]),
                         tuple(int(a) for a in data["stored_actions"]), tuple(int(n) for n in data["n_outliers"]),
                         str(data.get("grid", "symmetric")), str(data.get("rotation", "none")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportFormatError(f"A module layout {str(data)[:200]} is malformed ({exc!r}). Export the plan again.") from None
        code_formats(layout.grid)  # refuses an unknown grid by name
        if layout.rotation not in ROTATIONS:
            raise ExportFormatError(f"The export knows the rotations {ROTATIONS}, not {layout.rotation!r}: a file of a newer "
                                    "windquant_gym; upgrade it to read this file.")
        if not (len(layout.columns) == len(layout.stored_actions) == len(layout.n_outliers)):
            raise ExportFormatError(f"Layout {data} is inconsistent: one stored action and outlier count per unit expected.")
        if any(not 0 <= a < N_ACTIONS for a in layout.stored_actions):
            raise ExportFormatError(f"Layout {data} stores an action outside 0..{N_ACTIONS - 1}. Export again.")
        return layout


def layouts_to_json(layouts: Dict[str, ModuleLayout]) -> Dict[str, Dict]:
    return {name: layout.to_dict() for name, layout in layouts.items()}


def layouts_from_json(data: Dict[str, Dict]) -> Dict[str, ModuleLayout]:
    if not isinstance(data, dict) or not data:
        raise ExportFormatError(f"The export's module layouts are missing or empty ({str(data)[:100]!r}). Export again.")
    return {name: ModuleLayout.from_dict(entry) for name, entry in data.items()}


def layout_metadata(layouts: Dict[str, ModuleLayout]) -> Dict[str, str]:
    """The safetensors header metadata of a packed file (``format: pt`` is transformers')."""
    return {"format": "pt", "windquant_format": FORMAT, "layout": json.dumps(layouts_to_json(layouts))}


def read_layout_metadata(metadata: Dict[str, str] | None, path) -> Dict[str, ModuleLayout]:
    metadata = metadata or {}
    found = metadata.get("windquant_format", metadata.get("format"))
    if found != FORMAT or "layout" not in metadata:
        raise ExportFormatError(
            f"{path} has format {found!r}, this version reads {FORMAT!r}; "
            "export the plan again with this version (windquant export PLAN --out DIR --overwrite)."
        )
    return layouts_from_json(json.loads(metadata["layout"]))


def packed_names(layouts: Dict[str, ModuleLayout]) -> Dict[str, str]:
    """``{full tensor name: kind}`` of every packed tensor (kind: codes, scales, outliers, fp16)."""
    names = {}
    for module, layout in layouts.items():
        for local in layout.tensor_specs():
            names[f"{module}.{local}"] = tensor_kind(local)
    return names


def tensor_kind(key: str) -> str:
    """'codes', 'scales', 'zeros', 'outliers' or 'fp16' for a packed tensor's name (for size reports)."""
    local = key.rsplit(".", 1)[-1]
    if local.startswith("outlier_"):
        return "outliers"
    if local == FP16_NAME:
        return "fp16"
    return local.rsplit("_", 1)[-1]
