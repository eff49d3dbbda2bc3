"""Issue 26's saliency lever (``QuantConfig.salient_metric='obs'``): a unit's INT8-protected weights
chosen by the optimal-brain-surgeon cost ``W_ij^2 / [H^-1]_jj`` instead of AWQ's ``|W_ij| s_j``."""

import pytest
import torch

import windquant_gym as wq
from windquant_gym.errors import ConfigError
from windquant_gym.quant.build import needs_hessians
from windquant_gym.quant.compensation import obs_column_weights
from windquant_gym.quant.config import QuantConfig
from windquant_gym.quant.fitting import SALIENCY_COLUMNS, fit_units
from windquant_gym.quant.quantizers import protect_salient


def test_obs_column_weights_are_the_damped_inverse_diagonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    h = (x.T @ x / 300)[None].repeat(2, 1, 1)
    h[1, 5, :] = h[1, :, 5] = 0  # a dead column (never activated): H_jj taken as 1, as GPTQ does
    damped = h.clone()
    for u in range(2):
        diagonal = torch.diagonal(damped[u])
        diagonal.copy_(torch.where(diagonal > 0, diagonal, torch.ones_like(diagonal)))
        diagonal.add_(0.01 * diagonal.mean())
    expected = torch.diagonal(torch.linalg.inv(damped), dim1=-2, dim2=-1).rsqrt()[:, None, :].float()
    got = obs_column_weights(h.float(), 0.01)
    assert got.shape == (2, 1, 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert bool(torch.isfinite(got).all())


def test_obs_spares_a_column_its_twin_can_stand_in_for():
    """Two columns carrying the same input (perfectly correlated, up to a little noise) and a third of
    the same scale alone: AWQ's saliency ranks the three alike by ``|W| s``; the OBS cost knows that
    a twin's weight can be moved onto the other twin, so it protects the lone column's weight."""
    g = torch.Generator().manual_seed(1)
    t = 4000
    base = torch.randn(t, 1, generator=g)
    x = torch.cat([base, base + 0.05 * torch.randn(t, 1, generator=g), torch.randn(t, 1, generator=g),
                   0.1 * torch.randn(t, 5, generator=g)], dim=1)  # columns 0, 1 twins; 2 alone; 3-7 small
    h = (x.T @ x / t)[None]
    s = x.abs().mean(0)[None, None]
    w = torch.zeros(1, 1, 8)
    w[0, 0, :3] = torch.tensor([1.0, 1.0, 1.0]) / s[0, 0, :3]  # equal |W| s on the three
    w[0, 0, 3:] = 0.01
    awq = protect_salient(w, SALIENCY_COLUMNS["activation"](s, h, 0.01), 1)
    obs = protect_salient(w, SALIENCY_COLUMNS["obs"](s, h, 0.01), 1)
    assert obs[0, 0].nonzero().flatten().tolist() == [2]
    assert int(awq.sum()) == 1  # AWQ picks one of the three by a tie; OBS has a reason


def test_salient_metric_is_validated_and_round_trips():
    with pytest.raises(ConfigError, match="salient_metric must be one of .*'activation' is the paper's"):
        QuantConfig(salient_metric="magnitude")
    config = QuantConfig(salient_metric="obs")
    assert QuantConfig.from_json(config.to_json()) == config
    assert QuantConfig().salient_metric == "activation"
    # what the saliency reads is the Hessian, so a table built with it needs the Hessian blocks
    assert needs_hessians(QuantConfig(compensation="none", error_metric="activation", salient_metric="obs"))
    assert not needs_hessians(QuantConfig(compensation="none", error_metric="activation"))


def test_obs_protects_as_many_weights_and_measures_its_own_errors():
    """Same number of INT8 weights per unit, chosen differently; the table's recorded errors are
    those of what was stored under that choice (no claim that OBS is better on random weights:
    on Gaussian data it is not, the choice is made on SmolLM2's validation split)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 32, 64, generator=g) * 0.02
    w = torch.where(torch.rand(w.shape, generator=g) < 0.02, w * 20, w)
    mix = torch.eye(64) + 0.5 * torch.randn(64, 64, generator=g)
    x = torch.randn(1000, 64, generator=g) @ mix
    h = (x.T @ x / 1000)[None].expand(6, 64, 64).contiguous()
    s = x.abs().mean(0)[None, None].expand(6, 1, 64)
    n_protected = 60
    awq = fit_units(w, s, h, QuantConfig(chunk_size=64, scale_refit="output"), n_protected)
    obs = fit_units(w, s, h, QuantConfig(chunk_size=64, scale_refit="output", salient_metric="obs"), n_protected)
    assert [int(m.sum()) for m in obs.protected] == [n_protected] * 6
    assert torch.equal(obs.protected, protect_salient(w, obs_column_weights(h, 0.01), n_protected))
    assert not torch.equal(obs.protected, awq.protected)
    # 8 bit keeps the protected values too: its recorded error is what the stored weights give
    restored = torch.where(obs.protected, obs.outlier_codes.float() * obs.outlier_scale,
                           obs.codes[0].float() * obs.scales[0])
    diff = w - restored
    recorded = (torch.bmm(diff, h) * diff).sum(dim=(1, 2)).double().numpy()
    assert recorded == pytest.approx(obs.error_output[:, 1], rel=1e-4)


def test_the_table_key_changes_with_the_salient_metric(tiny, tmp_path):
    model, tokenizer = tiny
    keys = {}
    for metric in ("activation", "obs"):
        problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48, salient_metric=metric),
                                        n_samples=4, seq_len=32, cache=tmp_path, progress=False)
        keys[metric] = problem.table.fingerprint
        assert problem.table.config.salient_metric == metric
    assert keys["activation"] != keys["obs"]


@pytest.fixture(scope="module")
def obs_problem(tiny, tmp_path_factory):
    model, tokenizer = tiny  # the README preset's engine in small: rotation, refit, OBS saliency
    config = wq.QuantConfig(chunk_size=48, rotation="hadamard", scale_refit="output", salient_metric="obs")
    return wq.QuantProblem.build(model, tokenizer, "wiki-sample", config, n_samples=8, seq_len=64,
                                 cache=tmp_path_factory.mktemp("obs-cache"), progress=False)


def test_an_obs_table_exports_the_envs_weights_at_its_storage_bits(obs_problem, tmp_path):
    """The saliency changes which weights are INT8, not the format: a mixed plan packs and loads back
    to the env's weights bit for bit, at the accounted storage bits."""
    import numpy as np
    from test_export import assert_export_is_the_env, assert_packed_size_is_storage_bits, export_named_plans

    n_units = len(obs_problem.units)
    (plan, folder), = export_named_plans(obs_problem, {"mixed": (np.arange(n_units) % 7).tolist()}, tmp_path).values()
    assert_export_is_the_env(obs_problem, plan, folder)
    assert_packed_size_is_storage_bits(obs_problem, plan, folder)
