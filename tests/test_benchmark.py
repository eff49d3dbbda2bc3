import dataclasses
import itertools
import json

import gymnasium as gym
import numpy as np
import pytest

import windquant_gym as wq
from windquant_gym.allocators import (
    HeuristicAllocator,
    KnapsackAllocator,
    RandomAllocator,
    UniformAllocator,
    solve_knapsack,
)
from windquant_gym.harness import run_allocator
from windquant_gym.harness.bench import main as bench_main
from windquant_gym.plan import QuantPlan


def brute_force(cost, error, allowed, budget):
    best, best_plan = np.inf, None
    for plan in itertools.product(*[np.flatnonzero(row) for row in allowed]):
        rows = np.arange(len(plan))
        if cost[rows, plan].sum() <= budget and error[rows, plan].sum() < best:
            best, best_plan = error[rows, plan].sum(), np.array(plan)
    return best, best_plan


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_equals_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    n_units, n_actions = 5, 7
    cost = np.sort(rng.integers(1, 20, size=(n_units, n_actions)), axis=1)[:, ::-1].astype(float)
    error = np.sort(rng.random((n_units, n_actions)), axis=1)  # more bits, less error
    allowed = rng.random((n_units, n_actions)) < 0.8
    allowed[:, -1] = True
    budget = float(rng.integers(int(cost[:, -1].sum()), int(cost[:, 0].sum())))
    base = np.where(allowed, cost, np.inf).min(axis=1).sum()
    plan = solve_knapsack(cost, error, allowed, budget, resolution=int(budget - base))  # 1 bit per quantum: exact
    expected, _ = brute_force(cost, error, allowed, budget)
    rows = np.arange(n_units)
    assert allowed[rows, plan].all()
    assert cost[rows, plan].sum() <= budget
    assert error[rows, plan].sum() == pytest.approx(expected)


def test_knapsack_never_exceeds_budget_with_coarse_quanta():
    rng = np.random.default_rng(0)
    cost = rng.random((30, 7)) * 100
    error = rng.random((30, 7))
    plan = solve_knapsack(cost, error, np.ones((30, 7), bool), budget=1500.0, resolution=37)
    assert cost[np.arange(30), plan].sum() <= 1500.0


@pytest.mark.parametrize("target", [1.6, 2.0, 3.0])
def test_every_baseline_meets_its_budget(tiny_problem, target):
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=target)
    for allocator in (UniformAllocator(3), UniformAllocator(2), RandomAllocator(0), HeuristicAllocator(), KnapsackAllocator(),
                      KnapsackAllocator(error="raw")):
        (result,) = run_allocator(env, allocator)
        assert result.effective_bits <= target + 1e-9, allocator
        assert result.storage_bits > result.effective_bits


@pytest.mark.parametrize("target, moved", [(2.0, "down"), (2.5, "up")])
def test_heuristic_follows_appendix_b3(tiny_problem, target, moved):
    """All start at 2 bit; under a 2.0 budget (2 bit + 3% INT8 is 2.18) the least salient
    go down to 1.58/1 bit; with slack (2.5) the most salient go up to 4/3 bit."""
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=target).unwrapped
    plan = HeuristicAllocator().make_plan(env)
    bits = np.array(wq.ACTION_BITS)[plan]
    assert set(bits) <= {4, 3, 2, 1.58, 1}
    assert env.table.plan_bits(plan)["effective_bits"] <= target + 1e-9
    saliency = np.array([
        float((tiny_problem.model.get_submodule(u.module).weight.detach()[:, u.col_start:u.col_end].abs()
               * tiny_problem.calibration.act_scales[u.module][u.col_start:u.col_end]).mean())
        for u in env.units
    ])
    changed = bits > 2 if moved == "up" else bits < 2
    assert changed.any() and (bits == 2).any()
    # Greedy by saliency: among units of one shape (same costs), the moved ones are the
    # most (up) or least (down) salient.
    shapes = np.array([(u.out_features, u.width) for u in env.units])
    for shape in {tuple(x) for x in shapes}:
        same = (shapes == shape).all(axis=1)
        moved_units, kept = same & changed, same & (bits == 2)
        if moved_units.any() and kept.any():
            if moved == "up":
                assert saliency[moved_units].min() >= saliency[kept].max()
            else:
                assert saliency[moved_units].max() <= saliency[kept].min()


def test_knapsack_beats_uniform_on_measured_error(tiny_problem):
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.5).unwrapped
    error = env.table.module_normalized_error()
    rows = np.arange(env.n_units)
    knapsack = KnapsackAllocator().make_plan(env)
    uniform = np.full(env.n_units, wq.quant.action_index(2))
    assert error[rows, knapsack].sum() < error[rows, uniform].sum()


def test_callable_and_sb3_allocators_and_heldout(tiny_problem):
    from sb3_contrib import MaskablePPO

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    cheapest = lambda obs, mask: int(np.flatnonzero(mask)[-1])
    (result,) = run_allocator(env, cheapest, heldout=tiny_problem.blocks[:2], name="cheapest")
    assert result.allocator == "cheapest" and result.heldout_ppl > 1
    model = MaskablePPO("MlpPolicy", env, n_steps=env.unwrapped.n_units, device="cpu")
    (result,) = run_allocator(env, model)
    assert result.allocator == "MaskablePPO" and result.effective_bits <= 2.0 + 1e-9


def test_replayed_plan_reproduces_bits_and_perplexity_exactly(tiny_problem, tmp_path):
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.5)
    (first,) = run_allocator(env, RandomAllocator(3))
    plan = QuantPlan.from_table(tiny_problem.table, first.plan, "tiny-llama", target_bits=2.5,
                                effective_bits=first.effective_bits, storage_bits=first.storage_bits, proxy_ppl=first.proxy_ppl)
    path = plan.save(tmp_path / "plan.json")
    (again,) = run_allocator(env, str(path))
    assert again.plan == first.plan
    assert (again.effective_bits, again.storage_bits, again.proxy_ppl) == (first.effective_bits, first.storage_bits, first.proxy_ppl)
    # A plan that the budget no longer admits is refused, naming the unit.
    env.unwrapped.set_target_bits(1.6)
    with pytest.raises(wq.TableMismatchError, match="first unit"):
        run_allocator(env, str(path))
    # A plan whose recorded perplexity disagrees is refused.
    env.unwrapped.set_target_bits(2.5)
    data = json.loads(path.read_text())
    data["metrics"]["proxy_ppl"] *= 1.01
    path.write_text(json.dumps(data))
    with pytest.raises(wq.TableMismatchError, match="proxy_ppl"):
        run_allocator(env, str(path))
    # ... unless it was measured at another proxy precision (a bf16-proxy run): bits still checked.
    data["metrics"]["proxy_dtype"] = "bfloat16"
    path.write_text(json.dumps(data))
    (replayed,) = run_allocator(env, str(path))
    assert replayed.proxy_ppl == first.proxy_ppl
    data["metrics"]["effective_bits"] += 0.01
    path.write_text(json.dumps(data))
    with pytest.raises(wq.TableMismatchError, match="effective_bits"):
        run_allocator(env, str(path))
    data["table_fingerprint"] = "0" * 48
    path.write_text(json.dumps(data))
    with pytest.raises(wq.TableMismatchError, match="belongs to table") as refused:
        run_allocator(env, str(path))
    assert "fitting code" in str(refused.value) and "quant_config" in str(refused.value)
    assert "activation scales" in str(refused.value)
    # only the first part changed (weights, config or fitting code): the message says so, and only that
    data["table_fingerprint"] = "0" * 32 + env.unwrapped.problem.table.fingerprint[32:]
    path.write_text(json.dumps(data))
    with pytest.raises(wq.TableMismatchError, match=r"differ in the weights \(another model, or other weights\), the quantization config[^;]*\. Use"):
        run_allocator(env, str(path))
    # only the calibration's part changed
    data["table_fingerprint"] = env.unwrapped.problem.table.fingerprint[:32] + "0" * 16
    path.write_text(json.dumps(data))
    with pytest.raises(wq.TableMismatchError, match=r"differ in the calibration \(the activation scales") as refused:
        run_allocator(env, str(path))
    assert "fitting code" not in str(refused.value)


def test_bench_leaderboard_on_tiny_llama(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench" / "board.json"
    assert bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.5", "--eval-windows", "2",
                       "--eval-seq-len", "64", "--random-episodes", "2", "--evaluations", "3", "4", "8",
                       "--search-seeds", "0", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    board = data["leaderboard"]
    names = [row["allocator"] for row in board]
    assert names == (["unquantized", "uniform-2b", "uniform-3b", "random", "heuristic", "knapsack", "calibrated-knapsack",
                      "calibrated-knapsack-kv", "calibrated-knapsack-fisher"] + ["search-nll"] * 3)
    assert [r["episodes"] for r in board] == [1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 2, 2]
    # grouped by the budget asked for; evaluations is what was spent: the start (1), then generations of 4
    # (the calibrated knapsack: 1 + 2 groups x 3 other factors; with the keys-values group 3 more, Fisher-weighted too)
    assert [r["budget"] for r in board[-3:]] == [3, 4, 8]
    assert [r["evaluations"] for r in board] == [None, 1, 1, 1, 1, 1, 7, 10, 10, 1, 1, 5]
    for row in board[1:]:
        assert row["effective_bits"] <= 2.5 + 1e-9 and row["heldout_ppl"] > 1
    # A row of several episodes shows the median, the held-out range, and its plan with the lowest proxy PPL.
    episodes = [r for r in data["episodes"] if r["allocator"] == "search-nll" and r["budget"] == 8]
    assert [r["seed"] for r in episodes] == [0, 1]
    assert board[-1]["heldout_ppl"] == pytest.approx(sum(r["heldout_ppl"] for r in episodes) / 2)
    assert (board[-1]["heldout_min"], board[-1]["heldout_max"]) == (min(r["heldout_ppl"] for r in episodes),
                                                                    max(r["heldout_ppl"] for r in episodes))
    assert board[-1]["plan_file"] == min(episodes, key=lambda r: r["proxy_ppl"])["plan_file"]
    # Every row's plan is a plan file beside the JSON that replays to the row's figures; none overwrites another.
    files = [row["plan_file"] for row in data["episodes"][1:]]
    assert len(set(files)) == len(files) == 15
    for row in data["episodes"][1:]:
        saved = QuantPlan.load(out.parent / row["plan_file"])
        assert saved.metrics["heldout_ppl"] == row["heldout_ppl"] and saved.metrics["evaluations"] == row["evaluations"]
        assert saved.problem.model == "tiny-llama" and (saved.problem.n_samples, saved.problem.seq_len) == (8, 64)
    assert "board_plans/search-nll-2.5b-4ev-s1.json" in files and "board_plans/random-2.5b-e0.json" in files
    assert out.with_suffix(".csv").read_text().startswith("allocator,target_bits,budget,evaluations")
    assert "| knapsack | 2.500 | - | 1 |" in out.with_suffix(".md").read_text()
    assert data["meta"]["search_configs"]["search-nll"]["evaluations"] == 8
    printed = capsys.readouterr()
    assert "held-out PPL" in printed.out and "board_plans" in printed.out
    assert "search (nll)" in printed.err  # the search's progress bar, shown by default


def test_bench_with_the_kl_metric_and_the_kl_search(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "kl.json"
    assert bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.0", "--eval-windows", "2",
                       "--eval-seq-len", "64", "--allocators", "knapsack", "search-kl", "search", "--evaluations", "5",
                       "--proxy-metric", "kl", "--no-progress", "--json", str(out)]) == 0
    # --no-progress: no bar, neither the table build's (a cold cache here) nor the searches'
    bars = capsys.readouterr().err
    assert "it/s" not in bars and "s/it" not in bars and "search (" not in bars
    data = json.loads(out.read_text())
    assert [r["allocator"] for r in data["leaderboard"]] == ["unquantized", "knapsack", "search-kl", "search-nll"]
    for row in data["episodes"][1:]:
        assert row["proxy_metric"] == "kl" and row["proxy_kl"] > 0
        assert QuantPlan.load(out.parent / row["plan_file"]).metrics["proxy_kl"] == row["proxy_kl"]
    knapsack, search_kl = data["leaderboard"][1:3]
    assert search_kl["proxy_kl"] <= knapsack["proxy_kl"]  # the search never ends worse than its start, by its fitness
    assert data["meta"]["proxy_metric"] == "kl" and set(data["meta"]["search_configs"]) == {"search-kl", "search-nll"}


def test_bench_plan_exports_without_a_preset(tmp_path, monkeypatch):
    """bench -> windquant export PLAN -> load_quantized: the plan file says how to rebuild its problem."""
    from windquant_gym.cli import main

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "board.json"
    assert bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.0", "--allocators", "knapsack",
                       "--eval-windows", "2", "--eval-seq-len", "64", "--seed", "3", "--json", str(out)]) == 0
    plan_path = out.parent / json.loads(out.read_text())["leaderboard"][-1]["plan_file"]
    saved = QuantPlan.load(plan_path)
    assert saved.problem.seed == 3  # another calibration seed than the old default (0) of export
    assert main(["export", str(plan_path), "--out", str(tmp_path / "packed")]) == 0
    loaded = wq.load_quantized(tmp_path / "packed")
    problem = saved.problem_spec().build(progress=False)
    assert problem.table.fingerprint == saved.table_fingerprint
    assert wq.perplexity(loaded, problem.blocks) == pytest.approx(saved.metrics["proxy_ppl"], rel=1e-3)  # fp16 rest
    assert main(["plot", str(plan_path)]) == 0
    with pytest.raises(wq.ConfigError, match="drop --preset"):
        main(["export", str(plan_path), "--out", str(tmp_path / "again"), "--preset", "cpu"])
    # An old plan (no problem recorded) exported the old way, with the env's preset, is refused by its table.
    old = dataclasses.replace(saved, problem=None).save(tmp_path / "old.json")
    with pytest.raises(wq.TableMismatchError, match="belongs to table"):
        main(["export", str(old), "--out", str(tmp_path / "old"), "--preset", "smoke"])  # seed 0 != 3


def test_sb3_allocator_counts_its_training_episodes(tiny_problem):
    from sb3_contrib import MaskablePPO

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    n_units = env.unwrapped.n_units
    model = MaskablePPO("MlpPolicy", env, n_steps=n_units, batch_size=n_units, n_epochs=1, device="cpu")
    model.learn(total_timesteps=2 * n_units)
    (result,) = run_allocator(env, model)
    assert result.evaluations == 3  # two training episodes and this one
    (result,) = run_allocator(env, HeuristicAllocator())
    assert result.evaluations == 1


def test_leaderboard_median_range_and_plan_of_the_lowest_proxy():
    from windquant_gym.harness.leaderboard import aggregate, format_table

    rows = [{"allocator": "search-nll", "target_bits": 2.0, "budget": 300.0, "evaluations": spent, "effective_bits": 2.0,
             "storage_bits": 2.4, "proxy_ppl": proxy, "heldout_ppl": heldout, "seconds": 1.0, "plan_file": f"plans/s{i}.json"}
            for i, (spent, proxy, heldout) in enumerate([(297, 210.0, 280.0), (297, 190.0, 300.0), (293, 200.0, 250.0)])]
    rows.append({**rows[0], "budget": 100.0, "evaluations": 97, "plan_file": "plans/e100.json"})
    rows.append({**rows[0], "budget": 1000, "heldout_ppl": float("nan"), "plan_file": "plans/nan.json"})
    (three, one, broken) = aggregate(rows)
    assert (three["episodes"], three["evaluations"], three["proxy_ppl"], three["heldout_ppl"]) == (3, 297, 200.0, 280.0)
    assert (three["heldout_min"], three["heldout_max"]) == (250.0, 300.0)
    assert three["plan_file"] == "plans/s1.json"  # the lowest proxy PPL, not the lowest held-out
    assert (one["episodes"], one["heldout_min"], one["budget"], one["evaluations"]) == (1, None, 100, 97)
    assert broken["heldout_ppl"] is None  # a NaN is not a measurement
    kl_rows = [{**r, "proxy_metric": "kl", "proxy_kl": kl} for r, kl in zip(rows[:3], (0.3, 0.5, 0.1))]
    assert aggregate(kl_rows)[0]["plan_file"] == "plans/s2.json"  # by the metric the env measured
    text = format_table(rows, markdown=True)
    assert "| search-nll | 2.000 | 300 | 297 |" in text and "250.00-300.00" in text and "| s1.json |" in text


def test_bench_on_the_validation_split(tmp_path, monkeypatch):
    """--eval-split validation measures on the calibration text's validation blocks (where settings
    are chosen), not on the eval split."""
    from windquant_gym.data import validation_blocks
    from windquant_gym.eval.perplexity import block_nlls

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    outs = {}
    for split in ("eval", "validation"):
        outs[split] = tmp_path / f"{split}.json"
        assert bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.0", "--eval-windows", "3",
                           "--eval-seq-len", "64", "--allocators", "knapsack", "--eval-split", split,
                           "--json", str(outs[split])]) == 0
    data = {split: json.loads(path.read_text()) for split, path in outs.items()}
    assert data["validation"]["meta"]["heldout_split"] == "validation"
    windows = {split: d["episodes"][0]["heldout_window_nll"] for split, d in data.items()}
    assert len(windows["validation"]) == 3 and windows["validation"] != windows["eval"]
    # the validation rows are the unquantized model's NLL on exactly those blocks
    model, tokenizer = wq.load_model("tiny-llama")
    blocks = validation_blocks(wq.load_texts("wiki-sample", split="calibration"), tokenizer, 3, 64, (8, 64, 0))
    np.testing.assert_allclose(windows["validation"], block_nlls(model, blocks).double().numpy(), rtol=1e-4)
