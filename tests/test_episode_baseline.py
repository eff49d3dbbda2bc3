"""Episode-level advantages (``advantage: episode-baseline``): the arithmetic, that a stock
MaskablePPO's update sees them, and the recipe and training path."""

import gymnasium as gym
import numpy as np
import pytest
from sb3_contrib import MaskablePPO

from windquant_gym.agents import WindQuantPolicy
from windquant_gym.agents.episode_baseline import EpisodeBaseline, episode_advantages
from windquant_gym.agents.recipe import Recipe
from windquant_gym.agents.train import TrainArgs, train
from windquant_gym.envs import ProxyLossReward
from windquant_gym.errors import ConfigError


def test_leave_one_out_per_target_and_the_critic_where_alone():
    # episodes of 2 steps: [0,1] target 2.0, [2,3] target 2.0, [4,5] target 2.0, [6,7] target 3.0, [8] unfinished
    rewards = np.array([1, 2, 0, 0, 3, 3, 5, 5, 9], dtype=np.float32)  # returns 3, 0, 6 | 10
    values = np.array([0, 0, 0, 0, 0, 0, 4, 0, 0], dtype=np.float32)
    gae = np.full(9, -7.0, dtype=np.float32)
    ends = [(1, 2.0), (3, 2.0), (5, 2.0), (7, 3.0)]
    out = episode_advantages(rewards, values, True, ends, gae)
    # 3 - (0 + 6) / 2 = 0; 0 - (3 + 6) / 2 = -4.5; 6 - (3 + 0) / 2 = 4.5; alone: 10 - V(s6) = 6; unfinished: GAE's
    np.testing.assert_array_equal(out, [0, 0, -4.5, -4.5, 4.5, 4.5, 6, 6, -7])
    assert out[:6].reshape(3, 2)[:, 0].sum() == 0  # leave-one-out advantages of a group sum to 0
    # a rollout that began mid-episode: its first segment keeps the critic's advantages
    partial = episode_advantages(rewards, values, False, ends, gae)
    np.testing.assert_array_equal(partial[:2], [-7, -7])
    np.testing.assert_array_equal(partial[2:6], [-6, -6, 6, 6])  # 0 - 6, 6 - 0
    np.testing.assert_array_equal(gae, np.full(9, -7.0))  # the input is not changed


def test_ppo_updates_on_the_episode_advantages(tiny_problem):
    env = ProxyLossReward(gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.5))
    n = env.unwrapped.n_units
    model = MaskablePPO(WindQuantPolicy, env, n_steps=3 * n, batch_size=n, n_epochs=1, gamma=1.0, gae_lambda=1.0,
                        policy_kwargs={"hidden_size": 32}, seed=0, device="cpu")
    seen = []
    update = model.train

    def spy():  # what PPO's update reads
        seen.append(model.rollout_buffer.advantages[:, 0].copy())
        update()
    model.train = spy
    callback = EpisodeBaseline()
    model.learn(total_timesteps=3 * n, callback=callback)
    assert callback.updates == 1 and len(seen) == 1
    advantages = seen[0].reshape(3, n)
    assert np.all(advantages == advantages[:, :1])  # one advantage per episode, on each of its steps
    returns = model.rollout_buffer.rewards[:, 0].reshape(3, n).sum(axis=1)
    expected = [returns[i] - np.delete(returns, i).mean() for i in range(3)]
    np.testing.assert_allclose(advantages[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(returns) > 0  # sampled episodes differ, so the check above is not 0 == 0


def test_the_recipe_names_the_choices():
    assert Recipe.from_dict({"advantage": "episode-baseline"}).advantage == "episode-baseline"
    with pytest.raises(ConfigError, match=r"advantage must be one of \['gae', 'episode-baseline'\], got 'rloo'"):
        Recipe.from_dict({"advantage": "rloo"})


def test_training_with_episode_advantages_over_sampled_targets(tmp_path):
    # smoke-front draws a target per episode: groups of one fall back to the critic's baseline
    summary = train(TrainArgs(model="tiny-llama", preset="smoke-front", out=str(tmp_path / "run"), progress=False,
                              overrides={"advantage": "episode-baseline"}))
    assert summary["training_episodes"] == 4 and summary["ppo_updates"] is True
    assert (tmp_path / "run" / "front.json").exists()
