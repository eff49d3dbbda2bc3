import math

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.quant import build as table_module
from windquant_gym.quant.bitwidths import N_ACTIONS
from _helpers import random_hessians


def test_table_shapes_bits_and_errors(tiny_problem):
    table = tiny_problem.table
    n = len(table.units)
    assert table.unit_effective_bits.shape == table.unit_storage_bits.shape == (n, N_ACTIONS)
    # Lower precision, fewer bits, larger error (on average over units).
    mean_bits = table.unit_effective_bits.sum(0) / table.n_weights.sum()
    assert np.all(np.diff(mean_bits) < 0)
    errors = table.fit_rel_error.mean(0)
    assert np.all(np.diff(errors) > 0)
    assert np.all(table.unit_storage_bits[:, 1:] > table.unit_effective_bits[:, 1:])
    assert table.n_protected.sum() > 0


def test_dequantized_unit_matches_assembled_module(tiny_problem, tiny):
    model, _ = tiny
    table = tiny_problem.table
    name = table.units[0].module
    units = [u for u in table.units if u.module == name]
    actions = [(i % 6) + 1 for i in range(len(units))]
    actions[-1] = 0
    original = model.get_submodule(name).weight.data
    whole = table.assemble_module(name, actions, original)
    for unit, action in zip(units, actions):
        part = table.dequantize_unit(unit.index, action, original)
        assert torch.equal(whole[:, unit.col_start : unit.col_end], part)
    # Skip keeps the FP16 rounding of the original; quantized units differ from it.
    last = units[-1]
    assert torch.equal(whole[:, last.col_start :], original[:, last.col_start :].half().float())
    assert not torch.equal(whole[:, : units[0].col_end], original[:, : units[0].col_end])


def test_stored_errors_match_the_dequantized_weights(tiny_problem, tiny):
    model, _ = tiny
    table = tiny_problem.table
    scales = tiny_problem.calibration.act_scales
    for unit in table.units[::5]:
        original = model.get_submodule(unit.module).weight.data
        w = original[:, unit.col_start : unit.col_end]
        s = scales[unit.module][unit.col_start : unit.col_end]
        for action in range(N_ACTIONS):
            diff = w - table.dequantize_unit(unit.index, action, original)
            assert float((diff**2).sum()) == pytest.approx(table.fit_error_plain[unit.index, action], rel=1e-4, abs=1e-12)
            assert float(((diff * s) ** 2).sum()) == pytest.approx(table.fit_error_act[unit.index, action], rel=1e-4, abs=1e-12)


def test_cache_round_trips_and_second_build_loads(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    units = wq.find_units(model, 64)
    scales = {u.module: torch.rand(u.in_features) + 0.5 for u in units}
    hessians = random_hessians(model, 64)
    config = wq.QuantConfig(chunk_size=64, fit_steps=2)
    first = wq.build_table(model, scales, config, hessians=hessians, cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cached table should have been loaded")

    monkeypatch.setattr(table_module, "_fit_all", refuse)
    second = wq.build_table(model, scales, config, hessians=hessians, cache=tmp_path, progress=False)
    assert second.fingerprint == first.fingerprint and second.config == first.config
    assert second.units == first.units
    for name in first.codes:
        assert torch.equal(first.codes[name], second.codes[name])
        assert torch.equal(first.scales[name], second.scales[name])
        assert torch.equal(first.outlier_index[name], second.outlier_index[name])
        assert torch.equal(first.outlier_codes[name], second.outlier_codes[name])
        assert torch.equal(first.outlier_scales[name], second.outlier_scales[name])
    for name in ("fit_error_plain", "fit_error_act", "fit_error_output", "energy_output", "stored_action"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # A different config, different scales or different Hessians is a different table.
    with pytest.raises(AssertionError, match="cached table"):
        wq.build_table(model, scales, wq.QuantConfig(chunk_size=64, fit_steps=3), hessians=hessians, cache=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="cached table"):
        wq.build_table(model, scales, config, hessians=random_hessians(model, 64, seed=1), cache=tmp_path, progress=False)
    scales[units[0].module] = scales[units[0].module] * 2
    with pytest.raises(AssertionError, match="cached table"):
        wq.build_table(model, scales, config, hessians=hessians, cache=tmp_path, progress=False)


def test_fallback_takes_next_higher_precision_and_is_recorded(tiny):
    model, _ = tiny
    units = wq.find_units(model, 64)
    scales = {u.module: torch.ones(u.in_features) for u in units}
    strict = (math.inf, 1.0, 1.0, 1.0, 1e-9, 1e-9, 1.0)  # 2 and 1.58 bit always fail
    table = wq.build_table(model, scales, wq.QuantConfig(chunk_size=64, fallback_thresholds=strict),
                           hessians=random_hessians(model, 64), cache=False, progress=False)
    assert (table.stored_action[:, 4] == 3).all()  # 2 bit -> 3 bit
    assert (table.stored_action[:, 5] == 3).all()  # 1.58 -> 2 (fails) -> 3 bit
    assert (table.stored_action[:, 6] == 6).all()
    assert table.fallbacks[:, 4].all() and not table.fallbacks[:, 6].any()
    plan = [5] * len(units)
    bits = table.plan_bits(plan)
    assert bits["fallbacks"] == len(units)
    assert bits["effective_bits"] == pytest.approx(table.plan_bits([3] * len(units))["effective_bits"])


def test_plan_checks(tiny_problem):
    table = tiny_problem.table
    with pytest.raises(wq.TableMismatchError, match="one action per unit"):
        table.plan_bits([1, 2])
    with pytest.raises(wq.TableMismatchError, match="actions must lie"):
        table.plan_bits([7] * len(table.units))


def test_the_fit_batch_bounds_memory_not_results(tiny_problem):
    """One unit at a time (batch_elements=1) fits what the device default's batches fit, bit for bit:
    the GPU's larger default (FIT_BATCH_ELEMENTS) changes the speed, not the table."""
    from windquant_gym.quant.build import FIT_BATCH_ELEMENTS, build_table

    assert FIT_BATCH_ELEMENTS["cuda"] > FIT_BATCH_ELEMENTS["cpu"]
    problem = tiny_problem
    kwargs = dict(hessians=problem.calibration.hessians, cache=False, progress=False, units=problem.units)
    batched = build_table(problem.model, problem.calibration.act_scales, problem.table.config, **kwargs)
    single = build_table(problem.model, problem.calibration.act_scales, problem.table.config, batch_elements=1, **kwargs)
    for name in batched.codes:
        assert torch.equal(batched.codes[name], single.codes[name]), name
        assert torch.equal(batched.scales[name], single.scales[name]), name
    assert np.array_equal(batched.stored_action, single.stored_action)
    assert np.array_equal(batched.fit_error_output, single.fit_error_output)
