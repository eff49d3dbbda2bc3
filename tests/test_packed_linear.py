"""Issue 23: PackedLinear (the quantized Linear that stays packed where it runs) and the
transformers door (from_pretrained / save_pretrained / dequantize) on tiny-llama."""

import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import windquant_gym as wq
from windquant_gym.export import native_gemv
from windquant_gym.export.codec import decode_module, encode_module
from windquant_gym.export.layout import PACKED_FILE
from windquant_gym.export.planes import PLANES
from windquant_gym.export.torch_unpack import unpack_symbols
from windquant_gym.quant.bitwidths import N_ACTIONS


# ----- the torch unpackers --------------------------------------------------------------------
@pytest.mark.parametrize("plane", sorted({p for planes in PLANES.values() for p in planes}, key=str))
@pytest.mark.parametrize("n", [1, 5, 8, 24, 40, 1000, 4099])
def test_torch_unpack_reads_the_numpy_packers_stream_exactly(plane, n):
    packer = plane.packer
    rng = np.random.default_rng(n)
    symbols = rng.integers(0, plane.radix, size=-(-n // plane.per_byte) * plane.per_byte)
    packed = packer.pack(symbols)
    got = unpack_symbols(packer, torch.from_numpy(packed))
    assert got.dtype == torch.uint8 and got.tolist() == symbols.tolist()


# ----- one module, every bit width ------------------------------------------------------------
class _CountingLibrary:
    """The native kernel's library, counting its calls (the tokens of each)."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def wq_packed_gemv(self, *args):
        self.calls.append(args[0])
        return self.library.wq_packed_gemv(*args)


@pytest.fixture(params=["native", "tensor-ops"])
def decode_path(request, monkeypatch):
    """The decode (table) path through the native kernel, which must build here when a C compiler
    exists (``on``: a failed build is an error, not a silent fallback), or through tensor ops;
    ``.calls`` lists the kernel's calls (empty with tensor ops)."""
    from types import SimpleNamespace

    if request.param == "native" and native_gemv.compiler() is None:
        pytest.skip("no C compiler: the native decode kernel cannot be built here")
    monkeypatch.setenv(native_gemv.ENV_VAR, "on" if request.param == "native" else "off")
    native_gemv.reset()
    library = native_gemv.load()
    assert (library is not None) == (request.param == "native")
    calls = []
    if library is not None:
        counting = _CountingLibrary(library)
        calls = counting.calls
        monkeypatch.setattr(native_gemv, "load", lambda: counting)
    yield SimpleNamespace(name=request.param, calls=calls)
    native_gemv.reset()


def _module(tiny_problem, name, actions):
    table = tiny_problem.table
    units = [u for u in table.units if u.module == name]
    weight = tiny_problem.model.get_submodule(name).weight
    tensors, layout = encode_module(table, units, [actions[u.index] for u in units], weight)
    return units, tensors, layout


def _env_weight(tiny_problem, name, actions):
    with wq.quantized_weights(tiny_problem.model, tiny_problem.table, actions) as model:
        return model.get_submodule(name).weight.detach().clone()


@pytest.mark.parametrize("action", range(N_ACTIONS))
def test_every_bit_width_round_trips_through_the_module(grid_problem, action, decode_path):
    """File form -> compute form -> file form is exact; the module's weight is the env's bit
    for bit; both forward paths compute x @ W^T from the codes (on both grids: the asymmetric
    one's zero points too)."""
    tiny_problem = grid_problem
    name = tiny_problem.units[0].module
    actions = [action] * len(tiny_problem.units)
    _, tensors, layout = _module(tiny_problem, name, actions)
    module = wq.PackedLinear.from_tensors(layout, tensors)
    back = module.file_tensors()
    assert set(back) == set(tensors)
    for key in tensors:
        assert torch.equal(back[key], tensors[key]), key
    weight = _env_weight(tiny_problem, name, actions)
    assert torch.equal(module.dequantized_weight(), weight)
    assert torch.equal(decode_module(name, layout, tensors.__getitem__), weight)
    torch.manual_seed(action)
    for tokens in (1, 3, 16, 40):  # 1, 3 (and 16 natively) rows: the table (decode) path; 40: float tiles
        x = torch.randn(tokens, module.in_features)
        want = x @ weight.T
        assert torch.allclose(module(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), tokens
    quantized = action != 0  # action 0 keeps every unit in fp16: nothing for the kernel
    assert decode_path.calls == ([1, 3, 16] if decode_path.name == "native" and quantized else [])


def test_mixed_widths_and_outliers_in_one_module(grid_problem, decode_path):
    tiny_problem = grid_problem
    actions = (np.arange(len(tiny_problem.units)) % N_ACTIONS).tolist()
    for name in sorted({u.module for u in tiny_problem.units})[:6]:
        _, tensors, layout = _module(tiny_problem, name, actions)
        assert sum(layout.n_outliers) > 0
        module = wq.PackedLinear.from_tensors(layout, tensors)
        weight = _env_weight(tiny_problem, name, actions)
        assert torch.equal(module.dequantized_weight(), weight), name
        for x in (torch.randn(2, 3, module.in_features), torch.randn(1, module.in_features)):
            want = x @ weight.T
            assert torch.allclose(module(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), name
        bf16 = module(x.bfloat16())  # the native kernel works in float32 and hands back the input's dtype
        assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), x @ weight.T, rtol=0.05, atol=0.05 * want.abs().max().item())
        strided = torch.randn(module.in_features, 2).t()  # not contiguous
        assert torch.allclose(module(strided), strided @ weight.T, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert all(torch.equal(module.file_tensors()[k], v) for k, v in tensors.items())
    assert len(decode_path.calls) == (4 * 6 if decode_path.name == "native" else 0)
    native_calls = len(decode_path.calls)
    module.to(torch.bfloat16)  # fp16 scales become bf16: not what the kernel reads, so tensor ops
    x = torch.randn(1, module.in_features)
    assert torch.allclose(module(x).float(), x @ module.dequantized_weight().T, rtol=0.05, atol=0.05 * want.abs().max().item())
    assert len(decode_path.calls) == native_calls


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.float_numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.float_numels.append((func.__name__, tensor.numel()))
        return out


@pytest.mark.parametrize("tokens", [1, 40])
def test_no_float_weight_of_the_full_matrix_is_built_or_kept(tiny_problem, tokens, decode_path):
    """Every op the forward runs is recorded: no float tensor reaches O x I elements (a unit's
    tile is O x chunk), and after the forward the module holds no float32 tensor at all."""
    name = next(u.module for u in tiny_problem.units if u.in_features >= 3 * tiny_problem.table.config.chunk_size)
    actions = [4] * len(tiny_problem.units)
    _, tensors, layout = _module(tiny_problem, name, actions)
    module = wq.PackedLinear.from_tensors(layout, tensors)
    before = module.resident_bytes()
    x = torch.randn(tokens, module.in_features)
    with _RecordShapes() as record:
        module(x)
    full = module.out_features * module.in_features
    assert record.float_numels, "the recorder saw no op"
    assert max(n for _, n in record.float_numels) < full, [r for r in record.float_numels if r[1] >= full]
    assert module.resident_bytes() == before
    assert all(not t.is_floating_point() or t.dtype == torch.float16 for t in module._buffers.values())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_the_native_kernel_is_what_decodes_when_it_is_on(tiny_problem, decode_path):
    """One kernel call per module at decode sizes, none above ``native_max_tokens``, under
    autograd or tracing, or when off."""
    name = tiny_problem.units[0].module
    _, tensors, layout = _module(tiny_problem, name, (np.arange(len(tiny_problem.units)) % N_ACTIONS).tolist())
    module = wq.PackedLinear.from_tensors(layout, tensors)
    calls = decode_path.calls
    for tokens in (1, module.native_max_tokens, module.native_max_tokens + 1):
        module(torch.randn(tokens, module.in_features))
    expected = [1, module.native_max_tokens] if decode_path.name == "native" else []
    assert calls == expected
    x = torch.randn(2, module.in_features, requires_grad=True)  # the kernel has no backward: tensor ops then
    module(x).sum().backward()
    weight = module.dequantized_weight()
    traced = torch.jit.trace(module, torch.randn(1, module.in_features), check_trace=False)  # invisible to tracing
    probe = torch.randn(1, module.in_features)
    assert torch.allclose(traced(probe), probe @ weight.T, rtol=1e-4, atol=1e-5)
    assert calls == expected
    assert torch.allclose(x.grad, weight.sum(0).expand_as(x), rtol=1e-4, atol=1e-5)


def test_the_native_kernel_is_cached_per_cpu_and_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path))
    if native_gemv.compiler() is not None:
        here = native_gemv.library_path(native_gemv.compiler())
        monkeypatch.setattr(native_gemv, "_cpu_identity", lambda: "x86_64|another CPU|avx2")
        assert native_gemv.library_path(native_gemv.compiler()) != here  # never another CPU's -march=native build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(native_gemv.ENV_VAR, "auto")
    native_gemv.reset()
    try:
        with pytest.warns(wq.NativeKernelWarning, match="no C compiler.*apt install gcc"):
            assert native_gemv.load() is None
        monkeypatch.setenv(native_gemv.ENV_VAR, "on")
        native_gemv.reset()
        with pytest.raises(wq.MissingDependencyError, match="WINDQUANT_NATIVE_GEMV=on.*C compiler"):
            native_gemv.load()
        monkeypatch.setenv(native_gemv.ENV_VAR, "fast")
        with pytest.raises(wq.ConfigError, match="'fast' is not one of auto, on, off"):
            native_gemv.load()
    finally:
        native_gemv.reset()


@pytest.mark.skipif(native_gemv.compiler() is None, reason="no C compiler: the native decode kernel cannot be built here")
def test_the_cache_lists_and_clears_the_native_kernel(monkeypatch, tmp_path):
    from windquant_gym.cache.listing import cache_entries, clear_cache

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path))
    monkeypatch.setenv(native_gemv.ENV_VAR, "on")
    native_gemv.reset()
    try:
        assert native_gemv.load() is not None
        current = native_gemv.library_path(native_gemv.compiler())
        old = current.with_name("packed_gemv-0000000000000000.so")
        old.write_bytes(b"another CPU's build")
        details = {e.path.name: e.detail for e in cache_entries(["kernels"])}
        assert details == {current.name: "native decode kernel (this source, compiler and CPU)",
                           old.name: "stale native decode kernel (other source, compiler or CPU)"}
        assert [e.path for e in clear_cache(["kernels"], stale_only=True)] == [old]
        assert current.is_file() and not old.exists()
        clear_cache(["kernels"])
        assert not current.exists()
    finally:
        native_gemv.reset()


def test_resident_bytes_stay_near_the_storage_bits(tiny_problem):
    table = tiny_problem.table
    for actions in ([2] * len(table.units), [4] * len(table.units), [5] * len(table.units)):
        resident, accounted = 0, 0.0
        for name in sorted({u.module for u in table.units}):
            units, tensors, layout = _module(tiny_problem, name, actions)
            resident += wq.PackedLinear.from_tensors(layout, tensors).resident_bytes()
        accounted = table.plan_bits(actions)["storage_bits"] * int(table.n_weights.sum()) / 8
        # above the file by the codes at the outliers' positions, the row counts as bytes and (ternary) rows
        # padded to whole bytes: 48 -> 50 columns here, 256 -> 260 at the presets' chunk
        assert accounted <= resident <= 1.10 * accounted, (actions[0], resident / accounted)


# ----- the transformers door ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_export(tiny_problem, tmp_path_factory):
    actions = (np.arange(len(tiny_problem.units)) % N_ACTIONS).tolist()
    return actions, wq.export_plan(actions, tiny_problem, tmp_path_factory.mktemp("packed") / "mixed")


def test_save_pretrained_writes_an_equivalent_folder(tiny_problem, mixed_export, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    actions, folder = mixed_export
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    ids = tiny_problem.blocks[:1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    modules = {u.module for u in tiny_problem.units}
    with safe_open(str(folder / PACKED_FILE), framework="pt") as a, safe_open(str(tmp_path / "again" / PACKED_FILE), framework="pt") as b:
        packed = [k for k in a.keys() if k.rsplit(".", 1)[0] in modules]
        assert packed and set(packed) <= set(b.keys())
        for key in packed:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved["format"] == wq.export.FORMAT and set(saved["modules"]) == modules


def test_to_device_and_device_map_keep_the_model_packed(tiny_problem, mixed_export):
    from transformers import AutoModelForCausalLM

    _, folder = mixed_export
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").to("cpu")
    ids = tiny_problem.blocks[:1, :4]
    assert any(isinstance(m, wq.PackedLinear) for m in model.modules())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = wq.load_quantized(folder, device=device)
    with torch.no_grad():
        want = model(ids).logits
        got = on_device(ids.to(device)).logits.cpu()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_bf16_forward_stays_close(tiny_problem, mixed_export):
    _, folder = mixed_export
    model = wq.load_quantized(folder)
    bf16 = wq.load_quantized(folder, dtype=torch.bfloat16)
    ids = tiny_problem.blocks[:1]
    with torch.no_grad():
        want, got = model(ids).logits, bf16(ids).logits.float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


# ----- bad input ---------------------------------------------------------------------------------
def test_a_truncated_file_is_named_before_anything_loads(mixed_export, tmp_path):
    import shutil

    _, folder = mixed_export
    copy = shutil.copytree(folder, tmp_path / "copy")
    data = (copy / PACKED_FILE).read_bytes()
    (copy / PACKED_FILE).write_bytes(data[: len(data) - 1000])
    with pytest.raises(wq.IncompleteExportError, match=r"model\.safetensors is truncated.*re-export") as caught:
        wq.load_quantized(copy)
    assert isinstance(caught.value, FileNotFoundError)
    (copy / PACKED_FILE).write_bytes(data[:4])
    with pytest.raises(wq.IncompleteExportError, match="truncated"):
        wq.load_quantized(copy)


def test_a_newer_format_or_another_models_config_is_refused(tiny_problem, mixed_export, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    _, folder = mixed_export
    copy = shutil.copytree(folder, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    newer = {**config, "quantization_config": {**config["quantization_config"], "format": "windquant-packed-3"}}
    (copy / "config.json").write_text(json.dumps(newer))
    with pytest.raises(wq.ExportFormatError, match="newer windquant_gym.*pip install -U"):
        AutoModelForCausalLM.from_pretrained(copy)
    other = {**config, "intermediate_size": config["intermediate_size"] + 16}
    (copy / "config.json").write_text(json.dumps(other))
    with pytest.raises(wq.ExportFormatError, match="another model's plan"):
        wq.load_quantized(copy)
    del other["quantization_config"]
    (copy / "config.json").write_text(json.dumps(other))
    with pytest.raises(wq.ExportFormatError, match="no quantization_config"):
        wq.load_quantized(copy)


def test_a_missing_tokenizer_is_named(tiny_problem, mixed_export, tmp_path):
    actions, folder = mixed_export
    assert wq.load_tokenizer(folder)("hello")["input_ids"] == tiny_problem.tokenizer("hello")["input_ids"]
    bare = wq.export_plan(actions, tiny_problem.table, tmp_path / "bare", model=tiny_problem.model)
    with pytest.raises(wq.IncompleteExportError, match="no tokenizer.*tokenizer="):
        wq.load_tokenizer(bare)
    assert wq.load_quantized(bare) is not None  # the model itself does not need it


def test_export_of_a_missing_plan_file_is_a_named_error(tmp_path, capsys, monkeypatch):
    from windquant_gym.cli import main, run

    args = ["export", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]
    with pytest.raises(wq.PlanNotFoundError, match="No plan file") as caught:
        main(args)
    assert isinstance(caught.value, FileNotFoundError)
    monkeypatch.setattr("sys.argv", ["windquant", *args])
    assert run() == 2  # the console script: the message, not a traceback
    assert "PlanNotFoundError: No plan file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
