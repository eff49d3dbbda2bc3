"""ActionCostObservation: what each action of the current unit would cost, beside the paper's
15 features, so that a policy can compare actions instead of guessing from weight statistics."""

from __future__ import annotations

import math
from typing import Tuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..errors import ConfigError
from ..quant.bitwidths import N_ACTIONS
from ..quant.module_kinds import MODULE_KINDS, N_KINDS, module_kind

GAP_CAP_BITS = 8.0
"""Lagrangian gaps are clipped here (bits per weight); forbidden actions read as the cap."""
ERROR_FLOOR = 1e-9
"""Table errors below this (FP16 keeps a unit exactly) read as the floor on the log scale."""
_STATIC_DIMS = (0, 1, 2, 3, 4, 9, 10, 11)  # per-unit statistics of the paper's 15 (Table 1)
_LOG_DIMS = (1, 2, 9, 10, 11)  # positive, heavy-tailed (late layers' activations): standardised on a log scale

OBSERVATION_LAYOUT: Tuple[Tuple[str, int], ...] = (
    ("paper", 15), ("log_error", N_ACTIONS), ("bits", N_ACTIONS), ("gap", N_ACTIONS), ("log_price", 1),
    ("bits_per_remaining_weight", 1), ("layer", 1), ("column", 1), ("module_kind", N_KINDS),
)
"""Blocks of the observation, in order, with their widths."""
OBSERVATION_DIM = sum(width for _, width in OBSERVATION_LAYOUT)


class ActionCostObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """
    ## Description

    Replaces WindQuant-v0's observation (paper Table 1) with one that says, for the unit being
    decided, what each of the 7 actions would cost in table error and in bits, what a bit is
    worth given the budget left (the knapsack's Lagrangian price, :class:`BudgetPrice`), and
    where the unit sits in the model. The paper's 15 features stay in front. The env's
    rewards, actions and masks are unchanged; composes with :class:`CurriculumWrapper` and
    :class:`ProxyLossReward` in any order.

    ## Observation Space

    ``Box(-inf, inf, (48,), float32)``, blocks in order (:data:`OBSERVATION_LAYOUT`):

    * 0-14 ``paper``: the env's 15 features; with ``normalize`` the 8 per-unit statistics
      (dims 0-4, 9-11: weight and activation-scale statistics, whose scales differ by 1e5)
      are standardised by their mean and spread over the model's units, the positive
      heavy-tailed ones (1, 2, 9-11) on a log scale;
    * 15-21 ``log_error``: ``ln max(e_a, 1e-9)`` of each action, ``e`` the table's
      module-normalised error (the knapsack's objective); with ``normalize`` standardised over
      the whole table;
    * 22-28 ``bits``: each action's effective bits per weight of this unit, / 16;
    * 29-35 ``gap``: ``(e_a + lam c_a - min_b (e_b + lam c_b)) / (lam n)`` in bits per weight at
      the current price ``lam`` (0: the action the knapsack's rule takes), clipped at 8,
      forbidden actions at 8; with ``normalize`` / 8;
    * 36 ``log_price``: ``ln lam``, with ``normalize`` mapped from the grid's range to [-1, 1];
    * 37 ``bits_per_remaining_weight``: remaining budget per remaining weight over the target
      (1: on track; < 1: overspent so far);
    * 38 ``layer``: ``layer / (n_layers - 1)``; 39 ``column``: the unit's first input column
      over the module's input width;
    * 40-47 ``module_kind``: one-hot q, k, v, o, gate, up, down, other (:data:`MODULE_KINDS`).

    ## Arguments

    ``ActionCostObservation(env, normalize=True)``: ``env`` a WindQuant-v0 env, wrapped or
    not; ``normalize=False`` gives the raw values (the ablation of the scaling).

    ## Version History

    * v0: initial version (with WindQuant-v0).
    """

    def __init__(self, env: gym.Env, normalize: bool = True):
        gym.utils.RecordConstructorArgs.__init__(self, normalize=normalize)
        gym.ObservationWrapper.__init__(self, env)
        base = env.unwrapped
        if not hasattr(base, "budget_price") or not hasattr(base, "table"):
            raise ConfigError(f"ActionCostObservation wraps a WindQuant-v0 env, got {type(base).__name__}; "
                              "use gym.make('WindQuant-v0', model=...).")
        self.normalize = bool(normalize)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(OBSERVATION_DIM,), dtype=np.float32)
        self._prices = base.budget_price()
        table, units = base.table, base.units
        n_weights = table.n_weights.astype(np.float64)
        self._bits = table.unit_effective_bits / n_weights[:, None]
        self._n = n_weights
        log_error = np.log(np.maximum(self._prices.error, ERROR_FLOOR))
        self._static_shift = np.zeros(15)
        self._static_scale = np.ones(15)
        self._log_price_shift, self._log_price_scale = 0.0, 1.0
        if self.normalize:
            stats = np.stack([self._paper_transform(base, dim) for dim in _STATIC_DIMS], axis=1)
            self._static_shift[list(_STATIC_DIMS)] = stats.mean(axis=0)
            self._static_scale[list(_STATIC_DIMS)] = np.where(stats.std(axis=0) > 0, stats.std(axis=0), 1.0)
            log_error = (log_error - log_error.mean()) / max(log_error.std(), 1e-12)
            low, high = math.log(self._prices.lowest_price), math.log(self._prices.highest_price)
            self._log_price_shift, self._log_price_scale = (low + high) / 2, max((high - low) / 2, 1e-12)
        self._log_error = log_error
        n_layers = max(u.layer for u in units) + 1
        self._position = np.array([[u.layer / max(n_layers - 1, 1), u.col_start / u.in_features] for u in units])
        self._kind = np.zeros((len(units), N_KINDS))
        self._kind[np.arange(len(units)), [module_kind(u.module) for u in units]] = 1.0

    @staticmethod
    def _paper_transform(base, dim: int) -> np.ndarray:
        """Every unit's value of the paper's feature ``dim`` (log where heavy-tailed)."""
        column = base.unit_statistics[:, dim if dim < 5 else dim - 4]
        return np.log(np.maximum(column, 1e-12)) if dim in _LOG_DIMS else column

    def observation(self, observation: np.ndarray) -> np.ndarray:
        base = self.env.unwrapped
        t = min(base.unit_index, base.n_units - 1)
        remaining = base.remaining_bits
        price = self._prices.price(base.unit_index, remaining) if base.unit_index < base.n_units else 0.0
        gap = np.minimum(self._prices.gaps(t, price) / self._n[t], GAP_CAP_BITS)
        on_track = base.budget_pace
        log_price = (math.log(max(price, self._prices.lowest_price)) - self._log_price_shift) / self._log_price_scale
        out = np.empty(OBSERVATION_DIM, dtype=np.float32)
        paper = np.asarray(observation, dtype=np.float64)
        if self.normalize:
            paper[list(_LOG_DIMS)] = np.log(np.maximum(paper[list(_LOG_DIMS)], 1e-12))
        out[0:15] = (paper - self._static_shift) / self._static_scale
        out[15:22] = self._log_error[t]
        out[22:29] = self._bits[t] / 16.0
        out[29:36] = gap / GAP_CAP_BITS if self.normalize else gap
        out[36] = log_price
        out[37] = on_track
        out[38:40] = self._position[t]
        out[40:48] = self._kind[t]
        return out

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()


__all__ = ["ActionCostObservation", "MODULE_KINDS", "OBSERVATION_DIM", "OBSERVATION_LAYOUT", "module_kind"]
