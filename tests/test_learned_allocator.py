"""The learned allocator's parts (issue 12): action-cost observation, proxy-loss reward,
behaviour-cloning warm start, the returned plan, and seeds that mean one thing."""

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from sb3_contrib import MaskablePPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import windquant_gym as wq
from windquant_gym.agents import WindQuantPolicy
from windquant_gym.agents.imitation import behaviour_clone, collect_demonstrations, replay_accuracy
from windquant_gym.agents.train import TrainArgs, make_env, train
from windquant_gym.allocators import KnapsackAllocator
from windquant_gym.allocators.knapsack import solve_knapsack
from windquant_gym.envs import ActionCostObservation, BudgetPrice, LossRewardConfig, ProxyLossReward
from windquant_gym.envs.action_costs import ERROR_FLOOR, GAP_CAP_BITS, OBSERVATION_DIM, module_kind


def _wrapped(tiny_problem, target=2.0, normalize=True, config=None):
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=target)
    return ActionCostObservation(ProxyLossReward(env, config), normalize=normalize)


def _walk(env, choose, rng=None):
    """One episode; ``choose(obs, mask)`` picks the action. Returns (observations, rewards, info)."""
    obs, _ = env.reset()
    observations, rewards, done, info = [obs], [], False, {}
    while not done:
        obs, reward, done, _, info = env.step(choose(obs, env.action_masks()))
        observations.append(obs)
        rewards.append(reward)
    return observations, rewards, info


def test_action_cost_features_equal_the_tables_values_at_every_step(tiny_problem):
    env = _wrapped(tiny_problem, target=2.5)
    base = env.unwrapped
    table = base.table
    error = table.module_normalized_error()
    log_error = np.log(np.maximum(error, ERROR_FLOOR))
    log_error = (log_error - log_error.mean()) / log_error.std()
    bits = table.unit_effective_bits / table.n_weights[:, None]
    prices = base.budget_price()
    rng = np.random.default_rng(0)
    obs, _ = env.reset()
    assert obs.shape == (OBSERVATION_DIM,) and env.observation_space.contains(obs)
    n_layers = max(u.layer for u in base.units) + 1
    for t, unit in enumerate(base.units):
        remaining = base.remaining_bits
        np.testing.assert_allclose(obs[15:22], log_error[t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(obs[22:29], bits[t] / 16, rtol=1e-6)
        # the price: the least grid price at which the remaining units' rule choices fit
        price = prices.price(t, remaining)
        k = int(np.flatnonzero(prices.prices == price)[0])
        spend = lambda lam: sum(table.unit_effective_bits[i, np.argmin(np.where(base.rule_mask[i], error[i] + lam * table.unit_effective_bits[i], np.inf))]
                                for i in range(t, base.n_units))
        assert spend(price) <= remaining * (1 + 1e-9) or k == len(prices.prices) - 2
        if k > 0:
            assert spend(prices.prices[k - 1]) > remaining
        # the gap is 0 at the rule's action, in bits per weight elsewhere, capped for forbidden actions
        lam = max(price, prices.lowest_price)
        score = np.where(base.rule_mask[t], error[t] / lam + table.unit_effective_bits[t], np.inf)
        expected = np.minimum((score - score.min()) / table.n_weights[t], GAP_CAP_BITS) / GAP_CAP_BITS
        np.testing.assert_allclose(obs[29:36], expected, rtol=1e-5, atol=1e-6)
        assert obs[38] == pytest.approx(unit.layer / (n_layers - 1))
        assert obs[39] == pytest.approx(unit.col_start / unit.in_features)
        assert obs[40:48].sum() == 1 and obs[40 + module_kind(unit.module)] == 1
        assert obs[37] == pytest.approx(remaining / (base.target_bits * base.remaining_weights), rel=1e-6)
        mask = env.action_masks()
        obs, *_ = env.step(int(rng.choice(np.flatnonzero(mask))))


def test_module_kinds_cover_llama_names_and_fall_back_to_other():
    assert [module_kind(f"model.layers.0.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")] == [0, 1, 2, 3]
    assert [module_kind(f"model.layers.3.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")] == [4, 5, 6]
    assert module_kind("transformer.h.0.mystery") == 7


def test_unnormalised_view_gives_the_raw_values(tiny_problem):
    raw, normalized = _wrapped(tiny_problem, normalize=False), _wrapped(tiny_problem)
    obs_raw, _ = raw.reset()
    obs_norm, _ = normalized.reset()
    paper, _ = raw.unwrapped.reset()
    raw.reset()
    np.testing.assert_allclose(obs_raw[:15], paper, rtol=1e-6)
    error = raw.unwrapped.table.module_normalized_error()[0]
    np.testing.assert_allclose(obs_raw[15:22], np.log(np.maximum(error, ERROR_FLOOR)), rtol=1e-5)
    # normalised: the per-unit statistics no longer span orders of magnitude
    assert np.abs(obs_norm[:15]).max() < 10 and not np.allclose(obs_norm[:15], obs_raw[:15])


def test_budget_price_lower_bound_never_exceeds_the_knapsack_optimum():
    rng = np.random.default_rng(3)
    cost = np.sort(rng.integers(1, 20, size=(12, 4)), axis=1)[:, ::-1].astype(float)
    error = np.sort(rng.random((12, 4)), axis=1)
    allowed = np.ones_like(cost, dtype=bool)
    prices = BudgetPrice(cost, error, allowed, n_prices=512)
    for budget in (cost.min(1).sum() + 5, cost.mean(1).sum(), cost.max(1).sum()):
        plan = solve_knapsack(cost, error, allowed, budget, resolution=int(budget))  # whole-number costs: exact
        optimum = error[np.arange(12), plan].sum()
        bound = prices.lower_bound(0, budget)
        assert bound <= optimum + 1e-9
        assert bound >= optimum - 0.25 * error.max()  # duality gap of a multiple-choice knapsack: about one unit's step
        rule = np.argmin(error + prices.price(0, budget) * cost, axis=1)
        assert cost[np.arange(12), rule].sum() <= budget + 1e-9


def test_budget_price_refuses_bad_tables():
    with pytest.raises(wq.ConfigError, match="same shape|one shape"):
        BudgetPrice(np.ones((3, 2)), np.ones((3, 3)), np.ones((3, 2), dtype=bool))
    with pytest.raises(wq.ConfigError, match="allowed action"):
        BudgetPrice(np.ones((2, 2)), np.ones((2, 2)), np.array([[True, False], [False, False]]))
    with pytest.raises(wq.ConfigError, match="n_prices"):
        BudgetPrice(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2), dtype=bool), n_prices=2)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_dense_reward_telescopes_to_a_constant_of_the_target(tiny_problem, gamma):
    config = LossRewardConfig(loss_coef=2.0, shaping_coef=3.0, gamma=gamma)
    env = _wrapped(tiny_problem, target=2.5, config=config)
    rng = np.random.default_rng(1)
    returns = []
    for _ in range(2):  # two different plans: the shaping's sum is the same for both
        observations, rewards, info = _walk(env, lambda obs, mask: int(rng.choice(np.flatnonzero(mask))))
        terms = info["reward_terms"]
        assert terms["loss"] == pytest.approx(-2.0 * math.log(info["ppl_ratio"]))
        assert terms["budget_penalty"] == 0.0
        discounted = sum(gamma ** t * r for t, r in enumerate(rewards))
        n_modules = len({u.module for u in env.unwrapped.units})
        phi0 = -3.0 * env.unwrapped.budget_price().lower_bound(0, env.unwrapped.budget_bits) / n_modules
        # sum_t gamma^t F_t = gamma^N Phi(s_N) - Phi(s_0) = -Phi(s_0); the loss comes on the last step
        assert discounted == pytest.approx(-phi0 + gamma ** (len(rewards) - 1) * terms["loss"], rel=1e-9, abs=1e-9)
        if gamma == 1.0:
            assert sum(rewards) == pytest.approx(terms["total"], rel=1e-9)
        returns.append(discounted - gamma ** (len(rewards) - 1) * terms["loss"])
    assert returns[0] == pytest.approx(returns[1], rel=1e-9, abs=1e-12)


def test_terminal_reward_keeps_falling_past_the_papers_saturation(tiny_problem, monkeypatch):
    """ProxyLossReward's terminal term, read off real episodes whose proxy loss is set to give
    PPL ratios 20, 90 and 100: -ln(ratio), still falling from 90 to 100."""
    from windquant_gym.eval.perplexity import TokenLosses

    env = _wrapped(tiny_problem, target=2.5, config=LossRewardConfig(loss_coef=1.5, shaping_coef=0.0))
    base_nll = tiny_problem.baseline_nll
    terminal = {}
    for ratio in (20.0, 90.0, 100.0):
        monkeypatch.setattr(tiny_problem, "proxy_losses", lambda plan, kl=False, progress=False, r=ratio:
                            TokenLosses(base_nll + math.log(r), None, 1))
        _, rewards, info = _walk(env, lambda obs, mask: int(np.flatnonzero(mask)[-1]))
        assert info["ppl_ratio"] == pytest.approx(ratio)
        assert info["reward_terms"]["loss"] == pytest.approx(-1.5 * math.log(ratio))
        terminal[ratio] = rewards[-1]
    assert terminal[100.0] < terminal[90.0] < terminal[20.0]
    assert terminal[90.0] - terminal[100.0] == pytest.approx(1.5 * math.log(100 / 90))


def test_loss_reward_config_round_trips_and_names_bad_values():
    config = LossRewardConfig(loss_coef=0.5, shaping_coef=0.0, gamma=0.99)
    assert LossRewardConfig.from_json(config.to_json()) == config
    with pytest.raises(wq.ConfigError, match="gamma"):
        LossRewardConfig(gamma=0.0)
    with pytest.raises(wq.ConfigError, match="loss_coef"):
        LossRewardConfig(loss_coef=float("nan"))
    with pytest.raises(wq.ConfigError, match="Unknown"):
        LossRewardConfig.from_json('{"nope": 1}')


def test_wrappers_refuse_other_envs():
    with pytest.raises(wq.ConfigError, match="WindQuant-v0"):
        ActionCostObservation(gym.make("CartPole-v1"))
    with pytest.raises(wq.ConfigError, match="WindQuant-v0"):
        ProxyLossReward(gym.make("CartPole-v1"))


def test_wrapped_env_passes_gymnasium_and_sb3_checks(tiny_problem):
    env = _wrapped(tiny_problem)
    check_env(env, skip_render_check=True)
    sb3_check_env(_wrapped(tiny_problem), warn=True)


def test_behaviour_cloning_on_a_plan_makes_the_policy_replay_it(tiny_problem):
    env = _wrapped(tiny_problem, target=2.5)
    env.unwrapped.set_target_bits(2.5)
    plan = KnapsackAllocator().make_plan(env.unwrapped)
    demos = collect_demonstrations(env, {2.5: plan})
    assert len(demos) == env.unwrapped.n_units and demos.masks[np.arange(len(plan)), plan].all()
    model = MaskablePPO(WindQuantPolicy, env, n_steps=64, batch_size=64, policy_kwargs={"hidden_size": 64}, seed=0, device="cpu")
    assert replay_accuracy(model.policy, demos) < 0.9  # a fresh policy does not know the plan
    stats = behaviour_clone(model.policy, demos, epochs=400, learning_rate=3e-3, batch_size=64, seed=0)
    assert stats["accuracy"] >= 0.99
    # the deterministic policy, rolled out in the env (its own states, not the demonstrations'), replays it
    _, _, info = _walk(env, lambda obs, mask: int(model.predict(obs, action_masks=mask, deterministic=True)[0]))
    assert np.mean(np.asarray(info["plan"]) == plan) >= 0.99
    # and PPO can go on from the cloned policy (sb3-contrib #291: learn() after imitation's BC)
    model.learn(total_timesteps=64)


def test_demonstrations_refuse_a_plan_the_masks_forbid(tiny_problem):
    env = _wrapped(tiny_problem, target=2.0)
    too_rich = np.zeros(env.unwrapped.n_units, dtype=np.int64)  # FP16 everywhere: over any budget
    with pytest.raises(wq.ConfigError, match="masks"):
        collect_demonstrations(env, {2.0: too_rich})
    with pytest.raises(wq.ConfigError, match="one action per unit"):
        collect_demonstrations(env, {2.0: too_rich[:3]})


def test_run_returns_the_better_plan_by_proxy_and_reports_both(tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    # trained on ActionCostObservation, so that the bench needs config.json to see what it saw
    summary = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(run), episodes=4, target_bits=2.5, progress=False,
                              overrides={"observation": "action-costs"}))
    assert summary["warm_start"]["steps"] > 0 and 0 <= summary["warm_start"]["accuracy"] <= 1
    policy = wq.plan.QuantPlan.load(run / "final_plan.json")
    best = wq.plan.QuantPlan.load(run / "best_plan.json")
    returned = wq.plan.QuantPlan.load(run / "returned_plan.json")
    better = min((policy, best), key=lambda p: p.metrics["proxy_ppl"])
    assert returned.actions == better.actions
    assert returned.metrics["proxy_ppl"] == min(policy.metrics["proxy_ppl"], best.metrics["proxy_ppl"])
    # 4 training episodes, the policy's own rollout, and the warm start's passes: the calibrated
    # knapsack's 7 and one measured walk at the one target
    assert summary["warm_start"]["evaluations"] == 8
    assert returned.metrics["evaluations"] == 4 + 1 + 8
    results = summary["results"]
    assert {"policy (deterministic)", "best plan seen in training", "knapsack"} <= set(results)
    assert sum(bool(r.get("returned")) for r in results.values()) == 1
    assert results["knapsack"]["heldout_ppl"] > 1
    # bench evaluates the policy on the observation it was trained on (config.json beside it)
    from windquant_gym.harness.bench import main as bench_main

    out = tmp_path / "bench" / "lb.json"
    assert bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.5", "--allocators", "knapsack",
                       "--eval-windows", "2", "--eval-seq-len", "32", "--policy", str(run / "final_model.zip"),
                       "--json", str(out)]) == 0
    rows = {r["allocator"]: r for r in json.loads(out.read_text())["episodes"]}
    assert rows["MaskablePPO"]["evaluations"] == 4 + 1 + 8
    (run / "config.json").unlink()
    with pytest.raises(wq.ConfigError, match="config.json"):
        bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.5", "--allocators", "knapsack",
                    "--eval-windows", "2", "--eval-seq-len", "32", "--policy", str(run / "final_model.zip"),
                    "--json", str(out)])


def test_agent_seed_leaves_the_calibration_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    from windquant_gym.agents import load_hyperparams

    hp = load_hyperparams("smoke")
    blocks = {}
    for seed, calibration in ((0, None), (7, None), (0, 3)):
        env = make_env(TrainArgs(model="tiny-llama", preset="smoke", seed=seed, calibration_seed=calibration, progress=False), hp)
        blocks[(seed, calibration)] = env.unwrapped.problem.blocks.clone()
        env.close()
    assert torch.equal(blocks[(0, None)], blocks[(7, None)])  # the agent's seed: same proxy text
    assert not torch.equal(blocks[(0, None)], blocks[(0, 3)])  # the calibration seed picks other blocks


def test_lagrange_rule_meets_the_budget_and_nearly_matches_the_knapsack(tiny_problem):
    from windquant_gym.allocators.calibrated_knapsack import lagrange_rule_plan

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.5).unwrapped
    table = env.table
    error = table.module_normalized_error()
    rows = np.arange(env.n_units)
    for target in (2.0, 2.5, 3.0):
        env.set_target_bits(target)
        rule = lagrange_rule_plan(table.unit_effective_bits, error, env.rule_mask, env.budget_bits)
        exact = solve_knapsack(table.unit_effective_bits, error, env.rule_mask, env.budget_bits)
        assert table.unit_effective_bits[rows, rule].sum() <= env.budget_bits * (1 + 1e-12)
        assert env.rule_mask[rows, rule].all()
        assert error[rows, rule].sum() <= 1.05 * error[rows, exact].sum()


def test_calibrated_knapsack_spends_what_it_says_and_keeps_its_best(tiny_problem):
    from windquant_gym.allocators import CalibratedKnapsack
    from windquant_gym.harness import run_allocator

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    allocator = CalibratedKnapsack(factors=(1, 4), groups=("first", "last"))
    (result,) = run_allocator(env, allocator)
    assert allocator.evaluations == len(allocator.history) == 3 and result.evaluations == 3
    best_scales, best_nll = min(allocator.history, key=lambda h: h[1])
    assert allocator.scales == best_scales
    assert math.log(result.proxy_ppl) == pytest.approx(best_nll, rel=1e-9)  # the plan measured is the one chosen
    assert result.effective_bits <= 2.0 + 1e-9
    with pytest.raises(wq.ConfigError, match="including 1.0"):
        CalibratedKnapsack(factors=(2, 4))
    with pytest.raises(wq.ConfigError, match="including 1.0"):
        CalibratedKnapsack(factors={"last": (0.5, 2)})
    with pytest.raises(wq.ConfigError, match=r"not in groups"):
        CalibratedKnapsack(factors={"keys-values": (0.5, 1)})  # the group is not calibrated by default
    with pytest.raises(wq.ConfigError, match="Unknown layer groups"):
        CalibratedKnapsack(groups=("middle",))
    from windquant_gym.allocators.calibrated_knapsack import calibrate_each

    with pytest.raises(wq.ConfigError, match="at least one target"):
        calibrate_each("calibrated-knapsack", None, [])


def test_calibrate_each_lets_a_target_take_another_targets_better_scales(monkeypatch):
    """The coordinate search can stop short at one budget; calibrate_each measures every target's
    scales at every other (once per distinct set) and keeps each target's best, counting each pass."""
    from types import SimpleNamespace

    from windquant_gym.allocators import CalibratedKnapsack
    from windquant_gym.allocators.calibrated_knapsack import calibrate_each

    a, b = {"first": 8.0, "last": 1.0}, {"first": 2.0, "last": 4.0}
    own = {2.0: a, 2.5: b, 3.0: a}  # what the search finds at each target alone
    nll = {(2.0, "a"): 5.0, (2.0, "b"): 5.2, (2.5, "a"): 4.0, (2.5, "b"): 4.3, (3.0, "a"): 3.5, (3.0, "b"): 3.1}
    name = lambda scales: "a" if scales == a else "b"
    passes = []

    def calibrate(self, env):
        self.evaluations, self.scales = 7.0, own[self.calibrate_at]
        return self.scales, nll[(self.calibrate_at, name(self.scales))]

    monkeypatch.setattr(CalibratedKnapsack, "calibrate", calibrate)
    monkeypatch.setattr(CalibratedKnapsack, "plan_at", lambda self, env, target, scales=None: (target, name(scales)))
    env = SimpleNamespace(problem=SimpleNamespace(proxy_nll=lambda plan: passes.append(plan) or nll[plan]))
    found = calibrate_each("calibrated-knapsack", env, [2.0, 2.5, 3.0])
    assert found.scales == {2.0: a, 2.5: a, 3.0: b}  # 2.5 takes a (4.0 < 4.3), 3.0 takes b (3.1 < 3.5)
    assert found.plans == {2.0: (2.0, "a"), 2.5: (2.5, "a"), 3.0: (3.0, "b")}
    assert found.proxy_nll == {2.0: 5.0, 2.5: 4.0, 3.0: 3.1}
    assert sorted(passes) == [(2.0, "b"), (2.5, "a"), (3.0, "b")]  # one pass per other distinct set
    assert found.evaluations == 3 * 7 + len(passes)
    assert found.evaluations_per_target == {2.0: 22.0, 2.5: 22.0, 3.0: 22.0}


def test_training_warm_starts_on_the_key_value_calibrated_teacher(tmp_path, monkeypatch):
    from windquant_gym.agents.hyperparams import load_hyperparams

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    warm_start = {**load_hyperparams("smoke")["warm_start"], "demonstrations": "calibrated-knapsack-kv"}
    summary = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "run"), episodes=2, target_bits=2.5,
                              progress=False, overrides={"warm_start": warm_start}))
    assert summary["warm_start"]["demonstrations"] == "calibrated-knapsack-kv"
    assert set(summary["warm_start"]["scales"]) == {"first", "last", "keys-values"}
    # the teacher's 10 calibration passes and one measured walk at the one target
    assert summary["warm_start"]["calibration_evaluations"] == 10 and summary["warm_start"]["evaluations"] == 11
    assert "calibrated knapsack (teacher)" in summary["results"]


def test_keys_values_group_rescales_only_key_and_value_projections(tiny_problem):
    from windquant_gym.allocators import CalibratedKnapsack
    from windquant_gym.allocators.calibrated_knapsack import group_masks
    from windquant_gym.allocators.registry import baseline_allocators
    from windquant_gym.harness import run_allocator

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    units = env.unwrapped.units
    masks = group_masks(units)
    names = {u.module.rsplit(".", 1)[-1] for u, m in zip(units, masks["keys-values"]) if m}
    assert names == {"k_proj", "v_proj"}
    assert masks["first"].any() and masks["last"].any()
    # a factor on the group moves exactly its units' errors
    allocator = CalibratedKnapsack(factors=(1, 4), groups=("first", "last", "keys-values"))
    plain = allocator._scaled_error(env.unwrapped, {"keys-values": 1.0})
    scaled = allocator._scaled_error(env.unwrapped, {"keys-values": 4.0})
    np.testing.assert_allclose(scaled[masks["keys-values"]], 4.0 * plain[masks["keys-values"]])
    np.testing.assert_array_equal(scaled[~masks["keys-values"]], plain[~masks["keys-values"]])
    (result,) = run_allocator(env, allocator)
    assert allocator.evaluations == result.evaluations == 4  # 1 + one more factor per group
    assert set(allocator.scales) == {"first", "last", "keys-values"}
    registered = baseline_allocators()["calibrated-knapsack-kv"]
    assert registered.name == "calibrated-knapsack-kv" and "keys-values" in registered.groups
    assert registered.factors["keys-values"] == (0.25, 0.5, 1.0, 2.0) and registered.factors["first"] == (1.0, 2.0, 4.0, 8.0)
    mixed = CalibratedKnapsack(factors={"keys-values": (0.5, 1)}, groups=("first", "keys-values"))
    (result,) = run_allocator(env, mixed)
    assert result.evaluations == 1 + 3 + 1  # the default factors for "first", the given ones for keys-values
    assert baseline_allocators()["calibrated-knapsack"].groups == ("first", "last")  # the default teacher unchanged


def test_a_group_that_matches_no_unit_is_refused_by_name(tiny_problem):
    from windquant_gym.allocators import CalibratedKnapsack

    from dataclasses import replace
    from types import SimpleNamespace

    # a model whose attention names its projections otherwise (the fixture's units stay as they are)
    renamed = [replace(u, module=u.module.replace("k_proj", "wk").replace("v_proj", "wv")) for u in tiny_problem.units]
    env = SimpleNamespace(units=renamed, target_bits=2.0, problem=tiny_problem)
    passes = tiny_problem.proxy_passes
    with pytest.raises(wq.ConfigError, match=r"\['keys-values'\] match no unit"):
        CalibratedKnapsack(groups=("keys-values",)).calibrate(env)
    assert tiny_problem.proxy_passes == passes  # refused before any pass


def test_self_imitation_clones_the_best_plan_seen_between_updates(tiny_problem):
    from types import SimpleNamespace

    from stable_baselines3.common.logger import configure

    from windquant_gym.agents.self_imitation import SelfImitation

    env = _wrapped(tiny_problem, target=2.5)
    base = env.unwrapped
    rng = np.random.default_rng(5)
    _, _, info = _walk(env, lambda obs, mask: int(rng.choice(np.flatnonzero(mask))))  # a random "best" plan
    recorder = SimpleNamespace(best={2.5: {"plan": info["plan"], "proxy_ppl": info["proxy_ppl"]}})
    view = _wrapped(tiny_problem, target=2.5)
    model = MaskablePPO(WindQuantPolicy, env, n_steps=64, batch_size=64, policy_kwargs={"hidden_size": 64}, seed=0, device="cpu")
    model.set_logger(configure(None, []))  # learn() would set one up
    callback = SelfImitation(view, recorder, {}, epochs=300, learning_rate=3e-3)
    callback.init_callback(model)
    callback.on_rollout_start()
    assert callback.last_stats["accuracy"] >= 0.99 and callback.rounds == 1
    _, _, replayed = _walk(env, lambda obs, mask: int(model.predict(obs, action_masks=mask, deterministic=True)[0]))
    assert np.mean(np.asarray(replayed["plan"]) == np.asarray(info["plan"])) >= 0.95
    assert base.unit_index == base.n_units  # the training env's own episode was not touched by the callback's walks
    empty = SelfImitation(view, SimpleNamespace(best={}), {})
    empty.init_callback(model)
    empty.on_rollout_start()  # nothing seen, no warm start: nothing to imitate
    assert empty.rounds == 0
