"""Issue 21: plans told apart by a paired bootstrap over held-out windows, every proxy pass of a
training run counted (checked by a hook on the model's forward), one policy for several
budgets (TargetSampler, the front files and plot), and the control with PPO's updates off."""

import csv
import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import windquant_gym as wq
from windquant_gym.agents.front import read_front
from windquant_gym.agents.hyperparams import load_hyperparams
from windquant_gym.agents.train import TrainArgs, train
from windquant_gym.harness.leaderboard import add_comparisons, format_table
from windquant_gym.envs import TargetSampler
from windquant_gym.eval import block_nlls, mean_nll
from windquant_gym.eval.bootstrap import paired_bootstrap


# ----- the paired bootstrap -------------------------------------------------------------------
def test_bootstrap_of_a_plan_against_itself_is_exactly_zero():
    nll = np.random.default_rng(0).normal(3.0, 0.5, size=128)
    result = paired_bootstrap(nll, nll)
    assert (result.change, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.tie and result.verdict == "tie" and result.windows == 128


def test_bootstrap_tells_a_real_shift_from_noise():
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.5, size=200)
    better = base - 0.05 + rng.normal(0, 0.02, size=200)  # every window ~5% lower PPL
    result = paired_bootstrap(base, better)
    assert result.change == pytest.approx(math.expm1(np.mean(better - base)))
    assert result.low < result.change < result.high < 0 and result.verdict == "better"
    noise = base + rng.normal(0, 0.05, size=200)  # no shift, only noise: the interval spans 0
    assert paired_bootstrap(base, noise).tie
    worse = paired_bootstrap(better, base)
    assert worse.verdict == "worse" and worse.low > 0
    assert "tie" in paired_bootstrap(base, noise).describe() and "tie" not in result.describe()


def test_bootstrap_names_bad_input():
    with pytest.raises(wq.ConfigError, match="same windows"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(wq.ConfigError, match="non-finite"):
        paired_bootstrap([1.0, float("inf")], [1.0, 2.0])
    with pytest.raises(wq.ConfigError, match="resamples"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], resamples=5)


def test_block_nlls_are_the_windows_of_mean_nll(tiny):
    model, _ = tiny
    blocks = torch.randint(0, 200, (7, 33), generator=torch.Generator().manual_seed(0))
    per_block = block_nlls(model, blocks, batch_size=3, logits_chunk=10)  # chunks that straddle blocks
    assert per_block.shape == (7,)
    assert float(per_block.mean()) == pytest.approx(mean_nll(model, blocks), rel=1e-6)
    single = block_nlls(model, blocks[2:3])
    assert float(single[0]) == pytest.approx(float(per_block[2]), rel=1e-6)


def test_leaderboard_compares_every_plan_with_the_reference_at_its_target():
    rng = np.random.default_rng(2)
    reference = rng.normal(4.0, 0.3, size=64)
    rows = [
        {"allocator": "calibrated-knapsack", "target_bits": 2.0, "heldout_window_nll": reference.tolist(), "heldout_ppl": 1.0},
        {"allocator": "mine", "target_bits": 2.0, "heldout_window_nll": (reference - 0.1).tolist(), "heldout_ppl": 1.0},
        {"allocator": "same", "target_bits": 2.0, "heldout_window_nll": reference.tolist(), "heldout_ppl": 1.0},
        {"allocator": "mine", "target_bits": 3.0, "heldout_window_nll": reference.tolist(), "heldout_ppl": 1.0},
    ]
    add_comparisons(rows)
    assert "vs" not in rows[0] and "vs" not in rows[3]  # the reference itself; no reference at 3.0 bits
    assert rows[1]["vs"] == "calibrated-knapsack" and rows[1]["heldout_verdict"] == "better"
    assert rows[1]["heldout_change"] == pytest.approx(math.expm1(-0.1))
    assert rows[2]["heldout_verdict"] == "tie" and rows[2]["heldout_change_low"] == rows[2]["heldout_change_high"] == 0.0
    table = format_table(rows)
    assert "-9.5% [-9.5%, -9.5%]" in table and "+0.0% [+0.0%, +0.0%] tie" in table


# ----- every proxy pass counted ------------------------------------------------------------
def _count_proxy_passes(monkeypatch):
    """Record the input ids of every forward pass of a Llama decoder."""
    from transformers.models.llama.modeling_llama import LlamaModel

    seen = []
    original = LlamaModel.forward

    def counting(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", counting)
    return seen


def _count_smoke_passes(monkeypatch, preset: str = "smoke"):
    """``preset``'s calibration and table cached first (their passes are not the run's), then every
    forward of the model recorded (:func:`_count_proxy_passes`)."""
    hp = load_hyperparams(preset)
    kwargs = {k: v for k, v in hp["env_kwargs"].items() if k != "seed"}
    gym.make("WindQuant-v0", model="tiny-llama", progress=False, **kwargs)
    return _count_proxy_passes(monkeypatch)


def _passes_on(seen, blocks: torch.Tensor) -> float:
    """Full-pass equivalents among the recorded forwards that fed rows of ``blocks``."""
    rows = {tuple(r.tolist()) for r in blocks}
    fed = sum(sum(tuple(r.tolist()) in rows for r in ids) for ids in seen if ids.shape[1] == blocks.shape[1])
    return fed / len(blocks)


@pytest.mark.parametrize("preset", ["smoke", "smoke-front"])
def test_a_training_runs_proxy_passes_are_what_its_summary_says(tmp_path, monkeypatch, preset):
    hp = load_hyperparams(preset)
    seen = _count_smoke_passes(monkeypatch, preset)
    run = tmp_path / "run"
    summary = train(TrainArgs(model="tiny-llama", preset=preset, out=str(run), episodes=3, progress=False))
    problem = wq.plan.QuantPlan.load(run / "returned_plan.json").problem_spec().build()
    counted = _passes_on(seen, problem.blocks)
    targets = len(set(hp.get("sampled_targets") or hp["curriculum"]))
    assert counted == summary["evaluations"]
    assert summary["policy_evaluations"] == 3 + summary["warm_start"]["evaluations"] + targets  # episodes, warm start, rollouts
    assert summary["baseline_evaluations"] == summary["evaluations"] - summary["policy_evaluations"] >= 1
    assert summary["warm_start"]["evaluations"] == summary["warm_start"]["calibration_evaluations"] + targets


def test_a_teacher_calibrated_at_each_target_keeps_each_targets_best_scales(tmp_path, monkeypatch):
    """warm_start.calibrate_at: each: the teacher calibrated anew at every target (7 passes each),
    each target then keeping the best on the proxy of every target's scales, so that its plan is no
    worse on the proxy than its own calibration's nor than any other target's scales; every pass
    counted by a forward hook in the summary."""
    from windquant_gym.allocators import CalibratedKnapsack

    hp = load_hyperparams("smoke-front")
    seen = _count_smoke_passes(monkeypatch, "smoke-front")
    run = tmp_path / "run"
    summary = train(TrainArgs(model="tiny-llama", preset="smoke-front", out=str(run), episodes=3, progress=False,
                              overrides={"warm_start": {**hp["warm_start"], "calibrate_at": "each"}}))
    problem = wq.plan.QuantPlan.load(run / "returned_plan.json").problem_spec().build()
    counted = _passes_on(seen, problem.blocks)
    targets = sorted(float(t) for t in hp["sampled_targets"])
    warm = summary["warm_start"]
    assert warm["calibrate_at"] == "each" and sorted(warm["scales"]) == sorted(f"{t:g}" for t in targets)
    assert counted == summary["evaluations"]
    assert summary["policy_evaluations"] == 3 + warm["evaluations"] + len(targets)
    kept = {float(t): p for t, p in json.loads((run / "warm_start_plans.json").read_text()).items()}
    base = gym.make("WindQuant-v0", model="tiny-llama", progress=False,
                    **{k: v for k, v in hp["env_kwargs"].items() if k != "seed"}).unwrapped
    alone = {t: CalibratedKnapsack(calibrate_at=t) for t in targets}
    for teacher in alone.values():
        teacher.calibrate(base)
    distinct = []
    for teacher in alone.values():
        if teacher.scales not in distinct:
            distinct.append(teacher.scales)
    assert len(distinct) > 1  # else the scales compete with themselves only and nothing below could fail
    # 7 per target, and at each target one pass per other distinct set of scales
    assert warm["calibration_evaluations"] == 7 * len(targets) + len(targets) * (len(distinct) - 1)
    assert warm["evaluations"] == warm["calibration_evaluations"] + len(targets)  # + one measured walk each
    for target in targets:
        chosen = warm["scales"][f"{target:g}"]
        assert chosen in distinct and kept[target] == alone[target].plan_at(base, target, chosen).tolist()
        nll = base.problem.proxy_nll(np.asarray(kept[target]))
        for scales in distinct:  # the best of every target's scales at this target, by the proxy
            assert nll <= base.problem.proxy_nll(alone[target].plan_at(base, target, scales)) + 1e-9
        assert math.log(warm["teacher_proxy_ppl"][f"{target:g}"]) == pytest.approx(nll, rel=1e-6)
    # a front row's teacher costs every target's calibration and the other scales measured at its own
    teachers = [r for r in read_front(run) if r["allocator"] == "calibrated-knapsack"]
    assert sorted(r["target_bits"] for r in teachers) == targets
    assert all(r["evaluations"] == 7 * len(targets) + len(distinct) - 1 for r in teachers)
    # benchmarks/teacher_plans.py writes those plans: read where kept, rebuilt from the scales where not,
    # from warm_start.json where the run stopped before its summary
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_plans.py"
    spec = importlib.util.spec_from_file_location("teacher_plans_bench", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (run / "warm_start_plans.json").unlink()
    (run / "summary.json").unlink()
    args = [str(run), str(tmp_path / "teacher"), "--preset", "smoke-front", "--model", "tiny-llama",
            "--targets", *(f"{t:g}" for t in targets)]
    monkeypatch.setattr(sys, "argv", ["teacher_plans.py", *args])
    module.main()
    for target in targets:
        saved = wq.plan.QuantPlan.load(tmp_path / "teacher" / f"teacher_each_scales_{target:g}.json")
        assert list(saved.actions) == kept[target] and saved.metrics["target_bits"] == target
    (run / "warm_start.json").unlink()
    with pytest.raises(SystemExit, match="neither summary.json nor warm_start.json"):
        module.main()


def test_a_returned_only_summary_measures_two_plans_on_held_out_text(tmp_path, monkeypatch):
    """heldout_summary: returned (the cpu-quick preset): the returned plan and the teacher's, one
    held-out pass each, no knapsack pass; the proxy passes still add up to the summary's."""
    from windquant_gym.agents.train import TEACHER_ROW
    from windquant_gym.data import eval_windows, load_texts

    hp = load_hyperparams("smoke")
    kwargs = {k: v for k, v in hp["env_kwargs"].items() if k != "seed"}
    env = gym.make("WindQuant-v0", model="tiny-llama", progress=False, **kwargs)  # calibration and table cached first
    held_out = eval_windows(load_texts("wiki-sample", split="eval"), env.unwrapped.problem.tokenizer,
                            hp["eval_seq_len"], hp["eval_windows"])
    seen = _count_proxy_passes(monkeypatch)
    run = tmp_path / "run"
    summary = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(run), episodes=2, progress=False,
                              overrides={"heldout_summary": "returned"}))
    returned = summary["returned"]
    assert set(summary["results"]) == {returned, TEACHER_ROW}
    assert summary["results"][returned]["returned"] and summary["results"][returned]["vs"]["reference"] == TEACHER_ROW
    assert summary["heldout_summary"] == "returned" and summary["heldout_passes"] == 2
    assert _passes_on(seen, held_out) == 2  # counted on the model: the two plans, no unquantized or knapsack pass
    problem = wq.plan.QuantPlan.load(run / "returned_plan.json").problem_spec().build()
    assert _passes_on(seen, problem.blocks) == summary["evaluations"] == summary["policy_evaluations"]
    assert summary["baseline_evaluations"] == 0


# ----- one policy for every budget --------------------------------------------------------
def test_target_sampler_draws_every_target_and_passes_the_checks(tiny_problem):
    def make():
        return TargetSampler(gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem), (2.5, 3.0, 4.0), seed=3)

    env = make()
    drawn = []
    for _ in range(30):
        _, info = env.reset()
        drawn.append(env.unwrapped.target_bits)
        assert info["curriculum_stage"] == env.targets.index(drawn[-1])
    assert set(drawn) == {2.5, 3.0, 4.0}
    state = env.state_dict()
    twin = make()
    twin.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint stores
    assert [env.reset()[1]["target_bits"] for _ in range(6)] == [twin.reset()[1]["target_bits"] for _ in range(6)]
    env.freeze(3.0)
    assert {env.reset()[1]["target_bits"] for _ in range(5)} == {3.0}
    env.unfreeze()
    check_env(make(), skip_render_check=True)
    sb3_check_env(make(), warn=True)
    with pytest.raises(wq.ConfigError, match="at least one target"):
        TargetSampler(gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem), ())
    with pytest.raises(wq.ConfigError, match="list of target bits"):
        TargetSampler(gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem), ("x",))
    with pytest.raises(wq.ConfigError, match="target_bits"):
        TargetSampler(gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem), (0.5,))


def test_one_policy_plays_every_listed_budget_and_writes_the_front(tmp_path):
    run = tmp_path / "front"
    summary = train(TrainArgs(model="tiny-llama", preset="smoke-front", out=str(run), progress=False))
    hp = load_hyperparams("smoke-front")
    targets = [float(t) for t in hp["sampled_targets"]]
    rows = read_front(run)
    by = {(r["allocator"], r["target_bits"]): r for r in rows}
    assert {a for a, _ in by} == {"MaskablePPO", "MaskablePPO (returned)", "calibrated-knapsack", "knapsack"}
    episodes = list(csv.DictReader((run / "episodes.csv").open()))
    assert {float(e["target_bits"]) for e in episodes} <= set(targets)
    for target in targets:
        policy = by[("MaskablePPO", target)]
        # one pass of the trained policy at each budget: within it, and spending most of it
        assert target * 0.9 <= policy["effective_bits"] <= target + 1e-6
        assert policy["evaluations"] == summary["policy_evaluations"]
        assert by[("knapsack", target)]["evaluations"] == 1
        teacher = by[("calibrated-knapsack", target)]
        assert teacher["evaluations"] == 7 + (0 if target == hp["warm_start"]["calibrate_at"] else 1)
        assert "vs" not in teacher and policy["vs"] == "calibrated-knapsack"
        assert policy["heldout_change_low"] <= policy["heldout_change"] <= policy["heldout_change_high"]
        assert len(policy["heldout_window_nll"]) == hp["eval_windows"]
        assert math.exp(np.mean(policy["heldout_window_nll"])) == pytest.approx(policy["heldout_ppl"])
        saved = wq.plan.QuantPlan.load(run / policy["plan_file"])
        assert saved.metrics["target_bits"] == target and saved.metrics["proxy_ppl"] == policy["proxy_ppl"]
    with (run / "front.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows) == 4 * len(targets)
    assert (run / "front.md").read_text().count("\n") == len(rows) + 2
    assert summary["front"] == "front.json"


def test_front_plot_draws_and_names_a_missing_file(tmp_path):
    pytest.importorskip("matplotlib")
    from windquant_gym import plots

    rows = [{"allocator": a, "target_bits": t, "storage_bits": t + 0.4, "heldout_ppl": 100 / t + k, "evaluations": e}
            for k, (a, e) in enumerate((("MaskablePPO", 200.0), ("knapsack", 1.0))) for t in (2.0, 2.5, 3.0)]
    (tmp_path / "front.json").write_text(json.dumps({"rows": rows}))
    path = plots.plot_front(tmp_path)
    assert path == tmp_path / "front.png" and path.stat().st_size > 10_000
    with pytest.raises(wq.DataError, match="front.json"):
        plots.plot_front(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(wq.DataError, match="rows"):
        plots.plot_front(tmp_path / "bad.json")


# ----- the control: PPO's updates off -----------------------------------------------------
def test_ppo_updates_off_leaves_the_policy_where_the_warm_start_put_it(tmp_path, monkeypatch):
    from windquant_gym.agents import train as train_module

    snapshots = {}
    original = train_module._warm_start

    def remember(model, *args, **kwargs):
        stats = original(model, *args, **kwargs)
        snapshots["after warm start"] = {k: v.clone() for k, v in model.policy.state_dict().items()}
        return stats

    monkeypatch.setattr(train_module, "_warm_start", remember)
    overrides = {"ppo_updates": False, "self_imitation": None}
    train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "off"), episodes=4, overrides=overrides,
                    progress=False))
    from sb3_contrib import MaskablePPO

    trained = MaskablePPO.load(tmp_path / "off" / "final_model.zip", device="cpu").policy.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in snapshots["after warm start"].items())
    summary = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert summary["ppo_updates"] is False and summary["training_episodes"] == 4
    # with updates on, the same run moves the policy (the control is not vacuous)
    train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "on"), episodes=4,
                    overrides={"self_imitation": None}, progress=False))
    moved = MaskablePPO.load(tmp_path / "on" / "final_model.zip", device="cpu").policy.state_dict()
    assert not all(torch.equal(moved[k], v) for k, v in snapshots["after warm start"].items())
    with pytest.raises(wq.ConfigError, match="ppo_updates"):
        train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "bad"), overrides={"ppo_updates": "no"},
                        progress=False))


def test_front_presets_load_and_name_their_levers(tmp_path):
    front = load_hyperparams("cpu-front")
    assert front["sampled_targets"] == [1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5]
    assert front["warm_start"]["calibrate_at"] == 2.0 and front["eval_windows"] >= 128
    assert load_hyperparams("cpu-front-no-ppo")["ppo_updates"] is False
    assert load_hyperparams("cpu-no-ppo")["ppo_updates"] is False
    with pytest.raises(wq.ConfigError, match="sampled_targets"):
        train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "run"), overrides={"sampled_targets": 2.0},
                        progress=False))


def test_search_from_the_calibrated_knapsack_spends_its_start_out_of_the_budget(tiny_problem, monkeypatch):
    from windquant_gym.allocators import SearchAllocator

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.5).unwrapped
    seen = _count_proxy_passes(monkeypatch)
    before = tiny_problem.proxy_passes
    search = SearchAllocator(evaluations=20, seed=0, start="calibrated-knapsack", snapshot_at=(12,), progress=False,
                             offspring=4, stages=((0.25, 2), (1.0, 1)))
    search.make_plan(env)
    assert search.start_evaluations == 7  # the calibration's passes, paid out of the 20
    assert search.evaluations == tiny_problem.proxy_passes - before == _passes_on(seen, tiny_problem.blocks) <= 20
    assert 7 < search.result.snapshots[12]["evaluations"] <= 12
    with pytest.raises(wq.ConfigError, match="start plan's 7"):
        SearchAllocator(evaluations=7.5, start="calibrated-knapsack", progress=False).make_plan(env)
    kv = SearchAllocator(evaluations=12, seed=0, start="calibrated-knapsack-kv", progress=False, offspring=4,
                         stages=((0.25, 2), (1.0, 1)))
    kv.make_plan(env)
    assert kv.start_evaluations == 10  # its key / value group's 3 passes on top of the 7


def test_paired_script_compares_each_allocator_with_itself_on_the_reference_engine(tmp_path, capsys):
    """benchmarks/paired.py --reference-label: an engine A/B pairs knapsack with knapsack, not with another allocator."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"
    spec = importlib.util.spec_from_file_location("paired_script", script)
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    rng = np.random.default_rng(0)
    base = rng.normal(4.0, 0.3, 40)

    def bench(path, shifts):
        rows = [{"allocator": "unquantized", "target_bits": None, "heldout_window_nll": (base - 1).tolist()}]
        for name, shift in shifts.items():
            rows.append({"allocator": name, "target_bits": 2.0, "effective_bits": 2.0, "storage_bits": 2.4,
                         "proxy_ppl": 1.0, "heldout_ppl": float(np.exp((base + shift).mean())),
                         "heldout_window_nll": (base + shift).tolist()})
        path.write_text(json.dumps({"episodes": rows}))
        return path

    old = bench(tmp_path / "old.json", {"knapsack": 0.5, "calibrated-knapsack": 0.2})
    new = bench(tmp_path / "new.json", {"knapsack": 0.4, "calibrated-knapsack": 0.2})
    out = tmp_path / "pairs.json"
    assert paired.main([f"{old}=old", f"{new}=new", "--reference-label", "old", "--json", str(out)]) == 0
    pairs = {r["allocator"]: r for r in json.loads(out.read_text())}
    assert pairs["knapsack [new]"]["reference"] == "knapsack [old]"
    assert pairs["knapsack [new]"]["change"] == pytest.approx(math.exp(-0.1) - 1)
    assert pairs["calibrated-knapsack [new]"]["reference"] == "calibrated-knapsack [old]"
    assert pairs["calibrated-knapsack [new]"]["low"] == pairs["calibrated-knapsack [new]"]["high"] == 0.0  # same windows
    assert "(reference)" in capsys.readouterr().out


def test_paired_script_matches_rows_by_storage_bits(tmp_path, capsys):
    """benchmarks/paired.py --match storage: a plan at a higher target whose file is as large pairs with the
    reference engine's plan of that size, not with its own target's; too far apart, it pairs with nothing."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"
    spec = importlib.util.spec_from_file_location("paired_script", script)
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    base = np.random.default_rng(1).normal(4.0, 0.3, 40)

    def bench(path, rows):
        episodes = [{"allocator": "unquantized", "target_bits": None, "heldout_window_nll": (base - 1).tolist()}]
        for target, storage, shift in rows:
            episodes.append({"allocator": "knapsack", "target_bits": target, "effective_bits": target,
                             "storage_bits": storage, "proxy_ppl": 1.0, "heldout_ppl": float(np.exp((base + shift).mean())),
                             "heldout_window_nll": (base + shift).tolist()})
        path.write_text(json.dumps({"episodes": episodes}))
        return path

    outliers = bench(tmp_path / "outliers.json", [(3.0, 3.43, 0.3), (2.5, 2.93, 0.5)])
    plain = bench(tmp_path / "plain.json", [(3.35, 3.42, 0.25), (2.85, 2.99, 0.4)])
    out = tmp_path / "pairs.json"
    assert paired.main([f"{outliers}=o", f"{plain}=p", "--reference-label", "o", "--match", "storage",
                        "--json", str(out)]) == 0
    pairs = {(r["allocator"], r["target_bits"]): r for r in json.loads(out.read_text())}
    match = pairs[("knapsack [p]", 3.35)]
    assert match["reference_target_bits"] == 3.0 and match["change"] == pytest.approx(math.exp(-0.05) - 1)
    assert ("knapsack [p]", 2.85) not in pairs  # 2.99 against 2.93: outside the default 0.015
    assert "against its 3-bit row" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="storage-tolerance"):
        paired.main([str(outliers), "--reference", "knapsack", "--match", "storage", "--storage-tolerance", "-1"])


def test_seed_table_compares_each_run_with_the_search_from_the_chosen_start(tmp_path, capsys):
    """benchmarks/seed_table.py --search-start: the search from that start is the one each run is paired
    with, seed by seed; a search from another start stays a row of its own, never mixed into "search"."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_table.py"
    spec = importlib.util.spec_from_file_location("seed_table_script", script)
    seed_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_table)
    base = np.random.default_rng(2).normal(4.0, 0.3, 40)

    def row(allocator, shift, **extra):
        return {"allocator": allocator, "target_bits": 2.0, "heldout_window_nll": (base + shift).tolist(), **extra}

    unquantized = {"allocator": "unquantized", "target_bits": None, "heldout_window_nll": (base - 1).tolist()}
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"episodes": [unquantized, row("calibrated-knapsack", 0.35), row("knapsack", 0.9),
                                               row("plan:returned_plan_2.json", 0.1, plan_file="runs/quick-kv_s0/returned_plan_2.json"),
                                               row("plan:best_plan_2.json", 0.15, plan_file="runs/quick-kv_s0/best_plan_2.json")]}))
    searches = []
    for start, shift in (("calibrated-knapsack", 0.0), ("calibrated-knapsack-kv", 0.2)):
        path = tmp_path / f"search_{start}.json"
        path.write_text(json.dumps({"episodes": [unquantized, row("calibrated-knapsack", 0.3), row("calibrated-knapsack-kv", 0.25),
                                                 row(f"search-nll (from {start})", shift, seed=0)]}))
        searches.append(path)
    table, _ = seed_table.read([replay], searches, "calibrated-knapsack-kv")
    assert set(table[2.0]) == {("calibrated-knapsack", 0), ("calibrated-knapsack-kv", 0), ("quick-kv", 0), ("search", 0),
                               ("search (from calibrated-knapsack)", 0), ("quick-kv (best by proxy)", 0)}
    assert np.allclose(table[2.0][("quick-kv (best by proxy)", 0)], base + 0.15)  # the run's best by proxy, kept apart
    assert np.allclose(table[2.0][("search", 0)], base + 0.2)  # the search from the chosen start
    assert np.allclose(table[2.0][("calibrated-knapsack", 0)], base + 0.3)  # a search file's reference replaces a replay's
    alone, _ = seed_table.read([replay], [])  # replays alone: their own reference rows count (the plain knapsack's not)
    assert set(alone[2.0]) == {("calibrated-knapsack", 0), ("quick-kv", 0), ("quick-kv (best by proxy)", 0)}
    assert np.allclose(alone[2.0][("calibrated-knapsack", 0)], base + 0.35)
    out = tmp_path / "table.json"
    assert seed_table.main(["--replay", str(replay), "--search", *map(str, searches), "--main", "quick-kv",
                            "--search-start", "calibrated-knapsack-kv", "--json", str(out)]) == 0
    assert "vs search from calibrated-knapsack-kv (same seed)" in capsys.readouterr().out
    rows = {r["run"]: r for r in json.loads(out.read_text())["rows"]}
    (vs_search,) = rows["quick-kv"]["vs_search"]
    assert vs_search["change"] == pytest.approx(math.exp(-0.1) - 1)  # the run 0.1 nats below the search from its start
    assert rows["search (from calibrated-knapsack)"]["vs_search"] == []  # searches are not paired with each other
