"""GPTQ peer baseline (windquant_gym.harness.gptq_peer, llm-compressor) on the random tiny Llama."""

import sys

import pytest
import torch

import windquant_gym as wq
from windquant_gym.harness import gptq_peer
from windquant_gym.errors import ConfigError, MissingDependencyError
from windquant_gym.quant.units import find_units, module_names

# the tiny Llama's decoder Linears have in_features 128 and 320: g64 and g32 divide both
GROUP = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's matrices are too small to share: with two threads and a busy second
    core, llm-compressor's per-layer GPTQ ran 10x slower (1 s -> 10 s per call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decoder_paths(model):
    return module_names(find_units(model, chunk_size=10**9))


@pytest.fixture(scope="module")
def model():
    model, _ = wq.load_model("tiny-llama")
    return model


@pytest.fixture(scope="module")
def blocks():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 64), generator=generator)


@pytest.fixture(scope="module")
def quantized_3b(model, blocks):
    pytest.importorskip("llmcompressor", reason="the GPTQ peer needs llm-compressor: pip install llmcompressor")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    quantized, bits = gptq_peer.gptq_quantize(model, blocks, 3, GROUP)
    return before, quantized, bits


def test_caller_model_bitwise_unchanged(model, quantized_3b):
    before, quantized, _ = quantized_3b
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert quantized is not model
    for path in _decoder_paths(model):
        module = model.get_submodule(path)
        assert not hasattr(module, "quantization_scheme") and not hasattr(module, "weight_scale"), path
        assert not module._forward_hooks and not module._forward_pre_hooks, path


def test_copy_is_plain_and_weights_take_few_values(model, quantized_3b):
    _, quantized, bits = quantized_3b
    assert bits["nbits"] == 3 and bits["group_size"] == GROUP and bits["effective_bits"] == 3.0
    assert bits["symmetric"] is True
    for path in _decoder_paths(model):
        original = model.get_submodule(path).weight
        module = quantized.get_submodule(path)
        weight = module.weight
        assert type(module) is torch.nn.Linear and not hasattr(module, "weight_scale"), path  # no library hooks left
        assert weight.shape == original.shape and weight.dtype == original.dtype
        assert torch.isfinite(weight).all()
        assert not torch.equal(weight, original), path
        # groups are GROUP consecutive input columns of one output row
        groups = weight.detach().reshape(weight.shape[0], -1, GROUP).reshape(-1, GROUP)
        distinct = max(len(torch.unique(group)) for group in groups)
        assert distinct <= 2**3, (path, distinct)
        rel = (weight - original).norm() / original.norm()
        assert rel < 1.0, (path, float(rel))
    # embeddings and the LM head are not decoder Linears: untouched
    assert torch.equal(quantized.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(quantized.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_storage_bits_formula(model, blocks, quantized_3b):
    _, _, bits = quantized_3b
    # dense int32 packing (128 * 3 and 320 * 3 are multiples of 32) + one fp16 scale per group
    assert bits["code_bits"] == pytest.approx(3.0)
    assert bits["storage_bits"] == pytest.approx(3 + 16 / GROUP)
    _, bits2 = gptq_peer.gptq_quantize(model, blocks[:4], 2, 32, symmetric=False)
    # asymmetric adds a packed 2-bit zero point per group (rows * 2 bits, rows multiple of 16)
    assert bits2["code_bits"] == pytest.approx(2.0)
    assert bits2["storage_bits"] == pytest.approx(2 + 16 / 32 + 2 / 32)
    assert bits2["symmetric"] is False


def test_rows(model, blocks):
    pytest.importorskip("llmcompressor", reason="the GPTQ peer needs llm-compressor: pip install llmcompressor")
    rows = gptq_peer.gptq_rows(model, blocks[:4], blocks[4:], settings=[(2, GROUP)], batch_size=4)
    (row,) = rows
    assert row["allocator"] == f"GPTQ 2b g{GROUP}"
    assert row["effective_bits"] == 2.0 and row["storage_bits"] == pytest.approx(2 + 16 / GROUP)
    assert set(row) == {"allocator", "effective_bits", "storage_bits", "proxy_ppl", "heldout_ppl", "seconds"}
    assert row["proxy_ppl"] > 1 and row["heldout_ppl"] > 1 and row["seconds"] > 0


@pytest.mark.parametrize(
    "nbits,group_size,match",
    [
        (1, 64, "nbits must be an integer from 2 to 8.*got 1"),
        (9, 64, "got 9"),
        (3.0, 64, "got 3.0"),
        (True, 64, "got True"),
        (3, 0, "group_size must be a positive integer.*got 0"),
        (3, "64", "got '64'"),
        # 128 does not divide the 320-wide down_proj: named, with the group sizes that fit
        (3, 128, r"group_size 128 does not divide.*down_proj \(320\).*divisor of 64.*e\.g\. 16, 32, 64"),
    ],
)
def test_bad_settings_raise_config_error(model, blocks, nbits, group_size, match):
    # checked before the library is imported or the model copied: fast, and without llm-compressor too
    with pytest.raises(ConfigError, match=match):
        gptq_peer.gptq_quantize(model, blocks, nbits, group_size)
    with pytest.raises(ConfigError, match=match):
        gptq_peer.gptq_rows(model, blocks, blocks, settings=[(2, GROUP), (nbits, group_size)])


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(4, 8), "integer tensor of token ids"),
        (torch.zeros(8, dtype=torch.long), r"shape \(8,\)"),
        (torch.zeros(0, 8, dtype=torch.long), "at least one block"),
        ([[1, 2, 3]], "got list"),
    ],
)
def test_bad_blocks_raise_config_error(model, bad, match):
    with pytest.raises(ConfigError, match=match):
        gptq_peer.gptq_quantize(model, bad, 3, GROUP)


def test_bad_symmetric_raises(model, blocks):
    with pytest.raises(ConfigError, match="symmetric must be True"):
        gptq_peer.gptq_quantize(model, blocks, 3, GROUP, symmetric="yes")


def test_missing_library_names_pip_command(model, blocks, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # import llmcompressor -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install llmcompressor"):
        gptq_peer.gptq_quantize(model, blocks, 3, GROUP)
    with pytest.raises(MissingDependencyError, match="llm-compressor"):
        gptq_peer.require_llmcompressor()
    with pytest.raises(MissingDependencyError, match=r"windquant-gym\[gptq\]"):
        gptq_peer.gptq_rows(model, blocks, blocks, settings=[(3, GROUP)])
