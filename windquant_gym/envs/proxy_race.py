"""Racing proxy measurement: a plan is measured on a few calibration blocks first, and on the
rest only when it may be the best seen at its target.

The search's multi-stage selection (after EvoPress) measures its offspring on a fraction of
the proxy's blocks and only the promising ones on all of them. An env episode can do the same:
most episodes' plans are clearly worse than the best one found at their target, and half the
proxy's tokens say so at half the cost (the episode's time is ~90% the proxy pass). Plans
that come within ``margin`` of the best are measured on the remaining blocks, so the best plan
at every target, the one self-imitation clones and the run returns, is always measured on
every block, as without racing.

The first blocks are drawn at random for every episode (from the env's ``np_random``), and
the plan's NLL on them is compared with the unquantized model's on the same blocks: the
perplexity ratio the reward reads is that excess, and the proxy perplexity reported is the
full baseline's times it, so an estimate and a complete measurement read on one scale.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class RaceMeasurement:
    """What one episode's racing measurement gave."""

    nll: float
    """The plan's mean NLL on every block: measured when ``complete``, else estimated as
    ``base_nll`` plus its excess over the unquantized model on the blocks it was measured on."""
    base_nll: float
    """The unquantized model's mean NLL on every block (the proxy's baseline)."""
    blocks: int
    """Blocks measured: the first draw, or all of them when ``complete``."""
    complete: bool
    """Measured on every block (so comparable with any full proxy pass)."""
    passes: float
    """Proxy passes spent, in full-pass equivalents."""


def check_race(race_blocks: Optional[int], race_margin: float, n_blocks: int, proxy_metric: str) -> None:
    """Raise a ConfigError naming the fix for an unusable ``race_blocks`` / ``race_margin``."""
    if isinstance(race_margin, bool) or not isinstance(race_margin, numbers.Real) or not (0 <= race_margin < math.inf):
        raise ConfigError(f"race_margin must be a number >= 0 (a relative perplexity margin, e.g. 0.01), got {race_margin!r}.")
    if race_blocks is None:
        return
    if isinstance(race_blocks, bool) or not isinstance(race_blocks, numbers.Integral) or not 1 <= race_blocks < n_blocks:
        raise ConfigError(
            f"race_blocks must be an int from 1 to {n_blocks - 1} (blocks of the {n_blocks}-block proxy measured first), "
            f"got {race_blocks!r}; leave it None to measure every block every episode."
        )
    if proxy_metric != "nll":
        raise ConfigError(f"race_blocks works with proxy_metric='nll' only, got proxy_metric={proxy_metric!r}; drop one of them.")


class ProxyRace:
    """``ProxyRace(problem, blocks, margin)``: ``measure(plan, target, rng)`` measures ``plan``
    on ``blocks`` random calibration blocks, and on the others too when its perplexity ratio
    there is within ``(1 + margin)`` times the best complete one at ``target`` (or nothing
    is known there yet)."""

    def __init__(self, problem, blocks: int, margin: float):
        self.problem = problem
        self.blocks = int(blocks)
        self.log_margin = math.log1p(float(margin))
        self.best: Dict[float, float] = {}
        """Per target, the lowest complete ``nll - base_nll`` (log perplexity ratio) seen."""
        before = problem.proxy_passes
        problem.baseline_block_nll()  # now, while the model holds its own weights
        self.setup_passes = problem.proxy_passes - before
        """The unquantized pass for the per-block baseline (0 where the problem had it)."""

    def measure(self, plan: np.ndarray, target: float, rng: np.random.Generator) -> RaceMeasurement:
        problem = self.problem
        n_blocks = len(problem.blocks)
        base = problem.baseline_block_nll()
        first = np.sort(rng.choice(n_blocks, self.blocks, replace=False))
        rest = np.setdiff1d(np.arange(n_blocks), first)
        passes_before = problem.proxy_passes
        with problem.measuring(plan) as measure:
            head = measure(first)
            excess = head.nll - float(base[first].mean())  # log perplexity ratio on these blocks
            best = self.best.get(target)
            if best is not None and not excess <= best + self.log_margin:  # NaN/inf lose too
                return RaceMeasurement(problem.baseline_nll + excess, problem.baseline_nll, len(first), False,
                                       problem.proxy_passes - passes_before)
            tail = measure(rest)
        nll = (head.nll * head.n_positions + tail.nll * tail.n_positions) / (head.n_positions + tail.n_positions)
        base_nll = problem.baseline_nll  # the full pass's baseline, as without racing
        if math.isfinite(nll):
            self.best[target] = min(self.best.get(target, math.inf), nll - base_nll)
        return RaceMeasurement(nll, base_nll, n_blocks, True, problem.proxy_passes - passes_before)

    def consider(self, target: float, ppl_ratio: float) -> None:
        """Count a plan measured on every block elsewhere (e.g. a warm start's) at ``target``."""
        if ppl_ratio > 0 and math.isfinite(ppl_ratio):
            self.best[float(target)] = min(self.best.get(float(target), math.inf), math.log(ppl_ratio))

    def state_dict(self) -> Dict[str, float]:
        return {f"{t!r}": v for t, v in self.best.items()}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.best = {float(t): float(v) for t, v in state.items()}
