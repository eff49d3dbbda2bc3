"""RewardConfig and the two reward functions: dense per-step shaping and eq. 5 at episode end.

Paper values where the paper gives them (epsilon 0.3, perplexity-ratio thresholds 3 and 20,
skip limit 10%, bonus below ratio 2, discount 0.99); the other constants are ours, chosen
so that each term is O(1) on SmolLM2-135M at 2-3 bits and documented field by field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Dict

from ..errors import ConfigError


@dataclass(frozen=True)
class RewardConfig:
    """Every constant of the reward. ``R = alpha*G_c - P_qual - P_budget - P_ppl - P_skip + B_quality``."""

    alpha: float = 1.0
    """Weight of the compression gain ``G_c``."""
    fp32_reference_bits: float = 32.0
    """``G_c = (ref - b) / ref`` with ``b`` the effective bits per weight (paper: FP32)."""
    epsilon: float = 0.3
    """Tolerated relative increase of the proxy loss, ``(L_Q - L_0)/L_0`` (paper eq. 2: 0.3)."""
    lambda_init: float = 1.0
    """Initial Lagrange multiplier of the quality constraint."""
    lambda_lr: float = 0.5
    """Step of the projected gradient ascent ``lambda <- clip(lambda + lr * (dL - epsilon), 0, max)``."""
    lambda_max: float = 10.0
    budget_coef: float = 10.0
    """``P_budget = coef * (e + e^2)``, ``e`` the relative excess of effective bits over the target."""
    ppl_soft: float = 3.0
    """Perplexity ratio where ``P_ppl`` starts (paper: 3)."""
    ppl_hard: float = 20.0
    """Ratio where the linear part ends and the logarithmic part begins (paper: 20)."""
    ppl_soft_coef: float = 1.0
    """``P_ppl`` rises linearly from 0 at ``ppl_soft`` to this value at ``ppl_hard``."""
    ppl_hard_coef: float = 2.0
    """Beyond ``ppl_hard``: ``+ coef * ln(ratio / ppl_hard)`` (logarithmic, so a broken model
    still gets a finite, ordered reward)."""
    skip_limit: float = 0.10
    """Fraction of skipped units tolerated (paper: 10%)."""
    skip_coef: float = 5.0
    """``P_skip = coef * max(0, skip_fraction - skip_limit)``."""
    bonus_ratio: float = 2.0
    """``B_quality = bonus * (bonus_ratio - ratio)`` when the ratio is below this (paper: 2)."""
    bonus: float = 1.0
    step_skip_penalty: float = 0.5
    """Per-step shaping, summed over an episode (each step gets 1/N of it): skipping a unit."""
    step_saving: float = 0.5
    """At or under the target: ``+ step_saving * (target - b_unit) / target`` (saved bits)."""
    step_over_penalty: float = 0.25
    """Over the target: ``- step_over_penalty * (b_unit - target) / target`` (mild)."""
    step_error_coef: float = 0.0
    """Not in the paper (0 = off, the paper's shaping). When positive, every step also pays
    ``- coef * e / n_modules``, ``e`` the chosen action's activation-weighted reconstruction
    error from the table divided by its module's energy: over an episode, ``- coef`` times
    the mean relative error of the decoder's modules. It tells each decision its own cost
    at once instead of only through the episode-end perplexity (see benchmarks/RESULTS.md)."""
    version: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "version" and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise ConfigError(f"RewardConfig.{f.name} must be a finite number >= 0, got {value!r}.")
        if not self.ppl_soft < self.ppl_hard:
            raise ConfigError(f"RewardConfig needs ppl_soft < ppl_hard, got {self.ppl_soft} and {self.ppl_hard}.")
        if self.fp32_reference_bits <= 0:
            raise ConfigError(f"fp32_reference_bits must be positive, got {self.fp32_reference_bits}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RewardConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ConfigError(f"Unknown RewardConfig fields {sorted(set(data) - known)}.")
        return cls(**data)


def budget_excess(effective_bits: float, target_bits: float) -> float:
    """The plan's bits over the target, relative to the target (0 within budget): what both the
    env's budget penalty and :class:`~windquant_gym.envs.ProxyLossReward`'s charge for."""
    return max(0.0, effective_bits - target_bits) / target_bits


def step_reward(config: RewardConfig, unit_bits: float, target_bits: float, skipped: bool, n_units: int) -> float:
    """Dense shaping for one decision; ``unit_bits`` is the unit's effective bits per weight."""
    if skipped:
        return -config.step_skip_penalty / n_units
    if unit_bits <= target_bits:
        return config.step_saving * (target_bits - unit_bits) / target_bits / n_units
    return -config.step_over_penalty * (unit_bits - target_bits) / target_bits / n_units


def final_reward(
    config: RewardConfig,
    *,
    effective_bits: float,
    target_bits: float,
    loss_increase: float,
    ppl_ratio: float,
    skip_fraction: float,
    lagrange_lambda: float,
) -> Dict[str, float]:
    """Eq. 5, term by term; ``total`` is the reward. ``loss_increase`` is ``(L_Q - L_0)/L_0``."""
    ref = config.fp32_reference_bits
    # Capped at the target: compressing below it earns nothing more (protection overhead
    # makes the nominal minimum unreachable anyway).
    gain = min(ref - effective_bits, ref - target_bits) / ref
    excess = budget_excess(effective_bits, target_bits)
    if ppl_ratio <= config.ppl_soft:
        p_ppl = 0.0
    elif ppl_ratio <= config.ppl_hard:
        p_ppl = config.ppl_soft_coef * (ppl_ratio - config.ppl_soft) / (config.ppl_hard - config.ppl_soft)
    else:
        p_ppl = config.ppl_soft_coef + config.ppl_hard_coef * math.log(ppl_ratio / config.ppl_hard)
    terms = {
        "gain": config.alpha * gain,
        "quality_penalty": lagrange_lambda * max(0.0, loss_increase - config.epsilon),
        "budget_penalty": config.budget_coef * (excess + excess * excess),
        "ppl_penalty": p_ppl,
        "skip_penalty": config.skip_coef * max(0.0, skip_fraction - config.skip_limit),
        "quality_bonus": config.bonus * max(0.0, config.bonus_ratio - ppl_ratio),
    }
    terms["total"] = (
        terms["gain"] - terms["quality_penalty"] - terms["budget_penalty"] - terms["ppl_penalty"]
        - terms["skip_penalty"] + terms["quality_bonus"]
    )
    return terms


def update_lambda(config: RewardConfig, lagrange_lambda: float, loss_increase: float) -> float:
    """Projected gradient ascent on the dual variable of ``loss_increase <= epsilon``."""
    return min(config.lambda_max, max(0.0, lagrange_lambda + config.lambda_lr * (loss_increase - config.epsilon)))
