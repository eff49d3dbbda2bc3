"""HQQ peer baseline (windquant_gym.harness.peers) on the random tiny Llama."""

import math

import pytest
import torch

pytest.importorskip("hqq")

import windquant_gym as wq  # noqa: E402
from windquant_gym.harness.peers import hqq_quantize, hqq_rows  # noqa: E402
from windquant_gym.errors import ConfigError  # noqa: E402
from windquant_gym.quant.units import find_units, module_names  # noqa: E402


@pytest.fixture(scope="module")
def model():
    model, _ = wq.load_model("tiny-llama")
    return model


@pytest.fixture(scope="module")
def quantized_4b(model):
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    quantized, bits = hqq_quantize(model, 4, 64)
    return before, quantized, bits


def _decoder_paths(model):
    return module_names(find_units(model, chunk_size=10**9))


def test_caller_model_bitwise_unchanged(model, quantized_4b):
    before, quantized, _ = quantized_4b
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert quantized is not model


@pytest.mark.parametrize("nbits,group_size", [(4, 64), (3, 32), (2, 64)])
def test_decoder_weights_changed_and_group_codes(model, nbits, group_size):
    quantized, bits = hqq_quantize(model, nbits, group_size)
    assert bits["nbits"] == nbits and bits["group_size"] == group_size
    assert bits["effective_bits"] == nbits
    for path in _decoder_paths(model):
        original = model.get_submodule(path).weight
        weight = quantized.get_submodule(path).weight
        assert weight.shape == original.shape and weight.dtype == original.dtype
        assert torch.isfinite(weight).all()
        assert not torch.equal(weight, original), path
        # HQQ's default axis=1 groups consecutive weights of the flattened (row-major) weight.
        groups = weight.detach().reshape(-1, group_size)
        distinct = max(len(torch.unique(group)) for group in groups)
        assert distinct <= 2**nbits, (path, distinct)
        # and it stays an approximation of the original
        rel = (weight - original).norm() / original.norm()
        assert rel < 1.0, (path, float(rel))


def test_storage_bits_formula(model, quantized_4b):
    _, _, bits = quantized_4b
    # 4 bit packs exactly: 4 bits per code + fp16 scale + fp16 zero per group of 64.
    assert bits["code_bits"] == pytest.approx(4.0)
    assert bits["storage_bits"] == pytest.approx(4 + 32 / 64)
    _, bits2 = hqq_quantize(model, 2, 32)
    assert bits2["storage_bits"] == pytest.approx(2 + 32 / 32)
    # 3 bit: ten codes per int32, per Linear ceil((numel / g) / 10) words per group column.
    g = 64
    _, bits3 = hqq_quantize(model, 3, g)
    numels = [model.get_submodule(p).weight.numel() for p in _decoder_paths(model)]
    code = sum(32 * math.ceil(n / g / 10) * g for n in numels)
    meta = sum(2 * 16 * (n // g) for n in numels)
    assert bits3["storage_bits"] == pytest.approx((code + meta) / sum(numels))
    assert 3.2 + 0.5 <= bits3["storage_bits"] < 3.3 + 0.5


def test_embeddings_and_head_untouched(model, quantized_4b):
    _, quantized, _ = quantized_4b
    assert torch.equal(quantized.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(quantized.get_output_embeddings().weight, model.get_output_embeddings().weight)
    decoder = set(_decoder_paths(model))
    original = dict(model.named_parameters())
    for name, param in quantized.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module not in decoder:  # norms, embeddings, head
            assert torch.equal(param, original[name]), name


def test_bad_settings(model):
    with pytest.raises(ConfigError):
        hqq_quantize(model, 7, 64)
    with pytest.raises(ConfigError):
        hqq_quantize(model, 4, 12)
    with pytest.raises(ConfigError):  # does not divide the 64 x 128 k_proj weight
        hqq_quantize(model, 4, 16384)


def test_missing_hqq(model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    with pytest.raises(wq.MissingDependencyError, match="pip install hqq"):
        hqq_quantize(model, 4, 64)


def test_hqq_rows_finite(model):
    torch.manual_seed(0)
    proxy = torch.randint(0, 257, (2, 32))
    heldout = torch.randint(0, 257, (2, 32))
    rows = hqq_rows(model, proxy, heldout, settings=((4, 64), (2, 32)))
    assert [row["allocator"] for row in rows] == ["HQQ 4b g64", "HQQ 2b g32"]
    for row in rows:
        assert set(row) == {"allocator", "effective_bits", "storage_bits", "proxy_ppl", "heldout_ppl", "seconds"}
        assert math.isfinite(row["proxy_ppl"]) and row["proxy_ppl"] > 1
        assert math.isfinite(row["heldout_ppl"]) and row["heldout_ppl"] > 1
        assert row["seconds"] >= 0
    assert rows[0]["storage_bits"] == pytest.approx(4.5)
    assert rows[1]["storage_bits"] == pytest.approx(3.0)
