import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the user's converted models (SmolLM2 takes a minute to convert), read before the cache moves
_USER_MODEL_CACHE = os.environ.get("WINDQUANT_MODEL_CACHE") or str(
    __import__("windquant_gym.paths", fromlist=["cache_root"]).cache_root() / "models"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's cache (one cache per test session, shared by its
    tests), except the converted models (slow to make: a test that needs SmolLM2 converts it
    there once, as any first use would)."""
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path_factory.getbasetemp() / "windquant-cache"))
    monkeypatch.setenv("WINDQUANT_MODEL_CACHE", _USER_MODEL_CACHE)
    # cli.run() (called in-process by some tests) would change malloc for the whole test session
    monkeypatch.setenv("WINDQUANT_KEEP_FREED_MEMORY", "0")


@pytest.fixture
def env(tiny_problem):
    """WindQuant-v0 on the session's tiny problem at 2.0 bits."""
    import gymnasium as gym

    environment = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.0)
    yield environment
    environment.close()


@pytest.fixture(scope="session")
def tiny():
    import windquant_gym as wq

    return wq.load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_problem(tiny, tmp_path_factory):
    import windquant_gym as wq

    model, tokenizer = tiny
    cache = tmp_path_factory.mktemp("cache")
    return wq.QuantProblem.build(
        model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48), n_samples=8, seq_len=64, cache=cache, progress=False
    )


@pytest.fixture(scope="session")
def tiny_asymmetric_problem(tiny, tmp_path_factory):
    """The tiny problem on the asymmetric grid (zero points at 2-4 bit; issue 26), with the refit."""
    import windquant_gym as wq

    model, tokenizer = tiny
    return wq.QuantProblem.build(
        model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48, grid="asymmetric", scale_refit="output"),
        n_samples=8, seq_len=64, cache=tmp_path_factory.mktemp("asym-cache"), progress=False,
    )


@pytest.fixture(params=["symmetric", "asymmetric"])
def grid_problem(request):
    """The tiny problem on each grid."""
    return request.getfixturevalue("tiny_problem" if request.param == "symmetric" else "tiny_asymmetric_problem")
