"""The evolutionary search (SearchAllocator, evolve), its fitnesses and the KL proxy."""

import itertools
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.allocators import (
    KnapsackAllocator,
    ProxyFitness,
    SearchAllocator,
    SearchConfig,
    TableErrorFitness,
    evolve,
)
from windquant_gym.harness import run_allocator
from windquant_gym.envs import PrecisionRules
from windquant_gym.envs.windquant import BUDGET_TOLERANCE
from windquant_gym.quant.bitwidths import action_index

from _helpers import assert_bitwise_equal, snapshot

SMALL = dict(offspring=4, stages=((0.25, 2), (1.0, 1)))  # 2 evaluations per generation on tiny-llama


def make_env(problem, target, **kwargs):
    return gym.make("WindQuant-v0", model=problem.model, problem=problem, target_bits=target, **kwargs).unwrapped


class Recording:
    """Wraps a fitness and keeps every plan it was asked to measure, with the rows."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.n_blocks, self.metric = inner.n_blocks, getattr(inner, "metric", "?")

    def cost(self, n_rows):
        return self.inner.cost(n_rows)

    def session(self, start):
        outer = self

        class Session:
            def __enter__(self):
                self.context = outer.inner.session(start)
                evaluate = self.context.__enter__()

                def recorded(plan, rows=None):
                    outer.calls.append((np.array(plan), None if rows is None else np.array(rows)))
                    return evaluate(plan, rows)

                return recorded

            def __exit__(self, *exc):
                return self.context.__exit__(*exc)

        return Session()


def within_masks(env, plan):
    """Whether the env's masks allow every action of ``plan`` (walked without the episode-end pass)."""
    used, rows = 0.0, np.arange(env.n_units)
    cost = env.table.unit_effective_bits
    for t, action in enumerate(plan):
        fits = used + cost[t, action] + env._suffix_min[t + 1] <= env.budget_bits + BUDGET_TOLERANCE
        if not (env.rule_mask[t, action] and fits):
            return False
        used += cost[t, action]
    return cost[rows, plan].sum() <= env.budget_bits + BUDGET_TOLERANCE


# ----- offspring are valid plans ------------------------------------------------------------
@pytest.mark.parametrize("target", [2.0, 2.5, 3.0])
def test_every_offspring_meets_the_budget_and_the_rules_exactly(tiny_problem, target):
    rules = PrecisionRules(early_layers=1, early_min_bits=2, mlp_gate_min_bits=1.58)
    env = make_env(tiny_problem, target, precision_rules=rules)
    fitness = Recording(TableErrorFitness(env.table.module_normalized_error()))
    start = np.where(env.rule_mask, env.table.unit_effective_bits, np.inf).argmin(axis=1)  # the cheapest allowed: room to move
    result = evolve(start, fitness, env.table.unit_effective_bits, env.rule_mask, env.budget_bits,
                    SearchConfig(evaluations=150, **SMALL), seed=3, stored=env.table.stored_action)
    plans = [plan for plan, _ in fitness.calls]
    assert len(plans) > 100 and result.accepted > 0
    rows = np.arange(env.n_units)
    for plan in plans:
        assert env.table.unit_effective_bits[rows, plan].sum() <= env.budget_bits + BUDGET_TOLERANCE
        assert env.rule_mask[rows, plan].all()
        assert within_masks(env, plan)
    assert len({p.tobytes() for p, rows_ in fitness.calls if rows_ is not None}) == sum(
        1 for _, rows_ in fitness.calls if rows_ is not None)  # no offspring measured twice


def test_search_plan_is_played_unchanged_and_replays(tiny_problem, tmp_path):
    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    search = SearchAllocator(evaluations=12, seed=1, progress=False, **SMALL)
    (result,) = run_allocator(env, search)
    assert result.plan == search.result.plan.tolist()  # the harness refuses a projected plan
    assert result.evaluations == search.result.evaluations == search.evaluations
    assert result.proxy_ppl == pytest.approx(math.exp(search.result.fitness), rel=1e-12)
    plan = wq.plan.QuantPlan.from_problem(tiny_problem, result.plan, target_bits=2.0, evaluations=result.evaluations,
                                          effective_bits=result.effective_bits, storage_bits=result.storage_bits,
                                          proxy_ppl=result.proxy_ppl)
    (replayed,) = run_allocator(env, str(plan.save(tmp_path / "plan.json")))
    assert replayed.plan == result.plan and replayed.proxy_ppl == result.proxy_ppl
    assert replayed.evaluations == result.evaluations


# ----- never worse than the start ------------------------------------------------------------
@pytest.mark.parametrize("metric", ["nll", "kl"])
def test_search_never_returns_a_plan_worse_than_its_start(tiny_problem, metric):
    env = make_env(tiny_problem, 2.0)
    start = KnapsackAllocator().make_plan(env)
    result = evolve(start, ProxyFitness(tiny_problem, metric), env.table.unit_effective_bits, env.rule_mask,
                    env.budget_bits, SearchConfig(evaluations=15, fitness=metric, **SMALL), seed=0,
                    stored=env.table.stored_action)
    assert result.fitness <= result.start_fitness
    assert [h["fitness"] for h in result.history] == sorted((h["fitness"] for h in result.history), reverse=True)
    # The fitness it reports is the plan's own, measured from scratch (incremental assembly changed nothing).
    losses = tiny_problem.proxy_losses(result.plan, kl=metric == "kl")
    assert (losses.kl if metric == "kl" else losses.nll) == result.fitness
    start_losses = tiny_problem.proxy_losses(start, kl=metric == "kl")
    assert (start_losses.kl if metric == "kl" else start_losses.nll) == result.start_fitness


def test_a_noisy_screening_stage_cannot_make_the_result_worse(tiny_problem):
    """Whatever the subsets say, the winner is compared with the parent on all blocks."""

    class Noisy:
        n_blocks, metric = 8, "noisy"

        def __init__(self, error):
            self.error, self.rng = error, np.random.default_rng(0)

        def cost(self, n_rows):
            return n_rows / self.n_blocks

        def session(self, start):
            from contextlib import contextmanager

            @contextmanager
            def session():
                rows_ = np.arange(len(self.error))
                yield lambda plan, rows=None: (float(self.error[rows_, plan].sum()) if rows is None
                                               else float(self.rng.normal()))
            return session()

    env = make_env(tiny_problem, 2.5)
    error = env.table.module_normalized_error()
    start = KnapsackAllocator().make_plan(env)
    result = evolve(start, Noisy(error), env.table.unit_effective_bits, env.rule_mask, env.budget_bits,
                    SearchConfig(evaluations=100, **SMALL), seed=0)
    rows = np.arange(env.n_units)
    assert error[rows, result.plan].sum() == result.fitness <= error[rows, start].sum() == result.start_fitness


# ----- reaches the knapsack's optimum on its own objective -----------------------------------
def _small_instances(problem):
    env = make_env(problem, 2.5)
    error, cost = env.table.module_normalized_error(), env.table.unit_effective_bits
    for pick in range(3):
        units = np.sort(np.random.default_rng(pick).choice(env.n_units, 6, replace=False))
        for target in (2.0, 2.5, 3.0):
            yield cost[units], error[units], target * env.table.n_weights[units].sum()


def test_with_the_knapsacks_error_as_fitness_it_reaches_the_knapsacks_optimum(tiny_problem):
    for cost, error, budget in _small_instances(tiny_problem):
        allowed = np.ones_like(cost, dtype=bool)
        rows = np.arange(len(cost))
        plans = np.array(list(itertools.product(range(7), repeat=len(cost))))  # every plan: 7^6
        fits = cost[rows, plans].sum(axis=1) <= budget + BUDGET_TOLERANCE
        optimum = error[rows, plans[fits]].sum(axis=1).min()
        start = np.full(len(cost), action_index(1))  # far from it: every unit at 1 bit
        # A local search can stall where only a coupled move of two units helps: with the
        # output-error table, 1 of these 72 runs (18 instances x 4 seeds) stays 3.1% above the
        # optimum even at 2000 evaluations; the other 71 reach it within 100. So: every run
        # within 5%, and the best of 4 seeds exactly at the optimum.
        runs = [evolve(start, TableErrorFitness(error), cost, allowed, budget, SearchConfig(evaluations=400), seed=seed)
                for seed in range(4)]
        assert all(run.fitness <= optimum * 1.05 for run in runs), budget
        assert min(run.fitness for run in runs) == pytest.approx(optimum, rel=1e-12), budget


# ----- evaluations ---------------------------------------------------------------------------
def test_evaluations_are_counted_exactly(tiny_problem):
    """Tokens that went through the model, over the proxy's tokens, are the evaluations reported."""
    env = make_env(tiny_problem, 2.0)
    start = KnapsackAllocator().make_plan(env)
    forwarded = []
    handle = tiny_problem.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: forwarded.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        config = SearchConfig(evaluations=20, offspring=6, stages=((0.25, 3), (0.5, 1), (1.0, 1)))
        fitness = ProxyFitness(tiny_problem, "nll")
        result = evolve(start, fitness, env.table.unit_effective_bits, env.rule_mask, env.budget_bits, config, seed=2)
    finally:
        handle.remove()
    proxy_tokens = tiny_problem.blocks.numel()
    per_generation = 6 * 0.25 + 3 * 0.5 + 1 * 1.0
    assert result.evaluations == sum(forwarded) / proxy_tokens == fitness.tokens / proxy_tokens
    assert result.evaluations == 1 + result.generations * per_generation  # the start, then full generations
    assert result.evaluations <= 20 < result.evaluations + per_generation  # stops when the next would not fit


@pytest.mark.parametrize("n_blocks", [4, 3])  # 3: stage costs in thirds, not exact in binary
def test_a_budget_run_returns_the_longer_runs_snapshot(tiny_problem, n_blocks):
    env = make_env(tiny_problem, 2.5)
    start = KnapsackAllocator().make_plan(env)
    error = env.table.module_normalized_error()
    config = dict(offspring=6, stages=((1 / 3, 2), (1.0, 1)))
    run = lambda budget, **kw: evolve(start, TableErrorFitness(error, n_blocks), env.table.unit_effective_bits, env.rule_mask,
                                      env.budget_bits, SearchConfig(evaluations=budget, **config), seed=5, **kw)
    long = run(80, snapshot_at=(1, 10, 31))
    for budget in (1, 10, 31):
        short = run(budget)
        assert short.plan.tolist() == long.snapshots[budget]["plan"].tolist()
        assert short.evaluations == long.snapshots[budget]["evaluations"]
        assert short.fitness == long.snapshots[budget]["fitness"]
    assert long.snapshots[1]["evaluations"] == 1  # the start alone
    with pytest.raises(wq.ConfigError, match="does not pay for one full measurement"):
        run(80, snapshot_at=(0.5,))


# ----- weights are borrowed, never kept ------------------------------------------------------
def test_search_gives_the_weights_back_also_when_interrupted(tiny_problem, monkeypatch):
    import windquant_gym.problem as problem_module  # where every proxy pass runs

    env = make_env(tiny_problem, 2.0)
    start = KnapsackAllocator().make_plan(env)
    before = snapshot(tiny_problem.model)
    evolve(start, ProxyFitness(tiny_problem, "kl"), env.table.unit_effective_bits, env.rule_mask, env.budget_bits,
           SearchConfig(evaluations=6, fitness="kl", **SMALL), seed=0)
    assert_bitwise_equal(tiny_problem.model, before)
    calls = []
    real = problem_module.token_losses

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(problem_module, "token_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evolve(start, ProxyFitness(tiny_problem, "nll"), env.table.unit_effective_bits, env.rule_mask, env.budget_bits,
               SearchConfig(evaluations=10, **SMALL), seed=0)
    assert_bitwise_equal(tiny_problem.model, before)


# ----- the KL proxy --------------------------------------------------------------------------
def test_kl_of_the_unquantized_model_is_zero_and_grows_with_fewer_bits(tiny_problem):
    assert tiny_problem.proxy_kl(None) == 0.0
    kl = [tiny_problem.proxy_kl([action_index(b)] * len(tiny_problem.units)) for b in (8, 4, 3, 2, 1)]
    assert 0 < kl[0] and kl == sorted(kl)
    # The top-k reference's KL is the KL of the coarsened distributions: never above the full KL.
    reference = tiny_problem.kl_reference(k=8)
    full = tiny_problem.kl_reference(k=wq.models.tiny.TINY_VOCAB)
    plan = [action_index(2)] * len(tiny_problem.units)
    with wq.quantized_weights(tiny_problem.model, tiny_problem.table, plan):
        coarse = wq.eval.token_losses(tiny_problem.model, tiny_problem.blocks, reference=reference).kl
        exact = wq.eval.token_losses(tiny_problem.model, tiny_problem.blocks, reference=full).kl
    assert 0 < coarse <= exact
    same_kernels = wq.compute.kernels.linear_kernels("cpu", tiny_problem.model)  # the passes' own float32 kernel, for like rounding
    with torch.inference_mode(), same_kernels, wq.quantized_weights(tiny_problem.model, tiny_problem.table, plan):
        quantized = tiny_problem.model(tiny_problem.blocks).logits[:, :-1].float().log_softmax(-1)
    with torch.inference_mode(), wq.compute.kernels.linear_kernels("cpu", tiny_problem.model):
        original = tiny_problem.model(tiny_problem.blocks).logits[:, :-1].float().log_softmax(-1)
    direct = (original.exp() * (original - quantized)).sum(-1).mean().item()
    assert exact == pytest.approx(direct, rel=1e-4)


def test_kl_on_a_subset_of_blocks_uses_the_matching_reference(tiny_problem):
    reference = tiny_problem.kl_reference()
    rows = np.array([1, 4, 6])
    part = reference.rows(rows)
    assert torch.equal(part.token_ids, reference.token_ids[torch.as_tensor(rows)])
    with pytest.raises(wq.ConfigError, match="same blocks"):
        wq.eval.token_losses(tiny_problem.model, tiny_problem.blocks[:2], reference=part)


def test_env_with_the_kl_proxy_metric(tiny_problem):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0, proxy_metric="kl")
    gym_check(env.unwrapped, skip_render_check=True)
    sb3_check(env, warn=True)
    (result,) = run_allocator(env, KnapsackAllocator())
    assert result.proxy_metric == "kl" and result.proxy_kl == tiny_problem.proxy_kl(result.plan)
    env.reset()
    done = False
    plan = iter(result.plan)
    while not done:
        _, reward, done, _, info = env.step(next(plan))
    assert info["proxy_metric"] == "kl"
    assert info["loss_increase"] == pytest.approx(info["proxy_kl"] / tiny_problem.baseline_nll)
    assert info["ppl_ratio"] == pytest.approx(math.exp(info["proxy_kl"]))
    nll_env = make_env(tiny_problem, 2.0)
    nll_env.reset()
    for action in result.plan:
        *_, nll_info = nll_env.step(action)
    assert nll_info["proxy_metric"] == "nll" and "proxy_kl" not in nll_info
    assert nll_info["proxy_ppl"] == pytest.approx(info["proxy_ppl"], rel=1e-12)  # one pass gives both
    assert nll_info["ppl_ratio"] == pytest.approx(info["proxy_ppl"] / tiny_problem.baseline_ppl)


# ----- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "300", None, True])
def test_bad_evaluations_is_a_named_error(bad):
    with pytest.raises(wq.ConfigError, match="evaluations must be a positive number") as caught:
        SearchConfig(evaluations=bad)
    assert repr(bad) in str(caught.value)
    with pytest.raises(wq.ConfigError, match="evaluations"):
        SearchAllocator(evaluations=bad)


@pytest.mark.parametrize("bad", ["ppl", "KL", "", None])
def test_bad_fitness_name_is_a_named_error(bad, tiny_problem):
    with pytest.raises(wq.ConfigError, match="'nll', 'kl'"):
        SearchConfig(fitness=bad)
    with pytest.raises(wq.ConfigError, match="'nll', 'kl'"):
        ProxyFitness(tiny_problem, bad)
    with pytest.raises(wq.ConfigError, match="proxy_metric must be one of"):
        make_env(tiny_problem, 2.0, proxy_metric=bad)


@pytest.mark.parametrize("stages", [((0.25, 2),), ((0.5, 2), (0.25, 1), (1.0, 1)), ((0.25, 1), (0.5, 2), (1.0, 1)),
                                    ((0.0, 2), (1.0, 1)), ((0.25, 99), (1.0, 1)), "fast"])
def test_bad_stages_are_a_named_error(stages):
    with pytest.raises(wq.ConfigError, match=r"ending with \(1.0, 1\)"):
        SearchConfig(stages=stages)


def test_other_bad_search_settings(tiny_problem):
    with pytest.raises(wq.ConfigError, match="offspring"):
        SearchConfig(offspring=0)
    with pytest.raises(wq.ConfigError, match="same_shape"):
        SearchConfig(same_shape=1.5)
    with pytest.raises(wq.ConfigError, match="min_refund"):
        SearchConfig(min_refund=-0.1)
    with pytest.raises(wq.ConfigError, match="start="):
        SearchAllocator(start="greedy")
    with pytest.raises(wq.ConfigError, match="not both"):
        SearchAllocator(SearchConfig(), evaluations=10)
    with pytest.raises(wq.ConfigError, match="seed"):
        SearchAllocator(seed=-1)
    env = make_env(tiny_problem, 2.0)
    with pytest.raises(wq.ConfigError, match="does not pay for one full measurement"):
        evolve(KnapsackAllocator().make_plan(env), ProxyFitness(tiny_problem), env.table.unit_effective_bits, env.rule_mask,
               env.budget_bits, SearchConfig(evaluations=0.5))
    over = np.zeros(env.n_units, dtype=np.int64)  # all FP16: 8x the budget
    with pytest.raises(wq.ConfigError, match="within it"):
        evolve(over, ProxyFitness(tiny_problem), env.table.unit_effective_bits, env.rule_mask, env.budget_bits)
    with pytest.raises(wq.DataError, match=r"\[n, L\]"):
        ProxyFitness(tiny_problem, "nll", blocks=torch.zeros(5, dtype=torch.long))


def test_bench_refuses_bad_evaluations(capsys):
    from windquant_gym.harness.bench import main as bench_main

    for bad in ("0", "abc", "nan"):
        with pytest.raises(SystemExit):
            bench_main(["--model", "tiny-llama", "--evaluations", bad])
        assert "--evaluations" in capsys.readouterr().err


def test_search_config_json_round_trip():
    config = SearchConfig(evaluations=120.5, fitness="kl", offspring=8, stages=((0.125, 4), (0.5, 1), (1.0, 1)))
    assert SearchConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["stages"] == [[0.125, 4], [0.5, 1], [1.0, 1]]
    with pytest.raises(wq.ConfigError, match="Unknown SearchConfig fields"):
        SearchConfig.from_dict({"evaluatons": 3})


def test_fitness_on_other_blocks_counts_their_tokens(tiny_problem):
    other = wq.sample_token_blocks(wq.load_texts("wiki-sample", "calibration"), tiny_problem.tokenizer, 4, 128, seed=9)
    fitness = ProxyFitness(tiny_problem, "kl", blocks=other)
    assert fitness.n_blocks == 4 and fitness.cost(4) == 4 * 128 / tiny_problem.blocks.numel() == 1.0
    plan = np.full(len(tiny_problem.units), action_index(2))
    with fitness.session(plan) as evaluate:
        on_two = evaluate(plan, np.array([0, 3]))
    reference = tiny_problem.kl_reference(other)
    with wq.quantized_weights(tiny_problem.model, tiny_problem.table, plan):
        expected = wq.eval.token_losses(tiny_problem.model, other[[0, 3]], reference=reference.rows([0, 3])).kl
    assert on_two == expected and fitness.tokens == 2 * 128


def test_incremental_assembly_moves_units_to_fp16_and_back_exactly(tiny_problem):
    """Inside a session the model holds the assembler's buffers: a unit raised to FP16 must get
    the original weights' columns, not the buffer's own (quantized) ones."""
    env = make_env(tiny_problem, 3.0)
    plan = np.full(env.n_units, action_index(3))
    with_fp16 = plan.copy()
    with_fp16[[0, 5]] = 0
    fitness = ProxyFitness(tiny_problem, "nll")
    with fitness.session(plan) as evaluate:
        measured = [evaluate(p, None) for p in (plan, with_fp16, plan, with_fp16)]
    fresh = [tiny_problem.proxy_nll(p) for p in (plan, with_fp16)]
    assert measured == fresh + fresh and fresh[0] != fresh[1]


def test_an_exact_planned_allocator_whose_plan_the_masks_change_is_refused(tiny_problem):
    class Greedy(wq.allocators.PlannedAllocator):
        exact = True

        def make_plan(self, env):
            return np.zeros(env.n_units, dtype=np.int64)  # all FP16: far over any budget

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    with pytest.raises(wq.TableMismatchError, match="exact = True must plan within env.budget_bits"):
        run_allocator(env, Greedy())
    Greedy.exact = False  # a plain planned allocator is projected onto the masks, as documented
    (result,) = run_allocator(env, Greedy())
    assert result.effective_bits <= 2.0 + 1e-9


def test_the_fitness_and_the_config_must_name_the_same_metric(tiny_problem):
    env = make_env(tiny_problem, 2.0)
    with pytest.raises(wq.ConfigError, match="SearchConfig\\(fitness='kl'\\)"):
        evolve(KnapsackAllocator().make_plan(env), ProxyFitness(tiny_problem, "kl"), env.table.unit_effective_bits,
               env.rule_mask, env.budget_bits, SearchConfig(evaluations=5))
