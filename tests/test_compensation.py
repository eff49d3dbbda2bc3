"""Chunk-local error compensation (GPTQ inside a unit), the calibration's Hessian blocks,
and the table built with them."""

import json

import numpy as np
import pytest
import torch

import windquant_gym as wq
import windquant_gym.problem as problem_module
from windquant_gym.errors import ConfigError, TableMismatchError
from windquant_gym.quant.bitwidths import BIT_WIDTHS, N_ACTIONS
from windquant_gym.quant.compensation import compensated_codes, inverse_cholesky
from windquant_gym.quant.config import QuantConfig
from windquant_gym.quant.fitting import QUANT_ACTIONS, fit_units
from windquant_gym.quant.quantizers import dequantize_codes, fit_scales, int8_outliers, protect_salient
from _helpers import random_hessians

ROUND = dict(compensation="none", error_metric="output")


def correlated_layer(units=3, rows=24, columns=32, tokens=512, seed=0):
    """Weights ``[U, O, G]``, activation scales ``[U, 1, G]`` and Hessians ``[U, G, G]`` of
    inputs whose columns are strongly correlated (what compensation exploits)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(units, rows, columns, generator=g)
    mix = torch.randn(units, columns, columns, generator=g) / columns**0.5 + 0.5 * torch.eye(columns)
    x = torch.randn(units, tokens, columns, generator=g) @ mix
    hessian = x.transpose(1, 2) @ x / tokens
    s = x.abs().mean(dim=1, keepdim=True)
    return w, s, hessian


def output_error(w, q, hessian):
    d = w - q
    return (torch.bmm(d, hessian) * d).sum(dim=(1, 2))


@pytest.mark.parametrize("action", list(QUANT_ACTIONS))
def test_compensation_lowers_the_output_error_at_every_width(action):
    w, s, hessian = correlated_layer()
    rounded = fit_units(w, s, hessian, QuantConfig(chunk_size=32, **ROUND), n_protected=10)
    compensated = fit_units(w, s, hessian, QuantConfig(chunk_size=32), n_protected=10)
    # the same scales and protected weights; the codes differ and the output error falls
    torch.testing.assert_close(rounded.scales[action - 1], compensated.scales[action - 1], rtol=0, atol=0)
    assert torch.equal(rounded.protected, compensated.protected)
    assert not torch.equal(rounded.codes[action - 1], compensated.codes[action - 1])
    assert np.all(compensated.error_output[:, action] < 0.95 * rounded.error_output[:, action])
    # and the recorded error is the error of what is stored
    spec = BIT_WIDTHS[action]
    outliers = compensated.outlier_codes.float() * compensated.outlier_scale
    q = torch.where(compensated.protected, outliers, dequantize_codes(compensated.codes[action - 1], compensated.scales[action - 1], spec))
    np.testing.assert_allclose(compensated.error_output[:, action], output_error(w, q, hessian).double().numpy(), rtol=1e-4)


@pytest.mark.parametrize("action", list(QUANT_ACTIONS))
def test_with_an_identity_hessian_it_is_rounding_alone(action):
    w, s, _ = correlated_layer()
    identity = torch.eye(w.shape[-1]).expand(w.shape[0], -1, -1).contiguous()
    rounded = fit_units(w, s, identity, QuantConfig(chunk_size=32, **ROUND), n_protected=10)
    compensated = fit_units(w, s, identity, QuantConfig(chunk_size=32), n_protected=10)
    assert torch.equal(rounded.codes[action - 1], compensated.codes[action - 1])


def test_protected_weights_keep_their_values_and_take_no_compensation():
    w, s, hessian = correlated_layer()
    protected = protect_salient(w, s, 40)
    scale, codes = int8_outliers(w, protected)
    values = codes.float() * scale
    spec = BIT_WIDTHS[4]
    fit = fit_scales(w, ~protected, s * s, spec, 5, 0.1)
    hinv = inverse_cholesky(hessian)
    out = compensated_codes(w, fit.alpha, spec, hinv, protected, values)
    # what the table stores at protected positions is the INT8 outlier, whatever the code says
    fitted = fit_units(w, s, hessian, QuantConfig(chunk_size=32), n_protected=40)
    assert torch.equal(fitted.protected, protected) and torch.equal(fitted.outlier_codes, codes)
    # compensation never moves a protected weight: making every weight protected gives the
    # same codes as rounding (nothing is left to absorb an error, and no error arises)
    everything = torch.ones_like(protected)
    all_protected = compensated_codes(w, fit.alpha, spec, hinv, everything, w.clone())
    assert torch.equal(all_protected, torch.stack([fit.codes[u] for u in range(w.shape[0])]))
    assert out.shape == w.shape and out.dtype == torch.int8


def test_an_all_zero_or_dead_column_hessian_still_inverts():
    hessian = torch.zeros(2, 8, 8)
    hessian[1, :4, :4] = torch.eye(4) * 3.0  # columns 4..7 never activated
    factor = inverse_cholesky(hessian)
    assert torch.isfinite(factor).all()
    off_diagonal = factor[0] - torch.diag(torch.diagonal(factor[0]))
    assert torch.count_nonzero(off_diagonal) == 0  # an all-zero block is rounding alone


def test_table_units_stay_independent(tiny):
    """Changing one unit's weights changes no other unit's codes, scales or outliers."""
    model, _ = tiny
    import copy

    model = copy.deepcopy(model)
    units = wq.find_units(model, 64)
    scales = {u.module: torch.rand(u.in_features, generator=torch.Generator().manual_seed(3)) + 0.5 for u in units}
    hessians = random_hessians(model, 64)
    config = QuantConfig(chunk_size=64, fit_steps=2)
    before = wq.build_table(model, scales, config, hessians=hessians, cache=False, progress=False)
    target = units[1]
    with torch.no_grad():
        model.get_submodule(target.module).weight[:, target.col_start : target.col_end].mul_(1.7).add_(0.01)
    after = wq.build_table(model, scales, config, hessians=hessians, cache=False, progress=False)
    for unit in units:
        cols = slice(unit.col_start, unit.col_end)
        same = torch.equal(before.codes[unit.module][:, :, cols], after.codes[unit.module][:, :, cols])
        assert same == (unit.index != target.index), unit
    others = [u.index for u in units if u.index != target.index]
    np.testing.assert_array_equal(before.fit_error_output[others], after.fit_error_output[others])


def test_tiny_problem_table_is_compensated_and_records_output_errors(tiny_problem):
    """The export and replay tests run on this table: they cover a compensated one."""
    table = tiny_problem.table
    assert table.config.compensation == "gptq" and table.config.error_metric == "output"
    assert np.all(np.isfinite(table.fit_error_output)) and np.all(table.fit_error_output >= 0)
    # more bits, less output error, on average over units
    assert np.all(np.diff(table.rel_error("output").mean(0)) > 0)
    np.testing.assert_array_equal(table.rel_error(), table.rel_error("output"))


def test_compensated_table_beats_rounding_on_the_tiny_model_proxy(tiny_problem):
    rounded = wq.build_table(tiny_problem.model, tiny_problem.calibration.act_scales,
                             QuantConfig(chunk_size=48, **ROUND), hessians=tiny_problem.calibration.hessians,
                             cache=False, progress=False)
    table = tiny_problem.table
    for action in (2, 3, 4):  # 4, 3, 2 bit
        assert table.fit_error_output[:, action].sum() < rounded.fit_error_output[:, action].sum()


# ----- calibration ---------------------------------------------------------------------------
def test_calibration_hessians_are_the_inputs_second_moment(tiny):
    model, _ = tiny
    units = wq.find_units(model, 48)
    blocks = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    captured = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: captured.setdefault(n, []).append(i[0].detach().reshape(-1, i[0].shape[-1]).float()))
        for n in dict.fromkeys(u.module for u in units)]
    try:
        result = wq.calibrate(model, units, blocks, batch_size=2, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.chunk_size == 48
    for name, chunks in captured.items():
        x = torch.cat(chunks)
        hessian = result.hessians[name]
        n_chunks = -(-x.shape[1] // 48)
        assert hessian.shape == (n_chunks, 48, 48)
        for c in range(n_chunks):
            block = x[:, c * 48 : (c + 1) * 48]
            width = block.shape[1]
            torch.testing.assert_close(hessian[c, :width, :width], block.T @ block / x.shape[0], rtol=1e-4, atol=1e-5)
            assert torch.count_nonzero(hessian[c, width:]) == 0  # the ragged last chunk is zero-padded
    q, k = (next(n for n in captured if n.endswith(f"0.self_attn.{p}_proj")) for p in "qk")
    assert result.hessians[q] is result.hessians[k]  # one input, one tensor


def test_cached_calibration_round_trips_the_shared_hessians(tiny, tmp_path):
    model, _ = tiny
    units = wq.find_units(model, 48)
    blocks = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    first = problem_module._cached_calibration(model, units, blocks, 2, tmp_path, False)
    second = problem_module._cached_calibration(model, units, blocks, 2, tmp_path, False)
    assert second.chunk_size == first.chunk_size == 48
    assert second.hessians.keys() == first.hessians.keys()
    for name in first.hessians:
        assert torch.equal(first.hessians[name], second.hessians[name])
    q, v = (next(n for n in first.hessians if n.endswith(f"0.self_attn.{p}_proj")) for p in "qv")
    assert second.hessians[q] is second.hessians[v]
    # another chunking is another calibration
    third = problem_module._cached_calibration(model, wq.find_units(model, 32), blocks, 2, tmp_path, False)
    assert third.chunk_size == 32


# ----- config and bad inputs -----------------------------------------------------------------
def test_config_fields_round_trip_and_version_1_reads_as_the_paper_fit():
    config = QuantConfig(chunk_size=64, compensation="gptq", damping=0.05, error_metric="activation")
    assert QuantConfig.from_json(config.to_json()) == config
    old = json.loads(QuantConfig(chunk_size=64).to_json())
    for key in ("compensation", "damping", "error_metric"):
        old.pop(key)
    old["version"] = 1
    upgraded = QuantConfig.from_dict(old)
    assert (upgraded.compensation, upgraded.error_metric, upgraded.version) == ("none", "activation", 2)
    for bad, match in [(dict(compensation="obq"), "compensation"), (dict(damping=0.0), "damping"),
                       (dict(damping="x"), "damping"), (dict(error_metric="kl"), "error_metric"),
                       (dict(version=1), "from_dict")]:
        with pytest.raises(ConfigError, match=match):
            QuantConfig(**bad)


def test_build_without_hessians_names_the_fix(tiny):
    model, _ = tiny
    scales = {u.module: torch.ones(u.in_features) for u in wq.find_units(model, 64)}
    with pytest.raises(ConfigError, match="hessians=calibration.hessians"):
        wq.build_table(model, scales, QuantConfig(chunk_size=64), cache=False, progress=False)
    wrong = random_hessians(model, 32)
    with pytest.raises(TableMismatchError, match="same chunk size"):
        wq.build_table(model, scales, QuantConfig(chunk_size=64), hessians=wrong, cache=False, progress=False)
    # the paper's fit with the activation metric needs no Hessians, and has no output errors
    table = wq.build_table(model, scales, QuantConfig(chunk_size=64, compensation="none", error_metric="activation"),
                           cache=False, progress=False)
    assert np.isnan(table.fit_error_output).all()
    with pytest.raises(TableMismatchError, match="no output errors"):
        table.rel_error("output")
    assert table.rel_error().shape == (len(table.units), N_ACTIONS)


def test_old_name_of_the_unit_bits_warns(tiny_problem):
    with pytest.warns(DeprecationWarning, match="unit_effective_bits"):
        bits = tiny_problem.table.effective_bits
    assert bits is tiny_problem.table.unit_effective_bits


def test_env_reads_a_quant_config_dict_as_presets_write_it(tiny, tmp_path):
    import gymnasium as gym

    model, tokenizer = tiny
    env = gym.make("WindQuant-v0", model=model, tokenizer=tokenizer, chunk_size=48, n_calibration_samples=4,
                   calibration_seq_len=32, quant_config={"compensation": "none", "error_metric": "activation"},
                   cache=tmp_path, progress=False)
    config = env.unwrapped.table.config
    assert (config.chunk_size, config.compensation, config.error_metric, config.version) == (48, "none", "activation", 2)
    # a dict without a version is the current version (saved configs always carry theirs)
    assert QuantConfig.from_dict({"chunk_size": 48}) == QuantConfig(chunk_size=48)
    with pytest.raises(ConfigError, match="a dict of its fields"):
        gym.make("WindQuant-v0", model=model, tokenizer=tokenizer, quant_config="gptq", progress=False)
