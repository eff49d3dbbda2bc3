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
    paper_cpu = load_hyperparams("cpu-paper")  # the paper's recipe on the small proxy
    assert paper_cpu["learning_rate"] == 5e-4 and paper_cpu["env_kwargs"]["salient_rate"] == 0.03
    assert "warm_start" not in paper_cpu and paper_cpu.get("observation", "paper") == "paper"
    readme = load_hyperparams("cpu")  # the README's: the recipe that wins (issues 12, 21) on the issue-26 engine
    cpu = load_hyperparams("cpu-issue13")  # the same recipe on the issue-13 engine, which the ablations inherit
    assert readme == load_hyperparams("cpu-engine-rot-obs")  # the preset that measured it
    assert {**readme, "env_kwargs": {**readme["env_kwargs"], "quant_config": {"damping": 0.3}}} == cpu
    assert readme["env_kwargs"]["quant_config"]["hessian_blocks"] == 64
    assert readme["env_kwargs"]["quant_config"]["rotation"] == "hadamard"
    assert readme["env_kwargs"]["quant_config"]["salient_metric"] == "obs"

    def without(preset, *keys):
        return {**preset, "env_kwargs": {**preset["env_kwargs"], "quant_config": {
            k: v for k, v in preset["env_kwargs"]["quant_config"].items() if k not in keys}}}

    rot = load_hyperparams("cpu-engine-rot")  # the engine before the OBS saliency: the same recipe but for it
    assert rot == without(readme, "salient_metric")
    both = load_hyperparams("cpu-engine-both")  # and before the rotation
    assert both == without(readme, "salient_metric", "rotation")
    assert load_hyperparams("cpu-no-ppo") == {**cpu, "ppo_updates": False}  # measured on the issue-13 engine
    assert load_hyperparams("cpu-engine-both-no-ppo") == {**both, "ppo_updates": False}  # on the issue-26 one
    assert load_hyperparams("cpu-engine-rot-no-ppo") == {**rot, "ppo_updates": False}  # on the rotated one
    assert load_hyperparams("cpu-engine-rot-obs-no-ppo") == {**readme, "ppo_updates": False}  # and on the README's
    assert load_hyperparams("cpu-quick-no-ppo") == {**load_hyperparams("cpu-quick"), "ppo_updates": False}
    quick = load_hyperparams("cpu-quick")
    assert load_hyperparams("cpu-quick-fp32") == {**quick, "env_kwargs": {**quick["env_kwargs"], "proxy_dtype": "float32"}}
    # cpu-quick with the key-and-value teacher, and its control: nothing else differs
    quick_kv = load_hyperparams("cpu-quick-kv")
    assert quick_kv == {**quick, "warm_start": {**quick["warm_start"], "demonstrations": "calibrated-knapsack-kv"}}
    assert load_hyperparams("cpu-quick-kv-no-ppo") == {**quick_kv, "ppo_updates": False}
    # the Fisher-weighted teacher, and its control: nothing else differs
    fisher = load_hyperparams("cpu-quick-fisher")
    assert fisher == {**quick_kv, "warm_start": {**quick_kv["warm_start"], "demonstrations": "calibrated-knapsack-fisher"}}
    assert load_hyperparams("cpu-quick-fisher-no-ppo") == {**fisher, "ppo_updates": False}
    # the teacher calibrated at each target, 132 episodes for at most cpu-quick-kv's passes, and its control
    each = load_hyperparams("cpu-quick-kv-each")
    assert each == {**quick_kv, "episodes": 132, "warm_start": {**quick_kv["warm_start"], "calibrate_at": "each"}}
    assert load_hyperparams("cpu-quick-kv-each-no-ppo") == {**each, "ppo_updates": False}
    assert load_hyperparams("cpu-bf16") == {**readme, "env_kwargs": {**readme["env_kwargs"], "proxy_dtype": "bfloat16"}}
    kv_teacher = load_hyperparams("cpu-kv-teacher")  # cpu-engine-both's recipe but for its teacher
    assert kv_teacher == {**both, "warm_start": {**both["warm_start"], "demonstrations": "calibrated-knapsack-kv"}}
    assert cpu["env_kwargs"]["n_calibration_samples"] == 16 and cpu["env_kwargs"]["seed"] == 0
    assert (cpu["observation"], cpu["reward_kind"], cpu["warm_start"]["demonstrations"]) == ("paper", "proxy-loss", "calibrated-knapsack")
    assert cpu["normalize_observation"] is True
    # the earlier README preset stays reproducible by name: cpu with ActionCostObservation
    assert load_hyperparams("cpu-action-costs") == {**cpu, "observation": "action-costs"}
    assert load_hyperparams("cpu-action-costs-no-ppo") == {**cpu, "observation": "action-costs", "ppo_updates": False}
    assert load_hyperparams("cpu-kv-teacher-no-ppo") == {**kv_teacher, "ppo_updates": False}  # its control
    # the front on cpu-engine-both's engine (its figures'); cpu-front-issue13 keeps the engine its first figures were measured on
    front, front13 = load_hyperparams("cpu-front"), load_hyperparams("cpu-front-issue13")
    assert front == {**front13, "env_kwargs": both["env_kwargs"]} and front13["env_kwargs"] == cpu["env_kwargs"]
    assert load_hyperparams("cpu-front-no-ppo") == {**front, "ppo_updates": False}
    # the front on the README preset's engine (rotation and OBS saliency), and its control
    front_obs = load_hyperparams("cpu-front-rot-obs")
    assert front_obs == {**front13, "env_kwargs": readme["env_kwargs"]}
    assert load_hyperparams("cpu-front-rot-obs-no-ppo") == {**front_obs, "ppo_updates": False}
    assert front13["observation"] == "paper"
    assert load_hyperparams("cpu-front-action-costs") == {**front13, "observation": "action-costs"}
    for ablation in ("cpu-action-costs", "cpu-no-loss-reward", "cpu-no-shaping", "cpu-no-warm-start", "cpu-no-normalization",
                     "cpu-knapsack-teacher", "cpu-no-self-imitation"):
        assert load_hyperparams(ablation) != cpu
    with pytest.raises(wq.UnknownNameError, match="cpu"):
        load_hyperparams("nope")
    # an ablation must change what runs: normalisation is ActionCostObservation's switch
    assert load_hyperparams("cpu-no-normalization") == {**cpu, "observation": "action-costs", "normalize_observation": False}


def test_normalization_switch_without_its_observation_is_refused():
    from windquant_gym.agents.recipe import Recipe

    base = {k: v for k, v in load_hyperparams("cpu-issue13").items() if k != "normalize_observation"}
    with pytest.raises(wq.ConfigError, match="observation: action-costs"):
        Recipe.from_dict({**base, "normalize_observation": False})
    assert Recipe.from_dict({**base, "observation": "action-costs", "normalize_observation": False})


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
    assert (run / "final_model.zip").exists() and list((run / "checkpoints").rglob("model.zip"))
    assert list((run / "tb").rglob("events.out.tfevents*"))
    plan = wq.plan.QuantPlan.load(run / "final_plan.json")
    assert plan.metrics["effective_bits"] <= 2.0 + 1e-9
    # the plan says how to rebuild the env's problem: the run's model, seed and calibration sizes
    assert (plan.problem.model, plan.problem.seed, plan.problem.n_samples, plan.problem.seq_len) == ("tiny-llama", 0, 8, 64)
    assert wq.plan.QuantPlan.load(next(run.glob("best_plan_*.json"))).problem == plan.problem
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


def test_killed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from windquant_gym.agents import callbacks
    from windquant_gym.agents.checkpoints import latest_checkpoint, read_state

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    uninterrupted = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "whole"), episodes=5, progress=False))
    record = callbacks.EpisodeRecorder._record

    def killed_after_third_episode(self, info):
        record(self, info)
        if self.episodes == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C, or the machine went away

    monkeypatch.setattr(callbacks.EpisodeRecorder, "_record", killed_after_third_episode)
    args = TrainArgs(model="tiny-llama", preset="smoke", out=str(run), episodes=5, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.setattr(callbacks.EpisodeRecorder, "_record", record)
    checkpoint = latest_checkpoint(run)
    saved = read_state(checkpoint)
    assert saved["episodes"] == 2 and checkpoint.name == "episode_000002"
    assert saved["env"]["episode_count"] == 2 and saved["curriculum"]["episodes_done"] == 2
    assert len(list(csv.DictReader((run / "episodes.csv").open()))) == 3  # episode 3 ran, then the kill

    summary = train(TrainArgs(resume=str(run), progress=False))
    rows = list(csv.DictReader((run / "episodes.csv").open()))
    assert [int(r["episode"]) for r in rows] == [1, 2, 3, 4, 5]  # episode 3 trained again, once in the CSV
    # the curriculum went on from stage 1 (episodes_per_stage = ceil(5 / 4) = 2), not from the start
    assert [float(r["target_bits"]) for r in rows] == [3.0, 3.0, 2.5, 2.5, 2.0]
    final = read_state(latest_checkpoint(run))
    assert final["episodes"] == 5 and final["env"]["episode_count"] == 5
    assert final["num_timesteps"] == 5 * summary["n_units"]
    assert summary["resumed_from_episode"] == 2
    # the proxy passes the warm start spent before the kill still count (equal budgets on a leaderboard)
    assert summary["warm_start"]["evaluations"] > 0
    # every pass counted: 5 episodes, the warm start's, a rollout at each of the 3 targets, the knapsack's row
    assert summary["policy_evaluations"] == uninterrupted["policy_evaluations"] == 5 + summary["warm_start"]["evaluations"] + 3
    assert summary["evaluations"] == uninterrupted["evaluations"] == summary["policy_evaluations"] + 1


def test_resume_needs_a_run_with_a_checkpoint(tmp_path):
    with pytest.raises(wq.ConfigError, match="config.json"):
        train(TrainArgs(resume=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"args": {}, "hyperparams": {}}))
    with pytest.raises(wq.ConfigError, match="no complete checkpoint"):
        train(TrainArgs(resume=str(tmp_path)))


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = TrainArgs(model="tiny-llama", preset="smoke", out=str(run), episodes=1, progress=False)
    train(args)
    with pytest.raises(wq.ConfigError, match="--resume"):
        train(args)
    stale = run / "best_plan_99.json"
    stale.write_text("{}")
    train(TrainArgs(**{**args.__dict__, "overwrite": True}))
    rows = list(csv.DictReader((run / "episodes.csv").open()))
    assert [int(r["episode"]) for r in rows] == [1] and not stale.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, monkeypatch):
    from windquant_gym.agents.checkpoints import latest_checkpoint

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train(TrainArgs(model="tiny-llama", preset="smoke", out=str(run), episodes=3, progress=False))
    folders = sorted(p.name for p in (run / "checkpoints").glob("episode_*"))
    assert folders == ["episode_000002", "episode_000003"]  # the newest two are kept
    assert latest_checkpoint(run).name == "episode_000003"
    (run / "checkpoints" / "episode_000003" / "model.zip").write_bytes(b"truncated")
    assert latest_checkpoint(run).name == "episode_000002"


def test_console_script_prints_a_named_error_without_traceback(tmp_path, capsys, monkeypatch):
    from windquant_gym.cli import run

    monkeypatch.setattr(sys, "argv", ["windquant", "train", "--resume", str(tmp_path)])
    assert run() == 2
    err = capsys.readouterr().err
    assert err.startswith("windquant: ConfigError:") and "config.json" in err and "Traceback" not in err
