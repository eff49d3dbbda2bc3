"""What one WindQuant-v0 episode costs, side by side in one run on one model (issue 5).

    python benchmarks/episode_speed.py                      # smollm2-135m, README preset (cpu)
    python benchmarks/episode_speed.py --small              # tiny-llama, a few episodes (CI)

(a) the paper-faithful path: per episode, each unit's quantizer fitted in turn for the
    action the policy chose (salient protection, INT8 outliers, 10 Adam steps on the
    scales through autograd with straight-through rounding, fallback to a higher
    precision when the error is too high: one unit at a time), then the proxy perplexity;
(b) our path: the quantization table once (its build time printed apart), then per
    episode the decisions, the assembly of the plan's weights from the table, and the
    proxy perplexity;
(c) the floor: one proxy forward pass alone, and the N env steps alone under MaskablePPO.

Both paths run the same plans, and the script prints both proxy perplexities: the same
objective and steps, so they agree up to float rounding (autograd vs the written-out
gradient, one unit vs a batch). Ratios are printed last; targets on
smollm2-135m, 2-core CPU, cpu preset: (a)/(b) >= 30, (b)/(c) <= 1.3.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List

import gymnasium as gym
import torch
from sb3_contrib import MaskablePPO

import windquant_gym as wq
from windquant_gym.agents import WindQuantPolicy, load_hyperparams
from windquant_gym.data import sample_token_blocks
from windquant_gym.compute.kernels import ENV_VAR as LINEAR_KERNEL_VAR, chosen_cpu_linear_kernel
from windquant_gym.compute.kernels import proxy_precision
from windquant_gym.eval.perplexity import mean_nll
from windquant_gym.problem import _cached_calibration
from windquant_gym.quant import BIT_WIDTHS, borrowed_weights
from windquant_gym.quant.quantizers import fake_quantize, initial_scale, int8_outliers, protect_salient, to_fp16_scale
from windquant_gym.envs.windquant import quant_config_from_kwargs
from windquant_gym.quant.build import build_table
from windquant_gym.quant.units import find_units


@dataclass
class Args:
    model: str = "smollm2-135m"
    """load_model name."""
    preset: str = "cpu"
    """hyperparams.yml block whose env_kwargs (chunk, calibration size, proxy_dtype) are used."""
    episodes: int = 3
    """Episodes of our path (b) and of the floor measurements (c)."""
    paper_episodes: int = 1
    """Episodes of the paper-faithful path (a): slow."""
    target_bits: float = 2.5
    seed: int = 0
    cached_table: bool = False
    """Reuse a cached table instead of timing its build."""


def _ste_fake_quantize(w: torch.Tensor, alpha: torch.Tensor, spec) -> torch.Tensor:
    """The operator's forward with straight-through rounding, for autograd (the paper's LSQ/SEQ)."""
    x = w / alpha
    if spec.operator == "binary":
        return torch.where(x >= 0, 1.0, -1.0) * alpha
    if spec.clip is not None:
        x = x.clamp(-spec.clip, spec.clip)
    scaled = x * spec.divisor - spec.shift
    if spec.clip is None:  # LSQ clamps w/alpha to the code range before rounding (no gradient outside)
        scaled = scaled.clamp(spec.code_min, spec.code_max)
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return alpha * (rounded.clamp(spec.code_min, spec.code_max) + spec.shift) / spec.divisor


def autograd_fit(w, keep, loss_weight, spec, steps, lr) -> torch.Tensor:
    """One unit's row scales by ``steps`` Adam steps through autograd, as the paper's code
    would: the same objective, parametrization (``alpha0 * r``), best-step keep and fp16
    rounding as :func:`fit_scales`, whose gradient is written out instead."""
    weight = loss_weight * keep
    alpha0 = initial_scale(w, keep, spec)
    start = torch.where(alpha0 > 0, alpha0, torch.ones_like(alpha0))
    multiplier = torch.ones_like(alpha0, requires_grad=True)
    optimizer = torch.optim.Adam([multiplier], lr=lr)
    best, best_loss = torch.ones_like(alpha0), None
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = (weight * (_ste_fake_quantize(w, start * multiplier, spec) - w) ** 2).sum(dim=-1, keepdim=True)
        with torch.no_grad():
            if best_loss is None:
                best_loss = loss.detach()
            else:
                better = loss < best_loss
                best_loss, best = torch.where(better, loss, best_loss), torch.where(better, multiplier, best)
        if step == steps:
            break
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            multiplier.clamp_(min=1e-3)
    with torch.no_grad():
        rounded_start = to_fp16_scale(alpha0)
        fitted = to_fp16_scale(torch.where(alpha0 > 0, alpha0 * best, alpha0))
        def loss_at(a):
            return (weight * (fake_quantize(w, torch.where(a > 0, a, start), spec) - w) ** 2).sum(dim=-1, keepdim=True)
        return torch.where(loss_at(fitted) <= loss_at(rounded_start), fitted, rounded_start)


def paper_faithful_proxy_nll(problem: wq.QuantProblem, plan: List[int]) -> float:
    """Fit every unit's quantizer for its action now, one unit at a time (the paper's
    per-episode work), apply, and return the proxy NLL."""
    table, config = problem.table, problem.table.config
    act_scales = problem.calibration.act_scales
    weights: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for unit, action in zip(problem.units, plan):
            original = problem.model.get_submodule(unit.module).weight
            out = weights.setdefault(unit.module, torch.empty_like(original))
            cols = slice(unit.col_start, unit.col_end)
            w = original.detach()[:, cols].float()[None]
            s = act_scales[unit.module][unit.col_start : unit.col_end].to(w.device, torch.float32)[None, None, :]
            protected = protect_salient(w, s, int(table.n_protected[unit.index]))
            o_scale, o_codes = int8_outliers(w, protected)
            loss_weight = s * s if config.fit_loss == "activation" else torch.ones_like(s)
            energy = float(((w * s) ** 2).sum() if config.fit_loss == "activation" else (w * w).sum())
            while action != 0:  # fallback: refit at the next higher precision while the error is too high
                spec = BIT_WIDTHS[action]
                with torch.enable_grad():
                    alpha = autograd_fit(w, ~protected, loss_weight, spec, config.fit_steps, config.fit_lr)
                q = torch.where(protected, o_codes.float() * o_scale, fake_quantize(w, alpha, spec))
                diff = (w - q) * (s if config.fit_loss == "activation" else 1.0)
                if float((diff * diff).sum()) <= config.fallback_thresholds[action] * max(energy, 1e-30):
                    break
                action -= 1
            if action == 0:
                q = w.half().float()
            out[:, cols] = q[0].to(out.dtype)
    with borrowed_weights(problem.model, weights), proxy_precision(next(problem.model.parameters()).device, problem.proxy_dtype):
        return mean_nll(problem.model, problem.blocks, batch_size=problem.batch_size)


def policy_episode(env: gym.Env, agent: MaskablePPO) -> Dict[str, float]:
    """One episode of the (stochastic) policy: wall time split into decisions and evaluation."""
    started = time.perf_counter()
    obs, _ = env.reset()
    done = False
    while not done:
        action, _ = agent.predict(obs, action_masks=env.unwrapped.action_masks(), deterministic=False)
        obs, _, done, _, info = env.step(int(action))
    total = time.perf_counter() - started
    evaluation = info["assemble_seconds"] + info["forward_seconds"]
    return {"total": total, "decisions": total - evaluation, "assemble": info["assemble_seconds"],
            "forward": info["forward_seconds"], "plan": info["plan"], "proxy_ppl": info["proxy_ppl"]}


def main(args: Args) -> Dict[str, float]:
    torch.manual_seed(args.seed)
    env_kwargs = load_hyperparams(args.preset)["env_kwargs"]
    model, tokenizer = wq.load_model(args.model)
    config = quant_config_from_kwargs(env_kwargs["chunk_size"], env_kwargs["salient_rate"], env_kwargs.get("quant_config"))
    blocks = sample_token_blocks(wq.load_texts("wiki-sample"), tokenizer, env_kwargs["n_calibration_samples"],
                                 env_kwargs["calibration_seq_len"], args.seed)
    units = find_units(model, config.chunk_size)
    calibration = _cached_calibration(model, units, blocks, 8, True, False)
    started = time.perf_counter()
    table = build_table(model, calibration.act_scales, config, hessians=calibration.hessians, cache=args.cached_table,
                        progress=True)
    table_seconds = time.perf_counter() - started
    problem = wq.QuantProblem(model, tokenizer, units, blocks, calibration, table,
                              proxy_dtype=env_kwargs.get("proxy_dtype", "float32"))
    env = gym.make("WindQuant-v0", model=model, problem=problem, target_bits=args.target_bits)
    agent = MaskablePPO(WindQuantPolicy, env, n_steps=len(units), seed=args.seed, device="cpu")
    print(f"{args.model}: {len(units)} units (chunk {config.chunk_size}), proxy {tuple(blocks.shape)} tokens "
          f"in {problem.proxy_dtype}, "
          f"target {args.target_bits} bits, torch threads {torch.get_num_threads()}")
    print(f"table build: {table_seconds:.1f} s{' (cached)' if args.cached_table else ''}, once per model and config")

    policy_episode(env, agent)  # warm-up: first-touch allocations, lazy inits
    ours = [policy_episode(env, agent) for _ in range(args.episodes)]
    with proxy_precision(next(model.parameters()).device, problem.proxy_dtype):
        forward = time_forward(model, blocks, problem.batch_size, args.episodes)
    # The same pass on each CPU kernel, side by side, against what the measured choice
    # (windquant_gym.compute.kernel_choice) picked on this machine (float32 proxies only).
    cpu_float32 = next(model.parameters()).device.type == "cpu" and problem.proxy_dtype == "float32"
    forward_default = time_forward(model, blocks, problem.batch_size, args.episodes, kernel="aten") if cpu_float32 else []
    forward_onednn = time_forward(model, blocks, problem.batch_size, args.episodes, kernel="onednn") if cpu_float32 else []

    paper, checks = [], []
    for episode in ours[: args.paper_episodes]:
        t = time.perf_counter()
        nll = paper_faithful_proxy_nll(problem, episode["plan"])
        paper.append(time.perf_counter() - t)
        checks.append((math.exp(nll), episode["proxy_ppl"]))

    med = statistics.median
    b = med(e["total"] for e in ours)
    steps = med(e["decisions"] for e in ours)
    floor = med(forward) + steps
    a = med(paper)
    print(f"\n{'':44} {'seconds':>8}")
    print(f"{'(a) paper-faithful episode (fit + proxy)':44} {a:8.2f}")
    print(f"{'(b) our episode':44} {b:8.2f}")
    print(f"{'    decisions (policy + env steps)':44} {steps:8.3f}")
    print(f"{'    assembly of the plan weights':44} {med(e['assemble'] for e in ours):8.3f}")
    print(f"{'    proxy forward (plan applied)':44} {med(e['forward'] for e in ours):8.3f}")
    print(f"{'(c) one proxy forward pass alone':44} {med(forward):8.3f}")
    print(f"{'(c) N env steps alone under MaskablePPO':44} {steps:8.3f}")
    if forward_default:
        print(f"{'    forward on PyTorch default kernel (MKL)':44} {med(forward_default):8.3f}")
        print(f"{'    forward on oneDNN':44} {med(forward_onednn):8.3f}"
              f"   (oneDNN speed-up {med(forward_default) / med(forward_onednn):.2f}x; measured choice here: "
              f"{chosen_cpu_linear_kernel(model)})")
    gflop = linear_gflop(model, blocks)
    print(f"proxy forward: {gflop:.3g} GFLOP in Linear layers and the LM head, "
          f"{gflop / med(forward):.0f} GFLOP/s achieved")
    for paper_ppl, table_ppl in checks:
        print(f"same plan, proxy PPL: paper-faithful {paper_ppl:.4f}, table {table_ppl:.4f}")
    ratios = {"a_over_b": a / b, "b_over_c": b / floor, "table_seconds": table_seconds}
    print(f"\n(a)/(b) per episode: {ratios['a_over_b']:.1f}   (target >= 30)")
    print(f"(b)/(c) episode over forward + policy steps: {ratios['b_over_c']:.2f}   (target <= 1.3)")
    print(f"ceiling on (a)/(b) while both paths pay this forward: (a)/(c forward) = {a / med(forward):.1f}")
    print(f"table build / (b) episode: {table_seconds / b:.1f} episodes' worth")
    env.close()
    return ratios


def time_forward(model, blocks, batch_size: int, repeats: int, kernel: str | None = None) -> List[float]:
    """Seconds of ``repeats`` proxy passes (after one warm-up), optionally on another CPU
    linear kernel (``WINDQUANT_CPU_LINEAR``)."""
    previous = os.environ.get(LINEAR_KERNEL_VAR)
    if kernel is not None:
        os.environ[LINEAR_KERNEL_VAR] = kernel
    try:
        if kernel is not None:
            mean_nll(model, blocks, batch_size=batch_size)
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            mean_nll(model, blocks, batch_size=batch_size)
            seconds.append(time.perf_counter() - t)
        return seconds
    finally:
        if previous is None:
            os.environ.pop(LINEAR_KERNEL_VAR, None)
        else:
            os.environ[LINEAR_KERNEL_VAR] = previous


def linear_gflop(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Multiply-add work of one proxy pass in every Linear layer and the LM head
    (2 x tokens x weights; attention scores and elementwise ops not counted)."""
    head = model.get_output_embeddings()
    weights = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    return 2 * blocks.numel() * (weights + head.weight.numel()) / 1e9


def parse() -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Args()
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--small", action="store_true", help="tiny-llama, smoke preset, 2 episodes (CI)")
    ns = vars(parser.parse_args())
    if ns.pop("small"):
        ns.update(model="tiny-llama", preset="smoke", episodes=2, paper_episodes=1)
    return Args(**ns)


if __name__ == "__main__":
    wq.keep_freed_memory()  # our process: reuse freed memory (windquant_gym/compute/process.py)
    main(parse())
