"""The Fisher sensitivity of each quantized module (eval/sensitivity.py) and the calibrated
knapsack that weights the table's errors by it (``calibrated-knapsack-fisher``)."""

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.allocators.calibrated_knapsack import (CALIBRATED_KNAPSACKS, CalibratedKnapsack, calibrated_knapsack,
                                                         unit_sensitivity)
from windquant_gym.errors import ConfigError
from windquant_gym.eval.sensitivity import fisher_sensitivity
from windquant_gym.quant.units import module_names


def _summed_kl(model, blocks, reference_logp, module=None, noise_std=0.0, seed=0):
    """Summed next-token KL to ``reference_logp`` with Gaussian noise of ``noise_std`` added to
    ``module``'s output."""
    generator = torch.Generator().manual_seed(seed)
    handle = None
    if module is not None:
        handle = model.get_submodule(module).register_forward_hook(
            lambda m, i, out: out + noise_std * torch.randn(out.shape, generator=generator))
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(blocks).logits.float(), dim=-1)
    finally:
        if handle is not None:
            handle.remove()
    return float((reference_logp.exp() * (reference_logp - logp)).sum())


def test_sensitivity_predicts_the_divergence_that_output_noise_causes(tiny_problem):
    """S_m * e / 2 is the KL growth (summed over positions) an output error of relative size e
    causes: checked against noise injected into each module's output, measured by the model."""
    model, blocks = tiny_problem.model, tiny_problem.blocks[:4]
    modules = module_names(tiny_problem.units)
    sensitivity = fisher_sensitivity(model, modules, blocks, label_samples=32, seed=0)
    with torch.no_grad():
        reference = torch.log_softmax(model(blocks).logits.float(), dim=-1)
    outputs = {}
    handles = [model.get_submodule(m).register_forward_hook(lambda mod, i, out, m=m: outputs.__setitem__(m, out.detach()))
               for m in modules]
    with torch.no_grad():
        model(blocks)
    for h in handles:
        h.remove()
    relative = 1e-3  # small: the second-order term dominates (measured: rank correlation 0.996, ratio 0.98)
    predicted, measured = [], []
    for m in modules:
        std = float((relative * outputs[m].pow(2).mean()).sqrt())
        kl = np.mean([_summed_kl(model, blocks, reference, m, std, seed) for seed in range(4)])
        # the fisher was measured on the whole blocks, the noise on these 4: same blocks here
        predicted.append(0.5 * relative * sensitivity[m])
        measured.append(kl)
    predicted, measured = np.array(predicted), np.array(measured)
    ranks = lambda x: np.argsort(np.argsort(x))
    rank_correlation = np.corrcoef(ranks(predicted), ranks(measured))[0, 1]
    assert rank_correlation > 0.9, (rank_correlation, predicted, measured)
    ratio = predicted.sum() / measured.sum()
    assert 0.7 < ratio < 1.4, (ratio, predicted, measured)


def test_sensitivity_leaves_the_model_as_it_was(tiny_problem):
    model = tiny_problem.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    first = fisher_sensitivity(model, module_names(tiny_problem.units), tiny_problem.blocks, seed=3)
    again = fisher_sensitivity(model, module_names(tiny_problem.units), tiny_problem.blocks, seed=3)
    assert first == again  # the label draws are seeded
    assert all(v > 0 and np.isfinite(v) for v in first.values())
    assert set(first) == set(module_names(tiny_problem.units))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is grads[n] and p.requires_grad == flags[n]
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


def test_sensitivity_of_a_frozen_model_leaves_it_frozen(tiny_problem):
    """A model whose parameters require no gradient (frozen for inference) is measured the same,
    and stays frozen; a forward pass that fails leaves no hook behind."""
    model, modules = tiny_problem.model, module_names(tiny_problem.units)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    free = fisher_sensitivity(model, modules, tiny_problem.blocks, seed=1)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    try:
        model.requires_grad_(False)
        frozen = fisher_sensitivity(model, modules, tiny_problem.blocks, seed=1)
        assert all(not p.requires_grad for p in model.parameters())
        with pytest.raises(Exception):
            fisher_sensitivity(model, modules, tiny_problem.blocks + 10**9, seed=1)  # token ids past the vocabulary
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    assert frozen == pytest.approx(free, rel=1e-5)


def test_sensitivity_refuses_bad_input(tiny_problem):
    model, modules = tiny_problem.model, module_names(tiny_problem.units)
    with pytest.raises(ConfigError, match="label_samples must be a positive integer"):
        fisher_sensitivity(model, modules, tiny_problem.blocks, label_samples=0)
    with pytest.raises(ConfigError, match=r"\[n, seq_len\]"):
        fisher_sensitivity(model, modules, tiny_problem.blocks[0])
    with pytest.raises(ConfigError, match="not nn.Linear modules"):
        fisher_sensitivity(model, ["model.nope"], tiny_problem.blocks)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        fisher_sensitivity(model, modules, tiny_problem.blocks, batch_size=0)
    with pytest.raises(ConfigError, match="proxy_dtype|float16|bfloat16"):
        fisher_sensitivity(model, modules, tiny_problem.blocks, dtype="float8")


def test_sensitivity_in_bf16_ranks_modules_as_float32_does(tiny_problem):
    """The bf16 measurement (what a bf16 proxy's problem uses) is the float32 one up to rounding:
    the same labels are drawn where the rounded probabilities allow, so modules rank alike."""
    model, modules = tiny_problem.model, module_names(tiny_problem.units)
    full = fisher_sensitivity(model, modules, tiny_problem.blocks, dtype="float32")
    half = fisher_sensitivity(model, modules, tiny_problem.blocks, dtype="bfloat16")
    a, b = np.array([full[m] for m in modules]), np.array([half[m] for m in modules])
    ranks = lambda x: np.argsort(np.argsort(x))
    assert np.corrcoef(ranks(a), ranks(b))[0, 1] > 0.9
    assert np.median(np.abs(a - b) / a) < 0.1


def test_problem_measures_sensitivity_once_on_the_statistics_set(tiny, tmp_path, monkeypatch):
    """With a statistics set (hessian_blocks > 0) the problem keeps its blocks and measures there;
    the result is kept, so a second call costs nothing."""
    import windquant_gym.problem as problem_module

    model, tokenizer = tiny
    problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48, hessian_blocks=6,
                                    hessian_seq_len=32), n_samples=4, seq_len=32, cache=tmp_path, progress=False)
    assert problem.statistics_blocks is not None and tuple(problem.statistics_blocks.shape) == (6, 32)
    seen = []

    def counting(model, modules, blocks, **kwargs):
        seen.append(blocks)
        return {m: 1.0 for m in modules}

    monkeypatch.setattr(problem_module, "fisher_sensitivity", counting)
    problem.module_sensitivity()
    problem.module_sensitivity()
    assert len(seen) == 1 and torch.equal(seen[0], problem.statistics_blocks)


def test_fisher_knapsack_is_the_kv_knapsack_when_every_module_is_equally_sensitive(tiny_problem, monkeypatch):
    import gymnasium as gym

    env = gym.make("WindQuant-v0", model=tiny_problem.model, problem=tiny_problem, target_bits=2.5).unwrapped
    scales = {"first": 2.0, "last": 1.0, "keys-values": 0.5}
    fisher, kv = calibrated_knapsack("calibrated-knapsack-fisher"), calibrated_knapsack("calibrated-knapsack-kv")
    assert CALIBRATED_KNAPSACKS["calibrated-knapsack-fisher"].groups == CALIBRATED_KNAPSACKS["calibrated-knapsack-kv"].groups
    measured = tiny_problem.module_sensitivity()
    weights = unit_sensitivity(tiny_problem, env.units)
    assert weights.mean() == pytest.approx(1.0) and weights.std() > 0.1  # the tiny model's modules differ
    # differently sensitive modules move bits: the plans differ, at the same budget
    plan_f, plan_kv = fisher.plan_at(env, 2.5, scales), kv.plan_at(env, 2.5, scales)
    assert not np.array_equal(plan_f, plan_kv)
    for plan in (plan_f, plan_kv):
        assert env.table.plan_bits(plan)["effective_bits"] <= 2.5 + 1e-9
    # the measured-sensitive units keep more bits under the fisher weighting
    bits = env.table.unit_effective_bits / env.table.n_weights[:, None]
    rows = np.arange(len(plan_f))
    top = weights >= np.quantile(weights, 0.75)
    assert bits[rows, plan_f][top].mean() > bits[rows, plan_kv][top].mean()
    # equal sensitivities everywhere: the same plan as the table's errors
    monkeypatch.setattr(tiny_problem, "module_sensitivity", lambda label_samples=2, seed=0, progress=False: {m: 3.0 for m in measured})
    assert np.array_equal(fisher.plan_at(env, 2.5, scales), plan_kv)
    env.close()


def test_calibrated_knapsack_refuses_an_unknown_sensitivity():
    with pytest.raises(ConfigError, match="sensitivity must be one of"):
        CalibratedKnapsack(sensitivity="hessian")


def test_training_warm_starts_on_the_fisher_teacher(tmp_path, monkeypatch):
    """The teacher's sensitivities are measured once, timed apart from its 10 proxy passes."""
    from windquant_gym.agents.hyperparams import load_hyperparams
    from windquant_gym.agents.train import TrainArgs, train

    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    warm_start = {**load_hyperparams("smoke")["warm_start"], "demonstrations": "calibrated-knapsack-fisher"}
    summary = train(TrainArgs(model="tiny-llama", preset="smoke", out=str(tmp_path / "run"), episodes=2, target_bits=2.5,
                              progress=False, overrides={"warm_start": warm_start}))
    warm = summary["warm_start"]
    assert warm["demonstrations"] == "calibrated-knapsack-fisher" and warm["sensitivity_seconds"] > 0
    assert set(warm["scales"]) == {"first", "last", "keys-values"}
    assert warm["calibration_evaluations"] == 10 and warm["evaluations"] == 11  # no proxy pass for the sensitivities


def test_fisher_study_pairs_rule_seeds_runs_and_searches_by_seed(tmp_path):
    """benchmarks/fisher_study.py reads the rule's label seeds from seeds/fisher_sS_T.json, runs by folder,
    searches by seed, and refuses files measured on other windows."""
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    base = np.random.default_rng(0).normal(4.0, 0.3, 40)
    fisher, xeon = tmp_path / "fisher" / "replay", tmp_path / "xeon"
    (xeon / "search").mkdir(parents=True)
    fisher.mkdir(parents=True)

    def row(allocator, shift, **extra):
        return {"allocator": allocator, "target_bits": 2.0, "heldout_window_nll": (base + shift).tolist(), **extra}

    unquantized = {"allocator": "unquantized", "heldout_window_nll": (base - 1).tolist()}
    for target in ("2", "2.5", "3"):
        (fisher / f"replay_{target}.json").write_text(json.dumps({"episodes": [
            unquantized, row("calibrated-knapsack", 0.3),
            row(f"plan:fisher_s0_{target}.json", 0.1, plan_file=f"../seeds/fisher_s0_{target}.json"),
            row(f"plan:returned_plan_{target}.json", 0.2, plan_file=f"../runs/cpu-quick-fisher_s0/returned_plan_{target}.json")]}))
        (xeon / f"replay_xeon_{target}.json").write_text(json.dumps({"episodes": [
            unquantized, row(f"plan:returned_plan_{target}.json", 0.25, plan_file=f"cpu-quick-kv_s0/returned_plan_{target}.json")]}))
        (xeon / "search" / f"search_kv_xeon_{float(target):.1f}.json").write_text(json.dumps({"episodes": [
            unquantized, row("search-nll (from calibrated-knapsack-kv)", 0.15, seed=0)]}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fisher_study.py"
    done = subprocess.run([sys.executable, str(script), str(fisher), str(xeon)], capture_output=True, text=True, check=True)
    first = done.stdout.split("\n\n")[1]  # the 2.0-bit block
    assert f"fisher: {math.exp(base.mean() + 0.1):.2f}" in first
    assert f"fisher_s0 against search-kv_s0: {100 * (math.exp(-0.05) - 1):+.1f}%" in first  # 0.05 nats below the search
    assert "cpu-quick-fisher_s0 against fisher_s0: +10.5%" in first  # exp(0.1) - 1: the run 0.1 nats above the rule
    assert "cpu-quick-fisher_s0 against cpu-quick-kv_s0: -4.9%" in first
    (xeon / "replay_xeon_2.json").write_text(json.dumps({"episodes": [{**unquantized, "heldout_window_nll": base.tolist()}]}))
    refused = subprocess.run([sys.executable, str(script), str(fisher), str(xeon)], capture_output=True, text=True)
    assert refused.returncode != 0 and "other held-out windows" in refused.stderr
