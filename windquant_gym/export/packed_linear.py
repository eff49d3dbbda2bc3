"""``PackedLinear``: a quantized Linear that keeps its weight packed and computes ``x @ W^T``
from the codes, unit by unit, without a float copy of the weight.

Two forms of the same data:

* **file form** (what ``model.safetensors`` holds, :meth:`ModuleLayout.tensor_specs`): per
  stored bit width one dense stream of codes with the INT8 outliers' positions left out,
  exactly the storage accounting's bits;
* **compute form** (after :meth:`PackedLinear.prepare`, what stays resident): per unit its
  codes in byte-aligned planes (:mod:`.planes`: every position of the unit, an outlier's
  holding symbol 0, corrected below; rows padded to whole bytes); the outliers' columns and
  per-row counts unpacked to bytes. The scales, INT8 outlier values and fp16 (skipped)
  columns are the same tensors in both forms. The compute form is larger than the file by
  the codes at the outlier positions, the row padding of ternary units and the row counts'
  widening (``benchmarks/packed_inference.py`` measures it).

``state_dict()`` always gives the file form, so ``save_pretrained`` writes a folder the
loader reads again. The forward has two paths, chosen per call by the number of tokens:

* **table** (at most :attr:`PackedLinear.lut_max_tokens` tokens: decoding): per unit and
  plane, a table of the activations' partial sums for every byte value (a small matmul),
  one gather of the unit's bytes and a sum per row give ``x @ S^T`` for the symbols ``S``;
  the affine map symbol -> weight (:attr:`CodeFormat.weight_affine`) and a sparse outlier
  correction finish ``x @ W^T``;
* **tile** (prefill): each unit's tile is dequantized to float (exactly the weights
  :func:`~windquant_gym.export.codec.decode_module` rebuilds) and multiplied.

On the CPU the table path runs as one call per module of a native kernel (:mod:`.native_gemv`,
``packed_gemv.c``, compiled at first use; the same arithmetic, the outlier correction folded into
its row loop, in float32), up to :attr:`PackedLinear.native_max_tokens` tokens; as tensor ops
where it cannot be built, on CUDA, under autograd (an input that needs a gradient), tracing and
``torch.compile``. A layout with a rotation (``QuantConfig.rotation``) stores each quantized
unit's codes in its rotated frame; every path then multiplies them with that unit's inputs
rotated first, ``x_u R`` (one small matmul per unit and call), never with a rotated-back weight.
The tensor-op paths run on any device; at most one unit's tile or table is
alive at a time (the native kernel holds every unit's tables of one call: 256 floats per code
byte of a row, e.g. 64 KB per 2-bit unit of 256 columns and token; 8-bit units need none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportFormatError
from ..quant.bitwidths import SKIP_ACTION
from ..quant.rotation import rotation_matrix, to_model_frame
from . import native_gemv
from .formats import CodeFormat
from .layout import FP16_NAME, ModuleLayout, codes_name, outlier_name, scales_name, zeros_name
from .packing import field_bits, pack_fields, unpack_fields
from .planes import PLANES, Plane, digit_table, join_planes, split_planes, unpack_digits


@dataclass(frozen=True)
class _UnitTile:
    """Where one unit's compute-form codes lie."""

    unit: int
    start: int
    end: int
    slot: int
    """Row of the unit in its bit width's scales."""
    batch: int
    """Its batch (the units of its bit width and width) in the group."""
    position: int
    """Its row in the batch's plane buffers."""


@dataclass(frozen=True)
class _Batch:
    """Units of one bit width and one width, whose planes are stacked ``[units, O, row bytes]``
    so that the decode path handles them in one go."""

    width: int
    tiles: Tuple[_UnitTile, ...]
    buffers: Tuple[str, ...]
    """One buffer name per plane."""
    start: Optional[int]
    """First column when the units are adjacent (the activations are then one slice)."""


@dataclass(frozen=True)
class _Group:
    """The units of one stored bit width."""

    fmt: CodeFormat
    tiles: Tuple[_UnitTile, ...]
    batches: Tuple[_Batch, ...]

    @property
    def planes(self) -> Tuple[Plane, ...]:
        return PLANES[self.fmt.spec.stored_bits]


class PackedLinear(nn.Module):
    """A Linear whose weight is stored as a windquant plan's packed codes (see the module doc).

    Build it from a :class:`ModuleLayout` (its buffers are then empty, to be filled from a
    file, as ``from_pretrained`` does) and call :meth:`prepare` once the buffers hold the
    file's tensors; the forward prepares on first use otherwise.
    """

    #: Tokens (rows of ``x``) up to which the forward uses the table path; above, the float
    #: tile path. Measured on SmolLM2-135M (2-core Xeon, all 210 modules): the table path is
    #: 2.4x faster at 1 token, even at 8, slower from 16 (RESULTS.md, issue 23).
    lut_max_tokens: int = 8
    #: The same for the native kernel (CPU): measured on SmolLM2-135M's 2.0-bit plan (2-core AMD
    #: EPYC, all 210 modules), 22 ms at 1 token, 285 at 16, 648 at 32 against the tile path's
    #: 326 / 408 / 393 ms (RESULTS.md, issue 23).
    native_max_tokens: int = 16

    def __init__(self, layout: ModuleLayout, *, bias: bool = False, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.layout = layout
        self.out_features, self.in_features = layout.shape
        for name, (shape, tensor_dtype) in layout.tensor_specs().items():
            self.register_buffer(name, torch.empty(shape, dtype=tensor_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        self._groups: Tuple[_Group, ...] = ()
        self._outlier_units: Dict[int, Tuple[int, int, int]] = {}
        self.prepared = False

    # ----- file form <-> compute form ------------------------------------------------------
    @classmethod
    def from_tensors(cls, layout: ModuleLayout, tensors: Dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None) -> "PackedLinear":
        """A prepared module from file-form tensors by local name (e.g. a module's part of
        :func:`~windquant_gym.export.codec.encode_module`)."""
        module = cls(layout, bias=bias is not None, device="meta")
        for name, (shape, dtype) in layout.tensor_specs().items():
            if name not in tensors:
                raise ExportFormatError(f"PackedLinear needs the tensor {name!r} its layout lists; got {sorted(tensors)}.")
            value = tensors[name]
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                raise ExportFormatError(
                    f"Tensor {name!r} is {value.dtype} {tuple(value.shape)}, the layout needs {dtype} {tuple(shape)}; "
                    "the file is corrupt or of another export. Export again."
                )
            setattr(module, name, value.clone())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module.prepare()

    def _outlier_positions(self) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """Unit -> (rows, columns inside the unit) of its outliers, from the file form."""
        layout = self.layout
        out_f, columns = self.out_features, layout.columns
        units = layout.with_outliers()
        if not units:
            return {}
        widths = [columns[i][1] - columns[i][0] for i in units]
        sizes = [layout.n_outliers[i] for i in units]
        counts = unpack_fields(self._buffers[outlier_name("row_counts")].cpu().numpy(), [(out_f, field_bits(g + 1)) for g in widths])
        cols = unpack_fields(self._buffers[outlier_name("columns")].cpu().numpy(), [(n, field_bits(g)) for n, g in zip(sizes, widths)])
        positions = {}
        for i, c, r, n, g in zip(units, cols, counts, sizes, widths):
            if int(r.sum()) != n or (c.size and int(c.max()) >= g):
                raise ExportFormatError(
                    f"Unit {i}: {int(r.sum())} outliers in its row counts, the layout says {n}, columns up to "
                    f"{int(c.max()) if c.size else 0} for width {g}; the file is corrupt. Export again."
                )
            positions[i] = (np.repeat(np.arange(out_f), r), c)
        return positions

    @torch.no_grad()
    def prepare(self) -> "PackedLinear":
        """File form -> compute form (once; the file-form code streams are freed)."""
        if self.prepared:
            return self
        layout, out_f = self.layout, self.out_features
        device = next(iter(self._buffers.values())).device if self._buffers else torch.device("cpu")
        if device.type == "meta":
            raise ExportFormatError("PackedLinear.prepare() needs the file's tensors; its buffers are still empty (meta).")
        positions = self._outlier_positions()
        groups = []
        for action in layout.used_actions():
            fmt = layout.formats[action]
            members = layout.members(action)
            sizes = [layout.n_codes(i) for i in members]
            stream = fmt.packer.unpack(self._buffers[codes_name(fmt.label)].cpu().numpy(), sum(sizes))
            planes = PLANES[fmt.spec.stored_bits]
            units = {}
            for slot, (i, symbols) in enumerate(zip(members, np.split(stream, np.cumsum(sizes)[:-1]))):
                start, end = layout.columns[i]
                dense = np.zeros((out_f, end - start), dtype=np.int64)  # symbol 0 at the outliers' positions
                if i in positions:
                    keep = np.ones((out_f, end - start), dtype=bool)
                    keep[positions[i]] = False
                    if int(keep.sum()) != symbols.size:
                        raise ExportFormatError(f"Unit {i}: repeated outlier positions; the file is corrupt. Export again.")
                    dense[keep] = symbols
                else:
                    dense.reshape(-1)[:] = symbols
                units.setdefault(end - start, []).append((slot, i, split_planes(planes, dense)))
            tiles, batches = [], []
            for b, (width, entries) in enumerate(sorted(units.items(), reverse=True)):
                names = []
                for j, plane in enumerate(planes):
                    name = f"{fmt.label}_c{width}_p{j}"
                    stacked = np.stack([pieces[j] for _, _, pieces in entries]).reshape(len(entries), out_f, plane.row_bytes(width))
                    self.register_buffer(name, torch.from_numpy(stacked).to(device), persistent=False)
                    names.append(name)
                batch_tiles = tuple(_UnitTile(i, *layout.columns[i], slot, b, k) for k, (slot, i, _) in enumerate(entries))
                starts = [t.start for t in batch_tiles]
                adjacent = all(t.start == starts[0] + k * width for k, t in enumerate(batch_tiles))
                batches.append(_Batch(width, batch_tiles, tuple(names), starts[0] if adjacent else None))
                tiles.extend(batch_tiles)
            del self._buffers[codes_name(fmt.label)]
            groups.append(_Group(fmt, tuple(sorted(tiles, key=lambda t: t.slot)), tuple(batches)))
        if positions:
            cols = np.concatenate([positions[i][1] for i in layout.with_outliers()])
            counts = np.stack([np.bincount(positions[i][0], minlength=out_f) for i in layout.with_outliers()])
            col_dtype = np.uint8 if layout.chunk_size <= 256 else np.int16
            self.register_buffer("outlier_cols", torch.from_numpy(cols.astype(col_dtype)).to(device), persistent=False)
            count_dtype = np.uint8 if layout.chunk_size < 256 else np.int16  # a row holds at most chunk_size outliers
            self.register_buffer("outlier_counts", torch.from_numpy(counts.astype(count_dtype)).to(device), persistent=False)
            del self._buffers[outlier_name("columns")], self._buffers[outlier_name("row_counts")]
            at, self._outlier_units = 0, {}
            for k, i in enumerate(layout.with_outliers()):
                self._outlier_units[i] = (k, at, layout.n_outliers[i])
                at += layout.n_outliers[i]
        skipped = layout.members(SKIP_ACTION)
        if skipped:
            index = np.concatenate([np.arange(*layout.columns[i]) for i in skipped])
            self.register_buffer("skip_index", torch.from_numpy(index).to(device), persistent=False)
        for name in self.layout.tensor_specs():  # what stays of the file form: scales, outlier values, fp16 columns
            if name in self._buffers:
                # own the memory: a loader's tensors can be views of the file's mmap, which would keep the
                # whole file mapped (and its pages resident) for the model's life
                self._buffers[name] = self._buffers[name].clone()
        self._groups = tuple(groups)
        self.prepared = True
        return self

    def file_tensors(self) -> Dict[str, torch.Tensor]:
        """The file-form tensors by local name (what ``state_dict`` and the export write)."""
        if not self.prepared:
            return {name: self._buffers[name] for name in self.layout.tensor_specs()}
        layout, out_f = self.layout, self.out_features
        out: Dict[str, torch.Tensor] = {}
        for group in self._groups:
            fmt = group.fmt
            symbols = []
            for tile in group.tiles:
                width = tile.end - tile.start
                pieces = [piece.cpu().numpy() for piece in self._plane_bytes(group, tile)]
                unit = join_planes(group.planes, pieces, out_f, width)
                rows, cols = self._unit_outliers(tile.unit)
                if rows is not None:
                    keep = np.ones((out_f, width), dtype=bool)
                    keep[rows.cpu().numpy(), cols.cpu().numpy()] = False
                    unit = unit[keep]
                symbols.append(unit.reshape(-1))
            out[codes_name(fmt.label)] = torch.from_numpy(fmt.packer.pack(np.concatenate(symbols)))
            out[scales_name(fmt.label)] = self._buffers[scales_name(fmt.label)]
            if fmt.zero_point:
                out[zeros_name(fmt.label)] = self._buffers[zeros_name(fmt.label)]
        if FP16_NAME in self._buffers:
            out[FP16_NAME] = self._buffers[FP16_NAME]
        units = layout.with_outliers()
        if units:
            widths = [layout.columns[i][1] - layout.columns[i][0] for i in units]
            cols = self._buffers["outlier_cols"].cpu().numpy().astype(np.int64)
            counts = self._buffers["outlier_counts"].cpu().numpy().astype(np.int64)
            sizes = [layout.n_outliers[i] for i in units]
            col_runs = [(c, field_bits(g)) for c, g in zip(np.split(cols, np.cumsum(sizes)[:-1]), widths)]
            out[outlier_name("codes")] = self._buffers[outlier_name("codes")]
            out[outlier_name("columns")] = torch.from_numpy(pack_fields(col_runs))
            out[outlier_name("row_counts")] = torch.from_numpy(pack_fields([(c, field_bits(g + 1)) for c, g in zip(counts, widths)]))
            out[outlier_name("scales")] = self._buffers[outlier_name("scales")]
        device = self._device()
        return {k: v.to(device) for k, v in out.items()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for name, tensor in self.file_tensors().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _device(self) -> torch.device:
        for tensor in self._buffers.values():
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")

    # ----- forward --------------------------------------------------------------------------
    def _unit_outliers(self, unit: int):
        """(rows int64, columns inside the unit int64) of ``unit``'s outliers, or (None, None)."""
        if unit not in self._outlier_units:
            return None, None
        k, at, n = self._outlier_units[unit]
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=self.outlier_counts.device), self.outlier_counts[k].long(), output_size=n
        )
        return rows, self.outlier_cols[at : at + n].long()

    def _plane_bytes(self, group: _Group, tile: _UnitTile):
        return [self._buffers[name][tile.position].view(-1) for name in group.batches[tile.batch].buffers]

    def _symbols(self, group: _Group, tile: _UnitTile) -> torch.Tensor:
        """The unit's symbols ``[O, width]`` (uint8)."""
        width = tile.end - tile.start
        symbols = None
        for plane, data in zip(group.planes, self._plane_bytes(group, tile)):
            digits = unpack_digits(plane, data, self.out_features, width)
            if plane.shift:
                digits = digits << plane.shift
            symbols = digits if symbols is None else symbols + digits
        return symbols

    def _outlier_values(self, unit: int, rows: torch.Tensor) -> torch.Tensor:
        k, at, n = self._outlier_units[unit]
        return self._buffers[outlier_name("codes")][at : at + n].float() * self._buffers[outlier_name("scales")][k].float()[rows]

    def _unit_weight(self, group: _Group, tile: _UnitTile) -> torch.Tensor:
        """The unit's float32 weight tile ``[O, width]``, as :func:`decode_module` computes it."""
        fmt, spec = group.fmt, group.fmt.spec
        codes = self._symbols(group, tile).to(torch.float32)
        if fmt.code_step != 1:
            codes = codes * fmt.code_step
        codes = codes + fmt.codes[0]
        alpha = self._buffers[scales_name(fmt.label)][tile.slot].float()[:, None]
        levels = codes + spec.shift
        if fmt.zero_point:  # as dequantize_codes does it, so the weights equal the env's bit for bit
            levels = levels - self._buffers[zeros_name(fmt.label)][tile.slot].float()[:, None]
        weight = levels * (alpha / spec.divisor)
        rows, cols = self._unit_outliers(tile.unit)
        if rows is not None:
            weight[rows, cols] = self._outlier_values(tile.unit, rows)
        return weight  # in the unit's rotated frame when the layout has a rotation (see _rotated_inputs)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The full float32 weight ``[O, I]`` (for ``dequantize()``; the forward never builds it)."""
        self.prepare()
        weight = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self._device())
        for group in self._groups:
            for tile in group.tiles:
                weight[:, tile.start : tile.end] = to_model_frame(self._unit_weight(group, tile), self.layout.rotation)
        if FP16_NAME in self._buffers:
            weight[:, self.skip_index] = self._buffers[FP16_NAME].float()
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepared:
            self.prepare()
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        # the kernel has no backward and is invisible to tracing and compilation: the tensor ops then
        opaque_ok = not (torch.is_grad_enabled() and x2.requires_grad) and not torch.jit.is_tracing() and not (
            torch.compiler.is_compiling())
        eligible = x2.shape[0] <= self.native_max_tokens and x2.device.type == "cpu" and opaque_ok
        library = native_gemv.load() if eligible else None
        native = self._native_args() if library is not None else None
        if native is not None:  # the fused kernel works in float32
            x2 = x2.to(torch.float32).contiguous()
        y = x2.new_zeros(x2.shape[0], self.out_features)
        xq = self._rotated_inputs(x2)  # what the quantized units' codes multiply
        if native is not None:
            self._native_products(library, native, xq, y)
        elif x2.shape[0] <= self.lut_max_tokens:
            for group in self._groups:
                for batch in group.batches:
                    self._lut_batch(group, batch, xq, y)
            self._outlier_correction(xq, y)
        else:
            for group in self._groups:
                for tile in group.tiles:
                    y.addmm_(xq[:, tile.start : tile.end], self._unit_weight(group, tile).to(x2.dtype).t())
        if FP16_NAME in self._buffers:
            y.addmm_(x2.index_select(1, self.skip_index), self._buffers[FP16_NAME].to(x2.dtype).t())
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y.to(dtype).view(*lead, self.out_features)

    def _rotated_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with each quantized unit's columns in that unit's rotated frame, ``x_u R``, so that
        ``x_u R Q^T = x_u (Q R^T)^T`` (:mod:`windquant_gym.quant.rotation`); ``x`` itself when the
        layout has no rotation. Skipped units' columns are left as they are (their fp16 weights
        were never rotated)."""
        if self.layout.rotation == "none":
            return x
        rotated = x.clone()
        for group in self._groups:
            for tile in group.tiles:
                width = tile.end - tile.start
                matrix = self._cached(("rotation", width, x.device, x.dtype), lambda: rotation_matrix(width, x.device, x.dtype))
                rotated[:, tile.start : tile.end] = x[:, tile.start : tile.end] @ matrix
        return rotated

    def _cached(self, key, make):
        cache = self.__dict__.setdefault("_index_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _lut_batch(self, group: _Group, batch: _Batch, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y += x @ W^T`` over one batch's units by table lookups: per plane, ``T[m, u, g, byte] =
        sum_j x_u[m, g*per_byte + j] * digit_j(byte)`` (a small matmul), each row's bytes index
        ``T`` and are summed: ``x_u @ S_u^T``; then weight = alpha * (a * s + b)."""
        m, n_units, width, out_f = x.shape[0], len(batch.tiles), batch.width, self.out_features
        if batch.start is not None:
            xs = x[:, batch.start : batch.start + n_units * width]
        else:
            xs = torch.cat([x[:, t.start : t.end] for t in batch.tiles], dim=1)
        xs = xs.reshape(m, n_units, width)
        products = None
        for plane, name in zip(group.planes, batch.buffers):
            per, row_bytes = plane.per_byte, plane.row_bytes(width)
            padded = xs if row_bytes * per == width else torch.nn.functional.pad(xs, (0, row_bytes * per - width))
            table = padded.reshape(-1, per) @ digit_table(plane, x.dtype, x.device)  # [M * units * G, 256]
            offsets = self._cached(("offsets", name, x.device), lambda: (
                torch.arange(n_units * row_bytes, device=x.device, dtype=torch.int32) * 256).view(n_units, 1, row_bytes))
            index = offsets + self._buffers[name]  # int32 [units, O, G]
            part = table.view(m, -1).index_select(1, index.view(-1)).view(m, n_units, out_f, row_bytes).sum(-1)
            if plane.shift:
                part = part * plane.multiplier
            products = part if products is None else products + part
        a, b = group.fmt.weight_affine
        slots = self._cached(("slots", group.fmt.label, batch.width, x.device), lambda: torch.tensor(
            [t.slot for t in batch.tiles], device=x.device))
        alpha = self._buffers[scales_name(group.fmt.label)].index_select(0, slots).to(x.dtype)  # [units, O]
        if group.fmt.zero_point:  # each row's b: b - z / divisor
            b = b - group.fmt.zero_coefficient * self._buffers[zeros_name(group.fmt.label)].index_select(0, slots).to(x.dtype)
        combined = products * a + xs.sum(-1, keepdim=True) * b  # [M, units, O]
        y.add_((combined * alpha).sum(1))

    def _native_products(self, library, args: dict, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y += x @ W^T`` over every quantized unit, outliers included, in one call of the
        native kernel (:mod:`.native_gemv`; float32 ``x`` and ``y``, contiguous, on the CPU)."""
        if not args["n_units"]:  # every unit kept in fp16
            return
        status = library.wq_packed_gemv(x.shape[0], x.data_ptr(), self.in_features, self.out_features, args["n_units"],
                                        *args["pointers"], y.data_ptr(), torch.get_num_threads())
        if status == -1:
            raise MemoryError(f"windquant's native decode kernel could not allocate its tables ({x.shape[0]} tokens).")
        if status != 0:
            raise ExportFormatError(f"windquant's native decode kernel refused this module's planes (status {status}); "
                                    f"set {native_gemv.ENV_VAR}=off and report it.")

    def _native_args(self) -> Optional[dict]:
        """Per unit, what the kernel reads (columns, addresses of its fp16 scales and of its
        planes, digit layout, affine map, its outliers' counts, columns, codes and scales), as
        arrays built once per placement and dtype of the buffers (the cache key); None when the
        scales are not fp16 (e.g. after ``model.to(torch.bfloat16)``): the tensor-op path then."""
        key = ("native",) + tuple((t.data_ptr(), t.dtype) for t in self._buffers.values() if t is not None)
        return self._cached(key, self._make_native_args)

    def _make_native_args(self) -> Optional[dict]:
        buffers = self._buffers
        if any(buffers[scales_name(g.fmt.label)].dtype != torch.float16 for g in self._groups) or (
                self._outlier_units and buffers[outlier_name("scales")].dtype != torch.float16):
            return None
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in buffers.values() if t is not None):
            return None  # the kernel reads host memory, rows by address arithmetic
        i64, i32, f32, outlier_scales, zero_points = [], [], [], [], []
        for group in self._groups:
            a, b = group.fmt.weight_affine
            scales = buffers[scales_name(group.fmt.label)]
            zeros = buffers[zeros_name(group.fmt.label)] if group.fmt.zero_point else None
            if zeros is not None and zeros.dtype != torch.float16:
                return None
            for tile in group.tiles:
                names = group.batches[tile.batch].buffers
                plane_addresses, plane_info = [0, 0], [0] * 6
                for j, (plane, name) in enumerate(zip(group.planes, names)):
                    plane_addresses[j] = buffers[name][tile.position].data_ptr()
                    plane_info[3 * j : 3 * j + 3] = (plane.radix, plane.per_byte, plane.multiplier)
                counts = cols = codes = oscale = 0
                sizes = [1, 1]  # bytes of an outlier count and of an outlier column (uint8 or int16)
                if tile.unit in self._outlier_units:
                    k, at, _ = self._outlier_units[tile.unit]
                    counts = self.outlier_counts[k].data_ptr()
                    cols = self.outlier_cols[at:].data_ptr()
                    codes = buffers[outlier_name("codes")][at:].data_ptr()
                    oscale = buffers[outlier_name("scales")][k].data_ptr()
                    sizes = [self.outlier_counts.element_size(), self.outlier_cols.element_size()]
                i64.append([tile.start, tile.end - tile.start, scales[tile.slot].data_ptr(), *plane_addresses, counts, cols, codes])
                i32.append([len(group.planes), *plane_info, *sizes])
                f32.append([a, b, group.fmt.zero_coefficient])
                outlier_scales.append(oscale)
                zero_points.append(0 if zeros is None else zeros[tile.slot].data_ptr())
        arrays = [torch.tensor(i64, dtype=torch.int64), torch.tensor(i32, dtype=torch.int32),
                  torch.tensor(f32, dtype=torch.float32), torch.tensor(outlier_scales, dtype=torch.int64),
                  torch.tensor(zero_points, dtype=torch.int64)]
        # the arrays stay referenced beside their addresses, so the addresses stay valid
        return {"n_units": len(i64), "arrays": arrays, "pointers": [t.data_ptr() for t in arrays]}

    def _outlier_correction(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The table path put symbol 0 (weight alpha * b) at every outlier's position: add
        ``x[:, col] * (outlier - alpha * b)`` into each outlier's row."""
        units = self.layout.with_outliers()
        if not units:
            return
        out_f = self.out_features
        counts = self.outlier_counts.view(-1).long()
        n = sum(self.layout.n_outliers)
        flat = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts, output_size=n)  # k * O + row
        starts, base_rows, per_unit = self._cached(("outlier_units", x.device), lambda: self._outlier_unit_info(x.device))
        which = torch.repeat_interleave(torch.arange(len(units), device=x.device), per_unit, output_size=n)
        rows = flat - which * out_f  # no integer division: it costs more than the rest
        cols = self.outlier_cols.long() + starts.index_select(0, which)
        # alpha and b of each outlier's unit and row, from that unit's bit width's scales (and zero points)
        at = base_rows.index_select(0, which) * out_f + rows
        alpha = self._all_scales(x.dtype).index_select(0, at)
        values = self._buffers[outlier_name("codes")].to(x.dtype) * self._buffers[outlier_name("scales")].to(x.dtype).view(-1).index_select(0, flat)
        correction = values - alpha * self._all_offsets(x.dtype).index_select(0, at)
        y.index_add_(1, rows, x.index_select(1, cols) * correction)

    def _outlier_unit_info(self, device):
        """Per unit with outliers: its first column, its row in :meth:`_all_scales`, its outlier
        count (a few numbers per unit)."""
        row_of, at = {}, 0
        for group in self._groups:
            for tile in group.tiles:
                row_of[tile.unit] = at + tile.slot
            at += len(group.tiles)
        units = self.layout.with_outliers()
        starts = torch.tensor([self.layout.columns[i][0] for i in units], device=device)
        base = torch.tensor([row_of[i] for i in units], device=device)
        per_unit = torch.tensor([self.layout.n_outliers[i] for i in units], device=device)
        return starts, base, per_unit

    def _all_scales(self, dtype) -> torch.Tensor:
        """Every quantized unit's row scales, group after group, flat (a transient of a few KB)."""
        return torch.cat([self._buffers[scales_name(g.fmt.label)].to(dtype).view(-1) for g in self._groups])

    def _all_offsets(self, dtype) -> torch.Tensor:
        """Every quantized unit's row ``b`` (weight of symbol 0 over alpha), flat like :meth:`_all_scales`:
        the format's ``b``, less ``z / divisor`` where it stores zero points."""
        parts = []
        for g in self._groups:
            b = g.fmt.weight_affine[1]
            scales = self._buffers[scales_name(g.fmt.label)]
            if g.fmt.zero_point:
                parts.append((b - g.fmt.zero_coefficient * self._buffers[zeros_name(g.fmt.label)].to(dtype)).view(-1))
            else:
                parts.append(torch.full((scales.numel(),), b, dtype=dtype, device=scales.device))
        return torch.cat(parts)

    def resident_bytes(self) -> int:
        """Bytes of every tensor the module holds (buffers and bias)."""
        tensors = list(self._buffers.values()) + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, units={len(self.layout.columns)}, "
                f"stored={[self.layout.formats[a].label if a != SKIP_ACTION else 'fp16' for a in self.layout.stored_actions]}")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def packed_linears(model: nn.Module) -> List[Tuple[str, PackedLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PackedLinear)]
