"""Apply a plan to a model for a while, then give the model its own weights back.

The original weight tensors are never written: each borrowed Linear's ``weight.data`` is
pointed at a buffer holding the quantized weights and pointed back on exit (``finally``),
so restoring is bitwise exact and costs nothing, also after an exception or a
KeyboardInterrupt inside the block. Buffers are kept by a :class:`WeightAssembler` and
reused from one episode to the next, and so is what they hold: a plan rewrites only the units whose
stored action differs from the plan assembled into the buffer before (a search's mutation, or the
next episode's plan, changes a fraction of them).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .table import QuantTable
from .units import find_decoder_layers, module_names


class WeightAssembler:
    """Builds a plan's weights into buffers allocated once.

    ``per_layer=False``: one buffer per module (the whole model's quantized weights exist at
    once). ``per_layer=True``: buffers are shared by the same module of every decoder layer
    (``self_attn.q_proj`` of layer 3 reuses layer 2's), for :func:`streamed_quantized_weights`,
    which holds one layer's quantized weights at a time.

    ``dtype``: the buffers' dtype (default: each weight's own). A bf16 proxy pass (autocast)
    casts every float32 weight to bf16 on every call; buffers assembled in bf16 give the very
    same bf16 weights once per plan instead (both round to nearest even), and those buffers can
    only be used under autocast (or in a bf16 model)."""

    def __init__(self, model: nn.Module, table: QuantTable, per_layer: bool = False, dtype: Optional[torch.dtype] = None):
        self.model = model
        self.table = table
        self.dtype = dtype
        self.modules = module_names(table.units)
        self._first_unit: Dict[str, int] = {}
        self._count: Dict[str, int] = Counter(unit.module for unit in table.units)
        self._layer_of: Dict[str, int] = {}
        self._by_layer: Dict[int, List[str]] = defaultdict(list)
        for unit in table.units:
            if unit.module not in self._first_unit:
                self._first_unit[unit.module] = unit.index
                self._layer_of[unit.module] = unit.layer
                self._by_layer[unit.layer].append(unit.module)
        self.per_layer = per_layer
        # per_layer: the same module of every layer shares a buffer ("self_attn.q_proj")
        self._buffer_key = {name: _name_in_layer(name, self._layer_of[name]) if per_layer else name for name in self.modules}
        self._buffers: Dict[str, torch.Tensor] = {}
        self._originals: Dict[str, torch.Tensor] = {}
        # per buffer: (module, original's storage and version, buffer's storage), the buffer's version
        # after we wrote it, and the stored actions it holds: the next plan rewrites only the units
        # whose stored action changed
        self._held: Dict[str, tuple] = {}
        self.seconds = 0.0
        """Wall time spent assembling, summed over calls (read by the episode timing)."""

    def layer_modules(self, layer: int) -> List[str]:
        return self._by_layer[layer]

    def assemble(self, plan: Sequence[int], modules: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Quantized weights of ``modules`` (default all) under ``plan``, in reused buffers."""
        names = self.modules if modules is None else list(modules)
        if self.per_layer and len({self._layer_of[n] for n in names}) > 1:
            raise ConfigError(
                "This WeightAssembler shares one buffer per module across layers (per_layer=True), so it can "
                "assemble one decoder layer at a time, not the whole model; use streamed_quantized_weights(), "
                "or a WeightAssembler(model, table) without per_layer for quantized_weights()."
            )
        _synchronize(self.model)  # time the assembly alone, not kernels queued before it
        started = time.perf_counter()
        actions = self.table.check_plan(plan).tolist()
        result = {}
        lent = {buffer.data_ptr() for buffer in self._buffers.values()}
        for name in names:
            original = self._original(name, lent)
            key = self._buffer_key[name]
            buffer = self._buffers.get(key)
            dtype = self.dtype or original.dtype
            if buffer is None or buffer.shape != original.shape or buffer.dtype != dtype or buffer.device != original.device:
                with torch.inference_mode(False):  # a buffer made inside a forward pass must stay writable after it
                    buffer = self._buffers[key] = torch.empty_like(original, dtype=dtype)
            first = self._first_unit[name]
            module_actions = actions[first : first + self._count[name]]
            # what the buffer holds is reused only if it was assembled from this very original (same
            # storage, no in-place change through the Parameter since) and nothing wrote to it after us
            source = (name, original.data_ptr(), self.model.get_submodule(name).weight._version, buffer.data_ptr())
            held = self._held.get(key)
            reusable = held is not None and held[0] == source and held[1] == buffer._version
            self.table.assemble_module(name, module_actions, original, out=buffer, held=held[2] if reusable else None)
            self._held[key] = (source, buffer._version, self.table.stored_actions_of(name, module_actions))
            result[name] = buffer
        _synchronize(self.model)  # so that the time is the assembly's, not the next kernel's
        self.seconds += time.perf_counter() - started
        return result

    def _original(self, name: str, lent: set) -> torch.Tensor:
        """The module's own weight, also while the model holds one of our buffers in its place
        (a plan re-assembled in place, as the search does): a skipped unit's FP16 columns must
        come from the original, not from the buffer it is lent."""
        current = self.model.get_submodule(name).weight.data
        if current.data_ptr() in lent and name in self._originals:
            return self._originals[name]
        self._originals[name] = current
        return current


def _name_in_layer(name: str, layer: int) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    prefix = f".{layer}."
    return name[name.index(prefix) + len(prefix):] if prefix in name else name


def _synchronize(model: nn.Module) -> None:
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.is_cuda:
        torch.cuda.synchronize(parameter.device)


@contextmanager
def borrowed_weights(model: nn.Module, weights: Dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Point each named module's ``weight.data`` at the given tensor for the block, and
    back at the original on exit, whatever happens inside (exception, KeyboardInterrupt)."""
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


@contextmanager
def quantized_weights(
    model: nn.Module, table: QuantTable, plan: Sequence[int], assembler: WeightAssembler | None = None
) -> Iterator[nn.Module]:
    """``with quantized_weights(model, table, plan): ...`` runs the block on the quantized
    model; the original weights are back on exit, bit for bit, whatever happens inside."""
    assembler = assembler or WeightAssembler(model, table)
    with torch.no_grad():
        weights = assembler.assemble(plan)
    with borrowed_weights(model, weights):
        yield model


@contextmanager
def streamed_quantized_weights(
    model: nn.Module, table: QuantTable, plan: Sequence[int], assembler: WeightAssembler | None = None
) -> Iterator[nn.Module]:
    """Like :func:`quantized_weights`, but each decoder layer gets its quantized weights
    just before it runs (a forward pre-hook) and its own back right after (a forward hook):
    the extra memory is one layer's weights, not the model's (8B-scale models on one GPU).
    Every forward call re-assembles each layer, so feed the whole proxy as one batch. For
    evaluation only: a backward pass would see the restored weights."""
    assembler = assembler or WeightAssembler(model, table, per_layer=True)
    table.check_plan(plan)
    _, layers = find_decoder_layers(model)
    borrowed: Dict[str, torch.Tensor] = {}

    def give_back(names):
        for name in names:
            if name in borrowed:
                model.get_submodule(name).weight.data = borrowed.pop(name)

    def before(index):
        def hook(module, args):
            with torch.no_grad():
                weights = assembler.assemble(plan, assembler.layer_modules(index))
            for name, new in weights.items():
                parameter = model.get_submodule(name).weight
                borrowed.setdefault(name, parameter.data)
                parameter.data = new
        return hook

    def after(index):
        def hook(module, args, output):
            give_back(assembler.layer_modules(index))
        return hook

    handles = []
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before(index)))
            # prepend: give-back hooks run in reverse order of registration, so nested
            # contexts unwind last-in first-out and the original weights end up back
            handles.append(layer.register_forward_hook(after(index), prepend=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        give_back(list(borrowed))
