"""Issue 26's rotation lever (``QuantConfig.rotation='hadamard'``): each unit fitted in a rotated
frame ``W_u R`` and restored as ``Q R^T``; units stay independent, the export applies ``R`` to inputs."""

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.errors import ConfigError
from windquant_gym.quant.bitwidths import BIT_WIDTHS
from windquant_gym.quant.config import QuantConfig
from windquant_gym.quant.fitting import QUANT_ACTIONS, unit_errors
from windquant_gym.quant.rotation import rotated_inputs, rotation_matrix, unrotate


@pytest.mark.parametrize("width", [1, 16, 48, 64, 96, 256, 250])
def test_the_rotation_is_orthogonal_and_fixed_by_the_width(width):
    r = rotation_matrix(width, dtype=torch.float64)
    torch.testing.assert_close(r @ r.T, torch.eye(width, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(r, rotation_matrix(width, dtype=torch.float64))  # no state: the width alone decides
    # entries of each Hadamard block are +-1/sqrt(block): exactly representable sums of powers of two
    nonzero = r[r != 0].abs()
    assert nonzero.numel() >= width
    if width & (width - 1) == 0:  # a power of two: one dense block
        assert torch.allclose(nonzero, torch.full_like(nonzero, width ** -0.5)) and nonzero.numel() == width * width
    if width >= 16:  # randomized: the first column's signs are not those of the plain Hadamard matrix (all +)
        assert bool((r[:, 0] < 0).any())


def test_the_fit_in_the_rotated_frame_keeps_the_output_error_and_spreads_outliers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 8, 64, generator=g)
    w[:, :, 3] *= 30  # one heavy column: what rotation spreads
    x = torch.randn(500, 64, generator=g)
    h = (x.T @ x / 500)[None].expand(2, 64, 64).contiguous()
    w_r, h_r, s_r = rotated_inputs(w, h, 64)
    # W x = (W R)(R^T x): the output error of any D is the same in both frames
    d = torch.randn(2, 8, 64, generator=g)
    d_r = d @ rotation_matrix(64)
    np.testing.assert_allclose(unit_errors(w, w - d, s_r, h)[2], unit_errors(w_r, w_r - d_r, s_r, h_r)[2], rtol=1e-4)
    torch.testing.assert_close(unrotate(w_r), w, rtol=0, atol=1e-4)
    assert float(w_r.abs().amax() / w_r.std()) < 0.5 * float(w.abs().amax() / w.std())  # incoherence
    assert s_r.shape == (2, 1, 64) and bool((s_r > 0).all())


def test_bad_rotation_is_refused_by_name():
    with pytest.raises(ConfigError, match="rotation must be one of"):
        QuantConfig(rotation="random")
    assert QuantConfig(rotation="hadamard").rotation == "hadamard"
    assert QuantConfig.from_json(QuantConfig(rotation="hadamard").to_json()) == QuantConfig(rotation="hadamard")
    assert QuantConfig().to_dict()["rotation"] == "none"


@pytest.fixture(scope="module")
def rotated_problem(tiny, tmp_path_factory):
    model, tokenizer = tiny
    return wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48, rotation="hadamard",
                                 scale_refit="output"), n_samples=8, seq_len=64,
                                 cache=tmp_path_factory.mktemp("rot-cache"), progress=False)


def test_the_table_key_changes_with_the_rotation(rotated_problem, tiny_problem):
    assert rotated_problem.table.fingerprint != tiny_problem.table.fingerprint


def test_the_recorded_output_error_is_that_of_the_assembled_weights(rotated_problem):
    """What the table says a unit's error is, the model's frame measures: the rotation is undone exactly."""
    problem = rotated_problem
    table, hessians, n = problem.table, problem.calibration.hessians, len(problem.units)
    originals = {u.module: problem.model.get_submodule(u.module).weight.detach().float().clone() for u in problem.units}
    checked = 0
    for action in [0, *QUANT_ACTIONS]:
        with wq.quantized_weights(problem.model, table, [action] * n) as model:
            for unit in problem.units[:: max(1, n // 7)]:
                cols = slice(unit.col_start, unit.col_end)
                diff = originals[unit.module][:, cols] - model.get_submodule(unit.module).weight.detach()[:, cols].float()
                h = hessians[unit.module][unit.col_start // table.config.chunk_size][: unit.width, : unit.width].float()
                stored = int(table.stored_action[unit.index, action])
                measured = float(((diff @ h) * diff).sum())
                assert measured == pytest.approx(table.fit_error_output[unit.index, stored], rel=2e-3, abs=1e-9), (unit, action)
                checked += 1
    assert checked >= 7 * 7


def test_rotation_lowers_the_output_error_of_rows_with_outliers():
    """What the lever is for: rows with a few large weights (as real LLM weights have; the tiny
    model's Gaussian weights are incoherent already) waste a low-bit grid; rotated, they do not."""
    from windquant_gym.quant.fitting import fit_units

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 32, 64, generator=g) * 0.02
    heavy = torch.rand(w.shape, generator=g) < 0.01
    w = torch.where(heavy, w * 25, w)
    x = torch.randn(800, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))
    h = (x.T @ x / 800)[None].expand(4, 64, 64).contiguous()
    s = (x.abs().mean(0))[None, None].expand(4, 1, 64)
    config = QuantConfig(chunk_size=64, scale_refit="output", salient_rate=0.0)
    plain = fit_units(w, s, h, config, n_protected=0)
    w_r, h_r, s_r = rotated_inputs(w, h, 64)
    rotated = fit_units(w_r, s_r, h_r, config, n_protected=0)
    for action in (2, 3, 4):  # 4, 3, 2 bit
        ratio = rotated.error_output[:, action].sum() / plain.error_output[:, action].sum()
        assert ratio < 0.8, (BIT_WIDTHS[action].bits, ratio)


@pytest.fixture(scope="module")
def rotated_exports(rotated_problem, tmp_path_factory):
    from test_export import export_named_plans

    n_units = len(rotated_problem.units)
    named = {"uniform-2": [4] * n_units, "mixed": (np.arange(n_units) % 7).tolist()}
    return export_named_plans(rotated_problem, named, tmp_path_factory.mktemp("rot-exports"))


@pytest.mark.parametrize("name", ["uniform-2", "mixed"])
def test_a_rotated_export_loads_the_envs_weights_and_perplexity(rotated_problem, rotated_exports, name):
    from test_export import assert_export_is_the_env

    plan, folder = rotated_exports[name]
    # codes stay packed in the rotated frame; the packed model rotates the inputs instead
    packed = assert_export_is_the_env(rotated_problem, plan, folder)
    # every forward path (native / table at few tokens, tiles at many) gives the dense weights' product
    x = torch.randn(3, 20, packed.config.hidden_size, generator=torch.Generator().manual_seed(1))
    from windquant_gym.export.packed_linear import packed_linears

    for module_name, module in packed_linears(packed):
        if module.in_features != x.shape[-1]:
            continue
        dense = x @ module.dequantized_weight().T
        for tokens in (1, 4, 60):
            torch.testing.assert_close(module(x.reshape(-1, x.shape[-1])[:tokens]), dense.reshape(-1, dense.shape[-1])[:tokens],
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["uniform-2", "mixed"])
def test_a_rotated_export_is_its_storage_bits(rotated_problem, rotated_exports, name):
    from test_export import assert_packed_size_is_storage_bits

    plan, folder = rotated_exports[name]
    assert_packed_size_is_storage_bits(rotated_problem, plan, folder)  # the rotation costs no stored bit


def test_a_layout_names_its_rotation_and_refuses_an_unknown_one():
    from windquant_gym.errors import ExportFormatError
    from windquant_gym.export.layout import ModuleLayout

    layout = ModuleLayout((4, 96), 48, (4, 0), (0, 0), "symmetric", "hadamard")
    assert ModuleLayout.from_dict(layout.to_dict()) == layout
    assert "rotation" not in ModuleLayout((4, 96), 48, (4, 0), (0, 0)).to_dict()  # older files read as before
    assert ModuleLayout.from_dict(ModuleLayout((4, 96), 48, (4, 0), (0, 0)).to_dict()).rotation == "none"
    with pytest.raises(ExportFormatError, match="rotations"):
        ModuleLayout.from_dict(dict(layout.to_dict(), rotation="givens"))


def test_a_rotated_table_without_hessians_is_refused_by_name(tiny):
    model, _ = tiny
    units = wq.find_units(model, 48)
    scales = {u.module: torch.ones(u.in_features) for u in units}
    config = QuantConfig(chunk_size=48, compensation="none", error_metric="activation", rotation="hadamard")
    with pytest.raises(ConfigError, match="rotation='hadamard'.*Hessian"):
        wq.build_table(model, scales, config, cache=False, progress=False)
