"""What a policy sees and is paid: the observation and reward wrappers a preset names.

``observation: paper`` (WindQuant-v0's 15 features) or ``action-costs``
(:class:`~windquant_gym.envs.ActionCostObservation`, with ``normalize_observation``);
``reward_kind: eq5`` (the env's own, configured by ``reward:``) or ``proxy-loss``
(:class:`~windquant_gym.envs.ProxyLossReward`, configured by ``loss_reward:``, its potential
built for the preset's ``gamma``). A run folder's ``config.json`` keeps these, so a saved policy
is evaluated on what it was trained on (``windquant bench --policy``).
"""

from __future__ import annotations

from typing import Any, Dict

import gymnasium as gym

from ..envs import ActionCostObservation, LossRewardConfig, ProxyLossReward
from ..errors import ConfigError
from .recipe import OBSERVATIONS, REWARD_KINDS as REWARDS


def _plain(hp) -> Dict[str, Any]:
    """A :class:`~.recipe.Recipe` or its plain dict (a run's config.json), as the dict."""
    return hp.to_dict() if hasattr(hp, "to_dict") else hp


def wrap_observation(env: gym.Env, hp: Dict[str, Any]) -> gym.Env:
    hp = _plain(hp)
    kind = hp.get("observation", "paper")
    if kind not in OBSERVATIONS:
        raise ConfigError(f"observation must be one of {OBSERVATIONS}, got {kind!r} (hyperparams.yml).")
    if kind == "action-costs":
        return ActionCostObservation(env, normalize=bool(hp.get("normalize_observation", True)))
    return env


def wrap_reward(env: gym.Env, hp: Dict[str, Any]) -> gym.Env:
    hp = _plain(hp)
    kind = hp.get("reward_kind", "eq5")
    if kind not in REWARDS:
        raise ConfigError(f"reward_kind must be one of {REWARDS}, got {kind!r} (hyperparams.yml).")
    if kind == "proxy-loss":
        config = LossRewardConfig(**{**(hp.get("loss_reward") or {}), "gamma": float(hp["gamma"])})
        return ProxyLossReward(env, config)
    return env


def policy_view(env: gym.Env, hp: Dict[str, Any]) -> gym.Env:
    """``env`` with the preset's reward, then observation, wrapper."""
    return wrap_observation(wrap_reward(env, hp), hp)
