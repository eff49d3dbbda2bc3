"""proxy_dtype: the proxy pass in bf16 (autocast), opt-in; float32 stays the default."""

import dataclasses
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.errors import ConfigError

from _helpers import assert_bitwise_equal, snapshot


@pytest.fixture
def bf16_problem(tiny_problem):
    # a copy: the session's tiny_problem keeps its float32 proxy
    return dataclasses.replace(tiny_problem, proxy_dtype="bfloat16")


def _linear_output_dtypes(problem, plan):
    seen = []
    linear = problem.model.get_submodule(problem.units[0].module)
    handle = linear.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    try:
        nll = problem.proxy_nll(plan)
    finally:
        handle.remove()
    return nll, set(seen)


def test_bf16_proxy_runs_the_products_in_bf16_and_stays_close(tiny_problem, bf16_problem):
    plan = [4] * len(tiny_problem.units)  # 2 bit everywhere
    saved = snapshot(tiny_problem.model)
    fp32_nll, fp32_dtypes = _linear_output_dtypes(tiny_problem, plan)
    bf16_nll, bf16_dtypes = _linear_output_dtypes(bf16_problem, plan)
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert bf16_nll != fp32_nll and bf16_nll == pytest.approx(fp32_nll, rel=2e-2)
    assert_bitwise_equal(tiny_problem.model, saved)  # autocast converts copies, never the weights
    assert {p.dtype for p in tiny_problem.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("stream", [False, True])
def test_bf16_proxy_assembles_bf16_weights_that_autocast_would_have_made(bf16_problem, stream):
    """The bf16 proxy's buffers hold the plan's weights in bf16 (cast once per plan, not on every
    call): the NLL is bit for bit autocast's over float32 buffers, every action and the skip included."""
    from windquant_gym.quant.apply import WeightAssembler, quantized_weights, streamed_quantized_weights
    from windquant_gym.quant.bitwidths import N_ACTIONS

    problem = dataclasses.replace(bf16_problem, stream=stream)
    plan = (np.arange(len(problem.units)) % N_ACTIONS).tolist()
    saved = snapshot(problem.model)
    got = problem.proxy_nll(plan)
    assembler = problem.assembler(per_layer=stream, proxy=True)
    assert assembler.dtype == torch.bfloat16 and {b.dtype for b in assembler._buffers.values()} == {torch.bfloat16}
    applied = streamed_quantized_weights if stream else quantized_weights
    float32_buffers = WeightAssembler(problem.model, problem.table, per_layer=stream)
    with applied(problem.model, problem.table, plan, float32_buffers), torch.autocast("cpu", dtype=torch.bfloat16):
        want = wq.mean_nll(problem.model, problem.blocks, batch_size=len(problem.blocks) if stream else problem.batch_size)
    assert got == want
    assert_bitwise_equal(problem.model, saved)
    assert problem.assembler().dtype is None  # the held-out pass's buffers: the weights' own dtype


def test_bf16_baseline_is_measured_once_when_the_problem_is_made(tiny_problem):
    assert tiny_problem.baseline_nll == tiny_problem.calibration.nll
    passes = []
    handle = tiny_problem.model.get_output_embeddings().register_forward_hook(lambda *a: passes.append(1))
    try:
        problem = dataclasses.replace(tiny_problem, proxy_dtype="bfloat16")
        at_construction = len(passes)
        first, second = problem.baseline_nll, problem.baseline_nll
    finally:
        handle.remove()
    assert at_construction == math.ceil(len(problem.blocks) / problem.batch_size)  # one pass, at construction
    assert len(passes) == at_construction and second == first  # cached: reading it runs nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = wq.mean_nll(problem.model, problem.blocks, batch_size=problem.batch_size)
    assert first == pytest.approx(expected, abs=1e-9)
    assert first != tiny_problem.calibration.nll
    assert problem.baseline_ppl == pytest.approx(math.exp(first))


def test_bf16_baseline_is_the_unquantized_model_even_when_first_read_under_a_plan(bf16_problem):
    plan = [6] * len(bf16_problem.units)  # 1 bit everywhere: far from the baseline
    expected = bf16_problem.baseline_nll
    fresh = dataclasses.replace(bf16_problem)
    with wq.quantized_weights(fresh.model, fresh.table, plan):
        read_under_plan = fresh.baseline_nll
    assert read_under_plan == expected


def test_a_replaced_problem_gets_its_own_baseline_and_buffers(bf16_problem):
    other = dataclasses.replace(bf16_problem, blocks=bf16_problem.blocks[:, :32])
    assert other.baseline_nll != bf16_problem.baseline_nll
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert other.baseline_nll == pytest.approx(wq.mean_nll(other.model, other.blocks, batch_size=other.batch_size), abs=1e-9)
    bf16_problem.proxy_nll([1] * len(bf16_problem.units))
    assert dataclasses.replace(bf16_problem)._assembler is None


def test_env_rewards_compare_plan_and_baseline_at_the_proxy_precision(bf16_problem):
    env = gym.make("WindQuant-v0", model=bf16_problem.model, problem=bf16_problem, target_bits=3.0)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, info = env.step(int(np.flatnonzero(env.unwrapped.action_masks())[0]))
    assert info["baseline_ppl"] == pytest.approx(bf16_problem.baseline_ppl)
    assert info["proxy_ppl"] == pytest.approx(math.exp(bf16_problem.proxy_nll(info["plan"])), rel=1e-6)
    env.close()


def test_bad_or_conflicting_proxy_dtype_is_a_named_error(tiny_problem, tiny):
    with pytest.raises(ConfigError, match=r"proxy_dtype must be one of float32, bfloat16, auto, got 'float16'; float32 is the default"):
        dataclasses.replace(tiny_problem, proxy_dtype="float16")
    with pytest.raises(ConfigError, match=r"proxy_dtype='bfloat16' differs from the given problem's proxy_dtype='float32'"):
        gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, proxy_dtype="bfloat16")
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match=r"proxy_dtype must be one of"):  # before calibration and the table build
        wq.QuantProblem.build(model, tokenizer, "no-such-corpus", proxy_dtype="half", progress=False)


def test_cpu_bf16_preset_sets_the_proxy_precision():
    from windquant_gym.agents import load_hyperparams
    from windquant_gym.agents.hyperparams import preset_names

    def with_bf16(name):
        preset = load_hyperparams(name)
        return {**preset, "env_kwargs": {**preset["env_kwargs"], "proxy_dtype": "bfloat16"}}

    # each bf16 preset is its float32 preset but for the proxy's precision
    assert load_hyperparams("cpu-bf16") == with_bf16("cpu")  # the README preset's engine
    assert load_hyperparams("cpu-issue13-bf16") == with_bf16("cpu-issue13")
    assert load_hyperparams("cpu-paper-bf16") == with_bf16("cpu-paper")
    assert "cpu-bf16" in preset_names() and "default" not in preset_names()
    assert "proxy_dtype" not in load_hyperparams("cpu")["env_kwargs"]


def test_a_bf16_proxy_on_a_cpu_without_bf16_units_warns(tiny_problem, monkeypatch):
    from windquant_gym.compute import kernel_choice, kernels

    monkeypatch.setattr(kernel_choice, "cpu_flags", lambda: ("avx2", "avx512f", "avx512_bf16"))
    monkeypatch.setattr(kernels, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"without native bf16 support.*use proxy_dtype='float32'"):
        dataclasses.replace(tiny_problem, proxy_dtype="bfloat16")
    monkeypatch.setattr(kernels, "_cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dataclasses.replace(tiny_problem, proxy_dtype="bfloat16")
        assert dataclasses.replace(tiny_problem, proxy_dtype=torch.float32).proxy_dtype == "float32"  # a dtype, by name
    # plain AVX-512: oneDNN accepts bf16 there, but emulates it; the flags decide, as for proxy_dtype="auto"
    monkeypatch.setattr(kernel_choice, "cpu_flags", lambda: ("avx2", "avx512f"))
    with pytest.warns(RuntimeWarning, match=r"without native bf16 support"):
        dataclasses.replace(tiny_problem, proxy_dtype="bfloat16")


@pytest.mark.parametrize("flags, onednn, expected", [
    (("avx2", "avx512f", "avx512_bf16"), True, "bfloat16"),  # EPYC (Zen 4) / Cooper Lake
    (("avx2", "avx512f", "amx_bf16", "amx_tile"), True, "bfloat16"),  # Sapphire Rapids
    (("avx2", "avx512f"), True, "float32"),  # oneDNN would emulate bf16 here: no faster
    (("avx2",), False, "float32"),
])
def test_auto_proxy_dtype_is_bf16_only_where_the_cpu_multiplies_bf16(tiny_problem, monkeypatch, flags, onednn, expected):
    from windquant_gym.compute import kernel_choice, kernels

    monkeypatch.setattr(kernel_choice, "cpu_flags", lambda: flags)
    monkeypatch.setattr(kernels, "_cpu_has_native_bf16", lambda: onednn)
    assert kernels.resolve_proxy_dtype("auto", "cpu") == expected
    assert kernels.resolve_proxy_dtype("float32", "cpu") == "float32"  # an explicit choice is kept
    problem = dataclasses.replace(tiny_problem, proxy_dtype="auto")
    assert problem.proxy_dtype == expected  # a problem holds the resolved name, which plans record
    # the env accepts "auto" beside a problem whose precision it resolves to
    env = gym.make("WindQuant-v0", model=problem.model, problem=problem, proxy_dtype="auto", target_bits=3.0)
    env.close()


def test_auto_proxy_dtype_is_resolved_when_the_problem_is_built(tiny, monkeypatch):
    from windquant_gym.compute import kernels

    monkeypatch.setattr(kernels, "has_native_bf16", lambda device: False)
    model, tokenizer = tiny
    problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48), n_samples=2,
                                    seq_len=32, proxy_dtype="auto", progress=False)
    assert problem.proxy_dtype == problem.spec.proxy_dtype == "float32"


def test_cpu_quick_preset_is_cpu_with_auto_proxy_fewer_episodes_and_a_short_summary():
    from windquant_gym.agents.hyperparams import load_hyperparams, load_recipe

    cpu, quick = load_hyperparams("cpu"), load_hyperparams("cpu-quick")
    assert quick == {**cpu, "episodes": 160, "heldout_summary": "returned",
                     "env_kwargs": {**cpu["env_kwargs"], "proxy_dtype": "auto"}}
    assert load_recipe("cpu-quick").heldout_summary == "returned"
    with pytest.raises(ConfigError, match=r"heldout_summary"):
        load_recipe("cpu").replace(heldout_summary="some")


def test_streamed_bf16_proxy_matches_whole_model_assembly(bf16_problem):
    plan = [3] * len(bf16_problem.units)  # 3 bit everywhere
    saved = snapshot(bf16_problem.model)
    whole = bf16_problem.proxy_nll(plan)
    streamed = dataclasses.replace(bf16_problem, stream=True)
    assert streamed.baseline_nll == pytest.approx(bf16_problem.baseline_nll, rel=1e-3)
    nll, dtypes = _linear_output_dtypes(streamed, plan)
    assert dtypes == {torch.bfloat16} and nll == pytest.approx(whole, rel=1e-3)
    assert_bitwise_equal(bf16_problem.model, saved)


def test_the_benchmark_holds_the_pass_against_products_measured_in_the_same_process(tiny_problem, monkeypatch):
    """benchmarks/proxy_precision.py: the pass's GFLOP/s is its Linear FLOPs over its seconds, and the share is of
    the product rate measured there (scale.py's gemm_peak_gflops), per dtype."""
    import importlib.util
    import re
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    for name in ("scale", "episode_speed"):  # the benchmarks' own modules, imported below: unloaded after the test
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, None)
            monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location("proxy_precision_bench", bench / "proxy_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import episode_speed
    import scale

    monkeypatch.setattr(scale, "gemm_peak_gflops", lambda dtype, device: 400.0 if dtype == torch.float32 else 1600.0)
    gflop = episode_speed.linear_gflop(tiny_problem.model, tiny_problem.blocks)
    line = module.achieved_against_peak(tiny_problem, fp32_seconds=gflop / 100.0, bf16_seconds=gflop / 800.0)
    assert re.search(r"fp32 100 GFLOP/s against a large fp32 product's 400 \(25%\)", line), line
    assert re.search(r"bf16 800 against a bf16 product's 1600 \(50%\)", line), line
