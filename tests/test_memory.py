"""The memory estimate (issue 24): its parts against what is really allocated, its total against
a measured peak, and the named error a model that does not fit gets before anything large is
allocated."""

import subprocess
import sys
import textwrap

import pytest
import torch

import windquant_gym as wq
from windquant_gym import memory
from windquant_gym.quant.units import module_names


def _estimate(problem, **kwargs):
    return memory.estimate_memory(problem.model, module_names(problem.units), problem.table.config.chunk_size,
                                  batch_size=problem.batch_size, seq_len=problem.blocks.shape[1],
                                  salient_rate=problem.table.config.salient_rate, **kwargs)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_the_table_part_is_the_tables_own_bytes(tiny_problem):
    table = tiny_problem.table
    real = sum(_nbytes(d) for d in (table.codes, table.scales, table.outlier_index, table.outlier_codes, table.outlier_scales))
    estimate = _estimate(tiny_problem)
    assert estimate.table == pytest.approx(real, rel=0.05)
    assert estimate.weights == sum(t.numel() for t in table.codes.values()) // 6


def test_the_hessian_part_is_the_calibrations_own_bytes(tiny_problem):
    hessians = tiny_problem.calibration.hessians
    distinct = {id(t): t for t in hessians.values()}  # q/k/v and gate/up share one tensor
    assert _estimate(tiny_problem).hessians == _nbytes(distinct)


def test_streaming_assembles_one_layer(tiny_problem):
    whole, streamed = _estimate(tiny_problem), _estimate(tiny_problem, stream=True)
    layers = len({u.layer for u in tiny_problem.units})
    assert whole.assembly == 4 * whole.weights
    assert streamed.assembly == whole.streamed_assembly == whole.assembly // layers  # tiny-llama's layers are alike
    assert streamed.additional <= whole.additional


def test_the_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path):
    """A process of its own (its high-water mark is its own): tiny-llama's build, a proxy pass
    and an episode, against the estimate made before the build."""
    script = textwrap.dedent(f"""
        import json, gymnasium as gym, windquant_gym as wq
        from windquant_gym.memory import estimate_memory, peak_rss_bytes
        from windquant_gym.quant.units import find_units, module_names
        model, tokenizer = wq.load_model("tiny-llama")
        config = wq.QuantConfig(chunk_size=48)
        est = estimate_memory(model, module_names(find_units(model, 48)), 48, batch_size=8, seq_len=64,
                              salient_rate=config.salient_rate)
        problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", config, n_samples=8, seq_len=64,
                                        cache={str(tmp_path / 'cache')!r}, progress=False)
        env = gym.make("WindQuant-v0", model=model, problem=problem, target_bits=2.0)
        env.reset(seed=0)
        done = False
        while not done:
            _, _, done, _, _ = env.step(int(env.unwrapped.action_masks().nonzero()[0][-1]))
        print(json.dumps({{"estimate": est.peak, "peak": peak_rss_bytes()}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert figures["estimate"] == pytest.approx(figures["peak"], rel=0.25)


def test_a_model_that_does_not_fit_is_told_so_before_calibration(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 20)  # 1 MiB left

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started although the model does not fit")

    monkeypatch.setattr(wq.problem, "_cached_calibration", no_calibration)
    with pytest.raises(wq.InsufficientMemoryError, match=r"needs about .* \(table .* GiB is available") as caught:
        wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48), n_samples=8, seq_len=64,
                              cache=tmp_path / "cache", progress=False)
    assert "WINDQUANT_MEMORY_CHECK=off" in str(caught.value)
    assert isinstance(caught.value, MemoryError)  # except MemoryError still catches it
    monkeypatch.setenv(memory.ENV_VAR, "off")  # the way past it, as the message says
    with pytest.raises(AssertionError, match="calibration started"):
        wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48), n_samples=8, seq_len=64,
                              cache=tmp_path / "cache", progress=False)
    monkeypatch.setenv(memory.ENV_VAR, "maybe")
    with pytest.raises(wq.ConfigError, match="on .default. or off"):
        memory.memory_check_enabled()


def test_auto_streams_when_memory_is_short_and_measures_the_same(tiny, tiny_problem, tmp_path, monkeypatch):
    """stream="auto" (the default) streams only when that lowers the estimate and the whole-model
    estimate would take more than 40% of the available memory; the streamed problem's proxy and
    held-out NLLs are the same."""
    from windquant_gym.harness.episodes import plan_window_nlls

    def estimate(assembly, activations):
        return memory.MemoryEstimate(resident=0, table=1 << 30, table_build=1 << 28, hessians=0, assembly=assembly,
                                     activations=activations, weights=1, streamed_assembly=1 << 26)

    whole, streamed = estimate(4 << 30, 1 << 28), estimate(1 << 26, 1 << 29)  # the streamed batch is larger
    assert not memory.choose_stream(whole, streamed, available=20 << 30)  # 5.25 GiB of 20: room enough
    assert memory.choose_stream(whole, streamed, available=10 << 30)
    assert not memory.choose_stream(whole, streamed, torch.device("meta"), available=1)  # the user decides there
    assert not memory.choose_stream(whole, estimate(1 << 26, 8 << 30), available=1)  # a larger total: never
    # tiny-llama: the build's scratch is its peak, streaming lowers nothing, so auto does not stream
    assert not tiny_problem.stream
    model, tokenizer = tiny
    monkeypatch.setattr(memory, "choose_stream", lambda *args, **kwargs: True)  # what a short machine decides
    streamed_problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", tiny_problem.table.config, n_samples=8,
                                             seq_len=64, cache=tmp_path / "cache", progress=False)
    assert streamed_problem.stream
    plan = [2 + (i % 4) for i in range(len(tiny_problem.units))]
    assert streamed_problem.proxy_nll(plan) == pytest.approx(tiny_problem.proxy_nll(plan), rel=1e-5)
    heldout = tiny_problem.blocks[:3]
    assert torch.allclose(plan_window_nlls(streamed_problem, plan, heldout), plan_window_nlls(tiny_problem, plan, heldout),
                          rtol=1e-5)
    with pytest.raises(wq.ConfigError, match="stream must be True, False or 'auto'"):
        wq.QuantProblem.build(model, tokenizer, "wiki-sample", tiny_problem.table.config, n_samples=8, seq_len=64,
                              cache=tmp_path / "cache", progress=False, stream="yes")


def test_streaming_is_offered_only_where_it_lowers_the_peak():
    def estimate(table_build, assembly, streamed):
        return memory.MemoryEstimate(resident=0, table=1 << 30, table_build=table_build, hessians=0, assembly=assembly,
                                     activations=0, weights=1, streamed_assembly=streamed)

    with pytest.raises(wq.InsufficientMemoryError, match=r"stream=True.*1\.50 GiB less.*WINDQUANT_MEMORY_CHECK=off"):
        memory.check_memory(estimate(1 << 29, 2 << 30, 1 << 28), available=1 << 20)
    with pytest.raises(wq.InsufficientMemoryError) as caught:  # the build's scratch is the peak: streaming saves nothing
        memory.check_memory(estimate(3 << 30, 2 << 30, 1 << 28), available=1 << 20)
    assert "stream=True" not in str(caught.value)


def test_accelerator_models_are_left_to_their_allocator():
    estimate = memory.MemoryEstimate(resident=0, table=1 << 40, table_build=0, hessians=0, assembly=0, activations=0,
                                     weights=1, streamed_assembly=0)
    memory.check_memory(estimate, torch.device("meta"), available=1)  # not the host's memory: no check
    with pytest.raises(wq.InsufficientMemoryError, match="1024.00 GiB beside"):
        memory.check_memory(estimate, "cpu", available=1)


_MAPPED_READER = textwrap.dedent("""
    import json, sys
    import windquant_gym as wq
    model, tokenizer = wq.load_model("tiny-llama")
    problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48), n_samples=8,
                                    seq_len=64, cache=sys.argv[1], progress=False)
    codes = problem.table.codes
    total = sum(int(c.sum()) for c in codes.values())  # every page of the codes read
    path = f"{problem.table.fingerprint}.safetensors"
    ranges, figures, current = [], {}, None
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
            current = parts[-1].endswith(path) if len(parts) >= 6 else False
            if current:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
        elif current and parts[0] in ("Shared_Clean:", "Private_Clean:", "Private_Dirty:", "Anonymous:"):
            figures[parts[0][:-1]] = figures.get(parts[0][:-1], 0) + int(parts[1]) * 1024
    inside = all(any(lo <= c.data_ptr() and c.data_ptr() + c.numel() <= hi for lo, hi in ranges) for c in codes.values())
    print(json.dumps({"inside": inside, "codes_bytes": sum(c.numel() for c in codes.values()), **figures}), flush=True)
    sys.stdin.readline()  # stay alive (and mapped) until told
""")


def test_processes_reading_one_cached_table_share_its_pages(tmp_path):
    """The builder (which reads its table back once written) and a second process both hold the
    codes in the cache file's mapping: the second one's pages of it are shared, none private."""
    import json

    cache = str(tmp_path / "cache")

    def start():
        return subprocess.Popen([sys.executable, "-c", _MAPPED_READER, cache], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    builder = start()  # the cache is empty: this one fits the table
    try:
        first = json.loads(builder.stdout.readline())
        reader = start()
        try:
            second = json.loads(reader.stdout.readline())
        finally:
            reader.communicate("\n", timeout=60)
    finally:
        _, errors = builder.communicate("\n", timeout=60)
    assert builder.returncode == 0, errors[-2000:]
    assert first["inside"] and second["inside"]  # every codes tensor lies in the file's mapping
    assert first.get("Private_Dirty", 0) == second.get("Private_Dirty", 0) == 0  # nobody copied a page
    # the second process's pages of the codes are the first one's (page cache), not copies of its own
    assert second.get("Shared_Clean", 0) >= 0.95 * second["codes_bytes"]
