"""Proxy passes that start at the first changed decoder layer (issue 21: a cheaper pass for the
search): the same NLL as the full pass, and the layers in front really skipped."""

import dataclasses

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.eval.prefix_reuse import PrefixReuse, decoder_layers, unit_layers


@pytest.fixture()
def problems(tiny_problem):
    """Two views of the tiny problem, with and without reuse (each its own store)."""
    with_reuse = dataclasses.replace(tiny_problem, reuse_prefix=True)
    without = dataclasses.replace(tiny_problem, reuse_prefix=False)
    return with_reuse, without


def _layer_of_units(problem):
    return unit_layers(problem.model, [u.module for u in problem.units], decoder_layers(problem.model))


def test_units_map_to_their_decoder_layer(tiny_problem):
    layers = decoder_layers(tiny_problem.model)
    index = _layer_of_units(tiny_problem)
    assert len(layers) >= 2 and sorted(set(index.tolist())) == list(range(len(layers)))
    for unit, layer in zip(tiny_problem.units, index):
        assert f".layers.{layer}." in unit.module


def test_a_pass_after_a_late_change_skips_the_layers_in_front_and_gives_the_full_pass_nll(problems):
    reuse, full = problems
    index = _layer_of_units(reuse)
    n = len(reuse.units)
    plan = np.full(n, 3)
    late = plan.copy()
    late[np.flatnonzero(index == index.max())[0]] = 4  # one unit of the last layer
    mid = plan.copy()
    mid[np.flatnonzero(index == 1)[0]] = 2
    first = reuse.proxy_nll(plan)
    assert reuse._prefix.first_layer == 0  # nothing stored yet: the whole pass
    assert first == full.proxy_nll(plan)
    skipped = reuse._prefix.layers_skipped
    assert reuse.proxy_nll(late) == full.proxy_nll(late)  # bit for bit: same batches
    assert reuse._prefix.first_layer == index.max()
    n_batches = -(-len(reuse.blocks) // reuse.batch_size)
    assert reuse._prefix.layers_skipped - skipped == index.max() * n_batches
    assert reuse.proxy_nll(mid) == full.proxy_nll(mid)
    assert reuse._prefix.first_layer == 1
    assert reuse.proxy_nll(mid) == full.proxy_nll(mid) and reuse._prefix.first_layer == len(decoder_layers(reuse.model))
    assert reuse.proxy_nll(plan) == first  # back: from layer 1 again, the states follow the plan measured
    assert reuse._prefix.first_layer == 1


def test_the_model_keeps_its_own_layers_and_weights_after_a_pass(problems):
    reuse, _ = problems
    layers = decoder_layers(reuse.model)
    before = {name: p.detach().clone() for name, p in reuse.model.named_parameters()}
    n = len(reuse.units)
    reuse.proxy_nll(np.full(n, 2))
    plan = np.full(n, 2)
    plan[-1] = 1
    reuse.proxy_nll(plan)
    assert reuse._prefix.first_layer > 0
    assert all("forward" not in layer.__dict__ for layer in layers)  # no lookup left behind
    assert not any(layer._forward_hooks for layer in layers) and not reuse.model.get_decoder()._forward_pre_hooks
    for name, p in reuse.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_an_error_in_a_pass_drops_the_rows_it_touched(problems):
    reuse, full = problems
    n = len(reuse.units)
    reuse.proxy_nll(np.full(n, 3))
    layers = decoder_layers(reuse.model)

    def boom(module, args, kwargs, output):
        raise RuntimeError("interrupted")

    handle = layers[-1].register_forward_hook(boom, with_kwargs=True)
    plan = np.full(n, 3)
    plan[0] = 2
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            reuse.proxy_nll(plan)
    finally:
        handle.remove()
    assert reuse.proxy_nll(plan) == full.proxy_nll(plan)
    assert reuse._prefix.first_layer == 0  # nothing trusted after the error


def test_the_search_measures_the_same_fitness_with_and_without_reuse(problems):
    """Offspring differ in a few units; screening stages measure subsets of the blocks. Every
    measurement is the full pass's, bit for bit, so the search makes the same choices."""
    import gymnasium as gym

    from windquant_gym.allocators import KnapsackAllocator, ProxyFitness, SearchConfig, evolve

    reuse, full = problems
    results = []
    for problem in (reuse, full):
        env = gym.make("WindQuant-v0", model=problem.model, problem=problem, target_bits=2.5).unwrapped
        start = KnapsackAllocator().make_plan(env)
        config = SearchConfig(evaluations=40, offspring=6, stages=((0.25, 2), (1.0, 1)))
        results.append(evolve(start, ProxyFitness(problem, "nll"), env.table.unit_effective_bits, env.rule_mask,
                              env.budget_bits, config, seed=3, stored=env.table.stored_action))
    assert np.array_equal(results[0].plan, results[1].plan)
    assert results[0].history == results[1].history and results[0].fitness == results[1].fitness
    assert full._prefix is None
    assert full.proxy_nll(results[0].plan) == results[0].fitness


def test_a_search_session_skips_the_layers_in_front_of_a_late_change(problems):
    """The search's measurements go through the store: whole blocks and a screening subset alike."""
    from windquant_gym.allocators import ProxyFitness

    reuse, full = problems
    index = _layer_of_units(reuse)
    n = len(reuse.units)
    parent = np.full(n, 3)
    child = parent.copy()
    child[np.flatnonzero(index == index.max())[:2]] = 2
    subset = np.array([1, 4])
    with ProxyFitness(reuse, "nll").session(parent) as evaluate:
        measured = [evaluate(parent, None), evaluate(parent, subset)]
        skipped = reuse._prefix.layers_skipped
        measured += [evaluate(child, None), evaluate(child, subset)]
        assert reuse._prefix.layers_skipped > skipped
        assert reuse._prefix.first_layer == index.max()
    with ProxyFitness(full, "nll").session(parent) as evaluate:
        expected = [evaluate(parent, None), evaluate(parent, subset), evaluate(child, None), evaluate(child, subset)]
    assert measured == expected


def test_a_store_too_large_turns_reuse_off(tiny_problem):
    model = tiny_problem.model
    units = [u.module for u in tiny_problem.units]
    assert PrefixReuse.for_model(model, units, tiny_problem.blocks, max_bytes=1) is None
    assert PrefixReuse.for_model(model, units, tiny_problem.blocks) is not None
