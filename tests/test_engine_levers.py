"""Issue 26's engine levers: the least-squares scale refit after the codes, and a statistics set
(activation scales, Hessian blocks) measured apart from the proxy, disjoint from it and from the
validation split."""

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.data import statistics_blocks, token_stream, validation_blocks
from windquant_gym.data.sampling import VALIDATION_SHARE, _block_starts, split_starts
from windquant_gym.errors import ConfigError, DataError
from windquant_gym.quant.bitwidths import BIT_WIDTHS
from windquant_gym.quant.config import QuantConfig
from windquant_gym.quant.fitting import QUANT_ACTIONS, fit_units, refit_scales
from windquant_gym.quant.quantizers import dequantize_codes, fit_scales, int8_outliers, protect_salient
from test_compensation import correlated_layer, output_error


# ----- scale refit ---------------------------------------------------------------------------
def _row_errors(w, q, hessian):
    d = w - q
    return (torch.bmm(d, hessian) * d).sum(dim=-1)


def _stored(fitted, action):
    spec = BIT_WIDTHS[action]
    outliers = fitted.outlier_codes.float() * fitted.outlier_scale
    return torch.where(fitted.protected, outliers,
                       dequantize_codes(fitted.codes[action - 1], fitted.scales[action - 1], spec))


@pytest.mark.parametrize("compensation", ["gptq", "none"])
def test_refit_never_makes_a_row_worse_and_keeps_the_codes(compensation):
    w, s, hessian = correlated_layer(units=4, rows=32)
    base = QuantConfig(chunk_size=32, compensation=compensation, error_metric="output")
    before = fit_units(w, s, hessian, base, n_protected=10)
    after = fit_units(w, s, hessian, QuantConfig(**{**base.to_dict(), "scale_refit": "output"}), n_protected=10)
    changed = 0
    for action in QUANT_ACTIONS:
        # the codes are those chosen for the fitted scale; only the scale moves
        assert torch.equal(before.codes[action - 1], after.codes[action - 1])
        old = _row_errors(w, _stored(before, action), hessian)
        new = _row_errors(w, _stored(after, action), hessian)
        assert bool((new <= old * (1 + 1e-6) + 1e-9).all()), f"action {action}: a row got worse"
        changed += int((after.scales[action - 1] != before.scales[action - 1]).sum())
        # the table records the error of what is stored
        np.testing.assert_allclose(after.error_output[:, action],
                                   output_error(w, _stored(after, action), hessian).double().numpy(), rtol=1e-4)
        assert np.all(after.error_output[:, action] <= before.error_output[:, action] * (1 + 1e-6))
        # stored scales stay fp16 values
        assert torch.equal(after.scales[action - 1], after.scales[action - 1].half().float())
    assert changed > 0  # the refit does something on correlated inputs
    # and at the low widths it lowers the output error clearly
    assert after.error_output[:, 4].sum() < 0.99 * before.error_output[:, 4].sum()


def test_refit_is_the_least_squares_scale_of_the_codes():
    """With the codes fixed, no scale on a fine grid around it does better (up to fp16 rounding)."""
    w, s, hessian = correlated_layer(units=2, rows=6)
    spec = BIT_WIDTHS[3]  # 3 bit
    protected = protect_salient(w, s, 4)
    outlier_scale, outlier_codes = int8_outliers(w, protected)
    outliers = outlier_codes.float() * outlier_scale
    keep = ~protected
    fit = fit_scales(w, keep, s * s, spec)
    refit = refit_scales(w, fit.codes, fit.alpha, spec, hessian, keep, outliers)

    def errors(alpha):
        return _row_errors(w, torch.where(protected, outliers, dequantize_codes(fit.codes, alpha, spec)), hessian)

    best = errors(refit)
    for factor in np.linspace(0.8, 1.2, 81):
        trial = (refit * float(factor)).half().float()
        assert bool((best <= errors(trial) * (1 + 1e-4) + 1e-9).all())


def test_refit_keeps_rows_it_cannot_help():
    w, s, hessian = correlated_layer(units=1, rows=4)
    spec = BIT_WIDTHS[2]
    keep = torch.ones_like(w, dtype=torch.bool)
    zero_codes = torch.zeros_like(w, dtype=torch.int8)  # levels all 0: no scale changes anything
    alpha = torch.full((1, 4, 1), 0.5)
    torch.testing.assert_close(refit_scales(w, zero_codes, alpha, spec, hessian, keep, torch.zeros_like(w)), alpha)


# ----- statistics set and validation split ---------------------------------------------------
def _spans(starts, length):
    return [(int(a), int(a) + length) for a in starts]


def _overlap(a, b):
    return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)


def test_statistics_and_validation_blocks_share_no_token_with_the_proxy_or_each_other():
    n_tokens, proxy = 200_000, (16, 128, 0)
    proxy_spans = _spans(_block_starts(n_tokens, 16, 128, 0), 128)
    stats = _spans(split_starts(n_tokens, 64, 256, proxy, validation=False), 256)
    valid = _spans(split_starts(n_tokens, 32, 256, proxy, validation=True), 256)
    assert len(set(stats)) == 64 and len(set(valid)) == 32
    assert not _overlap(stats, proxy_spans) and not _overlap(valid, proxy_spans) and not _overlap(stats, valid)
    cut = int(n_tokens * (1 - VALIDATION_SHARE))
    assert all(end <= cut for _, end in stats) and all(start >= cut for start, _ in valid)
    # the same call gives the same blocks; another proxy seed moves them
    assert _spans(split_starts(n_tokens, 64, 256, proxy, validation=False), 256) == stats
    assert _spans(split_starts(n_tokens, 64, 256, (16, 128, 1), validation=False), 256) != stats


def test_split_blocks_are_the_stream_at_their_offsets(tiny):
    _, tokenizer = tiny
    texts = wq.load_texts("wiki-sample", split="calibration")
    stream = token_stream(texts, tokenizer)
    proxy = (8, 64, 0)
    blocks = statistics_blocks(texts, tokenizer, 12, 96, proxy)
    starts = split_starts(len(stream), 12, 96, proxy, validation=False)
    assert torch.equal(blocks, torch.stack([stream[a : a + 96] for a in starts]))
    assert validation_blocks(texts, tokenizer, 4, 96, proxy).shape == (4, 96)
    with pytest.raises(DataError, match="validation split needs"):
        split_starts(10_000, 50, 256, (4, 128, 0), validation=True)


# ----- the config and the problem ------------------------------------------------------------
def test_new_fields_round_trip_and_refuse_bad_values():
    config = QuantConfig(chunk_size=64, hessian_blocks=64, hessian_seq_len=256, scale_refit="output")
    assert QuantConfig.from_json(config.to_json()) == config
    assert QuantConfig.from_dict({"chunk_size": 64}).hessian_blocks == 0  # older saved configs: the proxy's statistics
    for bad, match in [(dict(hessian_blocks=-1), "hessian_blocks"), (dict(hessian_blocks=2.5), "hessian_blocks"),
                       (dict(hessian_blocks=True), "hessian_blocks"), (dict(hessian_seq_len=1), "hessian_seq_len"),
                       (dict(scale_refit="adam"), "scale_refit")]:
        with pytest.raises(ConfigError, match=match):
            QuantConfig(**bad)


def test_table_key_changes_with_each_new_field(tiny_problem):
    from windquant_gym.quant.build import table_fingerprint

    problem = tiny_problem
    base = problem.table.config
    key = table_fingerprint(problem.model, problem.units, problem.calibration.act_scales, base, problem.calibration.hessians)
    for change in (dict(scale_refit="output"), dict(hessian_blocks=8), dict(hessian_seq_len=128)):
        other = QuantConfig(**{**base.to_dict(), **change})
        assert table_fingerprint(problem.model, problem.units, problem.calibration.act_scales, other,
                                 problem.calibration.hessians) != key, change


def test_problem_with_a_statistics_set_fits_on_it_and_keeps_the_proxy_baseline(tiny, tiny_problem, tmp_path):
    model, tokenizer = tiny
    config = QuantConfig(chunk_size=48, hessian_blocks=12, hessian_seq_len=96, scale_refit="output")
    problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", config, n_samples=8, seq_len=64, cache=tmp_path,
                                    progress=False)
    # same proxy blocks and baseline as the problem without a statistics set
    assert torch.equal(problem.blocks, tiny_problem.blocks)
    assert problem.baseline_nll == pytest.approx(tiny_problem.baseline_nll, rel=1e-6)
    # the scales and Hessians are the statistics set's: calibrate() on those blocks gives them
    texts = wq.load_texts("wiki-sample", split="calibration")
    blocks = statistics_blocks(texts, tokenizer, 12, 96, (8, 64, 0))
    direct = wq.calibrate(model, problem.units, blocks, progress=False)
    name = problem.units[0].module
    torch.testing.assert_close(problem.calibration.act_scales[name], direct.act_scales[name])
    torch.testing.assert_close(problem.calibration.hessians[name], direct.hessians[name])
    assert not torch.allclose(problem.calibration.act_scales[name], tiny_problem.calibration.act_scales[name])
    assert problem.table.config == config
    assert problem.spec.quant_config == config  # a plan made on it rebuilds it
