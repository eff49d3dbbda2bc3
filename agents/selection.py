"""Which plan a run returns: the best by the proxy, or the best of a few on a validation split.

The proxy of the CPU presets is small (16 x 128 tokens) and the plans a run keeps were optimised on
it: among near-best plans it ranks held-out perplexity little better than chance (issue 21: over
the 12 returned 2.0-bit plans of four presets x 3 seeds on a Xeon, the proxy's rank correlation
with the held-out PPL was 0.28, 16 x 256 validation tokens' 0.84; benchmarks/selection_study.py).
:class:`ValidationChoice` keeps the proxy's few best plans and returns the one
that is best on blocks of the calibration text's validation split
(:func:`~windquant_gym.data.validation_blocks`: disjoint from the proxy's blocks and from the
statistics set; never the eval split). Every one of its passes is counted as proxy passes (tokens
over the proxy's tokens), so a run that chooses this way says what the choice cost.

Measured (``--preset cpu-quick-kv-select``, 3 seeds; benchmarks/RESULTS.md, "Choosing the returned
plan on the validation split"): no effect held out, because one run's best plans are near
neighbours that 16 windows do not tell apart; the split does tell *runs* apart.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import torch

from ..data import load_texts, validation_blocks
from ..errors import ConfigError


class ValidationChoice:
    """``ValidationChoice(problem, windows=16, seq_len=256)``: ``choose(candidates)`` measures
    each candidate plan (a mapping name -> ``{"plan": actions, ...}``) on the same ``windows``
    blocks of ``seq_len`` tokens of the problem's validation split, at the proxy's precision, and
    returns the name of the one with the lowest mean NLL (ties: the first given). Each
    candidate's ``validation_ppl`` is written into its entry."""

    def __init__(self, problem, windows: int = 16, seq_len: int = 256):
        spec = getattr(problem, "spec", None)
        if spec is None or spec.calibration is None:
            raise ConfigError(
                "Choosing the returned plan on the validation split needs the calibration corpus by name (the problem's "
                "spec.calibration), but this problem was built from texts passed in; build it from a corpus name "
                "(env_kwargs texts: wiki-sample) or drop the recipe's selection: block to choose on the proxy."
            )
        self.problem = problem
        self.blocks: torch.Tensor = validation_blocks(load_texts(spec.calibration, split="calibration"), problem.tokenizer,
                                                      windows, seq_len, (spec.n_samples, spec.seq_len, spec.seed))

    @property
    def passes_per_plan(self) -> float:
        """Proxy passes one candidate costs: its tokens over the proxy's."""
        return self.blocks.numel() / self.problem.blocks.numel()

    def nll(self, plan: Sequence[int]) -> float:
        """Mean NLL of the validation blocks with ``plan`` applied (weights restored after)."""
        with self.problem.measuring(list(plan), blocks=self.blocks) as measure:
            return float(measure().nll)

    def choose(self, candidates: Mapping[str, Dict[str, Any]]) -> str:
        if not candidates:
            raise ValueError("ValidationChoice.choose needs at least one candidate plan.")
        seen: Dict[bytes, float] = {}
        for entry in candidates.values():
            key = np.asarray(entry["plan"], dtype=np.int64).tobytes()  # as agents/front.py's HeldoutCache keys plans
            if key not in seen:  # the same plan twice (the policy's may be a seen one): measured once
                seen[key] = self.nll(entry["plan"])
            entry["validation_ppl"] = math.exp(seen[key])
        return min(candidates, key=lambda name: candidates[name]["validation_ppl"])


def top_plans(ranked: List[Dict[str, Any]], entry: Dict[str, Any], keep: int, score: str) -> List[Dict[str, Any]]:
    """``ranked`` (best first by ``score``, distinct plans) with ``entry`` in its place, at most
    ``keep`` long; ``entry`` is dropped when its plan is already there or it ranks below them."""
    plan = list(entry["plan"])
    if any(list(other["plan"]) == plan for other in ranked):
        return ranked
    merged = sorted([*ranked, entry], key=lambda e: e[score])  # stable: an equal newcomer goes after
    return merged[:keep]
