"""Warm start: behaviour cloning of a MaskablePPO policy on plans (the knapsack's, a search's).

A plan is turned into demonstrations by walking the env through it: the observation and the
action mask at every unit, and the plan's action. No proxy pass is spent: the walk stops
before the last step (the only one that measures the model), whose observation it has by then.

The loss is the policy's own masked log-likelihood, ``policy.evaluate_actions(obs, actions,
action_masks=...)``, so the logits a masked action would get never enter it, and the trained
object is the MaskablePPO policy itself (``model.learn()`` continues from it as from any
state). imitation's BC ignores masks, and sb3-contrib #291 reports ``learn()`` failing after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..harness.episodes import play_episode


@dataclass
class Demonstrations:
    observations: np.ndarray
    """``[M, obs_dim]`` float32."""
    actions: np.ndarray
    """``[M]`` int64."""
    masks: np.ndarray
    """``[M, n_actions]`` bool: what the env allowed at each step."""
    returns: Optional[np.ndarray] = None
    """``[M]`` discounted return-to-go of each step (when the walks were measured): what the
    critic is fitted to, so that PPO's first advantages are not the noise of a random critic."""
    final_infos: Dict[float, Dict[str, Any]] = field(default_factory=dict)
    """The env's last-step ``info`` of each measured walk, by target (its ``proxy_ppl`` ...)."""

    def __len__(self) -> int:
        return len(self.actions)


class _StrictPlan:
    """Plays a demonstration plan as it is: a masked action is an error, never projected."""

    def __init__(self, plan: np.ndarray, target: float):
        self.plan, self.target, self._t = plan, target, 0

    def __call__(self, observation, mask) -> int:
        action, t = int(self.plan[self._t]), self._t
        if not mask[action]:
            raise ConfigError(f"The demonstration plan at {self.target} bits takes action {action} at unit {t}, which the "
                              "env masks (over budget or below a precision rule): pass a plan made for this target.")
        self._t += 1
        return action


def collect_demonstrations(env: gym.Env, plans: Mapping[float, Sequence[int]], gamma: Optional[float] = None) -> Demonstrations:
    """Walk ``env`` (wrapped as the policy sees it, without a curriculum) through each
    ``plans[target_bits]`` at its target. Raises when the env's masks forbid a plan's action
    (the plan does not fit that target or the rules).

    With ``gamma`` the walks take their last step too, one proxy pass per plan, and
    ``returns`` holds every step's return-to-go discounted by ``gamma``."""
    observations, actions, masks, returns, final_infos = [], [], [], [], {}
    base = env.unwrapped
    for target, plan in plans.items():
        plan = np.asarray(plan, dtype=np.int64)
        if plan.shape != (base.n_units,):
            raise ConfigError(f"A demonstration plan needs one action per unit ({base.n_units}), got shape {plan.shape}.")
        # the last step runs the proxy pass: only when measured
        info, trace = play_episode(env, _StrictPlan(plan, target), options={"target_bits": float(target)}, trace=True,
                                   stop_before_last=gamma is None)
        observations += trace.observations
        actions += trace.actions
        masks += trace.masks
        rewards = trace.rewards
        if gamma is not None:
            final_infos[float(target)] = info
            to_go, running = np.empty(len(rewards)), 0.0
            for t in range(len(rewards) - 1, -1, -1):
                running = rewards[t] + gamma * running
                to_go[t] = running
            returns.append(to_go)
    return Demonstrations(np.stack(observations), np.asarray(actions, dtype=np.int64), np.stack(masks),
                          np.concatenate(returns).astype(np.float32) if gamma is not None else None, final_infos)


@torch.no_grad()
def replay_accuracy(policy, demos: Demonstrations) -> float:
    """Share of demonstrated steps where the deterministic (masked) policy takes the action."""
    policy.set_training_mode(False)
    obs = torch.as_tensor(demos.observations, device=policy.device)
    predicted = policy._predict(obs, deterministic=True, action_masks=demos.masks)
    return float((predicted.cpu().numpy() == demos.actions).mean())


def behaviour_clone(
    policy,
    demos: Demonstrations,
    *,
    epochs: int = 200,
    learning_rate: float = 3e-3,
    batch_size: int = 256,
    entropy_coef: float = 0.0,
    value_coef: float = 1.0,
    target_accuracy: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, float]:
    """Fit ``policy`` (a ``MaskableActorCriticPolicy``) to ``demos`` by masked maximum likelihood,
    minus ``entropy_coef`` times the policy's entropy (keeps some exploration for PPO), plus,
    when the demonstrations carry ``returns``, ``value_coef`` times the critic's squared error
    on them. Stops after ``epochs`` or once the deterministic policy replays
    ``target_accuracy`` of the steps (and, with returns, no sooner than half the epochs, for
    the critic). Returns the final ``loss``, ``accuracy``, ``value_rmse`` and ``epochs`` run."""
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ConfigError(f"behaviour_clone needs epochs >= 1, batch_size >= 1, learning_rate > 0; got {epochs}, "
                          f"{batch_size}, {learning_rate}.")
    if not len(demos):
        raise ConfigError("behaviour_clone got no demonstrations: pass at least one plan to collect_demonstrations.")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    obs = torch.as_tensor(demos.observations, device=policy.device)
    actions = torch.as_tensor(demos.actions, device=policy.device)
    masks = demos.masks
    returns = None if demos.returns is None else torch.as_tensor(demos.returns, device=policy.device)
    loss_value, accuracy, epoch = float("nan"), 0.0, 0
    bar = tqdm(range(epochs), desc="warm start (behaviour cloning)", unit="epoch", disable=not progress)
    for epoch in bar:
        policy.set_training_mode(True)
        order = torch.randperm(len(demos), generator=generator)
        total = 0.0
        for start in range(0, len(demos), batch_size):
            rows = order[start : start + batch_size]
            values, log_prob, entropy = policy.evaluate_actions(obs[rows], actions[rows], action_masks=masks[rows.numpy()])
            loss = -log_prob.mean() - entropy_coef * entropy.mean()
            if returns is not None:
                loss = loss + value_coef * torch.nn.functional.mse_loss(values.flatten(), returns[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        loss_value = total / len(demos)
        accuracy = replay_accuracy(policy, demos)
        bar.set_postfix(loss=f"{loss_value:.3f}", replayed=f"{accuracy:.1%}")
        if accuracy >= target_accuracy and (returns is None or epoch + 1 >= epochs // 2):
            break
    bar.close()
    policy.set_training_mode(False)
    value_rmse = float("nan")
    if returns is not None:
        with torch.no_grad():
            value_rmse = float(torch.sqrt(torch.mean((policy.predict_values(obs).flatten() - returns) ** 2)))
    return {"loss": loss_value, "accuracy": accuracy, "value_rmse": value_rmse, "epochs": epoch + 1}


__all__ = ["Demonstrations", "behaviour_clone", "collect_demonstrations", "replay_accuracy"]
