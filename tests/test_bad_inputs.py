"""Bad input gets a named error that states the offending value and how to fix it.

One test per case: each checks the exception class (a :class:`windquant_gym.WindQuantError`
subclass that also subclasses the matching builtin) and that the message names the value
and hints at the fix. Nothing here builds more than a tiny table.
"""

import copy
import json

import gymnasium as gym
import pytest
import torch
import torch.nn as nn

import windquant_gym as wq
from _helpers import random_hessians
import windquant_gym.problem as problem_module
import windquant_gym.quant.build as table_module
from windquant_gym.agents import load_hyperparams
from windquant_gym.plan import QuantPlan

SMALL = dict(n_calibration_samples=2, calibration_seq_len=32, chunk_size=64, progress=False, cache=False)


def message(excinfo) -> str:
    return str(excinfo.value)


def assert_says(excinfo, *fragments):
    text = message(excinfo)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def ones_scales(model, chunk_size: int = 64):
    """Activation scales of 1 for every module: enough for a table build to reach its checks."""
    return {u.module: torch.ones(u.in_features) for u in wq.find_units(model, chunk_size)}


def uncached_table(model, scales=None, config=wq.QuantConfig(chunk_size=64)):
    return wq.build_table(model, ones_scales(model, config.chunk_size) if scales is None else scales, config,
                          hessians=random_hessians(model, config.chunk_size), cache=False, progress=False)


@pytest.fixture
def fresh_tiny(tiny):
    """A private copy of the tiny model, safe to corrupt."""
    return copy.deepcopy(tiny[0]), tiny[1]


def refuse_calibration(monkeypatch):
    """Make calibrating or fitting a table fail loudly: a check must fire before either."""

    def refuse(*args, **kwargs):
        raise AssertionError("bad weights reached calibration or the table fit")

    monkeypatch.setattr(problem_module, "_cached_calibration", refuse)
    monkeypatch.setattr(problem_module, "calibrate", refuse)
    monkeypatch.setattr(table_module, "_fit_all", refuse)


class ConvBlock(nn.Module):
    """A decoder block without nn.Linear (GPT-2 style: Conv1d projections)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv1d(8, 8, 1)
        self.norm = nn.LayerNorm(8)


class NoLinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([ConvBlock(), ConvBlock()])
        self.head = nn.Linear(8, 10)  # outside the blocks: does not count


# ----- target bits ----------------------------------------------------------------------------


def test_target_bits_above_16_via_gym_make(tiny_problem):
    with pytest.raises(wq.ConfigError) as excinfo:
        gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=20)
    assert_says(excinfo, "got 20", "[1, 16]")
    assert isinstance(excinfo.value, ValueError)


def test_target_bits_below_1_via_set_target_bits(env):
    with pytest.raises(wq.ConfigError) as excinfo:
        env.unwrapped.set_target_bits(0.5)
    assert_says(excinfo, "got 0.5", "[1, 16]")
    assert env.unwrapped.target_bits == 2.0  # the refused value was not taken


def test_target_bits_nan(env):
    with pytest.raises(wq.ConfigError) as excinfo:
        env.unwrapped.set_target_bits(float("nan"))
    assert_says(excinfo, "nan", "[1, 16]")


def test_target_bits_via_reset_options(env):
    with pytest.raises(wq.ConfigError) as excinfo:
        env.reset(options={"target_bits": 17})
    assert_says(excinfo, "17", "[1, 16]")


def test_target_bits_below_what_the_precision_rules_allow(tiny_problem):
    rules = wq.PrecisionRules(early_layers=1, early_min_bits=3.0, attention_min_bits=2.0)
    with pytest.raises(wq.ConfigError) as excinfo:
        gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=1.2, precision_rules=rules)
    assert_says(excinfo, "target_bits=1.2", "below", "raise target_bits or relax precision_rules")


@pytest.mark.parametrize("bad", ["abc", None])
def test_target_bits_not_a_number(env, bad):
    with pytest.raises(wq.ConfigError) as excinfo:
        env.unwrapped.set_target_bits(bad)
    assert_says(excinfo, repr(bad), "[1, 16]")


def test_target_bits_out_of_range_is_refused_before_the_table_is_built(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(wq.QuantProblem, "build", lambda *a, **k: pytest.fail("built a table for a bad target"))
    with pytest.raises(wq.ConfigError, match="got 20"):
        gym.make("WindQuant-v0", model=model, tokenizer=tokenizer, target_bits=20)


# ----- QuantConfig: chunk size and salient rate ------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 2.5, "256", True], ids=["zero", "negative", "float", "str", "bool"])
def test_chunk_size_below_1_or_not_an_integer(bad):
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.QuantConfig(chunk_size=bad)
    assert_says(excinfo, f"got {bad!r}", "positive integer", "256")


def test_chunk_size_numpy_integer_is_accepted():
    import numpy as np

    config = wq.QuantConfig(chunk_size=np.int64(64))
    assert config.chunk_size == 64 and type(config.chunk_size) is int


def test_chunk_size_below_1_via_gym_make(tiny):
    with pytest.raises(wq.ConfigError) as excinfo:
        gym.make("WindQuant-v0", model=tiny[0], tokenizer=tiny[1], **{**SMALL, "chunk_size": 0})
    assert_says(excinfo, "chunk_size", "got 0", "256")


def test_chunk_size_below_1_in_find_units(tiny):
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.find_units(tiny[0], chunk_size=-1)
    assert_says(excinfo, "chunk_size", "got -1", "256")


@pytest.mark.parametrize(
    "bad", [0.5, 0.9, -0.1, float("nan"), None, "abc"], ids=["half", "0.9", "negative", "nan", "none", "str"]
)
def test_salient_rate_outside_0_to_half(bad):
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.QuantConfig(salient_rate=bad)
    assert_says(excinfo, f"got {bad!r}", "[0, 0.5)", "0.03")


def test_salient_rate_outside_range_via_gym_make(tiny):
    with pytest.raises(wq.ConfigError) as excinfo:
        gym.make("WindQuant-v0", model=tiny[0], tokenizer=tiny[1], **{**SMALL, "salient_rate": 0.7})
    assert_says(excinfo, "salient_rate", "got 0.7", "[0, 0.5)")


def test_fit_lr_not_a_number():
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.QuantConfig(fit_lr=None)
    assert_says(excinfo, "fit_lr", "got None", "0.1")


def test_fallback_thresholds_not_a_sequence():
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.QuantConfig(fallback_thresholds=None)
    assert_says(excinfo, "got None", "math.inf")


def test_precision_rule_bits_not_a_number():
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.PrecisionRules(early_min_bits="x")
    assert_says(excinfo, "early_min_bits", "'x'", "[1, 16]")


# ----- model structure and tokenizer -----------------------------------------------------------


def test_model_without_linear_layers_in_its_blocks():
    with pytest.raises(wq.ModelStructureError) as excinfo:
        wq.find_units(NoLinearModel(), chunk_size=4)
    assert_says(excinfo, "NoLinearModel", "'layers'", "Conv1d", "nn.Linear", "pass a Hugging Face causal LM")
    assert isinstance(excinfo.value, ValueError)


def test_model_without_linear_layers_via_gym_make(tiny):
    with pytest.raises(wq.ModelStructureError) as excinfo:
        gym.make("WindQuant-v0", model=NoLinearModel(), tokenizer=tiny[1], **SMALL)
    assert_says(excinfo, "NoLinearModel", "nn.Linear")


def test_module_model_without_tokenizer_via_gym_make(tiny):
    with pytest.raises(wq.ConfigError) as excinfo:
        gym.make("WindQuant-v0", model=tiny[0])
    assert_says(excinfo, "no tokenizer", "tokenizer=", "model='smollm2-135m'")


def test_module_model_without_tokenizer_in_problem_build(tiny, monkeypatch):
    refuse_calibration(monkeypatch)
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.QuantProblem.build(tiny[0], None, ["text " * 500], n_samples=2, seq_len=32, cache=False, progress=False)
    assert_says(excinfo, "LlamaForCausalLM", "no tokenizer", "load_model returns both")


# ----- calibration text --------------------------------------------------------------------------


def test_calibration_text_empty_list(tiny):
    with pytest.raises(wq.DataError) as excinfo:
        wq.QuantProblem.build(tiny[0], tiny[1], [], n_samples=2, seq_len=32, cache=False, progress=False)
    assert_says(excinfo, "empty", "0 documents", "wiki-sample")


def test_calibration_text_all_blank(tiny):
    with pytest.raises(wq.DataError) as excinfo:
        wq.sample_token_blocks(["", "   \n"], tiny[1], n_samples=2, seq_len=32)
    assert_says(excinfo, "empty", "2 documents", "wiki-sample")


def test_calibration_text_too_short_for_one_block(tiny):
    with pytest.raises(wq.DataError) as excinfo:
        gym.make("WindQuant-v0", model=tiny[0], tokenizer=tiny[1], calibration=["hello"], **SMALL)
    assert_says(excinfo, "6 tokens", "0 blocks of 32", "fewer than the 2 requested", "Give more text")


def test_calibration_block_count_below_1(tiny):
    with pytest.raises(wq.DataError) as excinfo:
        wq.sample_token_blocks(["text " * 100], tiny[1], n_samples=0, seq_len=32)
    assert_says(excinfo, "0 x 32", "64 x 256")


def test_calibration_texts_none(tiny):
    with pytest.raises(wq.DataError) as excinfo:
        wq.QuantProblem.build(tiny[0], tiny[1], None, n_samples=2, seq_len=32, cache=False, progress=False)
    assert_says(excinfo, "NoneType", "list of str")


def test_calibration_texts_not_strings(tiny):
    with pytest.raises(wq.DataError) as excinfo:
        wq.sample_token_blocks([b"bytes", 3], tiny[1], n_samples=1, seq_len=2)
    assert_says(excinfo, "document 0", "bytes", "Convert them to str")


def test_calibration_text_given_as_one_string_to_sampler(tiny):
    with pytest.raises(wq.DataError) as excinfo:
        wq.sample_token_blocks("one long string " * 50, tiny[1], n_samples=1, seq_len=8)
    assert_says(excinfo, "one str", "[text]")


def test_empty_corpus_name_does_not_read_the_working_directory():
    with pytest.raises(wq.DataError) as excinfo:
        wq.load_texts("")
    assert_says(excinfo, "empty", "''", "wiki-sample")


def test_empty_corpus_file(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(wq.DataError) as excinfo:
        wq.load_texts(str(tmp_path / "blank.txt"))
    assert_says(excinfo, "blank.txt", "holds no text")


# ----- non-finite weights: refused before calibration and table build ------------------------


def test_nan_weight_refused_before_calibration(fresh_tiny, monkeypatch):
    model, tokenizer = fresh_tiny
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    refuse_calibration(monkeypatch)
    with pytest.raises(wq.ModelStructureError) as excinfo:
        wq.QuantProblem.build(model, tokenizer, ["text " * 500], n_samples=2, seq_len=32, cache=False, progress=False)
    assert_says(excinfo, "'model.layers.1.mlp.up_proj'", "1 NaN", "row 3, column 5", "Reload the checkpoint")


def test_inf_weight_refused_before_table_build(fresh_tiny, monkeypatch):
    model, _ = fresh_tiny
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = -float("inf")
    refuse_calibration(monkeypatch)
    with pytest.raises(wq.ModelStructureError) as excinfo:
        uncached_table(model)
    assert_says(excinfo, "'model.layers.0.self_attn.k_proj'", "1 Inf", "-inf")


def test_nan_weight_refused_via_gym_make(fresh_tiny, monkeypatch):
    model, tokenizer = fresh_tiny
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 7] = float("nan")
    refuse_calibration(monkeypatch)
    with pytest.raises(wq.ModelStructureError) as excinfo:
        gym.make("WindQuant-v0", model=model, tokenizer=tokenizer, **SMALL)
    assert_says(excinfo, "'model.layers.0.mlp.down_proj'", "128 NaN")


def test_weights_beyond_fp16_range_refused(fresh_tiny, monkeypatch):
    model, _ = fresh_tiny
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 2] = 1e6
    refuse_calibration(monkeypatch)
    with pytest.raises(wq.ModelStructureError) as excinfo:
        uncached_table(model, config=wq.QuantConfig())
    assert_says(excinfo, "'model.layers.1.self_attn.o_proj'", "1e+06", "65504")


def test_activation_scales_of_another_model(tiny, monkeypatch):
    model, _ = tiny
    scales = {name: torch.ones(7) for name in ones_scales(model)}
    refuse_calibration(monkeypatch)
    with pytest.raises(wq.TableMismatchError) as excinfo:
        uncached_table(model, scales)
    assert_says(excinfo, "shape (7,)", "128 input features", "run calibrate()")


def test_activation_scales_not_finite(tiny, monkeypatch):
    model, _ = tiny
    scales = ones_scales(model)
    last = list(scales)[-1]
    scales[last] = torch.full_like(scales[last], float("inf"))
    refuse_calibration(monkeypatch)
    with pytest.raises(wq.DataError) as excinfo:
        uncached_table(model, scales)
    assert_says(excinfo, last, "inf", "Calibrate in float32")


# ----- unknown names ---------------------------------------------------------------------------


def test_unknown_hyperparameter_preset():
    with pytest.raises(wq.UnknownNameError) as excinfo:
        load_hyperparams("fast")
    assert_says(excinfo, "'fast'", "'cpu'", "'smoke'", "'WindQuant-v0'", "--preset")
    assert isinstance(excinfo.value, KeyError)


def test_unknown_corpus_name():
    with pytest.raises(wq.UnknownNameError) as excinfo:
        wq.load_texts("wikitext")
    assert_says(excinfo, "'wikitext'", "wiki-sample", "python-docs", "list of strings")


def test_unknown_model_name():
    with pytest.raises(wq.UnknownNameError) as excinfo:
        wq.load_model("llama-7b")
    assert_says(excinfo, "'llama-7b'", "smollm2-135m", "tiny-llama")


@pytest.mark.parametrize("device", ["tpu", "gpu0"])
def test_unknown_device(device):
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.load_model("tiny-llama", device=device)
    assert_says(excinfo, repr(device), "'cpu'", "'auto'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda():
    with pytest.raises(wq.ConfigError) as excinfo:
        wq.load_model("tiny-llama", device="cuda")
    assert_says(excinfo, "device='cuda'", "not available", "device='cpu'")


# ----- plans -------------------------------------------------------------------------------------


class LinearBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16, bias=False)
        self.mlp = nn.Linear(16, 24, bias=False)


class SmallModel(nn.Module):
    """Another model: a few Linear blocks, so its table builds in milliseconds."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.layers = nn.ModuleList([LinearBlock(), LinearBlock()])


def small_table(config):
    return uncached_table(SmallModel(), config=config)


@pytest.fixture(scope="module")
def other_model_table(tiny_problem):
    """Another model's table, with the tiny_problem's own quant config."""
    return small_table(tiny_problem.table.config)


@pytest.fixture(scope="module")
def other_config_table():
    return small_table(wq.QuantConfig(chunk_size=64, fit_steps=1))


def test_plan_for_another_config(tiny_problem, other_config_table):
    plan = QuantPlan.from_table(other_config_table, [2] * len(other_config_table.units), "small-model")
    with pytest.raises(wq.TableMismatchError) as excinfo:
        plan.check(tiny_problem.table)
    assert_says(excinfo, "'small-model'", "chunk_size: plan 64, table 48", "fit_steps: plan 1, table 10",
                "Rebuild the env with the plan's quant config")


def test_plan_for_another_model(tiny_problem, other_model_table):
    plan = QuantPlan.from_table(other_model_table, [2] * len(other_model_table.units), "small-model")
    with pytest.raises(wq.TableMismatchError) as excinfo:
        plan.check(tiny_problem.table)
    assert_says(excinfo, other_model_table.fingerprint, tiny_problem.table.fingerprint, "another model",
                "Use the model, the preset (its quant_config), the calibration and the windquant-gym version")


def test_plan_with_wrong_length(tiny_problem):
    with pytest.raises(wq.TableMismatchError) as excinfo:
        tiny_problem.table.check_plan([2, 2, 2])
    assert_says(excinfo, f"{len(tiny_problem.units)} for this table", "(3,)")


def test_plan_with_bit_widths_instead_of_action_indices(tiny_problem):
    with pytest.raises(wq.TableMismatchError) as excinfo:
        tiny_problem.table.plan_bits([16] * len(tiny_problem.units))
    assert_says(excinfo, "got 16..16", "[0, 6]", "not bit widths")


@pytest.mark.parametrize("bad", [2.5, float("nan")], ids=["fraction", "nan"])
def test_plan_with_non_integer_actions(tiny_problem, bad):
    n = len(tiny_problem.units)
    with pytest.raises(wq.TableMismatchError) as excinfo:
        tiny_problem.table.plan_bits([2] * (n - 1) + [bad])
    assert_says(excinfo, f"unit {n - 1}", repr(bad), "integer action indices")


def test_plan_file_that_is_not_a_plan(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(wq.TableMismatchError) as excinfo:
        QuantPlan.load(path)
    assert_says(excinfo, "plan.json", "not a plan file", "QuantPlan.save")
    path.write_text(json.dumps({"schema": 1, "actions": [1, 2]}))
    with pytest.raises(wq.TableMismatchError) as excinfo:
        QuantPlan.load(path)
    assert_says(excinfo, "table_fingerprint", "quant_config")


def test_every_named_error_is_a_windquant_error_and_a_builtin():
    pairs = [
        (wq.ConfigError, ValueError), (wq.DataError, ValueError), (wq.ModelStructureError, ValueError),
        (wq.TableMismatchError, ValueError), (wq.UnknownNameError, KeyError), (wq.MissingDependencyError, ImportError),
    ]
    for error, builtin in pairs:
        assert issubclass(error, wq.WindQuantError) and issubclass(error, builtin)
    assert str(wq.UnknownNameError("plain text")) == "plain text"  # not KeyError's repr
