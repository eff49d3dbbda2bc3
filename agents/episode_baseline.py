"""Episode-level advantages for a stock MaskablePPO: every step of an episode is credited with
the episode's return minus the mean return of the rollout's other episodes at the same target
(a leave-one-out baseline, as in RLOO, Kool et al. 2019; GRPO's group baseline without the
division by the spread, which PPO's per-minibatch normalisation does anyway).

Why: on the README preset the critic explains none of the return's variance (its explained
variance was below 0 in every one of the 39 updates of a cold `cpu-quick-kv` run), so the
per-step GAE advantages it gives are mostly its own error. Episodes of one rollout at one target
are alike but for the policy's sampled choices, so their returns compared with each other say
which choices paid. Measured (benchmarks/RESULTS.md, "On a 2-core Xeon with AMX"): against GAE
over 3 seeds, no effect shown; an opt-in ablation (``cpu-quick-kv-episode-baseline``).

A plain SB3 callback: ``on_rollout_end`` runs after the rollout buffer's
``compute_returns_and_advantage`` and before the update, so it overwrites
``rollout_buffer.advantages`` there; the returns the critic learns from are left as they are.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from ..errors import ConfigError


def episode_advantages(rewards: np.ndarray, values: np.ndarray, first_is_start: bool,
                       ends: List[Tuple[int, Optional[float]]], advantages: np.ndarray) -> np.ndarray:
    """The advantages of one environment's rollout (``[n_steps]`` arrays) with episode-level
    credit. ``ends``: ``(step, target)`` of every step that ended an episode, in order.
    Complete episodes in the rollout (the first counts only when ``first_is_start``) get their
    undiscounted return minus the mean of the other complete episodes' at the same target; an
    episode alone at its target gets its return minus the critic's value of its first state.
    Steps of an incomplete episode keep ``advantages`` (the critic's)."""
    out = np.array(advantages, dtype=np.float32, copy=True)
    episodes = []  # (first step, last step, target)
    start = 0
    for index, (end, target) in enumerate(ends):
        if index > 0 or first_is_start:
            episodes.append((start, end, target))
        start = end + 1
    groups: Dict[Optional[float], List[int]] = {}
    for number, (_, _, target) in enumerate(episodes):
        groups.setdefault(target, []).append(number)
    returns = np.array([float(rewards[a:b + 1].sum()) for a, b, _ in episodes], dtype=np.float64)
    for members in groups.values():
        total = returns[members].sum()
        for number in members:
            a, b, _ = episodes[number]
            if len(members) > 1:
                baseline = (total - returns[number]) / (len(members) - 1)
            else:
                baseline = float(values[a])
            out[a:b + 1] = returns[number] - baseline
    return out


class EpisodeBaseline(BaseCallback):
    """``EpisodeBaseline()``: replaces PPO's GAE advantages with :func:`episode_advantages`
    before every update (``advantage: episode-baseline`` in a preset). One environment only."""

    def __init__(self) -> None:
        super().__init__()
        self._ends: List[Tuple[int, Optional[float]]] = []
        self.updates = 0

    def _on_training_start(self) -> None:
        if self.training_env.num_envs != 1:
            raise ConfigError(f"advantage: episode-baseline works on one environment, got {self.training_env.num_envs}; "
                              "train with one env (windquant train does) or drop the setting.")

    def _on_rollout_start(self) -> None:
        self._ends = []

    def _on_step(self) -> bool:
        # on_step comes before the step is added to the buffer: its index is the buffer's position
        if bool(self.locals["dones"][0]):
            target = self.locals["infos"][0].get("target_bits")
            self._ends.append((int(self.model.rollout_buffer.pos), None if target is None else float(target)))
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        buffer.advantages[:, 0] = episode_advantages(
            buffer.rewards[:, 0], buffer.values[:, 0], bool(buffer.episode_starts[0, 0]), self._ends, buffer.advantages[:, 0])
        self.updates += 1
