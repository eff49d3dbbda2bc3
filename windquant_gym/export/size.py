"""``packed_size``: bytes an export's packed tensors take vs the storage-bit accounting."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Tuple

from ..plan import QuantPlan
from ..quant.accounting import n_protected, storage_bits
from ..quant.bitwidths import bit_widths
from .layout import PACKED_FILE, PLAN_FILE, packed_names, read_layout_metadata
from .reader import check_export_dir


def read_safetensors_header(path: Path) -> Tuple[int, Dict]:
    """``(header bytes including its 8-byte length, header JSON)`` of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def _data_bytes(header: Dict) -> Dict[str, int]:
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


@dataclass
class PackedSize:
    """Sizes of an export, in bytes. ``packed_bytes`` is the tensor data of the quantized
    Linears' packed tensors in ``model.safetensors``; ``accounted_bytes`` is ``storage_bits /
    8`` summed over their units (``QuantTable.plan_bits(plan)["storage_bits"] * n_weights /
    8``); ``rest_bytes`` the file's other tensors (embeddings, norms). The header (tensor
    index and layout JSON) is reported apart."""

    packed_bytes: int
    accounted_bytes: float
    n_weights: int
    header_bytes: int
    rest_bytes: int
    by_kind: Dict[str, int] = field(default_factory=dict)
    """``codes``, ``scales``, ``zeros`` (asymmetric grid), ``outliers``, ``fp16`` parts of ``packed_bytes``."""

    @property
    def ratio(self) -> float:
        """``packed_bytes / accounted_bytes`` (1.0 = exactly as accounted)."""
        return self.packed_bytes / self.accounted_bytes

    @property
    def packed_bits_per_weight(self) -> float:
        return 8.0 * self.packed_bytes / self.n_weights

    @property
    def accounted_bits_per_weight(self) -> float:
        return 8.0 * self.accounted_bytes / self.n_weights

    def to_dict(self) -> Dict:
        return {**asdict(self), "ratio": self.ratio, "packed_bits_per_weight": self.packed_bits_per_weight,
                "accounted_bits_per_weight": self.accounted_bits_per_weight}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in self.by_kind.items())
        return (
            f"packed {self.packed_bytes:,} B ({self.packed_bits_per_weight:.4f} bits/weight; {parts}) vs accounted "
            f"{self.accounted_bytes:,.0f} B ({self.accounted_bits_per_weight:.4f} bits/weight): {self.ratio - 1:+.3%}; "
            f"header {self.header_bytes:,} B; the rest of the model {self.rest_bytes:,} B"
        )


def packed_size(path: str | Path) -> PackedSize:
    """Measure the export folder ``path`` (see :class:`PackedSize`)."""
    path = check_export_dir(path)
    header_bytes, header = read_safetensors_header(path / PACKED_FILE)
    layouts = read_layout_metadata(header.get("__metadata__"), path / PACKED_FILE)
    salient_rate = QuantPlan.load(path / PLAN_FILE).quant_config.salient_rate
    sizes = _data_bytes(header)
    kinds = packed_names(layouts)
    by_kind: Dict[str, int] = {}
    for key, kind in kinds.items():
        by_kind[kind] = by_kind.get(kind, 0) + sizes.get(key, 0)
    accounted, n_weights = 0.0, 0
    for layout in layouts.values():
        out_f, operators = layout.shape[0], bit_widths(layout.grid)
        for (start, end), action in zip(layout.columns, layout.stored_actions):
            width = end - start
            accounted += storage_bits(out_f, width, n_protected(out_f * width, salient_rate), action, operators) / 8
            n_weights += out_f * width
    return PackedSize(
        packed_bytes=sum(sizes.get(key, 0) for key in kinds),
        accounted_bytes=accounted,
        n_weights=n_weights,
        header_bytes=header_bytes,
        rest_bytes=sum(size for key, size in sizes.items() if key not in kinds),
        by_kind=dict(sorted(by_kind.items())),
    )
