"""CurriculumWrapper: the target bits fall stage by stage (paper: 3.0 -> 2.5 -> 2.0 -> 2.0)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import gymnasium as gym

from ..errors import ConfigError
from .target_schedule import TargetSchedule


class CurriculumWrapper(TargetSchedule):
    """Sets the base env's ``target_bits`` at each reset from the current stage.

    ``stages``: targets in order; ``episodes_per_stage``: episodes spent in each (the last
    stage lasts for ever). ``freeze(target)`` pins a target for evaluation; ``unfreeze()``
    resumes the schedule. ``action_masks()`` passes through, so MaskablePPO sees it.
    """

    def __init__(self, env: gym.Env, stages: Sequence[float] = (3.0, 2.5, 2.0, 2.0), episodes_per_stage: int = 25):
        super().__init__(env)
        if not stages:
            raise ConfigError("CurriculumWrapper needs at least one stage, e.g. stages=(3.0, 2.5, 2.0, 2.0).")
        if not isinstance(episodes_per_stage, int) or episodes_per_stage < 1:
            raise ConfigError(f"episodes_per_stage must be a positive integer, got {episodes_per_stage!r}.")
        self.stages = tuple(float(s) for s in stages)
        for target in self.stages:  # fail now, not at stage 3 of a long run
            self.env.unwrapped.set_target_bits(target)
        self.episodes_per_stage = episodes_per_stage
        self.episodes_done = 0
        self.frozen_target: Optional[float] = None

    @property
    def stage(self) -> int:
        return min(self.episodes_done // self.episodes_per_stage, len(self.stages) - 1)

    @property
    def current_target(self) -> float:
        return self.frozen_target if self.frozen_target is not None else self.stages[self.stage]

    def state_dict(self) -> Dict[str, Any]:
        return {"episodes_done": self.episodes_done, "frozen_target": self.frozen_target}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.episodes_done = int(state["episodes_done"])
        self.frozen_target = state["frozen_target"]
