"""QuantProblem: a model, its units, calibration blocks and statistics, and its table:
everything an episode (or any allocator) needs, prepared once and cached on disk."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .calibration import Calibration, calibrate
from .data import load_texts, sample_token_blocks
from .eval.perplexity import mean_nll
from .fingerprint import tensors_fingerprint
from .paths import cache_dir
from .quant.apply import WeightAssembler, quantized_weights
from .quant.config import QuantConfig
from .quant.table import QuantTable, build_table
from .quant.units import Unit, find_units, module_names


def _cached_calibration(model, units, blocks, batch_size, cache, progress) -> Calibration:
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    names = module_names(units)
    key = tensors_fingerprint([(n, model.get_submodule(n).weight) for n in names] + [("blocks", blocks)], "calibration-1")
    path = (cache_dir("calibration") if cache is True else Path(cache)) / f"{key}.safetensors" if cache else None
    if path is not None and path.exists():
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        return Calibration(load_file(str(path)), float(meta["nll"]), int(meta["n_tokens"]))
    result = calibrate(model, units, blocks, batch_size=batch_size, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in result.act_scales.items()}, str(path),
                  metadata={"nll": repr(result.nll), "n_tokens": str(result.n_tokens)})
    return result


@dataclass
class QuantProblem:
    model: nn.Module
    tokenizer: object
    units: list
    blocks: torch.Tensor
    """``[n_samples, seq_len]`` calibration token blocks (also the proxy perplexity's text)."""
    calibration: Calibration
    table: QuantTable
    batch_size: int = 8
    _assembler: Optional[WeightAssembler] = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer,
        texts: str | Sequence[str] = "wiki-sample",
        config: QuantConfig = QuantConfig(),
        *,
        n_samples: int = 64,
        seq_len: int = 256,
        seed: int = 0,
        batch_size: int = 8,
        cache: bool | str | Path = True,
        progress: bool = True,
    ) -> "QuantProblem":
        """Sample calibration blocks, calibrate (cached), and build the table (cached)."""
        documents = load_texts(texts, split="calibration") if isinstance(texts, (str, Path)) else list(texts)
        blocks = sample_token_blocks(documents, tokenizer, n_samples, seq_len, seed)
        units = find_units(model, config.chunk_size)
        calibration = _cached_calibration(model, units, blocks, batch_size, cache, progress)
        table = build_table(model, calibration.act_scales, config, cache=cache, progress=progress)
        return cls(model, tokenizer, units, blocks, calibration, table, batch_size)

    @property
    def baseline_ppl(self) -> float:
        """Proxy perplexity of the unquantized model."""
        return math.exp(self.calibration.nll)

    def proxy_nll(self, plan: Sequence[int], progress: bool = False) -> float:
        """Mean NLL on the calibration blocks with ``plan`` applied (weights restored after)."""
        if self._assembler is None:
            self._assembler = WeightAssembler(self.model, self.table)
        with quantized_weights(self.model, self.table, plan, self._assembler):
            return mean_nll(self.model, self.blocks, batch_size=self.batch_size, progress=progress)

    def proxy_ppl(self, plan: Sequence[int], progress: bool = False) -> float:
        return math.exp(self.proxy_nll(plan, progress))
