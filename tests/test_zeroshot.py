"""Zero-shot evaluation through lm-eval-harness (optional extra ``zeroshot``), on a tiny local
multiple-choice task written into tmp_path: nothing is downloaded."""

import json
import random
import sys

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.errors import ConfigError, DataError, MissingDependencyError, UnknownNameError

N_CHOICES = 4


@pytest.fixture
def lm_eval(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("lm_eval")


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """What lm-eval's HFLM scores for a multiple-choice option: sum of log p(continuation | context)."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
    return float(sum(logp[len(ctx) + i - 1, token] for i, token in enumerate(cont)))


def _write_task(tmp_path, docs, name="tiny_mc", data_file=None):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data_file or data}\n"
        f"  cache_dir: {tmp_path / 'hf-datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return tasks


@pytest.fixture
def mc_task(tmp_path, tiny_problem, lm_eval):
    """16 questions whose label is the option the unquantized tiny model likes best (as lm-eval
    scores it), so the unquantized accuracy is 1 and a plan that changes the model shows."""
    rng = random.Random(0)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "milk", "salt", "rain", "fire"]
    docs = []
    for i in range(16):
        question = f"Question {i}: which word comes after {rng.choice(words)}?"
        choices = rng.sample(words, N_CHOICES)
        scores = [_loglikelihood(tiny_problem.model, tiny_problem.tokenizer, question, " " + c) for c in choices]
        docs.append({"question": question, "choices": choices, "label": int(np.argmax(scores))})
    return _write_task(tmp_path, docs)


def test_zero_shot_with_and_without_plan(tiny_problem, mc_task):
    from windquant_gym.harness.zeroshot import main_metric, zero_shot
    from windquant_gym.plan import QuantPlan

    model, tokenizer, table = tiny_problem.model, tiny_problem.tokenizer, tiny_problem.table
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    pad = tokenizer.pad_token_id

    plain = zero_shot(model, tokenizer, ["tiny_mc"], task_dirs=mc_task)
    again = zero_shot(model, tokenizer, "tiny_mc", task_dirs=str(mc_task), batch_size=3)
    n = len(table.units)
    int8 = zero_shot(model, tokenizer, ["tiny_mc"], plan=[1] * n, table=table, task_dirs=mc_task)
    binary = zero_shot(model, tokenizer, ["tiny_mc"], plan=QuantPlan.from_table(table, [6] * n), table=table,
                       task_dirs=mc_task, limit=12)

    for result in (plain, again, int8, binary):
        assert set(result) == {"tiny_mc"}
        metrics = result["tiny_mc"]
        assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics)
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert main_metric(metrics)[0] == "acc"
    assert plain["tiny_mc"]["acc"] == 1.0  # the labels are the unquantized model's own choices
    assert again == plain  # deterministic, whatever the batch size
    assert int8["tiny_mc"]["acc"] >= 0.9  # 8 bit barely moves the log-likelihoods
    assert binary["tiny_mc"]["acc"] < 1.0  # 1 bit everywhere does: the plan really was applied

    after = model.state_dict()
    assert set(after) == set(before)
    for key, tensor in after.items():
        assert torch.equal(tensor, before[key]), key
        assert tensor.data_ptr() == pointers[key], key
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert random.getstate() == python_state
    assert tokenizer.pad_token_id == pad and not model.training


def test_missing_lm_eval_names_the_extra(tiny, monkeypatch):
    from windquant_gym.harness.zeroshot import zero_shot

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    model, tokenizer = tiny
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[zeroshot\]"'):
        zero_shot(model, tokenizer, ["tiny_mc"])
    with pytest.raises(ImportError):  # still an ImportError for generic handlers
        zero_shot(model, tokenizer, ["tiny_mc"])


def test_bench_zero_shot_without_lm_eval_fails_before_building_the_env(monkeypatch, tmp_path):
    from windquant_gym.harness.bench import main as bench_main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingDependencyError, match="zeroshot"):
        bench_main(["--model", "no-such-model", "--zero-shot", "tiny_mc", "--json", str(tmp_path / "lb.json")])


def test_data_not_present_locally_is_a_data_error(tiny, tmp_path, lm_eval):
    from windquant_gym.harness.zeroshot import zero_shot

    tasks = _write_task(tmp_path, [], name="gone_mc", data_file=tmp_path / "absent.jsonl")
    model, tokenizer = tiny
    with pytest.raises(DataError, match="present locally") as info:
        zero_shot(model, tokenizer, ["gone_mc"], task_dirs=tasks)
    assert "HF_DATASETS_OFFLINE=1" in str(info.value) and "absent.jsonl" in str(info.value)


def test_bad_arguments(tiny, tmp_path, lm_eval):
    from windquant_gym.harness.zeroshot import zero_shot

    model, tokenizer = tiny
    with pytest.raises(ConfigError, match="table"):
        zero_shot(model, tokenizer, ["x"], plan=[0, 1])
    with pytest.raises(ConfigError, match="tasks"):
        zero_shot(model, tokenizer, [])
    with pytest.raises(ConfigError, match="batch_size"):
        zero_shot(model, tokenizer, ["x"], batch_size=0)
    with pytest.raises(ConfigError, match="do not exist"):
        zero_shot(model, tokenizer, ["x"], task_dirs=tmp_path / "nowhere")


def test_unknown_task_is_named(tiny, mc_task):
    from windquant_gym.harness.zeroshot import zero_shot

    model, tokenizer = tiny
    with pytest.raises(UnknownNameError, match="tiny_mcq") as info:
        zero_shot(model, tokenizer, ["tiny_mcq"], task_dirs=mc_task)
    assert "tiny_mc" in str(info.value)  # the close match


def test_bench_adds_zero_shot_columns(mc_task, tmp_path, capsys):
    from windquant_gym.harness.bench import main as bench_main

    out = tmp_path / "lb.json"
    assert bench_main(["--model", "tiny-llama", "--preset", "smoke", "--target-bits", "2.5", "--allocators", "uniform-2b",
                       "knapsack", "--eval-windows", "2", "--eval-seq-len", "64", "--zero-shot", "tiny_mc",
                       "--zero-shot-limit", "8", "--task-dir", str(mc_task), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["zero_shot"]["columns"] == ["tiny_mc/acc"]
    assert [row["allocator"] for row in data["leaderboard"]] == ["unquantized", "uniform-2b", "knapsack"]
    for row in data["leaderboard"]:
        assert 0.0 <= row["tiny_mc/acc"] <= 1.0
    assert out.with_suffix(".csv").read_text().splitlines()[0].endswith(",episodes,tiny_mc/acc")
    assert "tiny_mc/acc |" in out.with_suffix(".md").read_text()
    assert "tiny_mc/acc" in capsys.readouterr().out


def test_bench_zero_shot_options_need_the_flag(tmp_path):
    from windquant_gym.harness.bench import main as bench_main

    with pytest.raises(ConfigError, match="--zero-shot"):
        bench_main(["--task-dir", str(tmp_path), "--json", str(tmp_path / "lb.json")])


def test_a_head_that_config_calls_tied_keeps_its_own_tensor(mc_task, lm_eval):
    """lm-eval's HFLM calls model.tie_weights(): a model whose config says tied but whose head
    holds its own weights must get that head back, unchanged."""
    from windquant_gym.harness.zeroshot import zero_shot

    model, tokenizer = wq.load_model("tiny-llama")
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() * 0.5)  # untied in memory
    model.config.tie_word_embeddings = True
    own = head.weight
    saved = own.detach().clone()
    zero_shot(model, tokenizer, ["tiny_mc"], task_dirs=mc_task, limit=2)
    assert model.get_output_embeddings().weight is own and torch.equal(own, saved)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
