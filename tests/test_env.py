import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.envs.rewards import final_reward, step_reward, update_lambda
from windquant_gym.quant.bitwidths import ACTION_BITS

from _helpers import assert_bitwise_equal, snapshot


def run_episode(env, choose, seed=None):
    obs, _ = env.reset(seed=seed)
    observations, rewards, masks = [obs], [], []
    done = False
    while not done:
        mask = env.unwrapped.action_masks()
        masks.append(mask)
        obs, reward, done, truncated, info = env.step(choose(mask))
        assert not truncated
        observations.append(obs)
        rewards.append(reward)
    return observations, rewards, masks, info


def test_gymnasium_and_sb3_env_checkers_pass(env):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    gym_check(env.unwrapped, skip_render_check=True)
    sb3_check(env, warn=True)


def test_spaces_and_observation_layout(env, tiny_problem):
    base = env.unwrapped
    assert base.action_space == gym.spaces.Discrete(7)
    assert base.observation_space.shape == (15,) and base.observation_space.dtype == np.float32
    obs, info = env.reset()
    unit = base.units[0]
    w = tiny_problem.model.get_submodule(unit.module).weight.detach()[:, unit.col_start : unit.col_end]
    s = tiny_problem.calibration.act_scales[unit.module][unit.col_start : unit.col_end]
    expected = [w.mean(), w.std(unbiased=False), w.abs().mean(), (w.abs() < 1e-6).float().mean()]
    np.testing.assert_allclose(obs[:4], [float(x) for x in expected], rtol=1e-4, atol=1e-7)
    assert obs[5] == 0 and obs[6] == 0 and obs[7] == 1 and obs[8] == 0
    np.testing.assert_allclose(obs[9:12], [float(s.mean()), float(s.std(unbiased=False)), float(s.max())], rtol=1e-5)
    assert (obs[12], obs[13]) == (1.0, 0.0)  # q_proj: attention
    assert obs[14] == pytest.approx(2.0 / 8)
    obs, *_ = env.step(1)  # 8 bit on unit 0
    n = base.table.n_weights.astype(float)
    assert obs[5] == pytest.approx(1 / base.n_units)
    assert obs[6] == pytest.approx(8 * n[0] / (32 * n.sum()), rel=1e-5)
    assert obs[7] == pytest.approx((2.0 * n.sum() - 8 * n[0]) / (2.0 * n.sum()), rel=1e-5)
    urgency = 1 - (2.0 * n.sum() - 8 * n[0]) / (2.0 * n[1:].sum())
    assert obs[8] == pytest.approx(max(0.0, urgency), abs=1e-6)


@pytest.mark.parametrize("target", [1.3, 2.0, 3.0, 5.0])
def test_rollouts_that_follow_the_masks_meet_the_budget(tiny_problem, target):
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=target)
    rng = np.random.default_rng(int(target * 10))
    greedy_high = lambda mask: int(np.flatnonzero(mask)[0])  # most bits allowed: presses the budget
    random_allowed = lambda mask: int(rng.choice(np.flatnonzero(mask)))
    for choose in (greedy_high, random_allowed):
        _, _, masks, info = run_episode(env, choose)
        assert all(m.any() for m in masks)
        assert info["effective_bits"] <= target + 1e-9
    assert info["storage_bits"] > info["effective_bits"]


def test_masked_actions_are_projected_to_the_nearest_allowed(tiny_problem):
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=1.3)
    env.reset()
    projected = 0
    done = False
    while not done:
        mask = env.unwrapped.action_masks()
        _, _, done, _, info = env.step(0)  # always ask for 16 bit
        if not mask[0]:
            projected += 1
            assert info["action_projected"] and mask[info["action"]]
            allowed_bits = [ACTION_BITS[a] for a in np.flatnonzero(mask)]
            assert ACTION_BITS[info["action"]] == max(allowed_bits)  # nearest to 16 bit
        else:
            assert not info["action_projected"]
    assert projected > 0
    assert info["effective_bits"] <= 1.3 + 1e-9


def test_precision_rules_are_masks(tiny_problem):
    rules = wq.PrecisionRules(early_layers=1, early_min_bits=3.0, attention_min_bits=2.0)
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=4.0, precision_rules=rules)
    _, _, masks, info = run_episode(env, lambda mask: int(np.flatnonzero(mask)[-1]))  # fewest bits allowed
    plan = info["plan"]
    for unit, action in zip(env.unwrapped.units, plan):
        minimum = 3.0 if unit.layer == 0 else (2.0 if unit.is_attention else 1.0)
        assert ACTION_BITS[action] >= minimum
    with pytest.raises(wq.ConfigError, match="below"):
        gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=1.2, precision_rules=rules)


def test_same_seed_same_actions_same_everything(tiny_problem, tiny):
    def episode():
        env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.5)
        actions = iter(np.random.default_rng(7).integers(0, 7, size=10_000))
        result = run_episode(env, lambda mask: int(next(actions)), seed=3)
        env.close()
        return result

    obs_a, rew_a, _, info_a = episode()
    obs_b, rew_b, _, info_b = episode()
    np.testing.assert_array_equal(np.stack(obs_a), np.stack(obs_b))
    assert rew_a == rew_b
    assert info_a["proxy_ppl"] == info_b["proxy_ppl"] and info_a["plan"] == info_b["plan"]


def test_weights_unchanged_after_episodes_and_close(tiny_problem):
    saved = snapshot(tiny_problem.model)
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    for _ in range(2):
        run_episode(env, lambda mask: int(np.flatnonzero(mask)[-1]))
        assert_bitwise_equal(tiny_problem.model, saved)
    env.close()
    assert_bitwise_equal(tiny_problem.model, saved)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_weights_come_back_when_the_evaluation_is_interrupted(tiny_problem, monkeypatch, error):
    import windquant_gym.problem as problem_module

    saved = snapshot(tiny_problem.model)
    real_token_losses = problem_module.token_losses
    seen = []

    def interrupted(model, blocks, *args, **kwargs):
        # the plan's weights are in the model now; stop after one batch, as Ctrl-C would
        seen.append(any(not torch.equal(p, saved[n]) for n, p in model.named_parameters()))
        kwargs["on_batch"] = lambda: (_ for _ in ()).throw(error("stop"))
        return real_token_losses(model, blocks, *args, **kwargs)

    monkeypatch.setattr(problem_module, "token_losses", interrupted)
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    with pytest.raises(error):
        run_episode(env, lambda mask: int(np.flatnonzero(mask)[-1]))
    assert seen == [True]  # the interruption really came mid-evaluation, with borrowed weights in
    assert_bitwise_equal(tiny_problem.model, saved)
    monkeypatch.setattr(problem_module, "token_losses", real_token_losses)
    *_, info = run_episode(env, lambda mask: int(np.flatnonzero(mask)[-1]))  # the env still works
    assert info["effective_bits"] <= 2.0 + 1e-9
    env.close()
    assert_bitwise_equal(tiny_problem.model, saved)


def test_terminal_info_and_lagrange_update(env):
    _, rewards, _, info = run_episode(env, lambda mask: int(np.flatnonzero(mask)[-1]))
    for key in ("plan", "stored_plan", "effective_bits", "storage_bits", "proxy_ppl", "ppl_ratio", "fallbacks",
                "reward_terms", "episode_seconds", "lagrange_lambda"):
        assert key in info
    terms = info["reward_terms"]
    assert set(terms) >= {"gain", "quality_penalty", "budget_penalty", "ppl_penalty", "skip_penalty", "quality_bonus", "total"}
    base = env.unwrapped
    last, action = base.n_units - 1, info["plan"][-1]
    unit_bits = base.table.unit_effective_bits[last, action] / base.table.n_weights[last]
    shaping = step_reward(base.reward_config, unit_bits, 2.0, info["stored_plan"][-1] == 0, base.n_units)
    assert rewards[-1] == pytest.approx(terms["total"] + shaping)
    assert terms["total"] == pytest.approx(
        terms["gain"] - terms["quality_penalty"] - terms["budget_penalty"] - terms["ppl_penalty"]
        - terms["skip_penalty"] + terms["quality_bonus"]
    )
    assert math.isclose(info["ppl_ratio"], info["proxy_ppl"] / info["baseline_ppl"])
    expected = update_lambda(wq.RewardConfig(), info["lagrange_lambda"], info["loss_increase"])
    assert env.unwrapped.lagrange_lambda == pytest.approx(expected)
    with pytest.raises(gym.error.ResetNeeded):
        env.unwrapped.step(1)


def test_final_reward_terms_hand_computed():
    config = wq.RewardConfig()
    good = final_reward(config, effective_bits=2.0, target_bits=2.0, loss_increase=0.1, ppl_ratio=1.5,
                        skip_fraction=0.0, lagrange_lambda=1.0)
    assert good["gain"] == pytest.approx(30 / 32)
    assert good["quality_penalty"] == 0 and good["ppl_penalty"] == 0 and good["budget_penalty"] == 0
    assert good["quality_bonus"] == pytest.approx(0.5)
    bad = final_reward(config, effective_bits=2.2, target_bits=2.0, loss_increase=0.5, ppl_ratio=40.0,
                       skip_fraction=0.3, lagrange_lambda=2.0)
    assert bad["quality_penalty"] == pytest.approx(2.0 * 0.2)
    assert bad["budget_penalty"] == pytest.approx(10 * (0.1 + 0.01))
    assert bad["ppl_penalty"] == pytest.approx(1.0 + 2.0 * math.log(2.0))
    assert bad["skip_penalty"] == pytest.approx(5 * 0.2)
    mid = final_reward(config, effective_bits=2.0, target_bits=2.0, loss_increase=0.0, ppl_ratio=11.5,
                       skip_fraction=0.0, lagrange_lambda=0.0)
    assert mid["ppl_penalty"] == pytest.approx(0.5)
    assert bad["total"] < mid["total"] < good["total"]
    assert update_lambda(config, 0.1, 0.0) == 0.0  # projected at 0
    assert update_lambda(config, 9.9, 10.0) == config.lambda_max
    assert wq.RewardConfig.from_json(config.to_json()) == config
    with pytest.raises(wq.ConfigError, match="epsilon"):
        wq.RewardConfig(epsilon=-1)


def test_curriculum_stages_freeze_and_masks_pass_through(tiny_problem):
    env = wq.CurriculumWrapper(
        gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem), stages=(3.0, 2.0), episodes_per_stage=1
    )
    targets = []
    for _ in range(3):
        _, _, _, info = run_episode(env, lambda mask: int(np.flatnonzero(mask)[-1]))
        targets.append(info["target_bits"])
    assert targets == [3.0, 2.0, 2.0]
    assert env.get_wrapper_attr("action_masks")().dtype == bool
    env.freeze(2.5)
    _, _, _, info = run_episode(env, lambda mask: int(np.flatnonzero(mask)[0]))
    assert info["target_bits"] == 2.5 and env.episodes_done == 3
    with pytest.raises(wq.ConfigError, match="target_bits"):
        wq.CurriculumWrapper(gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem), stages=(0.5,))


def test_module_without_tokenizer_is_refused(tiny):
    with pytest.raises(wq.ConfigError, match="tokenizer"):
        gym.make("WindQuant-v0", model=tiny[0])
    with pytest.raises(wq.ConfigError, match="target_bits"):
        gym.make("WindQuant-v0", model=tiny[0], tokenizer=tiny[1], target_bits=20, n_calibration_samples=2,
                 calibration_seq_len=32, chunk_size=64, progress=False, cache=False)


def test_optional_step_error_shaping_charges_each_steps_measured_error(tiny_problem):
    plain = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=3.0)
    shaped = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=3.0,
                      reward_config=wq.RewardConfig(step_error_coef=20.0))
    rng = np.random.default_rng(0)
    actions = []

    def choose(mask):
        actions.append(int(rng.choice(np.flatnonzero(mask))))
        return actions[-1]

    *_, base, _, info = run_episode(plain, choose)
    replay = iter(actions)
    *_, extra, _, _ = run_episode(shaped, lambda mask: next(replay))
    error = tiny_problem.table.module_normalized_error()
    n_modules = len({u.module for u in tiny_problem.units})
    expected = [-20.0 * error[t, a] / n_modules for t, a in enumerate(info["plan"])]
    np.testing.assert_allclose(np.subtract(extra, base), expected, rtol=1e-9, atol=1e-12)
    assert sum(expected) < 0 and wq.RewardConfig().step_error_coef == 0.0  # off by default: the paper's shaping
