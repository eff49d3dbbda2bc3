"""What the curriculum and the target sampler share: a wrapper that sets the base env's target
at every reset (through ``set_target_bits``, the env's one writer of it) and can hold one
target for evaluation."""

from __future__ import annotations

from typing import Any, Dict, Optional

import gymnasium as gym
import numpy as np


class TargetSchedule(gym.Wrapper):
    """Base of :class:`CurriculumWrapper` and :class:`TargetSampler`: at every reset the base
    env's ``target_bits`` becomes :meth:`next_target` (or the frozen target); episodes that end
    while nothing is frozen count in ``episodes_done``; ``info["curriculum_stage"]`` carries
    :attr:`stage`. ``freeze(target)`` holds a target for evaluation, ``unfreeze()`` resumes the
    schedule; ``action_masks()`` passes through, so MaskablePPO sees it."""

    frozen_target: Optional[float] = None
    episodes_done: int = 0

    @property
    def stage(self) -> int:
        raise NotImplementedError

    @property
    def current_target(self) -> float:
        raise NotImplementedError

    def next_target(self) -> float:
        """The target of the episode about to start (nothing frozen)."""
        return self.current_target

    def freeze(self, target_bits: Optional[float] = None) -> None:
        """Stop advancing; hold ``target_bits`` (default: the current target)."""
        target = self.current_target if target_bits is None else float(target_bits)
        self.env.unwrapped.set_target_bits(target)
        self.frozen_target = target

    def unfreeze(self) -> None:
        self.frozen_target = None

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None):
        target = self.frozen_target if self.frozen_target is not None else self.next_target()
        self.env.unwrapped.set_target_bits(target)
        obs, info = self.env.reset(seed=seed, options=options)
        info["curriculum_stage"] = self.stage
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            info["curriculum_stage"] = self.stage
            if self.frozen_target is None:
                self.episodes_done += 1
        return obs, reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()


__all__ = ["TargetSchedule"]
