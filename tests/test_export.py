"""Packed export: bit packing, export_plan / load_quantized / packed_size, CLI, errors."""

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.export import (
    CODE_FORMATS,
    PACKERS,
    BitPacker,
    RadixPacker,
    field_bits,
    pack_fields,
    unpack_fields,
)
from windquant_gym.export.layout import PACKED_FILE, REQUIRED_FILES
from windquant_gym.plan import QuantPlan
from windquant_gym.quant.bitwidths import BIT_WIDTHS, N_ACTIONS, SKIP_ACTION

RAGGED = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 23, 24, 25, 31, 33, 1000, 1003]
QUANT_ACTIONS = range(1, N_ACTIONS)


# ----- packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("action", QUANT_ACTIONS)
@pytest.mark.parametrize("n", RAGGED)
def test_codes_round_trip_every_width_and_ragged_length(action, n):
    fmt = CODE_FORMATS[action]
    rng = np.random.default_rng(1000 * action + n)
    codes = torch.from_numpy(rng.choice(np.asarray(fmt.codes, dtype=np.int8), size=n))
    packed = fmt.pack(codes)
    assert packed.dtype == np.uint8
    # exactly ceil(n * stored_bits / 8) bytes: the storage accounting's bits, padded once
    assert len(packed) == fmt.n_bytes(n) == math.ceil(n * Fraction(str(fmt.spec.stored_bits)) / 8)
    assert torch.equal(fmt.unpack(packed, n), codes)


@pytest.mark.parametrize("action", QUANT_ACTIONS)
def test_extreme_codes_round_trip(action):
    fmt = CODE_FORMATS[action]
    for code in fmt.codes:
        codes = torch.full((37,), code, dtype=torch.int8)
        assert torch.equal(fmt.unpack(fmt.pack(codes), 37), codes)


def test_formats_follow_the_bit_width_table():
    expected_levels = {1: 256, 2: 16, 3: 8, 4: 4, 5: 3, 6: 2}
    assert CODE_FORMATS[SKIP_ACTION] is None
    for action in QUANT_ACTIONS:
        fmt = CODE_FORMATS[action]
        assert fmt.packer is PACKERS[BIT_WIDTHS[action].stored_bits]
        assert fmt.packer.stored_bits == BIT_WIDTHS[action].stored_bits
        assert len(fmt.codes) == expected_levels[action]
        assert list(fmt.codes) == sorted(fmt.codes)
    assert CODE_FORMATS[6].codes == (-1, 1)  # binarization: sign codes, one bit each
    assert CODE_FORMATS[5].packer == RadixPacker(3, 5)
    assert len({fmt.label for fmt in CODE_FORMATS[1:]}) == N_ACTIONS - 1


def test_ternary_packs_five_trits_per_byte():
    packer = RadixPacker(3, 5)
    trits = np.array([2, 1, 0, 2, 2, 1, 1])
    packed = packer.pack(trits)
    assert packed.tolist() == [2 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81, 1 + 1 * 3]
    assert packer.unpack(packed, 7).tolist() == trits.tolist()
    assert packer.pack(np.full(5, 2)).tolist() == [242]


def test_bit_packer_layout_is_little_endian():
    assert BitPacker(4).pack(np.array([1, 2, 15])).tolist() == [0x21, 0x0F]
    assert BitPacker(3).pack(np.array([7, 0, 1])).tolist() == [0b01000111, 0]
    assert BitPacker(1).pack(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1])).tolist() == [0x81, 0x01]


def test_packers_refuse_symbols_out_of_range():
    with pytest.raises(wq.ExportFormatError, match="outside 0..2"):
        RadixPacker(3, 5).pack(np.array([0, 3]))
    with pytest.raises(wq.ExportFormatError, match="outside 0..15"):
        BitPacker(4).pack(np.array([16]))
    with pytest.raises(wq.ExportFormatError, match=r"\[2\]"):
        CODE_FORMATS[5].encode(torch.tensor([1, 2, -1], dtype=torch.int8))  # 2 is no ternary code
    with pytest.raises(wq.ExportFormatError, match="truncated"):
        BitPacker(4).unpack(np.zeros(1, np.uint8), 3)


def test_fields_of_mixed_widths_round_trip():
    rng = np.random.default_rng(0)
    runs = [(rng.integers(0, 1 << b, size=n), b) for n, b in [(7, 6), (0, 3), (13, 9), (1, 1), (64, 8), (5, 6)]]
    packed = pack_fields(runs)
    assert len(packed) == math.ceil(sum(len(v) * b for v, b in runs) / 8)
    for (values, _), back in zip(runs, unpack_fields(packed, [(len(v), b) for v, b in runs])):
        assert back.tolist() == values.tolist()
    same = [(rng.integers(0, 8, size=n), 3) for n in (5, 0, 11)]  # one width: the fast path, same stream
    assert pack_fields(same).tolist() == BitPacker(3).pack(np.concatenate([v for v, _ in same])).tolist()
    assert [v.tolist() for v in unpack_fields(pack_fields(same), [(5, 3), (0, 3), (11, 3)])] == [v.tolist() for v, _ in same]


def test_field_bits_match_the_accounting():
    for g in range(1, 600):
        assert field_bits(g) == max(1, math.ceil(math.log2(g)))  # column inside a unit of width g
        assert field_bits(g + 1) == math.ceil(math.log2(g + 1))  # outliers in a row: 0..g


# ----- export / load on tiny-llama -----------------------------------------------------------
def _plans(n_units):
    rng = np.random.default_rng(0)
    mixed = np.arange(n_units) % N_ACTIONS  # every action, skip and 1.58 included
    rng.shuffle(mixed)
    return {"uniform-4": [2] * n_units, "uniform-2": [4] * n_units, "mixed": mixed.tolist()}


@pytest.fixture(scope="module")
def exports(tiny_problem, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, actions in _plans(len(tiny_problem.units)).items():
        plan = QuantPlan.from_table(tiny_problem.table, actions, "tiny-llama")
        out[name] = (plan, wq.export_plan(plan, tiny_problem, root / name))
    return out


PLAN_NAMES = ["uniform-4", "uniform-2", "mixed"]


def test_mixed_plan_uses_every_action(tiny_problem):
    assert set(_plans(len(tiny_problem.units))["mixed"]) == set(range(N_ACTIONS))


def _weight(module):
    return module.dequantized_weight() if isinstance(module, wq.PackedLinear) else module.weight


def assert_loaded_matches_plan(loaded, problem, actions):
    """Every quantized Linear of a loaded export (packed, or dequantized) equals the env's
    weights for ``actions``, bit for bit."""
    with wq.quantized_weights(problem.model, problem.table, actions) as model:
        for module in {u.module for u in problem.units}:
            assert torch.equal(_weight(loaded.get_submodule(module)), model.get_submodule(module).weight), module


def export_named_plans(problem, named_actions, root):
    """Export each ``{name: actions}`` plan of ``problem`` under ``root``: ``{name: (plan, folder)}``."""
    from windquant_gym.plan import QuantPlan

    out = {}
    for name, actions in named_actions.items():
        plan = QuantPlan.from_table(problem.table, actions, "tiny-llama")
        out[name] = (plan, wq.export_plan(plan, problem, root / name))
    return out


def assert_export_is_the_env(problem, plan, folder):
    """A packed and a dequantized load of ``folder`` hold the env's weights for ``plan`` bit for bit,
    and the packed model's proxy NLL is the env's; returns the packed model."""
    assert_loaded_matches_plan(wq.load_quantized(folder, dequantize=True), problem, plan.actions)
    packed = wq.load_quantized(folder)
    assert_loaded_matches_plan(packed, problem, plan.actions)  # via PackedLinear.dequantized_weight()
    nll = wq.mean_nll(packed, problem.blocks, batch_size=problem.batch_size)
    assert nll == pytest.approx(problem.proxy_nll(plan.actions), rel=1e-5)
    return packed


def assert_packed_size_is_storage_bits(problem, plan, folder):
    """The export's accounted bytes are the table's storage bits, and its file at most 1% over them."""
    size = wq.packed_size(folder)
    expected = problem.table.plan_bits(plan.actions)["storage_bits"] * int(problem.table.n_weights.sum()) / 8
    assert size.accounted_bytes == pytest.approx(expected, rel=1e-9)
    assert expected <= size.packed_bytes <= expected * 1.01
    return size


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_loaded_weights_equal_the_envs_bit_for_bit(tiny_problem, exports, name):
    plan, folder = exports[name]
    loaded = wq.load_quantized(folder, dequantize=True)
    modules = {u.module for u in tiny_problem.units}
    assert not any(isinstance(m, wq.PackedLinear) for m in loaded.modules())
    assert getattr(loaded.config, "quantization_config", None) is None
    assert_loaded_matches_plan(loaded, tiny_problem, plan.actions)
    original = tiny_problem.model.state_dict()
    for key, value in loaded.state_dict().items():
        if key.rsplit(".", 1)[0] not in modules:  # the rest: fp16-rounded originals
            assert torch.equal(value, original[key].half().float()), key


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_from_pretrained_gives_packed_linears_whose_logits_are_the_envs(tiny_problem, exports, name):
    """The ecosystem's door: after import windquant_gym, AutoModelForCausalLM.from_pretrained on
    an export folder builds PackedLinear modules; its logits equal the env's plan applied to
    the model (to fp16 rounding of the rest), on the table path (a few tokens) and the tile
    path (a whole block)."""
    from transformers import AutoModelForCausalLM

    plan, folder = exports[name]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    packed = {n for n, m in model.named_modules() if isinstance(m, wq.PackedLinear)}
    assert packed == {u.module for u in tiny_problem.units}
    assert model.config.quantization_config.format == wq.export.FORMAT
    dense = wq.load_quantized(folder, dequantize=True)
    ids = tiny_problem.blocks[:2]
    with torch.no_grad():
        for tokens in (ids[:1, :3], ids):  # 3 tokens: the table path; 2 x 64: float tiles
            got, want = model(tokens).logits, dense(tokens).logits
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), (tokens.shape, (got - want).abs().max())
        with wq.quantized_weights(tiny_problem.model, tiny_problem.table, plan.actions) as env_model:
            env_logits = env_model(ids).logits
        fp16_rest = (model(ids).logits - env_logits).abs().max().item()
        assert fp16_rest < 2e-2 * env_logits.abs().max().item()


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_loaded_perplexity_equals_the_proxy(tiny_problem, exports, name):
    plan, folder = exports[name]
    loaded = wq.load_quantized(folder)
    assert loaded.training is False and next(loaded.parameters()).dtype == torch.float32
    nll = wq.mean_nll(loaded, tiny_problem.blocks, batch_size=tiny_problem.batch_size)
    assert nll == pytest.approx(tiny_problem.proxy_nll(plan.actions), rel=1e-5)


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_packed_bytes_match_storage_bits(tiny_problem, exports, name):
    plan, folder = exports[name]
    table = tiny_problem.table
    size = wq.packed_size(folder)
    n_weights = int(table.n_weights.sum())
    expected = table.plan_bits(plan.actions)["storage_bits"] * n_weights / 8
    assert size.n_weights == n_weights
    assert size.accounted_bytes == pytest.approx(expected, rel=1e-9)
    assert size.packed_bytes == pytest.approx(expected, rel=0.01)
    assert size.packed_bytes >= expected  # only byte padding is added, never bits saved
    assert size.packed_bytes + size.rest_bytes == (folder / PACKED_FILE).stat().st_size - size.header_bytes
    assert sum(size.by_kind.values()) == size.packed_bytes
    assert ("fp16" in size.by_kind) == (SKIP_ACTION in plan.actions)
    assert size.ratio == pytest.approx(1.0, abs=0.01)
    assert "accounted" in size.summary()


def test_files_of_an_export(tiny_problem, exports):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    plan, folder = exports["mixed"]
    for name in REQUIRED_FILES:
        assert (folder / name).is_file()
    assert not (folder / "rest.safetensors").exists()  # format 2: one file, the model's own names
    assert QuantPlan.load(folder / "plan.json") == plan
    modules = {u.module for u in tiny_problem.units}
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "windquant" and config["format"] == "windquant-packed-2"
    assert set(config["modules"]) == modules and config["chunk_size"] == tiny_problem.table.config.chunk_size
    assert config["plan"]["table_fingerprint"] == plan.table_fingerprint
    with safe_open(str(folder / PACKED_FILE), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and json.loads(metadata["layout"]) == config["modules"]
    packed = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] in modules}
    rest = {k: v for k, v in tensors.items() if k not in packed}
    assert not any(k.endswith(".weight") for k in packed)  # no float weight of a quantized Linear
    assert {v.dtype for v in packed.values()} <= {torch.uint8, torch.int8, torch.float16}
    assert "model.embed_tokens.weight" in rest and "model.norm.weight" in rest
    assert "lm_head.weight" not in rest  # tied to the embeddings, written once
    assert {v.dtype for v in rest.values()} == {torch.float16}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Export a packed model."
    assert tokenizer(text)["input_ids"] == tiny_problem.tokenizer(text)["input_ids"]


def test_float32_rest_makes_the_perplexity_exact(tiny_problem, tmp_path):
    actions = _plans(len(tiny_problem.units))["mixed"]
    folder = wq.export_plan(actions, tiny_problem, tmp_path / "f32", rest_dtype=torch.float32)
    expected = tiny_problem.proxy_nll(actions)
    # dequantized, the float32 Linears are the env's, bit for bit: the same pass on the same kernel
    floats = wq.mean_nll(wq.load_quantized(folder, dequantize=True), tiny_problem.blocks, batch_size=tiny_problem.batch_size)
    assert floats == pytest.approx(expected, rel=1e-9)
    # packed, PackedLinear sums tile by tile (its own order of float32 additions)
    packed = wq.mean_nll(wq.load_quantized(folder), tiny_problem.blocks, batch_size=tiny_problem.batch_size)
    assert packed == pytest.approx(expected, rel=1e-6)


def test_fallback_stores_the_higher_precision(tiny, tmp_path):
    model, tokenizer = tiny
    thresholds = (math.inf, 1.0, 1.0, 1.0, 1.0, 1e-9, 1e-9)  # 1.58 and 1 bit fall back to 2 bit
    problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48, fallback_thresholds=thresholds),
                                    n_samples=8, seq_len=64, cache=tmp_path / "cache", progress=False)
    actions = [6] * len(problem.units)
    assert (problem.table.stored_action[:, 6] == 4).all()
    folder = wq.export_plan(actions, problem, tmp_path / "fallback")
    assert_loaded_matches_plan(wq.load_quantized(folder), problem, actions)
    size = wq.packed_size(folder)
    assert size.packed_bytes == pytest.approx(problem.table.plan_bits(actions)["storage_bits"] * size.n_weights / 8, rel=0.01)


# ----- CLI --------------------------------------------------------------------------------------
def test_cli_export(tiny_problem, tmp_path, monkeypatch, capsys):
    from windquant_gym.cli import main

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    actions = _plans(len(tiny_problem.units))["mixed"]
    plan_path = QuantPlan.from_table(tiny_problem.table, actions, "tiny-llama").save(tmp_path / "plan.json")
    out = tmp_path / "packed"
    assert main(["export", str(plan_path), "--out", str(out), "--preset", "smoke"]) == 0  # model named by the plan
    assert "accounted" in capsys.readouterr().out
    assert_loaded_matches_plan(wq.load_quantized(out), tiny_problem, actions)
    with pytest.raises(wq.OutputExistsError, match="--overwrite"):
        main(["export", str(plan_path), "--out", str(out), "--model", "tiny-llama", "--preset", "smoke"])
    assert main(["export", str(plan_path), "--out", str(out), "--model", "tiny-llama", "--preset", "smoke", "--overwrite"]) == 0


# ----- bad inputs -------------------------------------------------------------------------------
def test_refuses_a_plan_of_another_table(tiny_problem, tmp_path):
    plan = QuantPlan.from_table(tiny_problem.table, [2] * len(tiny_problem.units))
    other = dataclasses.replace(plan, table_fingerprint="0123abcd")
    with pytest.raises(wq.TableMismatchError, match="0123abcd"):
        wq.export_plan(other, tiny_problem, tmp_path / "x")
    with pytest.raises(wq.TableMismatchError, match="one action per unit"):
        wq.export_plan([2, 2, 2], tiny_problem, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_refuses_a_model_the_table_was_not_built_from(tiny_problem, tmp_path):
    from windquant_gym.models import tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    actions = [2] * len(tiny_problem.units)
    with pytest.raises(wq.TableMismatchError, match=r"sum\(W\^2\)"):
        wq.export_plan(actions, tiny_problem.table, tmp_path / "x", model=tiny_llama(seed=1))
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(wq.TableMismatchError, match=r"shape \(64, 64\)"):
        wq.export_plan(actions, tiny_problem.table, tmp_path / "x", model=narrow)
    with pytest.raises(wq.ConfigError, match="model="):
        wq.export_plan(actions, tiny_problem.table, tmp_path / "x")


def test_refuses_a_non_empty_output_folder_unless_overwrite(tiny_problem, tmp_path):
    actions = [3] * len(tiny_problem.units)
    folder = tmp_path / "out"
    folder.mkdir()
    wq.export_plan(actions, tiny_problem, folder)  # an empty folder is fine
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(wq.OutputExistsError, match="overwrite=True") as caught:
        wq.export_plan(actions, tiny_problem, folder)
    assert str(folder) in str(caught.value)
    assert isinstance(caught.value, FileExistsError)
    wq.export_plan([4] * len(tiny_problem.units), tiny_problem, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert QuantPlan.load(folder / "plan.json").actions == tuple([4] * len(tiny_problem.units))
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # no staging folder left
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(wq.OutputExistsError, match="not a folder"):
        wq.export_plan(actions, tiny_problem, file)


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_load_names_missing_files(tiny_problem, tmp_path, missing):
    folder = wq.export_plan([2] * len(tiny_problem.units), tiny_problem, tmp_path / "out")
    (folder / missing).unlink()
    with pytest.raises(wq.IncompleteExportError, match=missing) as caught:
        wq.load_quantized(folder)
    assert "--overwrite" in str(caught.value) and isinstance(caught.value, FileNotFoundError)


def test_load_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(wq.IncompleteExportError, match="No export folder"):
        wq.load_quantized(tmp_path / "nowhere")
    with pytest.raises(wq.IncompleteExportError):
        wq.packed_size(tmp_path / "nowhere")


@pytest.mark.parametrize("bits", range(1, 17))
def test_bit_packer_fast_and_plain_paths_write_one_stream(bits):
    """Widths up to 8 (and 16) pack a byte-aligned group at a time; the others go through
    the plain bit stream. Both must write the same little-endian stream."""
    from windquant_gym.export.packing import _to_bits

    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 9, 63, 257):
        symbols = rng.integers(0, 1 << bits, size=n)
        packed = BitPacker(bits).pack(symbols)
        assert packed.tolist() == np.packbits(_to_bits(symbols, bits), bitorder="little").tolist()
        assert len(packed) == math.ceil(n * bits / 8)
        assert BitPacker(bits).unpack(packed, n).tolist() == symbols.tolist()


def test_load_refuses_a_corrupt_or_foreign_packed_file(tiny_problem, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = wq.export_plan([3] * len(tiny_problem.units), tiny_problem, tmp_path / "out")
    with safe_open(str(folder / PACKED_FILE), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    key = next(k for k in tensors if k.endswith(".w3_codes"))
    save_file({**tensors, key: tensors[key][:-5].clone()}, str(folder / PACKED_FILE), metadata=metadata)
    with pytest.raises(wq.ExportFormatError, match="w3_codes.*Export the plan again"):
        wq.load_quantized(folder)
    del tensors[key]
    save_file(tensors, str(folder / PACKED_FILE), metadata=metadata)
    with pytest.raises(wq.ExportFormatError, match="has no tensor"):
        wq.load_quantized(folder)
