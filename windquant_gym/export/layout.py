"""The packed export's file names, tensor names and per-module layout record.

``model.safetensors`` holds, for every quantized Linear ``M`` (its weight ``[O, I]`` cut
into units of ``chunk_size`` columns), only packed data:

* ``M.<label>.codes`` uint8: the codes of every unit stored at that bit width (``label`` is
  ``w8 w4 w3 w2 w1.58 w1``), unit after unit, each unit's non-outlier weights in row-major
  order, packed densely (see :mod:`.formats`);
* ``M.<label>.scales`` fp16 ``[units, O]``: their per-row scales;
* ``M.fp16`` fp16 ``[O, skipped columns]``: the skipped units side by side;
* ``M.outliers.codes`` int8, ``M.outliers.columns`` (``ceil(log2 G)`` bits each: column
  inside the unit), ``M.outliers.row_counts`` (``ceil(log2(G+1))`` bits per row: CSR row
  lengths), ``M.outliers.scales`` fp16 ``[units, O]``: the INT8 outliers of the quantized
  units that have any, unit after unit.

The header's metadata holds ``format`` and ``layout``: per module its shape, chunk size,
the action stored per unit and the outlier count per unit (a few bytes per unit, not
counted by the storage accounting; reported as header bytes). Everything else of the model
is in ``rest.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

from ..errors import ExportFormatError

FORMAT = "windquant-packed-1"
PACKED_FILE = "model.safetensors"
REST_FILE = "rest.safetensors"
PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
#: Files :func:`load_quantized` cannot do without.
REQUIRED_FILES = (PACKED_FILE, REST_FILE, CONFIG_FILE, PLAN_FILE)


def codes_key(module: str, label: str) -> str:
    return f"{module}.{label}.codes"


def scales_key(module: str, label: str) -> str:
    return f"{module}.{label}.scales"


def fp16_key(module: str) -> str:
    return f"{module}.fp16"


OUTLIER_PARTS = ("codes", "columns", "row_counts", "scales")


def outlier_key(module: str, part: str) -> str:
    return f"{module}.outliers.{part}"


@dataclass(frozen=True)
class ModuleLayout:
    """What a reader needs besides the tensors to rebuild one module's weight."""

    shape: Tuple[int, int]
    chunk_size: int
    stored_actions: Tuple[int, ...]
    """Action stored per unit (after the table's fallback), in column order."""
    n_outliers: Tuple[int, ...]
    """INT8 outliers per unit (0 for skipped units: they keep all their weights in fp16)."""

    @property
    def columns(self) -> List[Tuple[int, int]]:
        """``(start, end)`` input columns of each unit."""
        in_features = self.shape[1]
        return [(s, min(s + self.chunk_size, in_features)) for s in range(0, in_features, self.chunk_size)]

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "ModuleLayout":
        layout = cls(tuple(data["shape"]), int(data["chunk_size"]), tuple(data["stored_actions"]), tuple(data["n_outliers"]))
        if not (len(layout.columns) == len(layout.stored_actions) == len(layout.n_outliers)):
            raise ExportFormatError(f"Layout {data} is inconsistent: one stored action and outlier count per unit expected.")
        return layout


def layout_metadata(layouts: Dict[str, ModuleLayout]) -> Dict[str, str]:
    return {"format": FORMAT, "layout": json.dumps({name: layout.to_dict() for name, layout in layouts.items()})}


def read_layout_metadata(metadata: Dict[str, str] | None, path) -> Dict[str, ModuleLayout]:
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        raise ExportFormatError(
            f"{path} has format {metadata.get('format')!r}, this version reads {FORMAT!r}; "
            "export the plan again with this version (windquant export PLAN --out DIR --overwrite)."
        )
    return {name: ModuleLayout.from_dict(data) for name, data in json.loads(metadata["layout"]).items()}


def tensor_kind(key: str) -> str:
    """'codes', 'scales', 'outliers' or 'fp16' for a key of the packed file (for size reports)."""
    if ".outliers." in key:
        return "outliers"
    if key.endswith(".fp16"):
        return "fp16"
    return key.rsplit(".", 1)[-1]
