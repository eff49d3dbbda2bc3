"""The typed training recipe, the CLI flags generated from TrainArgs, and the "one of each"
pieces of the layout: one bits-range check, one module-kind classifier, one episode loop."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import yaml

import windquant_gym as wq
from windquant_gym.agents.flags import add_dataclass_flags, dataclass_from_namespace, field_docs
from windquant_gym.agents.hyperparams import load_hyperparams, load_recipe, preset_names
from windquant_gym.agents.recipe import Recipe, SelfImitationRecipe, WarmStartRecipe
from windquant_gym.agents.train import TrainArgs
from windquant_gym.harness.episodes import play_episode
from windquant_gym.quant import module_kinds
from windquant_gym.quant.bitwidths import check_bits


# ----- the recipe ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_into_the_recipe_and_round_trips(preset):
    recipe = load_recipe(preset)
    assert isinstance(recipe, Recipe)
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    assert load_hyperparams(preset) == recipe.to_dict()  # the dict training reads is the recipe's


def test_the_recipe_types_its_sections():
    cpu = load_recipe("cpu")
    assert isinstance(cpu.warm_start, WarmStartRecipe) and cpu.warm_start.demonstrations == "calibrated-knapsack"
    assert isinstance(cpu.self_imitation, SelfImitationRecipe) and cpu.self_imitation.epochs == 50
    assert cpu.curriculum == (3.0, 2.5, 2.0, 2.0) and cpu.episodes == 200
    assert load_recipe("cpu-front").sampled_targets == (1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.episodes = 5


@pytest.mark.parametrize("block, names", [
    ({"learnig_rate": 1e-3}, ["'learnig_rate'", "did you mean 'learning_rate'"]),
    ({"warm_start": {"epoch": 3}}, ["warm_start", "'epoch'", "did you mean 'epochs'"]),
    ({"self_imitation": {"lr": 1e-3}}, ["self_imitation", "'lr'"]),
    ({"env_kwargs": {"chunk": 64}}, ["env_kwargs", "'chunk'", "did you mean 'chunk_size'"]),
    ({"reward": {"alpah": 1.0}}, ["reward", "'alpah'", "did you mean 'alpha'"]),
    ({"loss_reward": {"loss_cof": 1.0}}, ["loss_reward", "'loss_cof'"]),
    ({"sweep_resources": {"cpu": 2}}, ["sweep_resources", "'cpu'"]),
])
def test_an_unknown_key_is_refused_by_name(block, names):
    with pytest.raises(wq.ConfigError) as excinfo:
        Recipe.from_dict(block)
    for name in names:
        assert name in str(excinfo.value)


@pytest.mark.parametrize("block, says", [
    ({"episodes": 0}, "episodes must be an integer >= 1"),
    ({"learning_rate": "fast"}, "learning_rate must be a finite number"),
    ({"curriculum": [3.0, 20.0]}, "curriculum must lie in [1, 16]"),
    ({"sampled_targets": 2.0}, "sampled_targets must be a non-empty list"),
    ({"observation": "pixels"}, "observation must be one of"),
    ({"ppo_updates": "no"}, "ppo_updates must be true or false"),
    ({"warm_start": {"demonstrations": "oracle"}}, "warm_start.demonstrations must be one of"),
    ({"warm_start": {"calibrate_at": 0.5}}, "warm_start.calibrate_at must lie in [1, 16]"),
    ({"warm_start": {"demonstrations": "calibrated-knapsack", "calibrate_at": "every"}},
     "warm_start.calibrate_at must be a number of bits or 'each', got 'every'"),
    ({"warm_start": {"demonstrations": "knapsack", "calibrate_at": "each"}}, "the teacher 'knapsack' is not calibrated"),
    ({"version": 2}, "Recipe version 2"),
])
def test_a_bad_value_is_named(block, says):
    with pytest.raises(wq.ConfigError) as excinfo:
        Recipe.from_dict(block)
    assert says in str(excinfo.value)


def test_a_yaml_of_ones_own_is_checked_too(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text(yaml.safe_dump({"default": {"episodes": 3}, "mine": {"batchsize": 8}}))
    with pytest.raises(wq.ConfigError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        load_hyperparams("mine", str(path))


# ----- CLI flags from TrainArgs ------------------------------------------------------------------
def _parser():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, TrainArgs, exclude=("overrides",))
    return parser


def test_every_train_argument_is_a_flag_with_its_docstring_as_help():
    parser = _parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    expected = {f.name for f in dataclasses.fields(TrainArgs)} - {"overrides"}
    assert set(flags) == expected
    docs = field_docs(TrainArgs)
    assert docs["seed"].startswith("The agent's seed")
    assert "The agent's seed" in flags["seed"].help
    assert "--no-progress" in flags["progress"].option_strings and "--calibration-seed" in flags["calibration_seed"].option_strings


def test_parsed_flags_build_the_same_args_as_the_dataclass():
    parser = _parser()
    assert dataclass_from_namespace(TrainArgs, parser.parse_args([])) == TrainArgs()
    args = dataclass_from_namespace(TrainArgs, parser.parse_args(
        ["--preset", "cpu", "--seed", "2", "--target-bits", "2.5", "--no-progress", "--episodes", "7", "--overwrite"]))
    assert args == TrainArgs(preset="cpu", seed=2, target_bits=2.5, progress=False, episodes=7, overwrite=True)


@pytest.mark.parametrize("changes, says", [
    ({"seed": -1}, "TrainArgs.seed must be an integer >= 0"),
    ({"episodes": 0}, "TrainArgs.episodes must be an integer >= 1"),
    ({"gamma": 1.5}, "TrainArgs.gamma must lie in [0, 1]"),
    ({"target_bits": 40.0}, "target_bits must lie in [1, 16]"),
])
def test_bad_train_arguments_are_named(changes, says):
    with pytest.raises(wq.ConfigError) as excinfo:
        TrainArgs(**changes)
    assert says in str(excinfo.value)


# ----- one of each -------------------------------------------------------------------------------
def test_one_bits_range_check_for_numbers_and_lists():
    assert check_bits(2) == 2.0 and check_bits("3") == 3.0 and check_bits([1, 16]) == [1.0, 16.0]
    for bad in (0.5, 17, float("nan"), True, "x", None):
        with pytest.raises(wq.ConfigError, match=r"must lie in \[1, 16\]"):
            check_bits(bad)
    with pytest.raises(wq.ConfigError, match=r"got \[0\.5\]; e\.g\. --target-bits 2"):
        check_bits([2.0, 0.5], "target_bits", "--target-bits 2")


def test_one_module_kind_classifier_behind_units_rules_and_the_observation(tiny_problem):
    from windquant_gym.envs import action_costs

    assert action_costs.module_kind is module_kinds.module_kind  # re-exported, not re-derived
    for unit in tiny_problem.units:
        local = unit.module.split(".", 3)[-1]
        assert unit.is_attention == module_kinds.is_attention(local)
        assert unit.is_mlp == module_kinds.is_mlp(local)
    assert module_kinds.module_kind("model.layers.0.self_attn.q_proj") == 0
    assert module_kinds.module_kind("model.layers.0.mlp.down_proj") == 6
    assert module_kinds.module_kind("model.layers.0.mlp.whatever") == module_kinds.N_KINDS - 1
    assert module_kinds.is_mlp_gate("model.layers.0.mlp.gate_proj")
    assert not module_kinds.is_mlp_gate("model.layers.0.mlp.up_proj")


def test_the_observations_urgency_and_the_wrappers_pace_are_one_quantity(env):
    env.reset()
    base = env.unwrapped
    mask_of = env.get_wrapper_attr("action_masks")
    for _ in range(base.n_units - 1):
        obs, *_ = env.step(int(np.flatnonzero(mask_of())[-1]))  # the fewest bits: ahead of the budget
        assert obs[8] == pytest.approx(max(0.0, 1.0 - base.budget_pace), abs=1e-6)
    assert base.budget_pace > 1.0  # cheap choices leave more per weight than the target


def test_the_one_episode_loop_can_stop_before_the_proxy_pass(env):
    base = env.unwrapped
    passes = base.problem.proxy_passes
    first = lambda obs, mask: int(np.flatnonzero(mask)[-1])  # noqa: E731
    info, trace = play_episode(env, first, options={"target_bits": 3.0}, trace=True, stop_before_last=True)
    assert info is None and base.problem.proxy_passes == passes  # no pass paid
    assert len(trace.actions) == base.n_units and len(trace.rewards) == base.n_units - 1
    info, trace = play_episode(env, first, options={"target_bits": 3.0}, trace=True)
    assert base.problem.proxy_passes == passes + 1 and list(info["plan"]) == trace.actions
    assert info["target_bits"] == 3.0
    json.dumps(trace.actions)
