"""Proxy passes that start at the first decoder layer a plan changed.

A search's offspring differ from the plan measured before them in a few units; the decoder
layers in front of the first changed one see the same weights and the same tokens, so their
outputs are the ones the last pass on those tokens computed. :class:`PrefixReuse` keeps every
decoder layer's output per batch of blocks (the hidden states: ``n_layers x n_blocks x L x
hidden`` values for the full pass, ~140 MB for SmolLM2-135M's 16 x 128-token proxy, and the
screening subsets' besides) and, for a new plan, replaces each layer in front of the first
changed one by a lookup of its stored output. The layers from there on run as usual and their
outputs replace the stored ones.

What a pass returns is what the full pass returns, bit for bit: stored states are reused only
for the same blocks in the same batch, so the layers that run see exactly the inputs a full pass
gives them. The embedding, final norm and LM head always run (they are cheap, and the head may
be a quantized unit). How much it saves depends on where plans differ: a search's mutations
move several units at once (a raise paid for by lowerings), anywhere in the model.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

#: Largest store (bytes of hidden states) a problem keeps by default; above it passes run in full.
PREFIX_REUSE_BYTES = 1 << 30


def decoder_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder's layer list (``model.get_decoder().layers``), or None for a model without one."""
    try:
        layers = getattr(model.get_decoder(), "layers", None)
    except AttributeError:
        return None
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def unit_layers(model: nn.Module, unit_modules: Sequence[str], layers: nn.ModuleList) -> np.ndarray:
    """Per unit, the index of the decoder layer holding its module; ``len(layers)`` for the LM head
    (it runs after every layer) and 0 for anything else outside the layers (it changes them all)."""
    names = {id(module): name for name, module in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in layers]
    head = model.get_output_embeddings()
    head_name = names.get(id(head)) if head is not None else None
    out = np.zeros(len(unit_modules), dtype=np.int64)
    for i, module in enumerate(unit_modules):
        if module == head_name:
            out[i] = len(layers)
            continue
        for index, prefix in enumerate(prefixes):
            if module.startswith(prefix):
                out[i] = index
                break
    return out


class PrefixReuse:
    """Stored decoder-layer outputs of the last plan measured on each batch of blocks.

    ``with reuse.measuring(plan, rows, batch_size):`` around a pass over ``blocks[rows]`` (in
    ``batch_size`` batches, in order): a batch measured before (the same blocks in the same
    order) skips every layer in front of the first one whose units' actions differ from the plan
    it was last measured with, and the layers that run replace its stored outputs. A search
    measures the same few batches again and again (all blocks, and each generation's screening
    subset), so a store per batch, the last ``max_batches`` kept, serves it. ``first_layer`` (set
    on entry) says where the pass's earliest batch started."""

    def __init__(self, model: nn.Module, unit_modules: Sequence[str], n_blocks: int, layers: nn.ModuleList,
                 max_batches: Optional[int] = None):
        self.layers = layers
        self.unit_layer = unit_layers(model, unit_modules, layers)
        self._decoder = model.get_decoder()
        self.n_blocks = int(n_blocks)
        self.max_batches = max_batches
        self._stores: "OrderedDict[bytes, dict]" = OrderedDict()  # batch rows -> {"plan", "outputs", "tuples"}
        self._context = None
        self.first_layer = 0
        self.layers_skipped = 0
        """Decoder-layer runs saved so far (layers x batches)."""
        self.layers_run = 0
        """Decoder-layer runs made through the store so far: ``skipped / (skipped + run)`` is the
        share of the decoder's work saved."""

    @classmethod
    def for_model(cls, model: nn.Module, unit_modules: Sequence[str], blocks: torch.Tensor, batch_size: int = 8,
                  max_bytes: int = PREFIX_REUSE_BYTES) -> Optional["PrefixReuse"]:
        """A store for ``blocks`` on ``model``, or None where it would not fit: no decoder layer
        list, or more than ``max_bytes`` of float32 hidden states for the blocks' full-pass batches
        and as many blocks again in screening subsets."""
        layers = decoder_layers(model)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if layers is None or not isinstance(hidden, int):
            return None
        if 2 * len(layers) * blocks.numel() * hidden * 4 > max_bytes:
            return None
        full_batches = -(-len(blocks) // max(1, batch_size))
        return cls(model, unit_modules, len(blocks), layers, max_batches=2 * full_batches + 2)

    def first_changed_layer(self, plan: np.ndarray, stored_plan: Optional[np.ndarray]) -> int:
        """The first decoder layer whose units' actions differ between ``plan`` and ``stored_plan``
        (0 without one; ``len(layers)`` if none differs)."""
        if stored_plan is None:
            return 0
        differ = stored_plan != plan
        return int(self.unit_layer[differ].min()) if differ.any() else len(self.layers)

    @contextmanager
    def measuring(self, plan: Sequence[int], rows: Optional[Sequence[int]], batch_size: int, context=None) -> Iterator[None]:
        """Reuse and record around one pass over ``blocks[rows]`` (None: all) in ``batch_size``
        batches; ``context`` (e.g. the proxy's precision) must match the stored states' (a change
        drops them all). The layers that run see exactly the inputs a full pass gives them (the
        same blocks in the same batch), so the NLL is the full pass's, bit for bit."""
        plan = np.array(plan, dtype=np.int64)
        rows = np.arange(self.n_blocks) if rows is None else np.asarray(rows, dtype=np.int64)
        if context != self._context:
            self._stores.clear()
            self._context = context
        batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
        keys = [batch.tobytes() for batch in batches]
        entries = []
        for key in keys:
            entry = self._stores.pop(key, None)
            if entry is None:
                entry = {"plan": None, "outputs": [None] * len(self.layers), "tuples": [False] * len(self.layers)}
            self._stores[key] = entry  # most recently used last
            entries.append(entry)
        firsts = [self.first_changed_layer(plan, entry["plan"]) for entry in entries]
        self.first_layer = min(firsts)
        batch = {"index": -1}

        def next_batch(module, args, kwargs):
            batch["index"] += 1

        def run_or_look_up(index: int, layer_forward):
            def forward(*args, **kwargs):
                b = batch["index"]
                entry = entries[b]
                if index < firsts[b]:
                    self.layers_skipped += 1
                    states = entry["outputs"][index]
                    return (states,) if entry["tuples"][index] else states
                self.layers_run += 1
                output = layer_forward(*args, **kwargs)
                entry["tuples"][index] = isinstance(output, tuple)
                entry["outputs"][index] = output[0] if entry["tuples"][index] else output
                return output
            return forward

        layers = list(self.layers)
        own = [layer.__dict__.get("forward") for layer in layers]  # e.g. an accelerate hook's: put back after
        handle = self._decoder.register_forward_pre_hook(next_batch, with_kwargs=True)
        try:
            for index, layer in enumerate(layers):
                # an instance attribute: nn.Module.__call__ calls it (hooks on the layer still run)
                layer.forward = run_or_look_up(index, layer.forward)
            yield
            for entry in entries:
                entry["plan"] = plan
        except BaseException:
            for key in keys:  # their stored states may be half written
                self._stores.pop(key, None)
            raise
        finally:
            handle.remove()
            for layer, forward in zip(layers, own):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
            while self.max_batches is not None and len(self._stores) > self.max_batches:
                self._stores.popitem(last=False)


__all__ = ["PREFIX_REUSE_BYTES", "PrefixReuse", "decoder_layers", "unit_layers"]
