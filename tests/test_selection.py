"""Issue 21: the returned plan chosen on the calibration text's validation split (agents/selection.py):
the few best plans kept in training, each measured once on validation blocks disjoint from the
proxy's, every pass counted, the choice the lowest validation NLL, the recipe block validated."""

import json
import math

import pytest
import torch

import windquant_gym as wq
from windquant_gym.agents.hyperparams import load_hyperparams
from windquant_gym.agents.recipe import Recipe, SelectionRecipe
from windquant_gym.agents.selection import ValidationChoice, top_plans
from windquant_gym.agents.train import TrainArgs, train
from windquant_gym.data import load_texts, validation_blocks

from test_front import _count_smoke_passes, _passes_on


def _entry(ppl, plan):
    return {"proxy_ppl": ppl, "plan": list(plan)}


def test_top_plans_keeps_the_best_distinct_plans_best_first():
    ranked = []
    for ppl, plan in ((5.0, [1, 1]), (3.0, [2, 2]), (4.0, [3, 3]), (3.5, [2, 2]), (6.0, [4, 4]), (2.0, [5, 5])):
        ranked = top_plans(ranked, _entry(ppl, plan), keep=3, score="proxy_ppl")
    # [2, 2] measured twice is kept once (its first measurement); [4, 4] ranks below the three kept
    assert [(e["proxy_ppl"], e["plan"]) for e in ranked] == [(2.0, [5, 5]), (3.0, [2, 2]), (4.0, [3, 3])]
    assert top_plans([], _entry(1.0, [0]), keep=1, score="proxy_ppl") == [_entry(1.0, [0])]
    tie = top_plans([_entry(1.0, [0])], _entry(1.0, [1]), keep=2, score="proxy_ppl")
    assert [e["plan"] for e in tie] == [[0], [1]]  # an equal newcomer goes after


def test_validation_choice_measures_each_plan_once_on_its_own_blocks(tiny_problem):
    problem = tiny_problem
    choice = ValidationChoice(problem, windows=4, seq_len=64)
    spec = problem.spec
    expected = validation_blocks(load_texts(spec.calibration, split="calibration"), problem.tokenizer, 4, 64,
                                 (spec.n_samples, spec.seq_len, spec.seed))
    assert torch.equal(choice.blocks, expected)
    proxy_rows = {tuple(r.tolist()) for r in problem.blocks}
    assert not any(tuple(r.tolist()) in proxy_rows for r in choice.blocks)  # disjoint from the proxy's text
    assert choice.passes_per_plan == pytest.approx(4 * 64 / problem.blocks.numel())
    n = len(problem.units)
    plans = {"a": [4] * n, "b": [1] * n, "c": [1] * n, "d": [6] * n}  # 2, 8, 8 and 1 bit everywhere; "c" is "b"
    before = {k: v.clone() for k, v in problem.model.state_dict().items()}
    passes = problem.proxy_passes
    candidates = {name: {"plan": plan} for name, plan in plans.items()}
    chosen = choice.choose(candidates)
    assert problem.proxy_passes - passes == pytest.approx(3 * choice.passes_per_plan)  # "c" measured once, as "b"
    assert all(torch.equal(v, before[k]) for k, v in problem.model.state_dict().items())  # weights given back
    from windquant_gym.harness.episodes import plan_window_nlls

    # float32 proxy: the same numbers as a held-out measurement of the same blocks
    direct = {name: math.exp(float(plan_window_nlls(problem, plan, choice.blocks).mean())) for name, plan in plans.items()}
    for name in plans:
        assert candidates[name]["validation_ppl"] == pytest.approx(direct[name], rel=1e-4)
    assert len({round(v, 6) for v in direct.values()}) == 3  # the plans differ, so the choice is a real one
    assert chosen == min(direct, key=direct.get)
    with pytest.raises(ValueError, match="at least one"):
        choice.choose({})
    with pytest.raises(ValueError, match="proxy's own blocks only"):  # no KL reference on other blocks
        with problem.measuring(plans["a"], kl=True, blocks=choice.blocks):
            pass


def test_validation_choice_refuses_a_problem_without_its_corpus_name(tiny):
    model, tokenizer = tiny
    texts = load_texts("wiki-sample", split="calibration")
    problem = wq.QuantProblem.build(model, tokenizer, list(texts), wq.QuantConfig(chunk_size=48), n_samples=4, seq_len=32,
                                    progress=False)
    with pytest.raises(wq.ConfigError, match="corpus name"):
        ValidationChoice(problem)


def test_selection_block_is_validated_and_round_trips():
    base = load_hyperparams("smoke")
    recipe = Recipe.from_dict({**base, "selection": {"windows": 8}})
    assert recipe.selection == SelectionRecipe(by="validation", candidates=4, windows=8, seq_len=256)
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(wq.ConfigError, match=r"selection.by must be one of \['proxy', 'validation'\]"):
        Recipe.from_dict({**base, "selection": {"by": "eval"}})
    with pytest.raises(wq.ConfigError, match="selection.candidates must be an integer >= 1"):
        Recipe.from_dict({**base, "selection": {"candidates": 0}})
    with pytest.raises(wq.ConfigError, match="did you mean 'windows'"):
        Recipe.from_dict({**base, "selection": {"window": 8}})


def test_a_run_returns_the_best_on_validation_and_counts_its_passes(tmp_path, monkeypatch):
    seen = _count_smoke_passes(monkeypatch)
    run = tmp_path / "run"
    selection = {"candidates": 3, "windows": 4, "seq_len": 32}  # 32-token blocks: told apart from the proxy's 64
    summary = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(run), episodes=6, progress=False,
                              overrides={"selection": selection}))
    problem = wq.plan.QuantPlan.load(run / "returned_plan.json").problem_spec().build()
    choice = ValidationChoice(problem, 4, 32)
    seen = list(seen)  # the run's forwards, not the checks' below
    assert "validation split" in summary["selection"]
    targets = summary["targets"]
    distinct = 0
    for target, entry in targets.items():
        measured = {name: row for name, row in entry.items() if name != "returned"}
        assert all("validation_ppl" in row for row in measured.values())
        assert 2 <= len(measured) <= 1 + 3  # the policy's plan and up to 3 seen
        assert entry["returned"] == min(measured, key=lambda name: measured[name]["validation_ppl"])
        distinct += len({row["validation_ppl"] for row in measured.values()})  # a plan measured twice reads the same
        returned = wq.plan.QuantPlan.load(run / f"returned_plan_{target}.json")
        assert math.exp(choice.nll(returned.actions)) == pytest.approx(entry[entry["returned"]]["validation_ppl"], rel=1e-4)
    # every pass counted on the model: proxy rows, and the validation rows as tokens over the proxy's
    on_validation = _passes_on(seen, choice.blocks) * choice.passes_per_plan
    assert on_validation > 0
    counted = _passes_on(seen, problem.blocks) + on_validation
    assert counted == pytest.approx(summary["evaluations"])
    assert on_validation == pytest.approx(distinct * choice.passes_per_plan)
    warm = summary["warm_start"]["evaluations"]
    assert summary["policy_evaluations"] == pytest.approx(6 + warm + len(targets) + on_validation)
    saved = json.loads((run / "config.json").read_text())["hyperparams"]["selection"]
    assert saved == {"by": "validation", **selection}


def test_the_recorder_keeps_its_top_plans_through_a_checkpoint(tmp_path, tiny_problem):
    from windquant_gym.agents.callbacks import EpisodeRecorder

    n = len(tiny_problem.units)
    recorder = EpisodeRecorder(tmp_path, tiny_problem, 5, progress=False, keep=2)
    info = {"target_bits": 2.0, "effective_bits": 2.0, "storage_bits": 2.4, "ppl_ratio": 2.0}
    for episode, (ppl, action) in enumerate(((50.0, 0), (40.0, 1), (45.0, 2), (60.0, 3), (41.0, 1)), start=1):
        recorder.consider({**info, "proxy_ppl": ppl, "plan": [action] * n}, episode)
    assert not recorder.consider({**info, "effective_bits": 2.5, "proxy_ppl": 1.0, "plan": [4] * n}, 6)  # over budget
    top = [(e["proxy_ppl"], e["plan"][0]) for e in recorder.top[2.0]]
    assert top == [(40.0, 1), (45.0, 2)] and recorder.best[2.0]["proxy_ppl"] == 40.0  # [1] * n once; best is top[0]
    recorder.episodes = 5
    state = json.loads(json.dumps(recorder.state_dict()))  # what a checkpoint stores
    twin = EpisodeRecorder(tmp_path, tiny_problem, 5, progress=False, keep=2)
    twin.load_state_dict(state)
    assert twin.top == recorder.top and twin.best == recorder.best
