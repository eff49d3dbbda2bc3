"""Training with ``proxy_metric="kl"`` (preset ``cpu-quick-kv-kl``): the best plan kept, and the
plan returned at every target, are the lowest by the KL to the unquantized model, not by the
proxy perplexity, which a KL run still reports."""

import yaml

from windquant_gym.agents.callbacks import EpisodeRecorder
from windquant_gym.agents.hyperparams import load_hyperparams
from windquant_gym.agents.train import TrainArgs, train
from windquant_gym.plan import QuantPlan


def test_the_recorder_keeps_the_best_plan_by_the_envs_metric(tmp_path, tiny_problem):
    n = len(tiny_problem.units)
    info = {"target_bits": 2.0, "effective_bits": 2.0, "storage_bits": 2.4, "ppl_ratio": 2.0}
    low_ppl = {"proxy_ppl": 40.0, "proxy_kl": 0.9, "plan": [1] * n}
    low_kl = {"proxy_ppl": 45.0, "proxy_kl": 0.5, "plan": [2] * n}
    for metric, expected in (("kl", low_kl), ("nll", low_ppl)):
        (tmp_path / metric).mkdir()
        recorder = EpisodeRecorder(tmp_path / metric, tiny_problem, 2, progress=False)
        for episode, entry in enumerate((low_ppl, low_kl), start=1):
            recorder.consider({**info, **entry, "proxy_metric": metric}, episode)
        assert recorder.best[2.0]["plan"] == expected["plan"]
        saved = QuantPlan.load(tmp_path / metric / "best_plan_2.json")
        assert saved.metrics["proxy_metric"] == metric and saved.metrics["proxy_kl"] == expected["proxy_kl"]


def test_a_kl_training_run_returns_its_lowest_kl_plan_at_every_target(tmp_path):
    smoke = load_hyperparams("smoke")
    block = {**smoke, "env_kwargs": {**smoke["env_kwargs"], "proxy_metric": "kl"}}
    recipes = tmp_path / "kl.yml"
    recipes.write_text(yaml.safe_dump({"smoke-kl": block}))
    run = tmp_path / "run"
    summary = train(TrainArgs(model="tiny-llama", preset="smoke-kl", hyperparams=str(recipes), out=str(run), episodes=2,
                              progress=False))
    for target, candidates in summary["targets"].items():
        returned = candidates.pop("returned")
        kls = {name: values["proxy_kl"] for name, values in candidates.items()}
        assert set(kls) == {"policy (deterministic)", "best plan seen in training"}
        assert kls[returned] == min(kls.values()) > 0
        saved = QuantPlan.load(run / f"returned_plan_{target}.json")
        assert saved.metrics["proxy_metric"] == "kl" and saved.metrics["proxy_kl"] == kls[returned]
