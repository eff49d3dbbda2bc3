import dataclasses
import json

import pytest
import torch

import windquant_gym as wq
from windquant_gym.errors import ConfigError, DataError, UnknownNameError


def test_wiki_sample_splits_are_disjoint_and_cover_the_corpus():
    calibration = wq.load_texts("wiki-sample", split="calibration")
    held_out = wq.load_texts("wiki-sample", split="eval")
    everything = wq.load_texts("wiki-sample", split="all")
    assert len(calibration) > 60 and len(held_out) > 15
    assert not set(calibration) & set(held_out)
    assert sorted(calibration + held_out) == sorted(everything)
    assert "'''" not in everything[0]  # wiki markup stripped


def test_sampler_is_seeded_and_blocks_are_distinct_windows(tiny):
    _, tokenizer = tiny
    texts = ["alpha beta gamma " * 200, "delta epsilon " * 300]
    a = wq.sample_token_blocks(texts, tokenizer, n_samples=6, seq_len=32, seed=3)
    b = wq.sample_token_blocks(texts, tokenizer, n_samples=6, seq_len=32, seed=3)
    c = wq.sample_token_blocks(texts, tokenizer, n_samples=6, seq_len=32, seed=4)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = wq.data.token_stream(texts, tokenizer)
    starts = []
    for block in a:
        hits = [i for i in range(0, len(stream) - 31, 32) if torch.equal(stream[i : i + 32], block)]
        assert hits
        starts.append(hits[0])
    assert len(set(starts)) == 6


def test_too_little_text_gets_a_data_error(tiny):
    _, tokenizer = tiny
    with pytest.raises(DataError, match="fewer than the 4 requested"):
        wq.sample_token_blocks(["short text"], tokenizer, n_samples=4, seq_len=64)


def test_local_file_folder_and_unknown_names(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"Paragraph {i}. " + "words " * 100 for i in range(30)))
    docs = wq.load_texts(str(path), split="all")
    assert len(docs) > 3 and "Paragraph 0." in docs[0]
    assert set(wq.load_texts(str(path), "calibration")).isdisjoint(wq.load_texts(str(path), "eval"))
    assert wq.load_texts(str(tmp_path), split="all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text"):
        wq.load_texts(str(tmp_path / "empty"))
    with pytest.raises(UnknownNameError, match="wiki-sample"):
        wq.load_texts("no-such-corpus")
    with pytest.raises(DataError, match="split"):
        wq.load_texts("wiki-sample", split="train")


def test_tiny_llama_is_deterministic_and_offline():
    a, tok = wq.load_model("tiny-llama")
    b, _ = wq.load_model("tiny-llama")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"


def test_unknown_model_name_lists_the_presets():
    with pytest.raises(UnknownNameError, match="smollm2-135m"):
        wq.load_model("not-a-model")


def test_config_json_round_trip_and_validation():
    config = wq.QuantConfig(chunk_size=64, salient_rate=0.02, fit_loss="plain")
    again = wq.QuantConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["fallback_thresholds"][0] == "inf"
    with pytest.raises(dataclasses_frozen_error()):
        config.chunk_size = 3
    for bad, match in [
        (dict(chunk_size=0), "chunk_size"),
        (dict(salient_rate=0.5), "salient_rate"),
        (dict(salient_rate=-0.1), "salient_rate"),
        (dict(fit_steps=-1), "fit_steps"),
        (dict(fit_loss="kl"), "fit_loss"),
        (dict(fallback_thresholds=(1.0,) * 7), "fallback_thresholds"),
    ]:
        with pytest.raises(ConfigError, match=match):
            wq.QuantConfig(**bad)
    with pytest.raises(ConfigError, match="Unknown QuantConfig fields"):
        wq.QuantConfig.from_dict({"chunk": 3})


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_problem_spec_round_trip_and_rebuild(tiny_problem, tmp_path, monkeypatch):
    from windquant_gym.plan import QuantPlan
    from windquant_gym.problem import ProblemSpec

    spec = tiny_problem.spec
    assert (spec.model, spec.calibration, spec.seed, spec.n_samples, spec.seq_len) == (None, "wiki-sample", 0, 8, 64)
    assert ProblemSpec.from_dict(spec.to_dict()) == spec
    named = dataclasses.replace(spec, model="tiny-llama")
    plan = dataclasses.replace(QuantPlan.from_problem(tiny_problem, [3] * len(tiny_problem.units)), problem=named)
    loaded = QuantPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and loaded.problem == named
    assert "quant_config" not in json.loads((tmp_path / "plan.json").read_text())["problem"]  # stored once
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    rebuilt = loaded.problem_spec().build(progress=False)
    assert rebuilt.table.fingerprint == tiny_problem.table.fingerprint and rebuilt.spec == named
    # A module model is not named in its spec: rebuilding asks for a name.
    with pytest.raises(wq.ConfigError, match="--model"):
        spec.build()
    assert dataclasses.replace(loaded, problem=spec).problem_spec(model="tiny-llama").model == "tiny-llama"
    # A plan of an older version records no problem: the error says what to give instead.
    with pytest.raises(wq.ConfigError, match="--preset"):
        dataclasses.replace(loaded, problem=None).problem_spec()
    with pytest.raises(wq.ConfigError, match="n_samples"):
        ProblemSpec("tiny-llama", "wiki-sample", 0, 0, 64, spec.quant_config)
    with pytest.raises(wq.ConfigError, match="Unknown ProblemSpec fields"):
        ProblemSpec.from_dict({**spec.to_dict(), "tokens": 5})
    broken = json.loads((tmp_path / "plan.json").read_text())
    broken["problem"]["seed"] = -1
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(wq.TableMismatchError, match="'problem' entry is malformed"):
        QuantPlan.load(tmp_path / "broken.json")


def test_load_model_without_progress_hides_transformers_bars_and_restores_them(monkeypatch, capsys):
    from transformers.utils import logging as hf_logging

    from windquant_gym.models import loading

    def bar():
        list(hf_logging.tqdm(range(3), desc="Loading weights"))
        return capsys.readouterr().err

    seen = []

    def probe(dtype):  # a preset that records whether transformers' bars were on while it loaded
        seen.append(hf_logging.is_progress_bar_enabled())
        return loading.PRESETS["tiny-llama"](dtype)

    monkeypatch.setitem(loading.PRESETS, "probe", probe)
    wq.load_model("probe", progress=False)
    wq.load_model("probe")
    assert seen == [False, True] and hf_logging.is_progress_bar_enabled()
    assert "Loading weights" in bar()
    with pytest.raises(RuntimeError), loading._transformers_bars(False):
        assert "Loading weights" not in bar()
        raise RuntimeError("a failed load")
    assert hf_logging.is_progress_bar_enabled()  # restored, also on errors
    hf_logging.disable_progress_bar()  # a user who turned them off keeps them off
    try:
        with loading._transformers_bars(False):
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
