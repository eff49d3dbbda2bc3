"""QuantProblem: a model, its units, calibration blocks and statistics, and its table:
everything an episode (or any allocator) needs, prepared once and cached on disk."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import operator
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .cache import atomic_path, load_or_build, source_version
from .calibration import Calibration, calibrate
from .data import load_texts, sample_token_blocks, statistics_blocks, token_stream
from .errors import ConfigError
from .compute.kernels import check_proxy_dtype, proxy_precision, proxy_weight_dtype, resolve_proxy_dtype, warn_if_bf16_is_emulated
from .memory import check_memory, resolve_stream
from .eval.divergence import DEFAULT_TOPK, TopKReference
from .eval.perplexity import TokenLosses, block_nlls, mean_nll, token_losses, topk_reference
from .eval.prefix_reuse import PrefixReuse
from .eval.sensitivity import fisher_sensitivity
from .fingerprint import tensors_fingerprint
from .paths import cache_dir
from .quant.apply import WeightAssembler, quantized_weights, streamed_quantized_weights
from .quant.config import QuantConfig
from .quant.build import build_table, describe_model
from .quant.table import QuantTable
from .quant.units import Unit, check_weights, find_units, module_names


def check_block_rows(rows: Sequence[int], n_blocks: int) -> np.ndarray:
    """``rows`` as sorted distinct block indices in ``[0, n_blocks)``, else a ConfigError."""
    index = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
    if index.size == 0 or index.size != np.asarray(rows).size or index[0] < 0 or index[-1] >= n_blocks:
        raise ConfigError(
            f"rows must be distinct indices of the {n_blocks} calibration blocks (0 ... {n_blocks - 1}), at least one, "
            f"got {list(np.asarray(rows).reshape(-1))[:8]}; pass None to measure all of them."
        )
    return index


CALIBRATION_FORMAT = 3
"""Bump when what a cached calibration holds changes; its code (``calibration.py``) is hashed
into the key as well."""


def calibration_key(model: nn.Module, units: List[Unit], blocks: torch.Tensor) -> str:
    """The calibration cache key: every parameter and buffer of the model (the embeddings and
    norms shape the activations as much as the quantized Linears do), its config, the token
    blocks, the chunk widths (the Hessian blocks follow the chunking) and the calibration code."""
    config = getattr(model, "config", None)
    config_text = ""
    if config is not None and hasattr(config, "to_dict"):
        config_text = json.dumps({k: v for k, v in config.to_dict().items()
                                  if not k.startswith("_") and k != "transformers_version"}, sort_keys=True, default=str)
    tensors = [*((f"p:{n}", p) for n, p in model.named_parameters()),
               *((f"b:{n}", b) for n, b in model.named_buffers()), ("blocks", blocks)]
    widths = ",".join(str(u.width) for u in units)
    return tensors_fingerprint(tensors, calibration_code_version(), type(model).__name__, config_text, widths)


@functools.lru_cache(maxsize=None)
def calibration_code_version() -> str:
    """The calibration format and a hash of the code that computes a calibration (the scales
    and Hessians: ``calibration.py``; the stored NLL: ``eval/perplexity.py``; the units the
    Hessians are cut by: ``quant/units.py``): part of the cache key."""
    import importlib

    modules = ("calibration", "eval.perplexity", "quant.units")
    code = source_version(Path(importlib.import_module(f"{__package__}.{m}").__file__) for m in modules)
    return f"calibration-{CALIBRATION_FORMAT}-{code}"


def _load_calibration(path: Path) -> Calibration:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    scales = {k[len("scale:"):]: v for k, v in tensors.items() if k.startswith("scale:")}
    owners = json.loads(meta["hessian_owners"])
    hessians = {name: tensors[f"hessian:{owner}"] for name, owner in owners.items()}
    return Calibration(scales, float(meta["nll"]), int(meta["n_tokens"]), hessians, json.loads(meta["chunk_size"]))


def _save_calibration(result: Calibration, path: Path, model_name: str) -> None:
    from safetensors.torch import save_file

    # modules reading one input share one Hessian tensor: store it once, under its first reader
    owners, first = {}, {}
    for name, hessian in result.hessians.items():
        owners[name] = first.setdefault(id(hessian), name)
    tensors = {f"scale:{k}": v.contiguous() for k, v in result.act_scales.items()}
    tensors.update({f"hessian:{owner}": result.hessians[owner].contiguous() for owner in set(owners.values())})
    with atomic_path(path) as tmp:  # a crash mid-write never leaves a half file behind
        save_file(tensors, str(tmp), metadata={"nll": repr(result.nll), "n_tokens": str(result.n_tokens), "model": model_name,
                                              "code": calibration_code_version(),
                                              "hessian_owners": json.dumps(owners), "chunk_size": json.dumps(result.chunk_size)})


def _cached_calibration(model, units, blocks, batch_size, cache, progress) -> Calibration:
    def run() -> Calibration:
        return calibrate(model, units, blocks, batch_size=batch_size, progress=progress)

    if not cache:
        return run()
    path = (cache_dir("calibration") if cache is True else Path(cache)) / f"{calibration_key(model, units, blocks)}.safetensors"
    return load_or_build(path, _load_calibration, run, lambda result, p: _save_calibration(result, p, describe_model(model)),
                         "calibration")


@dataclass(frozen=True)
class ProblemSpec:
    """What rebuilds a :class:`QuantProblem` from scratch: the model by name, the calibration
    corpus by name, the calibration seed and sizes, the quant config and the proxy precision.
    Saved inside every plan file, so ``windquant export PLAN`` / ``windquant plot PLAN`` rebuild
    the very problem (hence the table) the plan was made on, with no preset to remember."""

    model: Optional[str]
    """A :func:`~windquant_gym.load_model` name or folder; None for a model passed as a module."""
    calibration: Optional[str]
    """A :func:`~windquant_gym.load_texts` corpus name or path; None for texts passed as a list."""
    seed: int
    """Picks the calibration blocks (the proxy's text)."""
    n_samples: int
    seq_len: int
    quant_config: QuantConfig
    proxy_dtype: str = "float32"
    version: int = 1

    def __post_init__(self) -> None:
        for name, least, example in (("seed", 0, "seed=0"), ("n_samples", 1, "n_samples=64"), ("seq_len", 2, "seq_len=256")):
            value = getattr(self, name)
            try:
                number = operator.index(value)  # ints and numpy integers, not floats or bools
            except TypeError:
                number = None
            if isinstance(value, bool) or number is None or number < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}; e.g. {example}.")
            object.__setattr__(self, name, int(number))
        if not isinstance(self.quant_config, QuantConfig):
            raise ConfigError(f"ProblemSpec.quant_config must be a QuantConfig, got {type(self.quant_config).__name__}.")
        object.__setattr__(self, "proxy_dtype", check_proxy_dtype(self.proxy_dtype))

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["quant_config"] = self.quant_config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ProblemSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown ProblemSpec fields {unknown}; known: {sorted(known)}.")
        return cls(**{**data, "quant_config": QuantConfig.from_dict(data["quant_config"])})

    def build(self, device: str = "auto", **build_kwargs) -> "QuantProblem":
        """Load the model and build its problem (calibration and table from the cache when
        there). ``build_kwargs`` go to :meth:`QuantProblem.build` (cache, progress, stream, ...)."""
        if self.model is None:
            raise ConfigError(
                "This problem was built from a model passed as a module, not by name, so the plan file cannot say where "
                "to load it from: name it (windquant export/plot PLAN --model NAME_OR_FOLDER, or "
                "plan.problem_spec(model=...)), or build the QuantProblem in Python."
            )
        if self.calibration is None:
            raise ConfigError(
                "This problem was calibrated on texts passed as a list, not a corpus name, so it cannot be rebuilt from "
                "the plan file: build the QuantProblem in Python with the same texts (QuantProblem.build(model, "
                "tokenizer, texts, plan.quant_config, ...)) and pass it to export_plan."
            )
        from .models import load_model

        model, tokenizer = load_model(self.model, device=device, progress=build_kwargs.get("progress", True))
        return QuantProblem.build(model, tokenizer, self.calibration, self.quant_config, n_samples=self.n_samples,
                                  seq_len=self.seq_len, seed=self.seed, proxy_dtype=self.proxy_dtype,
                                  model_name=self.model, **build_kwargs)


@dataclass
class QuantProblem:
    model: nn.Module
    tokenizer: object
    units: list
    blocks: torch.Tensor
    """``[n_samples, seq_len]`` calibration token blocks (also the proxy perplexity's text)."""
    calibration: Calibration
    """The activation scales and Hessian blocks the table was fitted with (from the statistics set,
    :func:`~windquant_gym.data.statistics_blocks`, when ``QuantConfig.hessian_blocks > 0``, else
    from ``blocks``) and the unquantized model's NLL on ``blocks`` (the proxy's baseline)."""
    table: QuantTable
    batch_size: int = 8
    stream: bool = False
    """Assemble one decoder layer at a time during the proxy pass (see :meth:`proxy_nll`)."""
    proxy_dtype: str = "float32"
    """Precision of the proxy pass: ``float32`` (default) or ``bfloat16`` (autocast: matrix
    products in bf16; 1.4-1.6x faster on an AVX-512-bf16 CPU, same ranking of plans in
    ``benchmarks/proxy_precision.py``); ``auto`` is resolved to one of them for the model's
    device (:func:`~windquant_gym.compute.kernels.resolve_proxy_dtype`). Held-out evaluation
    stays in the model's dtype."""
    spec: Optional[ProblemSpec] = None
    """How to rebuild this problem (set by :meth:`build`); plans made on it carry it."""
    reuse_prefix: bool = True
    """Start each proxy pass at the first decoder layer whose units' actions differ from the last
    pass's (:class:`~windquant_gym.eval.prefix_reuse.PrefixReuse`): a search's offspring, which
    change a unit or two, skip the layers in front of it. Same NLL (bit for bit on the same
    batches); off for a streamed problem or where the stored states would pass 1 GiB."""
    statistics_blocks: Optional[torch.Tensor] = None
    """The statistics set's ``[n, L]`` token blocks (:attr:`QuantConfig.hessian_blocks`), where
    :meth:`module_sensitivity` is measured; None: the proxy's :attr:`blocks` serve."""
    # Not constructor arguments: dataclasses.replace() must give a copy its own buffers and
    # baseline (the copy may hold another table or other blocks).
    _assembler: Optional[WeightAssembler] = field(default=None, init=False, repr=False, compare=False)
    _baseline_nll: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _kl_reference: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _prefix: Optional[PrefixReuse] = field(default=None, init=False, repr=False, compare=False)
    _sensitivity: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    last_timing: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    proxy_passes: float = field(default=0.0, init=False, repr=False, compare=False)
    """Proxy passes made on this problem since it was made, in full-pass equivalents (a pass on
    a quarter of the proxy's tokens counts 0.25): every :meth:`proxy_losses` call and every
    measurement of a search's fitness. What an allocator spent is the difference across its
    run; the baseline pass made with the calibration is not counted."""

    def __post_init__(self) -> None:
        self.proxy_dtype = resolve_proxy_dtype(self.proxy_dtype, next(self.model.parameters()).device)
        warn_if_bf16_is_emulated(next(self.model.parameters()).device, self.proxy_dtype)
        self.baseline_nll  # now, while the model holds its own weights (not a plan's)

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
        stream: bool | str = "auto",
        table_device: Optional[str | torch.device] = None,
        proxy_dtype: str = "float32",
        model_name: Optional[str] = None,
    ) -> "QuantProblem":
        """Sample calibration blocks, calibrate (cached), and build the table (cached).

        For models whose six quantized copies do not fit beside them on the accelerator,
        ``table_device="cpu"`` keeps the table in host memory (fitting still runs on the
        model's device) and ``stream=True`` assembles one decoder layer at a time. The default,
        ``stream="auto"``, streams on the CPU when that lowers the memory estimate and the
        whole-model one would take more than 40% of the available memory
        (:func:`~windquant_gym.memory.choose_stream`; from ~1B parameters on a 24 GiB machine);
        the NLL is the same either way.

        The cheap checks come first, so bad input fails in milliseconds with a named error:
        the config, the tokenizer, the model's structure and weights (NaN, Inf or beyond
        float16 is refused before any forward pass), then the text.

        ``model_name``: the :func:`~windquant_gym.load_model` name of ``model``, recorded in
        :attr:`spec` (with ``texts`` when it is a corpus name) so that plans can rebuild it."""
        first = next(model.parameters(), None) if isinstance(model, nn.Module) else None  # a bad model is named below
        proxy_dtype = resolve_proxy_dtype(proxy_dtype, "cpu" if first is None else first.device)  # "auto": bf16 where native
        if not isinstance(config, QuantConfig):
            raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}; e.g. QuantConfig(chunk_size=256).")
        if tokenizer is None:
            raise ConfigError(
                f"QuantProblem.build got a {type(model).__name__} but no tokenizer: pass the tokenizer that goes "
                "with the model (load_model returns both)."
            )
        spec = ProblemSpec(model_name, str(texts) if isinstance(texts, (str, Path)) else None, seed, n_samples, seq_len,
                           config, proxy_dtype)  # checks the sizes and the seed too
        units = find_units(model, config.chunk_size)
        check_weights(model, units)
        # before the first large allocation: a model that does not fit is told so by name
        device = next(model.parameters()).device
        stream, needed = resolve_stream(model, module_names(units), config.chunk_size, batch_size=batch_size,
                                        n_blocks=spec.n_samples, seq_len=spec.seq_len, salient_rate=config.salient_rate,
                                        stream=stream, device=device)
        check_memory(needed, device)
        documents = load_texts(texts, split="calibration") if isinstance(texts, (str, Path)) else texts
        stream_of_tokens = token_stream(documents, tokenizer) if config.hessian_blocks else None  # tokenized once
        statistics_set = None
        blocks = sample_token_blocks(documents, tokenizer, spec.n_samples, spec.seq_len, spec.seed, stream=stream_of_tokens)
        calibration = _cached_calibration(model, units, blocks, batch_size, cache, progress)
        if config.hessian_blocks:
            # scales and Hessians from their own, larger text; the proxy's NLL stays the proxy's. (The
            # statistics pass runs before the table exists, so it adds nothing to the estimated peak.)
            statistics_set = statistics_blocks(documents, tokenizer, config.hessian_blocks, config.hessian_seq_len,
                                               (spec.n_samples, spec.seq_len, spec.seed), stream=stream_of_tokens)
            statistics = _cached_calibration(model, units, statistics_set, batch_size, cache, progress)
            calibration = replace(statistics, nll=calibration.nll, n_tokens=calibration.n_tokens)
        table = build_table(model, calibration.act_scales, config, hessians=calibration.hessians, cache=cache, progress=progress,
                            storage_device=table_device, units=units)
        return cls(model, tokenizer, units, blocks, calibration, table, batch_size, stream, proxy_dtype, spec,
                   statistics_blocks=statistics_set)

    @property
    def baseline_nll(self) -> float:
        """Proxy NLL of the unquantized model, at the proxy's precision. The float32 one comes
        with the calibration; another costs one pass, made when the problem is made (or on the
        first read after ``proxy_dtype`` is changed: read it then outside any
        ``quantized_weights`` block, or it measures the plan applied there)."""
        if self.proxy_dtype == "float32":
            return self.calibration.nll
        if self.proxy_dtype not in self._baseline_nll:
            device = next(self.model.parameters()).device
            with proxy_precision(device, self.proxy_dtype):
                self._baseline_nll[self.proxy_dtype] = mean_nll(self.model, self.blocks, batch_size=self.batch_size)
        return self._baseline_nll[self.proxy_dtype]

    @property
    def baseline_ppl(self) -> float:
        """Proxy perplexity of the unquantized model."""
        return math.exp(self.baseline_nll)

    def kl_reference(self, blocks: Optional[torch.Tensor] = None, k: int = DEFAULT_TOPK) -> TopKReference:
        """The unquantized model's top-``k`` next-token distributions on the proxy blocks
        (cached) or on other ``blocks``, at the proxy's precision: what ``proxy_metric="kl"``
        and the search's KL fitness compare against (see :mod:`windquant_gym.eval.divergence`).
        One pass, made with the model's own weights: do not call it inside a
        ``quantized_weights`` block (:meth:`proxy_losses` makes it before it applies a plan)."""
        device = next(self.model.parameters()).device
        if blocks is not None:
            with proxy_precision(device, self.proxy_dtype):
                return topk_reference(self.model, blocks, k, batch_size=self.batch_size)
        key = (self.proxy_dtype, k)
        if key not in self._kl_reference:
            with proxy_precision(device, self.proxy_dtype):
                self._kl_reference[key] = topk_reference(self.model, self.blocks, k, batch_size=self.batch_size)
        return self._kl_reference[key]

    def proxy_losses(self, plan: Optional[Sequence[int]], kl: bool = False, progress: bool = False) -> TokenLosses:
        """Mean NLL on the calibration blocks with ``plan`` applied (``None``: the unquantized
        model), and with ``kl=True`` the mean KL to the unquantized model's next-token
        distributions (:meth:`kl_reference`), both from one pass; the weights are restored
        after. ``last_timing`` then holds the seconds spent assembling weights and the rest of
        the forward pass. With ``stream=True`` each decoder layer gets its quantized weights
        only while it runs (one layer's worth of extra memory) and the blocks go as one batch."""
        with self.measuring(plan, kl=kl, progress=progress) as measure:
            return measure()

    @contextlib.contextmanager
    def measuring(self, plan: Optional[Sequence[int]], kl: bool = False, progress: bool = False,
                  blocks: Optional[torch.Tensor] = None):
        """``with problem.measuring(plan) as measure:`` applies ``plan`` once; each
        ``measure(rows)`` is a pass over ``blocks[rows]`` (``None``: all of them) returning its
        :class:`TokenLosses`, and counts its tokens over the proxy's as proxy passes. Lets a
        caller measure a few blocks first and the rest only if worth it (the env's
        ``race_blocks``) without assembling the plan twice. ``blocks``: other token blocks than
        the proxy's (a validation split; no KL there), at the proxy's precision. Weights
        restored on exit."""
        if kl and blocks is not None:
            raise ValueError("measuring(kl=True) measures KL on the proxy's own blocks only (its reference is theirs); "
                             "pass blocks=None, or kl=False for other blocks.")
        reference = self.kl_reference() if kl else None  # before a plan is applied
        device = next(self.model.parameters()).device
        precision = proxy_precision(device, self.proxy_dtype)

        def measure(rows: Optional[Sequence[int]] = None) -> TokenLosses:
            return self.forward_pass(plan, rows, blocks=blocks, reference=reference, progress=progress)

        if plan is None:
            with precision:
                yield measure
            return
        assembler = self.assembler(per_layer=self.stream, proxy=True)
        started, assembled_before = time.perf_counter(), assembler.seconds
        weights = (streamed_quantized_weights if self.stream else quantized_weights)(self.model, self.table, plan, assembler)
        with weights, precision:
            yield measure
        assemble = assembler.seconds - assembled_before
        self.last_timing = {"assemble_seconds": assemble, "forward_seconds": time.perf_counter() - started - assemble}

    def forward_pass(self, plan: Optional[Sequence[int]], rows: Optional[Sequence[int]] = None,
                     blocks: Optional[torch.Tensor] = None, reference: Optional[TopKReference] = None,
                     progress: bool = False) -> TokenLosses:
        """One pass over ``blocks[rows]`` (``blocks``: the proxy's own by default; ``rows``:
        ``None`` for all) with the weights the model holds now, which must be ``plan``'s
        (``None``: its own). Every measurement of a plan (:meth:`measuring`, the search's
        :class:`~windquant_gym.allocators.fitness.ProxyFitness`) runs and is counted here: it adds
        its tokens over the proxy's to :attr:`proxy_passes`. ``reference`` is the KL reference on all of ``blocks``
        (its ``rows`` are taken here). On the proxy's own blocks with a plan applied, the layers
        in front of the first one the plan changed are looked up (:meth:`prefix_reuse`); a
        streamed problem sends the blocks as one batch, as its weights are assembled per layer."""
        own = blocks is None or blocks is self.blocks
        blocks = self.blocks if blocks is None else blocks
        index = None if rows is None else check_block_rows(rows, len(blocks))
        if index is not None:
            blocks = blocks[torch.as_tensor(index, dtype=torch.long)]
            reference = None if reference is None else reference.rows(index)
        self.proxy_passes += blocks.numel() / self.blocks.numel()
        streamed = plan is not None and self.stream
        size = len(blocks) if streamed else self.batch_size
        reuse = own and plan is not None and not self.stream
        with (self.prefix_reuse(plan, index, size) if reuse else contextlib.nullcontext()):
            return token_losses(self.model, blocks, size, reference, progress=progress)

    def baseline_block_nll(self) -> np.ndarray:
        """``[n_blocks]`` the unquantized model's mean NLL on each calibration block, at the
        proxy's precision (one pass, the first time; read it outside any
        ``quantized_weights`` block; it counts in :attr:`proxy_passes`). Their mean is
        :attr:`baseline_nll` up to rounding: what a pass over some of the blocks is compared with."""
        key = ("blocks", self.proxy_dtype)
        if key not in self._baseline_nll:
            self.proxy_passes += 1.0
            device = next(self.model.parameters()).device
            with proxy_precision(device, self.proxy_dtype):
                self._baseline_nll[key] = block_nlls(self.model, self.blocks, batch_size=self.batch_size).numpy()
        return self._baseline_nll[key]

    def prefix_reuse(self, plan: Sequence[int], rows: Optional[Sequence[int]], batch_size: int):
        """Context for one proxy pass over ``blocks[rows]`` (None: all) with ``plan`` applied: the
        layers in front of the first changed one are looked up (see :attr:`reuse_prefix`); a
        no-op where reuse is off. Only around passes over the proxy's own blocks."""
        if not self.reuse_prefix or self.stream:
            return contextlib.nullcontext()
        if self._prefix is None or self._prefix.n_blocks != len(self.blocks):
            self._prefix = PrefixReuse.for_model(self.model, [u.module for u in self.units], self.blocks, self.batch_size)
            if self._prefix is None:
                self.reuse_prefix = False
                return contextlib.nullcontext()
        return self._prefix.measuring(plan, rows, batch_size, context=(self.proxy_dtype, id(self.blocks), id(self.table)))

    def assembler(self, per_layer: bool = False, proxy: bool = False) -> WeightAssembler:
        """The problem's reusable weight buffers (one layer's, shared by every layer, with
        ``per_layer=True``, as the streamed pass needs). ``proxy=True``: buffers for the proxy
        pass, in the proxy precision's weight dtype (bf16 for the bf16 proxy: use them only
        inside :func:`~windquant_gym.compute.kernels.proxy_precision`); otherwise the weights' own."""
        dtype = proxy_weight_dtype(self.proxy_dtype) if proxy else None
        current = self._assembler
        if current is None or current.per_layer != per_layer or current.dtype != dtype:
            self._assembler = WeightAssembler(self.model, self.table, per_layer=per_layer, dtype=dtype)
        return self._assembler

    def proxy_nll(self, plan: Sequence[int], progress: bool = False) -> float:
        """Mean NLL on the calibration blocks with ``plan`` applied (see :meth:`proxy_losses`)."""
        return self.proxy_losses(plan, progress=progress).nll

    def proxy_ppl(self, plan: Sequence[int], progress: bool = False) -> float:
        return math.exp(self.proxy_nll(plan, progress))

    def proxy_kl(self, plan: Optional[Sequence[int]], progress: bool = False) -> float:
        """Mean KL divergence (nats per position) of the plan's next-token distributions from
        the unquantized model's on the calibration blocks; 0 for ``plan=None``."""
        return self.proxy_losses(plan, kl=True, progress=progress).kl

    def module_sensitivity(self, label_samples: int = 2, seed: int = 0, progress: bool = False) -> Dict[str, float]:
        """Each quantized module's Fisher sensitivity ``S_m``: twice the KL growth (summed over the
        measured positions) per unit of its relative output error
        (:func:`~windquant_gym.eval.sensitivity.fisher_sensitivity`), keyed
        by module name: measured once per problem, on the statistics set (:attr:`statistics_blocks`;
        the proxy's blocks where there is none), with the model's own weights (do not call it inside
        a ``quantized_weights`` block). Costs one forward and ``label_samples`` backward passes over
        that text, at the proxy's precision; no proxy pass. ``seed`` draws the labels."""
        if (label_samples, seed) not in self._sensitivity:
            blocks = self.blocks if self.statistics_blocks is None else self.statistics_blocks
            self._sensitivity[label_samples, seed] = fisher_sensitivity(
                self.model, module_names(self.units), blocks, label_samples=label_samples, seed=seed,
                dtype=self.proxy_dtype, progress=progress)
        return dict(self._sensitivity[label_samples, seed])  # a copy: the kept one stays as measured
