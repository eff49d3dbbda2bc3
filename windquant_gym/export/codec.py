"""One module's weight <-> its packed tensors (layout in :mod:`.layout`).

Decoding reproduces :meth:`QuantTable.assemble_module` exactly: the same float32
arithmetic on the same codes and fp16 scales (and, for a rotated table, the same product with
``R^T``), so the rebuilt weights equal the env's weights bit for bit.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import ExportFormatError
from ..quant.bitwidths import SKIP_ACTION
from ..quant.quantizers import dequantize_codes
from ..quant.rotation import to_model_frame
from ..quant.table import QuantTable
from ..quant.units import Unit
from .formats import code_formats
from .layout import FP16_NAME, ModuleLayout, codes_name, outlier_name, scales_name, zeros_name
from .packing import field_bits, pack_fields, unpack_fields


def _used_actions(stored: Sequence[int]) -> List[int]:
    return sorted({a for a in stored if a != SKIP_ACTION})


@torch.no_grad()
def encode_module(
    table: QuantTable, units: Sequence[Unit], actions: Sequence[int], original: torch.Tensor
) -> Tuple[Dict[str, torch.Tensor], ModuleLayout]:
    """Packed tensors (by local name, see :mod:`.layout`) and layout of one module (``units``
    in column order, ``actions`` requested per unit, ``original`` the module's weight, read
    for skipped units)."""
    module = units[0].module
    out_f, in_f = original.shape
    chunk_size = table.config.chunk_size
    stored = [int(table.stored_action[u.index, a]) for u, a in zip(units, actions)]
    # numpy throughout: single-threaded, several times cheaper than torch for these small ops
    codes = table.codes[module].cpu().numpy()
    scales = table.scales[module].cpu()
    index = table.outlier_index[module].cpu().numpy()
    order = np.argsort(index, kind="stable")  # row-major: CSR order
    index, outlier_values = index[order], table.outlier_codes[module].cpu().numpy()[order]
    keep = np.ones(out_f * in_f, dtype=bool)
    keep[index] = False
    keep = keep.reshape(out_f, in_f)
    outlier_scales = table.outlier_scales[module].cpu()
    formats = code_formats(table.config.grid)

    tensors: Dict[str, torch.Tensor] = {}
    for action in _used_actions(stored):
        fmt = formats[action]
        members = [u for u, s in zip(units, stored) if s == action]
        symbols = [fmt.encode(codes[action - 1, :, u.col_start : u.col_end][keep[:, u.col_start : u.col_end]]) for u in members]
        tensors[codes_name(fmt.label)] = torch.from_numpy(fmt.packer.pack(np.concatenate(symbols)))
        tensors[scales_name(fmt.label)] = torch.stack([scales[action - 1, :, u.col_start // chunk_size] for u in members])
        if fmt.zero_point:
            zeros = table.zeros[module].cpu()
            tensors[zeros_name(fmt.label)] = torch.stack([zeros[action - 1, :, u.col_start // chunk_size] for u in members])

    skipped = [u for u, s in zip(units, stored) if s == SKIP_ACTION]
    if skipped:
        tensors[FP16_NAME] = torch.cat(
            [original[:, u.col_start : u.col_end].detach().cpu().to(torch.float16) for u in skipped], dim=1
        ).contiguous()

    # Outliers of the quantized units, from the flat indices into the module's weight.
    rows, cols = index // in_f, index % in_f
    chunk_of = cols // chunk_size
    n_outliers, counts, columns, values, row_scales = [], [], [], [], []
    for unit, action in zip(units, stored):
        mine = np.flatnonzero(chunk_of == unit.col_start // chunk_size) if action != SKIP_ACTION else index[:0]
        n_outliers.append(int(mine.size))
        if not mine.size:
            continue
        counts.append((np.bincount(rows[mine], minlength=out_f), field_bits(unit.width + 1)))
        columns.append((cols[mine] - unit.col_start, field_bits(unit.width)))
        values.append(outlier_values[mine])
        row_scales.append(outlier_scales[:, unit.col_start // chunk_size])
    if values:
        tensors[outlier_name("codes")] = torch.from_numpy(np.concatenate(values))
        tensors[outlier_name("columns")] = torch.from_numpy(pack_fields(columns))
        tensors[outlier_name("row_counts")] = torch.from_numpy(pack_fields(counts))
        tensors[outlier_name("scales")] = torch.stack(row_scales)
    layout = ModuleLayout((out_f, in_f), chunk_size, tuple(stored), tuple(n_outliers), table.config.grid, table.config.rotation)
    return {k: v.contiguous() for k, v in tensors.items()}, layout


def _expect(tensor: torch.Tensor, shape, what: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ExportFormatError(f"{what} has shape {tuple(tensor.shape)}, the layout needs {tuple(shape)}; the file is corrupt.")
    return tensor


@torch.no_grad()
def decode_module(module: str, layout: ModuleLayout, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The module's float32 weight ``[O, I]`` from its packed tensors (``get(local name)``;
    ``module`` names it in errors)."""
    out_f, in_f = layout.shape
    columns = layout.columns
    stored = layout.stored_actions
    weight = torch.empty((out_f, in_f), dtype=torch.float32)

    # INT8 outliers: CSR per unit (row counts, then columns inside the unit).
    outliers = {}
    with_outliers = [i for i, n in enumerate(layout.n_outliers) if n]
    if with_outliers:
        widths = [columns[i][1] - columns[i][0] for i in with_outliers]
        sizes = [layout.n_outliers[i] for i in with_outliers]
        row_counts = unpack_fields(get(outlier_name("row_counts")).numpy(), [(out_f, field_bits(g + 1)) for g in widths])
        in_unit = unpack_fields(get(outlier_name("columns")).numpy(), [(n, field_bits(g)) for n, g in zip(sizes, widths)])
        codes = _expect(get(outlier_name("codes")), (sum(sizes),), f"{module} outlier codes").split(sizes)
        scales = _expect(get(outlier_name("scales")), (len(sizes), out_f), f"{module} outlier scales")
        for j, i in enumerate(with_outliers):
            counts, cols = row_counts[j], in_unit[j]
            if int(counts.sum()) != sizes[j] or (cols.size and cols.max() >= widths[j]):
                raise ExportFormatError(
                    f"{module} unit {i}: {int(counts.sum())} outliers in its row counts, layout says {sizes[j]}, columns up "
                    f"to {int(cols.max()) if cols.size else 0} for width {widths[j]}; the file is corrupt. Export again."
                )
            rows = np.repeat(np.arange(out_f), counts)
            values = codes[j].float() * scales[j].float()[torch.from_numpy(rows)]
            outliers[i] = (rows, cols, values)

    for action in _used_actions(stored):
        fmt = layout.formats[action]
        members = [i for i, s in enumerate(stored) if s == action]
        sizes = [out_f * (columns[i][1] - columns[i][0]) - layout.n_outliers[i] for i in members]
        symbols = np.split(fmt.packer.unpack(get(codes_name(fmt.label)).numpy(), sum(sizes)), np.cumsum(sizes)[:-1])
        scales = _expect(get(scales_name(fmt.label)), (len(members), out_f), f"{module} {fmt.label} scales")
        zeros = (_expect(get(zeros_name(fmt.label)), (len(members), out_f), f"{module} {fmt.label} zero points")
                 if fmt.zero_point else None)
        for j, i in enumerate(members):
            start, end = columns[i]
            unit_symbols = np.zeros((out_f, end - start), dtype=np.int64)  # symbol 0 at outliers: overwritten below
            if i in outliers:
                rows, cols, values = outliers[i]
                keep = np.ones((out_f, end - start), dtype=bool)
                keep[rows, cols] = False
                if int(keep.sum()) != symbols[j].size:
                    raise ExportFormatError(f"{module} unit {i}: repeated outlier positions; the file is corrupt. Export again.")
                unit_symbols[keep] = symbols[j]
            else:
                unit_symbols.reshape(-1)[:] = symbols[j]
            block = dequantize_codes(fmt.decode(unit_symbols), scales[j].float()[:, None], fmt.spec,
                                     None if zeros is None else zeros[j].float()[:, None])
            if i in outliers:
                block[torch.from_numpy(rows), torch.from_numpy(cols)] = values
            weight[:, start:end] = to_model_frame(block, layout.rotation)

    skipped = [i for i, s in enumerate(stored) if s == SKIP_ACTION]
    if skipped:
        width = sum(columns[i][1] - columns[i][0] for i in skipped)
        fp16 = _expect(get(FP16_NAME), (out_f, width), f"{module} fp16 columns")
        at = 0
        for i in skipped:
            start, end = columns[i]
            weight[:, start:end] = fp16[:, at : at + end - start].float()
            at += end - start
    return weight
