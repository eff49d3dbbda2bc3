"""Racing episodes (issue 21): a plan measured on some proxy blocks first and on the rest only
when it may be its target's best; the best plan is always a measurement on every block, and the
passes a run reports are the blocks that went through the model."""

import itertools
import json
import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import windquant_gym as wq
from windquant_gym.agents.callbacks import EpisodeRecorder
from windquant_gym.agents.hyperparams import load_hyperparams
from windquant_gym.agents.train import TrainArgs, train
from windquant_gym.allocators.baselines import KnapsackAllocator


def _play(env, plan):
    env.reset()
    for action in plan:
        *_, terminated, _, info = env.step(int(action))
    assert terminated
    return info


def _race_env(problem, **kwargs):
    return gym.make("WindQuant-v0", model=problem.model, problem=problem, target_bits=2.5, **kwargs)


# ----- the problem: a plan applied once, measured block by block --------------------------------
def test_two_halves_of_the_blocks_make_the_full_pass(tiny_problem):
    plan = KnapsackAllocator().make_plan(_race_env(tiny_problem).unwrapped)
    full = tiny_problem.proxy_losses(plan)
    before = tiny_problem.proxy_passes
    n = len(tiny_problem.blocks)
    first, rest = [0, 3, 5], [i for i in range(n) if i not in (0, 3, 5)]
    with tiny_problem.measuring(plan) as measure:
        head, tail = measure(first), measure(rest)
    assert tiny_problem.proxy_passes - before == pytest.approx(1.0)
    joined = (head.nll * head.n_positions + tail.nll * tail.n_positions) / (head.n_positions + tail.n_positions)
    assert joined == pytest.approx(full.nll, rel=1e-5) and head.n_positions + tail.n_positions == full.n_positions
    assert head.nll != pytest.approx(tail.nll, rel=1e-4)  # the halves differ: the check compares real work
    # the unquantized model's per-block NLL averages to the proxy baseline
    assert float(tiny_problem.baseline_block_nll().mean()) == pytest.approx(tiny_problem.baseline_nll, rel=1e-5)
    with pytest.raises(wq.ConfigError, match="distinct indices"):
        with tiny_problem.measuring(plan) as measure:
            measure([0, 0, 1])
    with pytest.raises(wq.ConfigError, match="pass None"):
        with tiny_problem.measuring(plan) as measure:
            measure([n])


def test_weights_come_back_after_a_raced_measurement(tiny_problem):
    model = tiny_problem.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = np.zeros(len(tiny_problem.units), dtype=np.int64) + 4  # 2 bits everywhere
    with pytest.raises(RuntimeError, match="stop"):
        with tiny_problem.measuring(plan) as measure:
            measure([1, 2])
            raise RuntimeError("stop")
    assert all(torch_equal(before[k], v) for k, v in model.state_dict().items())


def torch_equal(a, b):
    return bool((a == b).all())


# ----- the env ---------------------------------------------------------------------------------
def test_a_worse_plan_is_measured_on_the_first_blocks_only(tiny_problem):
    env = _race_env(tiny_problem, race_blocks=3, race_margin=0.0)
    base = env.unwrapped
    env.reset(seed=0)
    good = KnapsackAllocator().make_plan(base)
    first = _play(env, good)  # nothing known at 2.5 bits: every block
    assert first["proxy_complete"] and first["proxy_blocks"] == len(tiny_problem.blocks) and first["proxy_passes"] == 1.0
    assert base.race.best[2.5] == pytest.approx(math.log(first["ppl_ratio"]))
    plain = tiny_problem.proxy_losses(good)  # the same plan without racing: the same measurement
    assert first["proxy_ppl"] == pytest.approx(math.exp(plain.nll), rel=1e-6)
    # against a best far better than this plan, its estimate from 3 blocks loses the race
    bar = math.log(first["ppl_ratio"]) - 1.0
    base.race.best[2.5] = bar
    before = tiny_problem.proxy_passes
    raced = _play(env, good)
    assert not raced["proxy_complete"] and raced["proxy_blocks"] == 3
    assert raced["proxy_passes"] == pytest.approx(3 / len(tiny_problem.blocks)) == tiny_problem.proxy_passes - before
    # the estimate is the plan against the unquantized model on the same 3 blocks (some 3 of them), and
    # its proxy PPL that ratio times the full baseline's
    per_block = tiny_problem.baseline_block_nll()
    assert raced["proxy_ppl"] == pytest.approx(raced["ppl_ratio"] * tiny_problem.baseline_ppl, rel=1e-9)
    with tiny_problem.measuring(good) as measure:
        ratios = [math.exp(measure(rows).nll - per_block[list(rows)].mean())
                  for rows in itertools.combinations(range(len(per_block)), 3)]
    assert min(abs(r / raced["ppl_ratio"] - 1) for r in ratios) < 1e-6
    assert base.race.best[2.5] == bar  # an estimate never becomes the bar
    # at a margin that forgives anything it is measured on every block; the better bar stays
    base.race.log_margin = math.inf
    again = _play(env, good)
    assert again["proxy_complete"] and again["proxy_blocks"] == len(tiny_problem.blocks)
    assert again["proxy_ppl"] == pytest.approx(first["proxy_ppl"], rel=1e-6) and base.race.best[2.5] == bar


def test_the_race_draws_its_blocks_from_the_env_seed(tiny_problem):
    cheap = None
    draws = []
    for _ in range(2):
        env = _race_env(tiny_problem, race_blocks=2, race_margin=0.0)
        base = env.unwrapped
        base.race.best[2.5] = -math.inf  # nothing can come near: every episode stops at its 2 blocks
        cheap = np.array([np.flatnonzero(base.rule_mask[i])[-1] for i in range(base.n_units)])  # fits any budget
        env.reset(seed=7)
        draws.append([_play(env, cheap)["proxy_ppl"] for _ in range(4)])
    assert draws[0] == draws[1]  # the same seed: the same blocks
    assert len(set(draws[0])) > 1  # different blocks from one episode to the next


def test_the_racing_env_passes_both_checkers_and_resumes(tiny_problem):
    env = _race_env(tiny_problem, race_blocks=4)
    check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped)
    base = env.unwrapped
    base.race.best = {2.5: 0.25, 3.0: 0.125}
    state = base.state_dict()
    fresh = _race_env(tiny_problem, race_blocks=4).unwrapped
    fresh.load_state_dict(state)
    assert fresh.race.best == {2.5: 0.25, 3.0: 0.125}


@pytest.mark.parametrize("kwargs, match", [
    ({"race_blocks": 0}, "race_blocks must be an int from 1 to 7"),
    ({"race_blocks": 8}, "race_blocks must be an int from 1 to 7"),
    ({"race_blocks": True}, "leave it None"),
    ({"race_blocks": 2.5}, "leave it None"),
    ({"race_blocks": 2, "race_margin": -0.1}, "race_margin must be a number >= 0"),
    ({"race_blocks": 2, "race_margin": float("nan")}, "race_margin"),
    ({"race_margin": -1}, "race_margin must be a number >= 0"),  # checked without race_blocks too
    ({"race_blocks": 2, "proxy_metric": "kl"}, "proxy_metric='nll' only"),
])
def test_bad_race_settings_name_the_fix(tiny_problem, kwargs, match):
    with pytest.raises(wq.ConfigError, match=match):
        _race_env(tiny_problem, **kwargs)


# ----- the run: the recorder keeps complete measurements, the summary counts what was spent ------
def test_the_recorder_never_keeps_an_estimate_as_best(tmp_path, tiny_problem):
    recorder = EpisodeRecorder(tmp_path, tiny_problem, 3, progress=False)
    plan = [0] * len(tiny_problem.units)
    info = {"target_bits": 2.0, "effective_bits": 2.0, "storage_bits": 2.4, "proxy_ppl": 50.0, "ppl_ratio": 2.0, "plan": plan}
    assert recorder.consider({**info, "proxy_complete": True}, episode=1)
    assert not recorder.consider({**info, "proxy_ppl": 10.0, "proxy_complete": False}, episode=2)  # lower, but 2 blocks' estimate
    assert recorder.best[2.0]["proxy_ppl"] == 50.0
    assert recorder.consider({**info, "proxy_ppl": 40.0}, episode=3)  # no racing: always complete


def test_a_racing_runs_proxy_passes_are_what_its_summary_says(tmp_path, monkeypatch):
    from test_front import _count_smoke_passes, _passes_on

    hp = load_hyperparams("smoke")
    seen = _count_smoke_passes(monkeypatch)
    run = tmp_path / "run"
    summary = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(run), episodes=6, progress=False,
                              overrides={"env_kwargs": {"race_blocks": 2, "race_margin": 0.0}}))
    problem = wq.plan.QuantPlan.load(run / "returned_plan.json").problem_spec().build()
    counted = _passes_on(seen, problem.blocks)
    assert counted == pytest.approx(summary["evaluations"], abs=1e-9)
    rows = (run / "episodes.csv").read_text().splitlines()[1:]
    blocks = [int(r.split(",")[-1]) for r in rows]
    n = len(problem.blocks)
    assert len(blocks) == 6 and set(blocks) <= {2, n} and 2 in blocks  # some episodes raced, stopped at 2 blocks
    targets = len(set(hp["curriculum"]))
    spent = sum(b / n for b in blocks)
    assert summary["policy_evaluations"] == pytest.approx(summary["warm_start"]["evaluations"] + spent + targets + 1)  # + the per-block baseline
    # the bench counts the policy's passes as the run spent them, not one per episode
    from windquant_gym.harness.bench import main as bench_main

    board = tmp_path / "bench" / "lb.json"
    assert bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.0", "--allocators", "knapsack",
                       "--eval-windows", "2", "--eval-seq-len", "32", "--policy", str(run / "final_model.zip"),
                       "--json", str(board)]) == 0
    rows = {r["allocator"]: r for r in json.loads(board.read_text())["episodes"]}
    assert rows["MaskablePPO"]["evaluations"] == pytest.approx(summary["training_evaluations"] + summary["warm_start"]["evaluations"] + 1)
    assert summary["training_evaluations"] == pytest.approx(spent + 1) != 6  # not one pass per episode (the old count)
    for target, best in summary["targets"].items():  # the returned plans: measured on every block
        plan = wq.plan.QuantPlan.load(run / f"returned_plan_{target}.json")
        assert plan.metrics["proxy_ppl"] == pytest.approx(math.exp(problem.proxy_nll(plan.actions)), rel=1e-5)
