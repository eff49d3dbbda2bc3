"""Issue 26's asymmetric grid (``QuantConfig.grid='asymmetric'``): affine 2/3/4-bit operators with a
zero point per row of a unit, beside the paper's symmetric ones."""

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.errors import ConfigError
from windquant_gym.quant.accounting import effective_bits, storage_bits, unit_bit_tables
from windquant_gym.quant.bitwidths import ASYMMETRIC_BIT_WIDTHS, BIT_WIDTHS, SCALE_BITS, bit_widths
from windquant_gym.quant.compensation import compensated_codes
from windquant_gym.quant.config import QuantConfig
from windquant_gym.quant.fitting import QUANT_ACTIONS, fit_units, refit_affine
from windquant_gym.quant.quantizers import dequantize_codes, fit_affine, int8_outliers, protect_salient, quantize_codes
from test_compensation import correlated_layer

AFFINE_ACTIONS = [a for a in QUANT_ACTIONS if ASYMMETRIC_BIT_WIDTHS[a].zero_point]


def test_the_grid_replaces_exactly_the_2_to_4_bit_operators():
    assert [ASYMMETRIC_BIT_WIDTHS[a].bits for a in AFFINE_ACTIONS] == [4, 3, 2]
    for action in QUANT_ACTIONS:
        affine, paper = ASYMMETRIC_BIT_WIDTHS[action], BIT_WIDTHS[action]
        assert affine.bits == paper.bits and affine.stored_bits == paper.stored_bits  # same charge per code
        if action in AFFINE_ACTIONS:
            assert (affine.code_min, affine.code_max) == (0, 2 ** int(affine.bits) - 1)
        else:
            assert affine == paper
    assert bit_widths("symmetric") is BIT_WIDTHS and bit_widths("asymmetric") is ASYMMETRIC_BIT_WIDTHS
    with pytest.raises(ConfigError, match="grid must be one of"):
        bit_widths("nf4")


def _awkward_rows(seed=0):
    """Rows of every kind the fit must survive: skewed Gaussian, constant, all-zero, one weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 8, 40, generator=g) + 0.7 * torch.randn(2, 8, 1, generator=g)
    w[0, 1] = 0.37  # constant row
    w[0, 2] = 0.0  # all-zero row
    w[1, 3] = -5.0 * torch.rand(40, generator=g) - 1.0  # all negative
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[1, 4] = False  # all protected
    keep[1, 5, 1:] = False  # a single free weight
    return w, keep


@pytest.mark.parametrize("action", AFFINE_ACTIONS)
def test_affine_codes_stay_in_range_and_the_fit_beats_min_max(action):
    spec = ASYMMETRIC_BIT_WIDTHS[action]
    w, keep = _awkward_rows()
    weight = torch.ones_like(w)
    fit = fit_affine(w, keep, weight, spec, steps=10)
    assert fit.codes.dtype == torch.int8
    assert int(fit.codes.min()) >= 0 and int(fit.codes.max()) <= 2 ** int(spec.bits) - 1
    # stored values are fp16 and the fit never ends worse than its min-max start
    assert torch.equal(fit.alpha, fit.alpha.half().float()) and torch.equal(fit.zero, fit.zero.half().float())
    assert bool((fit.loss <= fit.initial_loss).all())
    assert float(fit.loss.sum()) < 0.95 * float(fit.initial_loss.sum())  # the alternation does work
    restored = dequantize_codes(fit.codes, fit.alpha, spec, fit.zero)
    # what the loss reports is what dequantizing stores
    torch.testing.assert_close(((restored - w) ** 2 * keep).sum(-1, keepdim=True), fit.loss, rtol=1e-5, atol=1e-6)
    # a constant row and an all-zero row are stored exactly
    torch.testing.assert_close(restored[0, 1], w[0, 1], rtol=1e-3, atol=1e-6)
    assert torch.equal(restored[0, 2], torch.zeros(40))
    assert torch.isfinite(restored).all()


def test_dequantize_is_alpha_times_code_minus_zero():
    spec = ASYMMETRIC_BIT_WIDTHS[AFFINE_ACTIONS[1]]  # 3 bit
    codes = torch.tensor([[[0, 3, 7]]], dtype=torch.int8)
    alpha, zero = torch.tensor([[[0.5]]]), torch.tensor([[[2.25]]])
    torch.testing.assert_close(dequantize_codes(codes, alpha, spec, zero), torch.tensor([[[-1.125, 0.375, 2.375]]]))
    # and quantizing those values gives the codes back
    assert torch.equal(quantize_codes(dequantize_codes(codes, alpha, spec, zero), alpha, spec, zero), codes)


@pytest.mark.parametrize("action", AFFINE_ACTIONS)
def test_compensation_with_an_identity_inverse_is_rounding_at_the_zero_point(action):
    spec = ASYMMETRIC_BIT_WIDTHS[action]
    w, keep = _awkward_rows(1)
    fit = fit_affine(w, keep, torch.ones_like(w), spec)
    eye = torch.eye(w.shape[-1]).expand(w.shape[0], -1, -1).contiguous()
    codes = compensated_codes(w, fit.alpha, spec, eye, torch.zeros_like(keep), torch.zeros_like(w), zero=fit.zero)
    assert torch.equal(codes, quantize_codes(w, fit.alpha, spec, fit.zero))


def _row_errors(w, q, hessian):
    d = w - q
    return (torch.bmm(d, hessian) * d).sum(dim=-1)


@pytest.mark.parametrize("action", AFFINE_ACTIONS)
def test_affine_refit_never_makes_a_row_worse_and_is_the_least_squares_pair(action):
    spec = ASYMMETRIC_BIT_WIDTHS[action]
    w, s, hessian = correlated_layer(units=2, rows=6)
    protected = protect_salient(w, s, 8)
    outlier_scale, outlier_codes = int8_outliers(w, protected)
    outliers = outlier_codes.float() * outlier_scale
    keep = ~protected
    fit = fit_affine(w, keep, s * s, spec)
    alpha, zero = refit_affine(w, fit.codes, fit.alpha, fit.zero, spec, hessian, keep, outliers)

    def stored(a, z):
        return torch.where(protected, outliers, dequantize_codes(fit.codes, a, spec, z))

    before, after = _row_errors(w, stored(fit.alpha, fit.zero), hessian), _row_errors(w, stored(alpha, zero), hessian)
    assert bool((after <= before).all())
    assert float(after.sum()) < 0.99 * float(before.sum())
    # no pair on a grid around the refit does better than it (beyond fp16 rounding)
    for da in (0.97, 0.99, 1.01, 1.03):
        for dz in (-0.05, 0.0, 0.05):
            other = _row_errors(w, stored(alpha * da, zero + dz), hessian)
            assert bool((after <= other * (1 + 2e-3) + 1e-7).all()), (da, dz)


def test_the_zero_point_is_counted_once_per_row_of_a_unit():
    out_f, width, n_salient = 24, 48, 34
    for action in range(len(BIT_WIDTHS)):
        extra = storage_bits(out_f, width, n_salient, action, ASYMMETRIC_BIT_WIDTHS) - storage_bits(out_f, width, n_salient, action)
        assert extra == (SCALE_BITS * out_f if action in AFFINE_ACTIONS else 0), action
    # eq. 6 does not charge it
    _, _, effective_sym, storage_sym = unit_bit_tables([24, 24], [48, 16], 0.03)
    _, _, effective_asym, storage_asym = unit_bit_tables([24, 24], [48, 16], 0.03, grid="asymmetric")
    np.testing.assert_array_equal(effective_sym, effective_asym)
    assert effective_asym[0, 2] == effective_bits(24 * 48, 34, 2)
    np.testing.assert_array_equal((storage_asym - storage_sym)[:, AFFINE_ACTIONS], 16 * 24)


def test_config_field_round_trips_and_refuses_bad_values():
    config = QuantConfig(grid="asymmetric", scale_refit="output")
    assert QuantConfig.from_json(config.to_json()) == config
    assert QuantConfig.from_dict({"chunk_size": 64}).grid == "symmetric"  # older saved configs: the paper's grid
    for bad in ("affine", "", None, ["asymmetric"]):
        with pytest.raises(ConfigError, match="grid must be one of"):
            QuantConfig(grid=bad)


@pytest.fixture
def asymmetric_problem(tiny_asymmetric_problem):
    return tiny_asymmetric_problem


def test_a_table_of_the_asymmetric_grid_stores_and_reloads_its_zero_points(asymmetric_problem, tiny_problem, tmp_path):
    from windquant_gym.quant.table import QuantTable

    table = asymmetric_problem.table
    assert set(table.zeros) == set(table.codes) and not tiny_problem.table.zeros
    assert table.fingerprint != tiny_problem.table.fingerprint
    for name, zeros in table.zeros.items():
        # entries of the operators without a zero point hold 0; the affine ones are used
        for action in QUANT_ACTIONS:
            if action not in AFFINE_ACTIONS:
                assert not zeros[action - 1].any()
        assert zeros[AFFINE_ACTIONS[-1] - 1].abs().sum() > 0
        codes = table.codes[name]
        for action in AFFINE_ACTIONS:
            assert int(codes[action - 1].min()) >= 0 and int(codes[action - 1].max()) <= 2 ** int(BIT_WIDTHS[action].bits) - 1
    path = tmp_path / "table.safetensors"
    table.save(path)
    loaded = QuantTable.load(path)
    unit = table.units[0]
    original = asymmetric_problem.model.get_submodule(unit.module).weight.detach().float()
    actions = [AFFINE_ACTIONS[-1]] * len([u for u in table.units if u.module == unit.module])
    assembled = table.assemble_module(unit.module, actions, original)
    torch.testing.assert_close(loaded.assemble_module(unit.module, actions, original), assembled, rtol=0, atol=0)
    # the unit's weights are those of its stored codes, scale and zero point, outliers on top
    torch.testing.assert_close(table.dequantize_unit(0, AFFINE_ACTIONS[-1], original),
                               assembled[:, unit.col_start:unit.col_end], rtol=0, atol=0)
    # a file without its zero points is refused by name
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("zeros:")}
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=meta)
    with pytest.raises(wq.errors.TableMismatchError, match="zero points"):
        QuantTable.load(tmp_path / "broken.safetensors")


def test_asymmetric_plans_pay_the_zero_points_in_storage_only(asymmetric_problem, tiny_problem):
    sym, asym = tiny_problem.table, asymmetric_problem.table
    out_f = np.array([u.out_features for u in asym.units])
    checked = 0
    for action in AFFINE_ACTIONS:
        same = (sym.stored_action[:, action] == action) & (asym.stored_action[:, action] == action)
        checked += int(same.sum())
        np.testing.assert_array_equal(asym.unit_effective_bits[same, action], sym.unit_effective_bits[same, action])
        np.testing.assert_array_equal(asym.unit_storage_bits[same, action] - sym.unit_storage_bits[same, action],
                                      SCALE_BITS * out_f[same])
    assert checked > 0


@pytest.fixture(scope="module")
def asymmetric_exports(tiny_asymmetric_problem, tmp_path_factory):
    from test_export import export_named_plans

    n_units = len(tiny_asymmetric_problem.units)
    mixed = (np.arange(n_units) % len(BIT_WIDTHS)).tolist()  # every action, skip included
    named = {"uniform-2": [AFFINE_ACTIONS[-1]] * n_units, "mixed": mixed}
    return export_named_plans(tiny_asymmetric_problem, named, tmp_path_factory.mktemp("asym-exports"))


@pytest.mark.parametrize("name", ["uniform-2", "mixed"])
def test_an_asymmetric_export_loads_the_envs_weights_and_perplexity(tiny_asymmetric_problem, asymmetric_exports, name):
    from test_export import assert_export_is_the_env

    plan, folder = asymmetric_exports[name]
    assert_export_is_the_env(tiny_asymmetric_problem, plan, folder)  # codes, scales and zero points stay packed


@pytest.mark.parametrize("name", ["uniform-2", "mixed"])
def test_an_asymmetric_export_is_its_storage_bits(tiny_asymmetric_problem, asymmetric_exports, name):
    from test_export import assert_packed_size_is_storage_bits

    plan, folder = asymmetric_exports[name]
    table = tiny_asymmetric_problem.table
    size = assert_packed_size_is_storage_bits(tiny_asymmetric_problem, plan, folder)  # zero points charged too
    out_f = {u.module: u.out_features for u in table.units}
    zero_units = sum(1 for u, a in zip(table.units, plan.actions) if table.stored_action[u.index, a] in AFFINE_ACTIONS)
    assert size.by_kind["zeros"] == 2 * sum(out_f[u.module] for u, a in zip(table.units, plan.actions)
                                            if table.stored_action[u.index, a] in AFFINE_ACTIONS)
    assert zero_units > 0


def test_fit_units_records_the_error_of_what_is_stored():
    w, s, hessian = correlated_layer(units=3, rows=16)
    fitted = fit_units(w, s, hessian, QuantConfig(chunk_size=32, grid="asymmetric", scale_refit="output"), n_protected=10)
    outliers = fitted.outlier_codes.float() * fitted.outlier_scale
    for action in QUANT_ACTIONS:
        spec = ASYMMETRIC_BIT_WIDTHS[action]
        zero = fitted.zeros[action - 1]
        assert (zero is not None) == spec.zero_point
        stored = torch.where(fitted.protected, outliers, dequantize_codes(fitted.codes[action - 1], fitted.scales[action - 1], spec, zero))
        d = w - stored
        np.testing.assert_allclose(fitted.error_output[:, action], (torch.bmm(d, hessian) * d).sum(dim=(1, 2)).double().numpy(), rtol=1e-4)
