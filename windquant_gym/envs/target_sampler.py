"""TargetSampler: a new budget every episode, so that one policy learns every budget at once."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import gymnasium as gym
import numpy as np

from ..errors import ConfigError
from .target_schedule import TargetSchedule


class TargetSampler(TargetSchedule, gym.utils.RecordConstructorArgs):
    """
    ## Description

    At every reset the base env's ``target_bits`` is drawn uniformly from ``targets`` (seeded),
    so a policy that sees the budget (the observation's target, price and bits-left features)
    is trained on all of them with one set of weights, and then plays any of them in one
    episode without retraining: the amortised allocator of the ``cpu-front`` preset. The
    drop-in sibling of :class:`CurriculumWrapper` (same ``freeze`` / ``unfreeze`` /
    ``state_dict`` / ``action_masks``), for training loops written against either.

    ## Arguments

    ``TargetSampler(env, targets=(1.75, 2.0, ..., 3.5), seed=0)``: ``targets`` bits per weight,
    each checked against the env's precision rules now, not at the episode that draws it.

    ## Version History

    * v0: initial version (issue 21).
    """

    def __init__(self, env: gym.Env, targets: Sequence[float], seed: int = 0):
        gym.utils.RecordConstructorArgs.__init__(self, targets=targets, seed=seed)
        gym.Wrapper.__init__(self, env)
        try:
            self.targets = tuple(float(t) for t in targets)
        except (TypeError, ValueError):
            raise ConfigError(f"TargetSampler needs a list of target bits, got {targets!r}; e.g. targets=(2.0, 2.5, 3.0).") from None
        if not self.targets:
            raise ConfigError("TargetSampler needs at least one target, e.g. targets=(2.0, 2.5, 3.0).")
        for target in self.targets:  # fail now, not at the episode that draws it
            self.env.unwrapped.set_target_bits(target)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
        self._rng = np.random.default_rng(int(seed))
        self.episodes_done = 0
        self.frozen_target: Optional[float] = None
        self._drawn = self.targets[0]

    @property
    def stage(self) -> int:
        """Index of the current target in ``targets`` (the curriculum's stage column)."""
        return self.targets.index(self.current_target) if self.current_target in self.targets else -1

    @property
    def current_target(self) -> float:
        return self.frozen_target if self.frozen_target is not None else self._drawn

    def next_target(self) -> float:
        self._drawn = self.targets[int(self._rng.integers(len(self.targets)))]
        return self._drawn

    def state_dict(self) -> Dict[str, Any]:
        return {"episodes_done": self.episodes_done, "frozen_target": self.frozen_target,
                "current_target": self._drawn, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.episodes_done = int(state["episodes_done"])
        self.frozen_target = state["frozen_target"]
        self._drawn = float(state.get("current_target", self.targets[0]))
        if "rng" in state:
            self._rng.bit_generator.state = state["rng"]


__all__ = ["TargetSampler"]
