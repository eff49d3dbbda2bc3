"""What every allocator that plans a whole episode shares: the projection of a planned action
onto the step's mask, and the base class that plays a plan step by step."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import ConfigError
from ..quant.bitwidths import ACTION_BITS

_BITS = np.asarray(ACTION_BITS, dtype=float)


def nearest_allowed(action: int, mask: np.ndarray) -> int:
    """The allowed action nearest in bits to ``action`` (ties to more bits), as the env projects."""
    if mask[action]:
        return int(action)
    distance = np.abs(_BITS - _BITS[action]) - _BITS * 1e-9
    distance[~mask] = np.inf
    return int(np.argmin(distance))


class PlannedAllocator:
    """Base class: computes a whole plan at ``begin_episode`` and plays it step by step,
    projected onto the mask (so a plan that would break the budget never does).

    ``exact = True`` promises a plan within the budget and the rules, which the masks leave
    as it is; the harness then refuses one they change, instead of measuring another plan."""

    name = "planned"
    exact = False

    def __init__(self) -> None:
        self.plan: Optional[np.ndarray] = None
        self._t = 0

    def make_plan(self, env) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def begin_episode(self, env) -> None:
        self.plan = np.asarray(self.make_plan(env.unwrapped), dtype=np.int64)
        self._t = 0

    def __call__(self, observation, action_mask) -> int:
        if self.plan is None:
            raise ConfigError(f"{type(self).__name__} plans from the env: call begin_episode(env) after reset().")
        action = nearest_allowed(int(self.plan[self._t]), np.asarray(action_mask, dtype=bool))
        self._t += 1
        return action
