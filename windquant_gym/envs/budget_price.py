"""The knapsack's Lagrangian view of a budget: what a bit is worth at any point of an episode.

The multiple-choice knapsack (minimise the summed table error of the units' actions within a
bit budget) has a Lagrangian relaxation: at a price ``lam`` per bit every unit independently
takes ``argmin_a error[i, a] + lam * cost[i, a]``, and the price at which those choices
spend exactly the budget gives (up to one unit's rounding) the knapsack's plan. This module
precomputes those choices on a grid of prices, with suffix sums over units, so that during an
episode two questions about the units still to come cost O(log K) and O(K):

* :meth:`BudgetPrice.price`: the price at which the remaining units would spend the
  remaining bits (the observation's budget price);
* :meth:`BudgetPrice.lower_bound`: the least summed table error the remaining units can reach
  within the remaining bits, by Lagrangian duality (the reward's potential).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


class BudgetPrice:
    """Lagrangian prices of bits over a table's per-unit ``cost`` (bits) and ``error``.

    ``allowed`` ``[N, A]`` bool marks the actions a unit may take (the precision rules).
    ``n_prices`` grid points span the range of the table's own trade-off slopes (error saved
    per bit), with a price of 0 (every unit at its least error) and a prohibitive price
    (every unit at its cheapest action) at the ends.
    """

    def __init__(self, cost: np.ndarray, error: np.ndarray, allowed: np.ndarray, n_prices: int = 256):
        cost = np.asarray(cost, dtype=np.float64)
        error = np.asarray(error, dtype=np.float64)
        allowed = np.asarray(allowed, dtype=bool)
        if cost.shape != error.shape or cost.shape != allowed.shape or cost.ndim != 2:
            raise ConfigError(f"cost, error and allowed must be [N, A] arrays of one shape, got {cost.shape}, "
                              f"{error.shape}, {allowed.shape}.")
        if not allowed.any(axis=1).all():
            raise ConfigError("Every unit needs at least one allowed action (check the precision rules).")
        if not isinstance(n_prices, int) or n_prices < 8:
            raise ConfigError(f"n_prices must be an integer >= 8, got {n_prices!r}; e.g. n_prices=256.")
        self.cost, self.error, self.allowed = cost, error, allowed
        self.prices = np.concatenate([[0.0], np.geomspace(*_slope_range(cost, error, allowed), n_prices - 2), [np.inf]])
        n_units = len(cost)
        value = np.empty((n_prices, n_units))
        spent = np.empty((n_prices, n_units))
        rows = np.arange(n_units)
        for k, lam in enumerate(self.prices):
            if np.isinf(lam):  # the cheapest allowed action, least error among equals
                score = np.where(allowed, cost + 1e-12 * error, np.inf)
            else:
                score = np.where(allowed, error + lam * cost, np.inf)
            choice = score.argmin(axis=1)
            value[k] = error[rows, choice] + (0.0 if np.isinf(lam) else lam * cost[rows, choice])
            spent[k] = cost[rows, choice]
        # Suffix sums, [N + 1, K]: row t covers units t..N-1 (row N: no unit left).
        self._value = np.zeros((n_units + 1, n_prices))
        self._value[:-1] = np.cumsum(value[:, ::-1], axis=1)[:, ::-1].T
        self._spent = np.zeros((n_units + 1, n_prices))
        self._spent[:-1] = np.cumsum(spent[:, ::-1], axis=1)[:, ::-1].T
        self._finite = np.isfinite(self.prices)

    @property
    def lowest_price(self) -> float:
        """The least positive price of the grid (log-scale features floor the price here)."""
        return float(self.prices[1])

    @property
    def highest_price(self) -> float:
        """The greatest finite price of the grid."""
        return float(self.prices[-2])

    def price(self, t: int, remaining_bits: float) -> float:
        """The least price at which units ``t..N-1`` spend at most ``remaining_bits``; the
        highest finite price when even their cheapest actions do not fit, 0 when their
        least-error actions fit."""
        spent = self._spent[t]  # non-increasing in the price
        k = int(np.searchsorted(-spent, -remaining_bits, side="left"))
        return float(self.prices[min(k, len(self.prices) - 2)])

    def lower_bound(self, t: int, remaining_bits: float) -> float:
        """Least summed error units ``t..N-1`` can reach within ``remaining_bits`` (a lower
        bound, by weak duality: ``max_lam sum_i min_a (e + lam c) - lam B``, over the grid)."""
        finite = self._finite
        dual = self._value[t, finite] - self.prices[finite] * remaining_bits
        return float(dual.max())

    def gaps(self, t: int, price: float) -> np.ndarray:
        """``[A]``: how much worse each action of unit ``t`` is than the unit's best at
        ``price``, ``(e_a + lam c_a - min_b (e_b + lam c_b)) / lam``, in bits (``inf`` where
        the rules forbid it). 0 marks the action the knapsack's rule takes."""
        lam = max(price, self.lowest_price)
        score = np.where(self.allowed[t], self.error[t] / lam + self.cost[t], np.inf)
        return score - score.min()


def _slope_range(cost: np.ndarray, error: np.ndarray, allowed: np.ndarray):
    """Least and greatest error saved per extra bit between two allowed actions of a unit,
    widened by 10x each way; (1e-12, 1) when the table has no such trade-off."""
    dc = cost[:, :, None] - cost[:, None, :]  # a costs more than b ...
    de = error[:, None, :] - error[:, :, None]  # ... and saves this much error
    ok = allowed[:, :, None] & allowed[:, None, :] & (dc > 0) & (de > 0)
    if not ok.any():
        return 1e-12, 1.0
    slopes = de[ok] / dc[ok]
    low, high = float(slopes.min()), float(slopes.max())
    return low / 10.0, max(high * 10.0, low * 100.0)


__all__ = ["BudgetPrice"]
