"""The CPU linear-kernel routing of inference passes (windquant_gym.compute.kernels)."""

import pytest
import torch
import torch.nn.functional as F

from windquant_gym.cache.listing import cache_entries, clear_cache
from windquant_gym.errors import CacheWarning, ConfigError
from windquant_gym.compute import kernel_choice, kernels
from windquant_gym.eval.perplexity import mean_nll

needs_onednn = pytest.mark.skipif(kernels._onednn_linear_op() is None, reason="this PyTorch build has no oneDNN linear")


class _CountingOp:
    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@needs_onednn
def test_float32_cpu_linears_without_grad_go_to_onednn_with_float32_results():
    op = _CountingOp(kernels._onednn_linear_op())
    x, w, b = torch.randn(3, 5, 32), torch.randn(48, 32), torch.randn(48)
    with torch.no_grad(), kernels._OneDNNLinear(op):
        routed = F.linear(x, w, b)
        routed_no_bias = torch.nn.functional.linear(x[:, :-1], w)
    assert op.calls == 2
    torch.testing.assert_close(routed, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_no_bias, F.linear(x[:, :-1], w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_other_dtypes_and_autograd_pass_through_unchanged():
    op = _CountingOp(kernels._onednn_linear_op())
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4)
    with kernels._OneDNNLinear(op):
        out = F.linear(x, w)  # grad enabled and the weight needs it: autograd's kernel
        out.sum().backward()
        with torch.no_grad():
            F.linear(x.bfloat16(), w.detach().bfloat16())
            F.linear(x.double(), w.detach().double())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast = F.linear(x, w.detach())
    assert op.calls == 0
    assert autocast.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 4))


@needs_onednn
def test_mean_nll_routes_on_cpu_and_matches_the_default_kernel(tiny, monkeypatch):
    model, tokenizer = tiny
    blocks = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    counting = _CountingOp(kernels._onednn_linear_op())
    monkeypatch.setattr(kernels, "_onednn_linear_op", lambda: counting)
    monkeypatch.setenv(kernels.ENV_VAR, "onednn")
    routed = mean_nll(model, blocks, batch_size=2)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert counting.calls >= 2 * linears - 1  # every Linear (and the head) in each of 2 batches
    monkeypatch.setenv(kernels.ENV_VAR, "aten")
    calls = counting.calls
    default = mean_nll(model, blocks, batch_size=2)
    assert counting.calls == calls
    assert routed == pytest.approx(default, rel=1e-5)


def test_routing_is_off_for_aten_and_for_other_devices(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "aten")
    with kernels.linear_kernels("cpu") as active:
        assert active is False
    monkeypatch.setenv(kernels.ENV_VAR, "onednn")
    with kernels.linear_kernels("meta") as active:
        assert active is False
    with kernels.linear_kernels("cpu") as active:
        assert active is (kernels._onednn_linear_op() is not None)


def _fake_timer(onednn, aten, calls):
    def timer(op, shapes):
        calls.append(shapes)
        return onednn, aten
    return timer


@pytest.mark.parametrize("onednn, aten, expected", [(1.0, 2.0, "onednn"), (2.0, 1.0, "aten"), (1.0, 1.01, "aten")])
def test_auto_chooses_the_kernel_measured_faster_and_keeps_pytorchs_within_noise(tiny, tmp_path, monkeypatch,
                                                                                onednn, aten, expected):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "_CHOSEN", {})
    calls = []
    choice = kernel_choice.choose_cpu_linear_kernel(object(), tiny[0], timer=_fake_timer(onednn, aten, calls))
    assert (choice.kernel, choice.onednn_seconds, choice.aten_seconds) == (expected, onednn, aten)
    model, _ = tiny
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert calls == [kernel_choice.linear_shapes(model)]  # the model's own shapes, every Linear counted
    assert sum(n for _, _, n in calls[0]) == len(linears)


def test_the_measurement_is_cached_per_machine_and_thread_count(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "_CHOSEN", {})
    calls = []
    timer = _fake_timer(1.0, 2.0, calls)
    first = kernel_choice.choose_cpu_linear_kernel(object(), tiny[0], timer=timer)
    [entry] = (tmp_path / "kernels").glob("*.json")
    monkeypatch.setattr(kernel_choice, "_CHOSEN", {})  # a new process: only the file is left
    assert kernel_choice.choose_cpu_linear_kernel(object(), tiny[0], timer=timer) == first
    assert len(calls) == 1
    listed = [e for e in cache_entries(["kernels"]) if e.path == entry]
    assert listed and "onednn (oneDNN 1000.0 ms, PyTorch's 2000.0 ms" in listed[0].detail
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        kernel_choice.choose_cpu_linear_kernel(object(), tiny[0], timer=timer)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 and len(list((tmp_path / "kernels").glob("*.json"))) == 2
    # a damaged entry is measured again, with a warning naming the file
    entry.write_text("{not json")
    monkeypatch.setattr(kernel_choice, "_CHOSEN", {})
    with pytest.warns(CacheWarning, match="damaged kernel-choice entry"):
        kernel_choice.choose_cpu_linear_kernel(object(), tiny[0], timer=timer)
    assert len(calls) == 3
    clear_cache(["kernels"])
    assert not list((tmp_path / "kernels").glob("*.json"))


@needs_onednn
def test_the_real_measurement_times_both_kernels_and_auto_routes_by_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "_CHOSEN", {})
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    model, _ = tiny
    choice = kernel_choice.choose_cpu_linear_kernel(kernels._onednn_linear_op(), model)
    assert choice.onednn_seconds > 0 and choice.aten_seconds > 0
    assert choice.kernel == ("onednn" if choice.speedup >= kernel_choice.MIN_SPEEDUP else "aten")
    with kernels.linear_kernels("cpu", model) as active:
        assert active is (choice.kernel == "onednn")
    monkeypatch.setattr(kernel_choice, "_CHOSEN", {})  # the cached file, with the other answer
    [entry] = (tmp_path / "kernels").glob("*.json")
    flipped = {"onednn": "aten", "aten": "onednn"}[choice.kernel]
    entry.write_text(entry.read_text().replace(f'"kernel": "{choice.kernel}"', f'"kernel": "{flipped}"'))
    with kernels.linear_kernels("cpu", model) as active:
        assert active is (flipped == "onednn")


def test_an_unknown_kernel_name_is_a_named_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "mkl")
    with pytest.raises(ConfigError, match=r"WINDQUANT_CPU_LINEAR='mkl'.*auto, onednn, aten.*unset it"):
        with kernels.linear_kernels("cpu"):
            pass


@needs_onednn
def test_keyword_arguments_bad_shapes_and_a_bias_needing_grad_keep_pytorchs_own_path():
    op = _CountingOp(kernels._onednn_linear_op())
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    bias = torch.zeros(5, requires_grad=True)
    with kernels._OneDNNLinear(op):
        with torch.no_grad():
            by_keyword = F.linear(input=x, weight=w)
        assert op.calls == 1  # routed, keywords read correctly
        with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied"), torch.no_grad():
            F.linear(x, torch.randn(5, 3))  # PyTorch's message, not oneDNN's primitive-descriptor error
        F.linear(x, w, bias).sum().backward()
    assert op.calls == 1
    torch.testing.assert_close(by_keyword, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, torch.full((5,), 3.0))
