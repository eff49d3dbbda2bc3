import csv
import importlib.util
import json
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import windquant_gym as wq
from windquant_gym.agents import WindQuantPolicy, load_hyperparams
from windquant_gym.agents.train import TrainArgs, train

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hyperparams_follow_the_paper_and_merge_over_default():
    hp = load_hyperparams("WindQuant-v0")
    assert (hp["learning_rate"], hp["clip_range"], hp["ent_coef"], hp["vf_coef"]) == (5e-4, 0.2, 0.05, 0.5)
    assert (hp["n_epochs"], hp["gamma"], hp["gae_lambda"]) == (3, 0.99, 0.95)
    assert hp["curriculum"] == [3.0, 2.5, 2.0, 2.0]
    cpu = load_hyperparams("cpu")
    assert cpu["learning_rate"] == 5e-4 and cpu["env_kwargs"]["salient_rate"] == 0.03
    assert cpu["env_kwargs"]["n_calibration_samples"] == 16
    with pytest.raises(wq.UnknownNameError, match="cpu"):
        load_hyperparams("nope")


def test_maskable_ppo_trains_two_episodes(tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    summary = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "run"), progress=False))
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "episodes.csv").open()))
    assert [int(r["episode"]) for r in rows] == [1, 2]
    assert [float(r["target_bits"]) for r in rows] == [3.0, 2.5]  # the curriculum moved on
    for row in rows:
        assert float(row["effective_bits"]) <= float(row["target_bits"]) + 1e-9
        assert float(row["proxy_ppl"]) > 1
    assert (run / "final_model.zip").exists() and list((run / "checkpoints").glob("*.zip"))
    assert list((run / "tb").rglob("events.out.tfevents*"))
    plan = wq.plan.QuantPlan.load(run / "final_plan.json")
    assert plan.metrics["effective_bits"] <= 2.0 + 1e-9
    results = summary["results"]
    assert results["unquantized"]["effective_bits"] == 16.0
    assert results["policy (deterministic)"]["heldout_ppl"] > 1
    assert json.loads((run / "summary.json").read_text())["episodes"] == 2
    from windquant_gym.cli import main

    assert main(["plot", str(run)]) == 0
    assert (run / "training_curves.png").stat().st_size > 1000


def test_policy_is_layernorm_mlp(tiny_problem):
    from sb3_contrib import MaskablePPO

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem)
    model = MaskablePPO(WindQuantPolicy, env, n_steps=env.unwrapped.n_units, policy_kwargs={"hidden_size": 16}, device="cpu")
    layers = [type(m).__name__ for m in model.policy.mlp_extractor.trunk]
    assert layers == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU"]
    assert model.policy.action_net.out_features == 7 and model.policy.value_net.out_features == 1


@pytest.mark.parametrize("algorithm", ["PPO", "A2C", "DQN"])
def test_mask_unaware_algorithms_run_one_episode(tiny_problem, algorithm):
    example = load_example("other_algorithms")
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    result = example.run(algorithm, env, episodes=1)
    assert result["effective_bits"] <= 2.0 + 1e-9  # projection kept the budget
    assert result["proxy_ppl"] > 1
