import math

import pytest
import torch

import windquant_gym as wq
from windquant_gym.calibration import calibrate

from _helpers import assert_bitwise_equal, snapshot


def test_apply_then_restore_is_bitwise_exact(tiny_problem):
    model, table = tiny_problem.model, tiny_problem.table
    saved = snapshot(model)
    plan = [4] * len(table.units)
    with wq.quantized_weights(model, table, plan):
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, saved[n])]
        assert len(changed) == 14  # every decoder Linear, nothing else
    assert_bitwise_equal(model, saved)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_restore_after_an_exception_inside(tiny_problem, error):
    model, table = tiny_problem.model, tiny_problem.table
    saved = snapshot(model)
    with pytest.raises(error):
        with wq.quantized_weights(model, table, [6] * len(table.units)):
            wq.mean_nll(model, tiny_problem.blocks[:2])
            raise error("interrupted mid-episode")
    assert_bitwise_equal(model, saved)


def test_proxy_nll_sees_the_plan_and_model_returns(tiny_problem):
    """On random weights perplexity need not rise with fewer bits (the expensive test on
    SmolLM2 checks that); here: 16 and 8 bit are near-lossless, 1 bit is not."""
    saved = snapshot(tiny_problem.model)
    n = len(tiny_problem.units)
    nll = {a: tiny_problem.proxy_nll([a] * n) for a in (0, 1, 6)}
    assert nll[0] == pytest.approx(tiny_problem.calibration.nll, abs=1e-3)  # FP16 rounding only
    assert nll[1] == pytest.approx(nll[0], abs=1e-3)
    assert abs(nll[6] - nll[1]) > 5e-3
    assert_bitwise_equal(tiny_problem.model, saved)


def test_chunked_nll_equals_full_logits(tiny):
    model, _ = tiny
    blocks = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=blocks, labels=blocks).loss.item()
    assert wq.mean_nll(model, blocks, batch_size=2, logits_chunk=7) == pytest.approx(reference, rel=1e-5)
    assert wq.perplexity(model, blocks) == pytest.approx(math.exp(reference), rel=1e-5)


def test_default_logits_chunk_bounds_the_logits_bytes(tiny, monkeypatch):
    import importlib

    module = importlib.import_module("windquant_gym.eval.perplexity")  # the package re-exports a function of that name

    assert module.logits_chunk_for(49152) == 2048  # SmolLM2: one chunk per 8 x 128 batch
    assert module.logits_chunk_for(128256) == 784  # LLaMA-3: ~400 MB of logits per chunk, not 1 GB
    assert module.logits_chunk_for(10**9) == 1
    model, _ = tiny
    blocks = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    monkeypatch.setattr(module, "LOGITS_BYTES", 257 * 4 * 16)  # 16 positions per chunk
    monkeypatch.setattr(module.logits_chunk_for, "__defaults__", (module.LOGITS_BYTES,))
    try:
        nll = wq.mean_nll(model, blocks, batch_size=3)
    finally:
        handle.remove()
    assert max(shape[0] for shape in seen) == 16 and len(seen) == 8  # 3 x 39 targets in chunks of 16
    assert nll == pytest.approx(wq.mean_nll(model, blocks, batch_size=3, logits_chunk=117), rel=1e-6)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_logits_chunk_is_a_named_error(tiny, bad):
    model, _ = tiny
    with pytest.raises(wq.ConfigError, match=r"logits_chunk must be a positive int .*got .*leave it None"):
        wq.mean_nll(model, torch.zeros(1, 8, dtype=torch.long), logits_chunk=bad)


def test_calibration_scales_are_mean_absolute_inputs(tiny):
    model, _ = tiny
    units = wq.find_units(model, 64)
    blocks = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))
    name = units[-1].module  # a down_proj: its input is the MLP's hidden activation
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, i: captured.append(i[0].detach().clone()))
    try:
        result = calibrate(model, units, blocks, batch_size=3, progress=False)
    finally:
        handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    torch.testing.assert_close(result.act_scales[name], x.abs().mean(0))
    assert set(result.act_scales) == {u.module for u in units}
    assert result.nll == pytest.approx(wq.mean_nll(model, blocks), rel=1e-6)
    assert not model.get_submodule(name)._forward_pre_hooks  # our hooks are gone


def test_streamed_layer_by_layer_equals_whole_model_assembly(tiny_problem):
    """The large-model path (one decoder layer's quantized weights at a time, table in host
    memory) gives the same NLL as assembling everything, and gives the weights back."""
    import dataclasses

    import numpy as np

    saved = snapshot(tiny_problem.model)
    plan = np.random.default_rng(3).integers(0, 7, len(tiny_problem.units)).tolist()
    whole = tiny_problem.proxy_nll(plan)
    streamed = dataclasses.replace(tiny_problem, stream=True)
    seen = []
    layers = wq.quant.units.find_decoder_layers(tiny_problem.model)[1]
    hook = layers[1].self_attn.q_proj.register_forward_pre_hook(  # while layer 1 runs
        lambda module, args: seen.append(
            sorted({n.split(".")[2] for n, p in tiny_problem.model.named_parameters() if not torch.equal(p, saved[n])})
        )
    )
    try:
        assert streamed.proxy_nll(plan) == pytest.approx(whole, rel=1e-6)
    finally:
        hook.remove()
    assert seen == [["1"]]  # while layer 1 runs, only its weights are borrowed (layer 0's are back)
    assert streamed._assembler.per_layer and len(streamed._assembler._buffers) == 7  # one layer's buffers
    assert_bitwise_equal(tiny_problem.model, saved)


def test_streamed_restores_after_an_exception_mid_forward(tiny_problem):
    saved = snapshot(tiny_problem.model)
    layers = wq.quant.units.find_decoder_layers(tiny_problem.model)[1]

    def fail(module, args):
        raise KeyboardInterrupt

    hook = layers[1].register_forward_pre_hook(fail)  # registered first: runs before layer 1 is assembled
    try:
        with pytest.raises(KeyboardInterrupt):
            with wq.quant.apply.streamed_quantized_weights(tiny_problem.model, tiny_problem.table, [5] * len(tiny_problem.units)):
                wq.mean_nll(tiny_problem.model, tiny_problem.blocks[:2])
    finally:
        hook.remove()
    assert_bitwise_equal(tiny_problem.model, saved)


def test_table_kept_in_host_memory_assembles_the_same(tiny_problem, tmp_path):
    table = wq.build_table(tiny_problem.model, tiny_problem.calibration.act_scales, tiny_problem.table.config,
                           hessians=tiny_problem.calibration.hessians, cache=False, progress=False, storage_device="cpu")
    plan = [3] * len(tiny_problem.units)
    name = tiny_problem.table.units[0].module
    original = tiny_problem.model.get_submodule(name).weight.data
    count = sum(1 for u in table.units if u.module == name)
    assert torch.equal(table.assemble_module(name, [3] * count, original),
                       tiny_problem.table.assemble_module(name, [3] * count, original))
    assert table.plan_bits(plan) == tiny_problem.table.plan_bits(plan)


def test_nested_streamed_contexts_unwind_to_the_original_weights(tiny_problem):
    from windquant_gym.quant.apply import streamed_quantized_weights

    saved = snapshot(tiny_problem.model)
    n = len(tiny_problem.units)
    with streamed_quantized_weights(tiny_problem.model, tiny_problem.table, [2] * n):
        with streamed_quantized_weights(tiny_problem.model, tiny_problem.table, [5] * n):
            wq.mean_nll(tiny_problem.model, tiny_problem.blocks[:2])
        wq.mean_nll(tiny_problem.model, tiny_problem.blocks[:2])
    assert_bitwise_equal(tiny_problem.model, saved)


def test_a_per_layer_assembler_refuses_whole_model_assembly(tiny_problem):
    from windquant_gym.quant.apply import WeightAssembler

    assembler = WeightAssembler(tiny_problem.model, tiny_problem.table, per_layer=True)
    with pytest.raises(wq.ConfigError, match="one decoder layer at a time"):
        with wq.quantized_weights(tiny_problem.model, tiny_problem.table, [2] * len(tiny_problem.units), assembler):
            pass
