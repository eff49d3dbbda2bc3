"""Paired bootstrap over held-out windows: is one plan's perplexity really lower than another's?

Two plans measured on the same ``n`` windows give two vectors of per-window mean NLL
(:func:`~windquant_gym.eval.perplexity.block_nlls`). The change of perplexity from plan A to
plan B is ``exp(mean(nll_B - nll_A)) - 1`` (every window predicts the same number of tokens,
so the mean of window NLLs is the corpus NLL). Resampling the *windows* with replacement, the
same draw for both plans, gives the spread of that change that the choice of text alone
would cause; its 2.5% and 97.5% quantiles are the 95% interval. An interval that contains 0
is a tie: the windows cannot tell the two plans apart (``benchmarks/RESULTS.md`` and the
README write "tie" for it).

Windows of one article are correlated, so the interval is, if anything, too narrow; the
held-out windows are spread evenly over all 105 articles of the wiki-sample eval split to
keep that small.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Sequence

import numpy as np

from ..errors import ConfigError

DEFAULT_RESAMPLES = 10_000
"""Bootstrap draws; the interval's ends move by < 0.1% of the change between seeds at this size."""


@dataclass(frozen=True)
class PairedComparison:
    """Plan B against plan A on the same windows: ``change`` is ``PPL_B / PPL_A - 1`` (negative:
    B is better), ``low``/``high`` the ends of its ``confidence`` interval."""

    change: float
    low: float
    high: float
    windows: int
    confidence: float = 0.95

    @property
    def tie(self) -> bool:
        """The interval contains 0 (or the change is exactly 0): no difference is shown."""
        return self.low <= 0.0 <= self.high

    @property
    def verdict(self) -> str:
        """``"better"`` (B's PPL lower), ``"worse"`` or ``"tie"``."""
        return "tie" if self.tie else ("better" if self.high < 0 else "worse")

    def describe(self) -> str:
        """e.g. ``-5.5% [-6.5%, -4.5%]`` or ``+0.3% [-0.4%, +1.0%] tie``."""
        return describe_change(self.change, self.low, self.high)

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "tie": self.tie, "verdict": self.verdict}


def describe_change(change: float, low: float, high: float) -> str:
    """A change of PPL and its interval as every table prints it: ``-5.5% [-6.5%, -4.5%]``,
    with `` tie`` appended when the interval contains 0."""
    text = f"{change:+.1%} [{low:+.1%}, {high:+.1%}]"
    return f"{text} tie" if low <= 0.0 <= high else text


def paired_bootstrap(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Plan B's perplexity change against plan A's, with a paired bootstrap interval over the
    windows. ``nll_a``/``nll_b``: per-window mean NLL of the two plans on the same windows."""
    a = np.asarray(nll_a, dtype=np.float64).reshape(-1)
    b = np.asarray(nll_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise ConfigError(
            f"paired_bootstrap needs per-window NLLs of both plans on the same windows (at least 2), got {a.size} and "
            f"{b.size}; measure both with block_nlls(model, windows) on one set of windows."
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("paired_bootstrap got a non-finite window NLL (a plan that diverged); compare finite plans only.")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 100:
        raise ConfigError(f"resamples must be an integer >= 100, got {resamples!r}; e.g. resamples={DEFAULT_RESAMPLES}.")
    if not 0.5 <= confidence < 1.0:
        raise ConfigError(f"confidence must lie in [0.5, 1), got {confidence!r}; e.g. confidence=0.95.")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(int(resamples))
    for start in range(0, len(means), 1000):  # [1000, n] index draws at a time: bounded memory for long texts
        rows = rng.integers(0, diff.size, size=(min(1000, len(means) - start), diff.size))
        means[start : start + len(rows)] = diff[rows].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedComparison(math.expm1(diff.mean()), math.expm1(low), math.expm1(high), int(diff.size), confidence)


__all__ = ["DEFAULT_RESAMPLES", "PairedComparison", "describe_change", "paired_bootstrap"]
