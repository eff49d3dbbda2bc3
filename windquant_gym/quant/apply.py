"""Apply a plan to a model for a while, then give the model its own weights back.

The original weight tensors are never written: each borrowed Linear's ``weight.data`` is
pointed at a buffer holding the quantized weights and pointed back on exit (``finally``),
so restoring is bitwise exact and costs nothing, also after an exception or a
KeyboardInterrupt inside the block. Buffers are kept by a :class:`WeightAssembler` and
reused from one episode to the next.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch
import torch.nn as nn

from .table import QuantTable
from .units import module_names


class WeightAssembler:
    """Builds a plan's weights into per-module buffers allocated once."""

    def __init__(self, model: nn.Module, table: QuantTable):
        self.model = model
        self.table = table
        self.modules = module_names(table.units)
        self._first_unit = {}
        for unit in table.units:
            self._first_unit.setdefault(unit.module, unit.index)
        self._count = {name: sum(1 for u in table.units if u.module == name) for name in self.modules}
        self._buffers: Dict[str, torch.Tensor] = {}

    def assemble(self, plan: Sequence[int]) -> Dict[str, torch.Tensor]:
        actions = self.table.check_plan(plan).tolist()
        result = {}
        for name in self.modules:
            weight = self.model.get_submodule(name).weight
            original = weight.data
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape != original.shape or buffer.dtype != original.dtype:
                buffer = self._buffers[name] = torch.empty_like(original)
            first = self._first_unit[name]
            self.table.assemble_module(name, actions[first : first + self._count[name]], original, out=buffer)
            result[name] = buffer
        return result


@contextmanager
def quantized_weights(
    model: nn.Module, table: QuantTable, plan: Sequence[int], assembler: WeightAssembler | None = None
) -> Iterator[nn.Module]:
    """``with quantized_weights(model, table, plan): ...`` runs the block on the quantized
    model; the original weights are back on exit, bit for bit, whatever happens inside."""
    assembler = assembler or WeightAssembler(model, table)
    with torch.no_grad():
        weights = assembler.assemble(plan)
    originals = {}
    try:
        for name, new in weights.items():
            parameter = model.get_submodule(name).weight
            originals[name] = parameter.data
            parameter.data = new
        yield model
    finally:
        for name, old in originals.items():
            model.get_submodule(name).weight.data = old
