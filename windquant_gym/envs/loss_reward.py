"""ProxyLossReward: a reward whose best episode is the plan with the least proxy loss.

Replaces WindQuant-v0's eq. 5 (which saturates: its perplexity penalty turns logarithmic past
ratio 20, its Lagrange multiplier sits at its cap, and its dense part pays for every bit saved,
so a policy can improve its return while the plan gets worse).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

import gymnasium as gym

from ..errors import ConfigError
from .rewards import budget_excess


@dataclass(frozen=True)
class LossRewardConfig:
    """Constants of :class:`ProxyLossReward`."""

    loss_coef: float = 1.0
    """Terminal reward ``- loss_coef * ln(ppl_ratio)``: the plan's excess proxy loss in nats
    (``L_Q - L_0`` with ``proxy_metric="nll"``, the KL divergence with ``"kl"``)."""
    shaping_coef: float = 1.0
    """Weight of the potential-based dense part (0: terminal reward only)."""
    gamma: float = 1.0
    """Discount the potential is built for, ``F = gamma * Phi(s') - Phi(s)``: set it to the
    algorithm's discount, or the shaping can change which plan is best."""
    budget_coef: float = 10.0
    """``- budget_coef * e`` with ``e`` the relative excess of bits over the target; 0 unless
    the target cannot be met (the env's masks keep every plan within a feasible budget)."""
    version: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "version" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not math.isfinite(value) or value < 0):
                raise ConfigError(f"LossRewardConfig.{f.name} must be a finite number >= 0, got {value!r}.")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"LossRewardConfig.gamma must lie in (0, 1], got {self.gamma!r}; pass the algorithm's "
                              "discount, e.g. gamma=1.0.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LossRewardConfig":
        data = json.loads(text)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"Unknown LossRewardConfig fields {unknown}.")
        return cls(**data)


class ProxyLossReward(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    ## Description

    WindQuant-v0 with another reward (actions, observations, masks and the proxy pass are the
    env's own; the env's eq. 5 is computed and dropped). Terminal:
    ``- loss_coef * ln(ppl_ratio) - budget_coef * max(0, b - b_target) / b_target``. Dense,
    every step: ``F = gamma * Phi(s') - Phi(s)`` with the potential

        Phi(s_t) = - shaping_coef * (E_spent(t) + E_rest(t)) / n_modules,   Phi(s_N) = 0,

    ``E_spent`` the summed module-normalised table error of the actions taken so far and
    ``E_rest`` the least error the remaining units can reach within the remaining bits
    (:meth:`BudgetPrice.lower_bound`). A step that takes the knapsack rule's action leaves
    ``E_spent + E_rest`` about where it was; a step that wastes bits or error lowers it.

    ## Why its optimum is the best plan

    Summed over an episode (discounted by ``gamma``) the dense part telescopes to
    ``gamma^N Phi(s_N) - Phi(s_0) = shaping_coef * E_rest(0) / n_modules``, which depends on the
    target only, not on the plan (Ng, Harada and Russell 1999). What is left,
    ``- loss_coef * ln(ppl_ratio)``, is a strictly decreasing, unbounded function of the proxy
    loss (no cap or saturation at any ratio: a plan at ratio 100 still gains from going to 90),
    and every plan the masks allow meets the budget. So among the plans within the budget the
    highest return belongs to the one with the least proxy loss: the leaderboard's objective.

    ``info["reward_terms"]`` (last step): ``loss``, ``budget_penalty``, ``shaping`` (the
    episode's summed dense part) and ``total`` (the episode's return at ``gamma = 1``).

    ## Arguments

    ``ProxyLossReward(env, config=LossRewardConfig())``.

    ## Version History

    * v0: initial version (with WindQuant-v0).
    """

    def __init__(self, env: gym.Env, config: Optional[LossRewardConfig] = None):
        gym.utils.RecordConstructorArgs.__init__(self, config=config)
        gym.Wrapper.__init__(self, env)
        self.config = config or LossRewardConfig()
        if not isinstance(self.config, LossRewardConfig):
            raise ConfigError(f"config must be a LossRewardConfig, got {type(self.config).__name__}.")
        base = env.unwrapped
        if not hasattr(base, "budget_price"):
            raise ConfigError(f"ProxyLossReward wraps a WindQuant-v0 env, got {type(base).__name__}; "
                              "use gym.make('WindQuant-v0', model=...).")
        self._prices = base.budget_price()
        self._n_modules = len({u.module for u in base.units})
        self._error_spent = 0.0
        self._shaping = 0.0
        self._potential = 0.0  # Phi of the current state: each step computes it once, for s'

    def potential(self) -> float:
        """``Phi`` of the env's current state (0 once the episode has ended)."""
        base = self.env.unwrapped
        if base.unit_index >= base.n_units or self.config.shaping_coef == 0:
            return 0.0
        rest = self._prices.lower_bound(base.unit_index, base.remaining_bits)
        return -self.config.shaping_coef * (self._error_spent + rest) / self._n_modules

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._error_spent = 0.0
        self._shaping = 0.0
        self._potential = self.potential()
        return obs, info

    def step(self, action):
        base = self.env.unwrapped
        before = self._potential
        t = base.unit_index
        obs, _, terminated, truncated, info = self.env.step(action)
        if t < base.n_units:
            self._error_spent += float(self._prices.error[t, info["action"]])
        self._potential = self.potential()
        shaping = self.config.gamma * self._potential - before
        self._shaping += shaping
        reward = shaping
        if terminated:
            ratio = info["ppl_ratio"]
            loss = -self.config.loss_coef * math.log(ratio) if ratio > 0 else 0.0
            excess = budget_excess(info["effective_bits"], info["target_bits"])
            budget_penalty = self.config.budget_coef * excess
            reward += loss - budget_penalty
            info["env_reward_terms"] = info.get("reward_terms")
            info["reward_terms"] = {"loss": loss, "budget_penalty": budget_penalty, "shaping": self._shaping,
                                    "total": loss - budget_penalty + self._shaping}
        return obs, float(reward), terminated, truncated, info

    def action_masks(self):
        return self.env.unwrapped.action_masks()


__all__ = ["LossRewardConfig", "ProxyLossReward"]
