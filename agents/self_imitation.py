"""Self-imitation: before every rollout, the policy is cloned onto the best plan it has found
at each target so far (Oh et al. 2018, "Self-Imitation Learning"), so that PPO explores around
its best plan instead of around where its updates happen to have left it.

A plain SB3 callback on a stock MaskablePPO: it runs :func:`behaviour_clone` (masked
likelihood of the best plan's actions along that plan's own trajectory) between PPO's updates,
on a second view of the same problem, so the training env's episode is never touched. It
spends no proxy pass: the best plans' measurements are the training episodes' own.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from .imitation import Demonstrations, behaviour_clone, collect_demonstrations


class SelfImitation(BaseCallback):
    """``SelfImitation(view, recorder, start_plans, epochs=..., learning_rate=...)``.

    ``view``: a WindQuant-v0 env wrapped as the policy sees it (not the training env);
    ``recorder``: the run's :class:`EpisodeRecorder` (its ``best`` plans by target);
    ``start_plans``: the plan to imitate at a target where nothing has been seen yet (the
    warm start's knapsack plans), so that the warm start is not forgotten there. Other
    keyword arguments go to :func:`behaviour_clone`."""

    def __init__(self, view: gym.Env, recorder, start_plans: Mapping[float, np.ndarray], seed: int = 0, **settings: Any):
        super().__init__()
        self.view, self.recorder = view, recorder
        self.start_plans = {float(t): np.asarray(p, dtype=np.int64) for t, p in start_plans.items()}
        self.seed, self.settings = seed, settings
        self._key: Optional[tuple] = None
        self._demos: Optional[Demonstrations] = None
        self.rounds = 0
        self.last_stats: Dict[str, float] = {}

    def _plans(self) -> Dict[float, np.ndarray]:
        plans = dict(self.start_plans)
        for target, best in self.recorder.best.items():
            plans[float(target)] = np.asarray(best["plan"], dtype=np.int64)
        return plans

    def _on_rollout_start(self) -> None:
        plans = self._plans()
        if not plans:  # nothing seen and no warm start yet
            return
        key = tuple((t, p.tobytes()) for t, p in sorted(plans.items()))
        if key != self._key:  # a new best somewhere: walk the plans again (no proxy pass)
            self._demos, self._key = collect_demonstrations(self.view, plans), key
        self.last_stats = behaviour_clone(self.model.policy, self._demos, seed=self.seed + self.rounds, **self.settings)
        self.rounds += 1
        self.logger.record("self_imitation/replayed", self.last_stats["accuracy"])

    def _on_step(self) -> bool:
        return True
