"""Property tests (hypothesis) for the quantizers and the bit accounting.

Random small shapes (out 1..16, width 1..64), ragged chunks, constant and all-zero rows,
and magnitudes from 1e-30 to 1e30. The fp16 scale range is a design decision documented in
:func:`windquant_gym.quant.quantizers.to_fp16_scale`: stored scales are 0 or fp16 values in
``[2**-14, 65504]``, so dequantized weights are always finite and lie on their bit width's
levels; whole models beyond 65504 are refused by name (see tests/test_bad_inputs.py).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import windquant_gym as wq
from _helpers import random_hessians
from windquant_gym.quant.accounting import effective_bits, n_protected, storage_bits, unit_bit_tables
from windquant_gym.quant.bitwidths import ACTION_BITS, BIT_WIDTHS, N_ACTIONS, SKIP_ACTION
from windquant_gym.quant.quantizers import (
    dequantize_codes,
    fit_scales,
    int8_outliers,
    protect_salient,
    quantize_codes,
    to_fp16_scale,
)
from windquant_gym.quant.units import FP16_MAX

FP16_MIN_NORMAL = 2.0**-14
QUANT_ACTIONS = list(range(1, N_ACTIONS))
ZERO_LEVEL_ACTIONS = [a for a in QUANT_ACTIONS if 0.0 in BIT_WIDTHS[a].levels]  # LSQ 8/4/3 and ternary
MAX_LEVEL = {a: max(abs(v) for v in BIT_WIDTHS[a].levels) for a in QUANT_ACTIONS}

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny tensors: one thread is faster here; the rest of the session keeps its own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- strategies --------------------------------------------------------------------------------


@st.composite
def weight_batches(draw, min_exp=-30.0, max_exp=30.0):
    """``(w [U, O, G], s [U, 1, G])``: gaussian rows at one random magnitude, with some rows
    made constant and some all zero."""
    units = draw(st.integers(1, 3))
    out = draw(st.integers(1, 16))
    width = draw(st.integers(1, 64))
    exponent = draw(st.floats(min_exp, max_exp))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(units, out, width, generator=generator) * (10.0**exponent)
    kinds = draw(st.lists(st.sampled_from(["gauss", "gauss", "constant", "zero"]), min_size=out, max_size=out))
    for row, kind in enumerate(kinds):
        if kind == "constant":
            w[:, row, :] = w[:, row, :1]
        elif kind == "zero":
            w[:, row, :] = 0.0
    s = torch.rand(units, 1, width, generator=generator) + 0.05
    return w, s


def level_set(action):
    return torch.tensor(BIT_WIDTHS[action].levels, dtype=torch.float32)


def on_levels(q: torch.Tensor, alpha: torch.Tensor, action: int) -> bool:
    """Every ``q / alpha`` (alpha > 0) is one of the bit width's levels (up to float rounding)."""
    positive = (alpha > 0).expand_as(q)
    ratio = (q / torch.where(alpha > 0, alpha, torch.ones_like(alpha)))[positive]
    if ratio.numel() == 0:
        return True
    distance = (ratio[:, None] - level_set(action)[None, :]).abs().min(dim=1).values
    return bool((distance <= 1e-5 * (1 + ratio.abs())).all())


# ----- fp16 scales -------------------------------------------------------------------------------


@PROPERTY
@given(
    st.lists(
        st.one_of(st.just(0.0), st.floats(-30, 30).map(lambda e: 10.0**e), st.floats(1e-45, 1e38)),
        min_size=1, max_size=32,
    )
)
def test_stored_scales_are_zero_or_fp16_normal(values):
    alpha = torch.tensor(values, dtype=torch.float32)
    stored = to_fp16_scale(alpha)
    assert torch.isfinite(stored).all()
    positive = stored > 0
    assert torch.equal(positive, alpha > 0)  # zero stays zero; nothing positive flushes to zero
    assert (stored[positive] >= FP16_MIN_NORMAL).all() and (stored[positive] <= FP16_MAX).all()
    assert torch.equal(stored, stored.half().float())  # exactly what an fp16 file holds
    order = torch.argsort(alpha)
    assert (stored[order].diff() >= 0).all()  # rounding and clamping keep the order


# ----- quantizers --------------------------------------------------------------------------------


@PROPERTY
@given(weight_batches(), st.sampled_from(QUANT_ACTIONS), st.sampled_from(["activation", "plain"]))
def test_fit_gives_finite_codes_on_the_levels_at_any_magnitude(batch, action, loss):
    w, s = batch
    spec = BIT_WIDTHS[action]
    keep = torch.ones_like(w, dtype=torch.bool)
    weight = s * s if loss == "activation" else torch.ones_like(s)
    fit = fit_scales(w, keep, weight, spec, steps=3, lr=0.1)

    # Scales: one per row, 0 or fp16 in the normal range.
    assert fit.alpha.shape == (*w.shape[:2], 1)
    assert torch.isfinite(fit.alpha).all()
    assert torch.equal(fit.alpha, to_fp16_scale(fit.alpha))
    # Codes: integers within the bit width's code range (binary: exactly +-1).
    assert fit.codes.dtype == torch.int8
    assert int(fit.codes.min()) >= spec.code_min and int(fit.codes.max()) <= spec.code_max
    if spec.operator == "binary":
        assert set(fit.codes.unique().tolist()) <= {-1, 1}
    # Dequantized weights: finite, on the levels, bounded by the largest fp16 scale.
    q = dequantize_codes(fit.codes, fit.alpha, spec)
    assert torch.isfinite(q).all()
    assert on_levels(q, fit.alpha, action)
    assert (q.abs() <= fit.alpha * MAX_LEVEL[action] * (1 + 1e-6)).all()
    assert (q.abs() <= FP16_MAX * MAX_LEVEL[action] * (1 + 1e-6)).all()
    # All-zero rows stay exactly zero; the fit never ends worse than its start.
    zero_rows = (w == 0).all(dim=-1)
    assert (q[zero_rows] == 0).all()
    assert not torch.isnan(fit.loss).any() and not torch.isnan(fit.initial_loss).any()
    assert (fit.loss <= fit.initial_loss).all()


@PROPERTY
@given(weight_batches(), st.sampled_from(ZERO_LEVEL_ACTIONS), st.floats(-30, 30))
def test_zero_level_quantizers_never_move_a_weight_further_than_zeroing(batch, action, log_alpha):
    """LSQ and ternary round to their nearest level, and 0 is one: ``|Q - W| <= |W|`` at any
    fp16 scale, so an out-of-range scale can only make a weight smaller, never larger."""
    w, _ = batch
    alpha = to_fp16_scale(torch.full((*w.shape[:2], 1), 10.0**log_alpha))
    q = dequantize_codes(quantize_codes(w, alpha, BIT_WIDTHS[action]), alpha, BIT_WIDTHS[action])
    assert torch.isfinite(q).all()
    assert ((q - w).abs() <= w.abs() * (1 + 1e-5)).all()


@PROPERTY
@given(weight_batches(min_exp=-2.0, max_exp=math.log10(FP16_MAX)))
def test_eight_bit_is_accurate_inside_the_fp16_range(batch):
    """Weights that fp16 scales reach at 8 bit (max |W| >= 127 * 2**-14 ~ 7.8e-3 per row up to
    65504) come back within half a step per weight."""
    w, s = batch
    spec = BIT_WIDTHS[1]
    fit = fit_scales(w, torch.ones_like(w, dtype=torch.bool), torch.ones_like(s), spec, steps=3)
    q = dequantize_codes(fit.codes, fit.alpha, spec)
    row_max = w.abs().amax(dim=-1, keepdim=True)
    reachable = (row_max >= spec.code_max * FP16_MIN_NORMAL).expand_as(w)
    # The start (max |W| / 127) never clips; the fit keeps whichever is better, so the error
    # is at most a few steps of the start's scale, a small fraction of the row's max.
    error = (q - w).abs()
    assert (error[reachable] <= (row_max.expand_as(w)[reachable] / spec.code_max) * 2).all()


@PROPERTY
@given(weight_batches(), st.floats(0.0, 0.49))
def test_protection_and_int8_outliers_are_finite_and_in_range(batch, rate):
    w, s = batch
    n_units, out, width = w.shape
    count = n_protected(out * width, rate)
    mask = protect_salient(w, s, count)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert mask.flatten(1).sum(dim=1).tolist() == [count] * n_units  # exactly n_p per unit
    if count:  # the protected ones are the most salient: none outside beats any inside
        saliency = (w.abs() * s).flatten(1)
        inside = torch.where(mask.flatten(1), saliency, torch.full_like(saliency, math.inf)).min(dim=1).values
        outside = torch.where(mask.flatten(1), torch.full_like(saliency, -math.inf), saliency).max(dim=1).values
        assert (outside <= inside).all()
    scale, codes = int8_outliers(w, mask)
    assert torch.equal(scale, to_fp16_scale(scale))
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    assert (codes[~mask] == 0).all()
    values = codes.float() * scale
    assert torch.isfinite(values).all()
    # Rows whose outliers lie inside the range come back within half an INT8 step.
    top = (w.abs() * mask).amax(dim=-1, keepdim=True)
    inside = ((top / 127 >= FP16_MIN_NORMAL) & (top / 127 <= FP16_MAX)).expand_as(w) & mask
    assert ((values - w).abs()[inside] <= scale.expand_as(w)[inside] * 0.5 + top.expand_as(w)[inside] * 2e-3).all()


# ----- bit accounting ----------------------------------------------------------------------------


@PROPERTY
@given(st.integers(1, 16), st.integers(1, 64), st.floats(0.0, 0.49))
def test_unit_bits_invariants(out, width, rate):
    n = out * width
    n_p = n_protected(n, rate)
    assert 0 <= n_p <= n // 2 and n_p <= rate * n + 1e-6 < n_p + 1
    eff = [effective_bits(n, n_p, a) for a in range(N_ACTIONS)]
    sto = [storage_bits(out, width, n_p, a) for a in range(N_ACTIONS)]
    assert eff[SKIP_ACTION] == sto[SKIP_ACTION] == 16 * n
    for action in range(N_ACTIONS):
        assert eff[action] <= sto[action] + 1e-9  # storage never undercounts
        if action != SKIP_ACTION:
            per_weight = eff[action] / n
            assert BIT_WIDTHS[action].bits - 1e-9 <= per_weight <= 8 + 1e-9  # codes at b, outliers at 8
    # Monotone in the action's bits: fewer bits per code never costs more. Effective bits
    # include skip; storage only among quantized actions, because a quantized row also pays
    # its fp16 scale (16 bits), so on a narrow ragged chunk FP16 can be the cheaper file:
    # a 1-column unit costs 16 bits per row skipped and 8 + 16 at 8 bit.
    order = sorted(range(N_ACTIONS), key=lambda a: ACTION_BITS[a])
    for low, high in zip(order, order[1:]):
        assert eff[low] <= eff[high] + 1e-9
        if high != SKIP_ACTION:
            assert sto[low] <= sto[high] + 1e-9
    if width >= 8 and rate <= 0.1:  # chunks of useful width: every quantized action is cheaper than FP16
        assert max(sto[1:]) <= sto[SKIP_ACTION]
    if width == 1:
        assert min(sto[1:]) > sto[SKIP_ACTION]


@PROPERTY
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 64)), min_size=1, max_size=12), st.floats(0.0, 0.49))
def test_unit_tables_count_the_weights_and_storage_covers_effective(shapes, rate):
    # (how a plan averages these per-unit costs is tested on real tables: table.plan_bits below)
    outs, widths = zip(*shapes)
    n_weights, n_salient, effective, storage = unit_bit_tables(outs, widths, rate)
    assert n_weights.tolist() == [o * g for o, g in shapes]
    assert np.all(effective <= storage + 1e-9)


# ----- ragged units and whole tables on small Linear models ------------------------------------


class Block(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.attn = nn.Linear(in_features, out_features, bias=False)
        self.mlp = nn.ModuleDict({"up": nn.Linear(in_features, out_features, bias=False)})


class SmallModel(nn.Module):
    def __init__(self, n_layers, in_features, out_features):
        super().__init__()
        self.layers = nn.ModuleList([Block(in_features, out_features) for _ in range(n_layers)])


@st.composite
def small_models(draw, min_exp=-30.0, max_exp=4.0):
    n_layers = draw(st.integers(1, 2))
    in_features = draw(st.integers(1, 64))
    out_features = draw(st.integers(1, 16))
    exponent = draw(st.floats(min_exp, max_exp))
    seed = draw(st.integers(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallModel(n_layers, in_features, out_features)
        with torch.no_grad():
            for block in model.layers:
                for linear in (block.attn, block.mlp["up"]):
                    linear.weight.normal_().mul_(10.0**exponent)
                    kind = draw(st.sampled_from(["gauss", "constant", "zero"]))
                    if kind == "constant":
                        linear.weight[0, :] = linear.weight[0, 0]
                    elif kind == "zero":
                        linear.weight[-1, :] = 0.0
    return model


@PROPERTY
@given(small_models(), st.integers(1, 64))
def test_ragged_units_partition_every_weight(model, chunk_size):
    units = wq.find_units(model, chunk_size)
    assert [u.index for u in units] == list(range(len(units)))
    by_module = {}
    for unit in units:
        by_module.setdefault(unit.module, []).append(unit)
    assert len(by_module) == 2 * len(model.layers)
    for name, members in by_module.items():
        in_features = model.get_submodule(name).weight.shape[1]
        assert len(members) == math.ceil(in_features / chunk_size)
        assert [u.col_start for u in members] == list(range(0, in_features, chunk_size))
        assert members[-1].col_end == in_features
        assert all(u.col_end == v.col_start for u, v in zip(members, members[1:]))  # no gap, no overlap
        assert all(u.width == chunk_size for u in members[:-1])
        assert members[-1].width == (in_features % chunk_size or chunk_size)  # the ragged last chunk


@FEW
@given(small_models(), st.integers(1, 64), st.floats(0.0, 0.49), st.data())
def test_table_is_finite_and_its_bits_are_consistent(model, chunk_size, rate, data):
    units = wq.find_units(model, chunk_size)
    scales = {u.module: torch.rand(u.in_features, generator=torch.Generator().manual_seed(1)) + 0.1 for u in units}
    config = wq.QuantConfig(chunk_size=chunk_size, salient_rate=rate, fit_steps=2)
    table = wq.build_table(model, scales, config, hessians=random_hessians(model, chunk_size), cache=False, progress=False)
    n = len(units)

    # Stored codes and scales are in range for every action; outliers are finite.
    for name in table.codes:
        for action in QUANT_ACTIONS:
            codes = table.codes[name][action - 1]
            spec = BIT_WIDTHS[action]
            assert int(codes.min()) >= spec.code_min and int(codes.max()) <= spec.code_max
        scale = table.scales[name].float()
        assert torch.isfinite(scale).all() and torch.equal(scale, to_fp16_scale(scale))
        assert torch.equal(table.outlier_scales[name].float(), to_fp16_scale(table.outlier_scales[name].float()))
    # Every unit under every action dequantizes to finite weights.
    for unit in units:
        original = model.get_submodule(unit.module).weight.detach()
        for action in range(N_ACTIONS):
            assert torch.isfinite(table.dequantize_unit(unit.index, action, original)).all()

    # Fallback only ever goes to a higher precision, and the stored action is monotone.
    assert np.all(table.stored_action <= np.arange(N_ACTIONS)[None, :])
    assert np.all(np.diff(table.stored_action, axis=1) >= 0)
    assert np.all(np.isfinite(table.fit_error_plain)) and np.all(np.isfinite(table.fit_error_act))
    assert np.all(np.isfinite(table.fit_error_output)) and np.all(table.fit_error_output >= 0)

    # Bits: storage >= effective; per weight, requesting fewer bits never costs more.
    effective = table.unit_effective_bits / table.n_weights[:, None]
    storage = table.unit_storage_bits / table.n_weights[:, None]
    assert np.all(table.unit_effective_bits <= table.unit_storage_bits + 1e-9)
    assert np.all(np.diff(effective, axis=1) <= 1e-9)
    # Storage is monotone among quantized actions (and from skip, since fallback can store
    # skip for a quantized request; see test_unit_bits_invariants for narrow chunks).
    quantized = table.stored_action[:, 1:] != SKIP_ACTION
    steps = np.diff(storage[:, 1:], axis=1)
    assert np.all(steps[quantized[:, :-1] & quantized[:, 1:]] <= 1e-9)
    assert np.all(effective[:, SKIP_ACTION] == 16)

    # A random plan's averages lie between its units' bits, and its weights are finite.
    plan = data.draw(st.lists(st.integers(0, N_ACTIONS - 1), min_size=n, max_size=n))
    bits = table.plan_bits(plan)
    rows = np.arange(n)
    for key, per_weight in (("effective_bits", effective), ("storage_bits", storage)):
        chosen = per_weight[rows, plan]
        assert chosen.min() - 1e-9 <= bits[key] <= chosen.max() + 1e-9
    assert bits["effective_bits"] <= bits["storage_bits"] + 1e-9
    assert table.plan_bits([SKIP_ACTION] * n)["effective_bits"] == pytest.approx(16.0)
    for name in table.codes:
        members = [u for u in units if u.module == name]
        original = model.get_submodule(name).weight.detach()
        assembled = table.assemble_module(name, [plan[u.index] for u in members], original)
        assert torch.isfinite(assembled).all()
