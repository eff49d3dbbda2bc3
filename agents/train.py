"""Train MaskablePPO on WindQuant-v0: ``windquant train --model smollm2-135m --preset cpu``.

Writes to ``--out``: ``episodes.csv`` (one row per episode), TensorBoard logs (``tb/``),
checkpoints (``checkpoints/``), ``best_plan_<target>.json``, ``final_plan.json`` and
``summary.json``; ends with a printed summary against the unquantized model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import gymnasium as gym
import numpy as np
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.monitor import Monitor

from ..data import eval_windows, load_texts
from ..envs import ENV_ID, CurriculumWrapper, RewardConfig
from ..eval.perplexity import perplexity
from ..plan import QuantPlan
from ..quant.apply import quantized_weights
from ..errors import ConfigError
from .callbacks import EpisodeRecorder
from .checkpoints import LATEST, ResumableCheckpoint, clear_run, has_run, latest_checkpoint, read_state
from .hyperparams import load_hyperparams
from .policy import WindQuantPolicy


@dataclass
class TrainArgs:
    model: str = "smollm2-135m"
    """A load_model name or local folder."""
    preset: str = ENV_ID
    """Hyperparameter block of agents/hyperparams.yml (e.g. 'cpu', 'smoke')."""
    out: str = "runs/windquant"
    """Run folder."""
    episodes: Optional[int] = None
    """Override the preset's episode count."""
    gamma: Optional[float] = None
    """Override the discount (paper 0.99; 1.0 gives the episode-end reward full weight)."""
    target_bits: Optional[float] = None
    """Train at one fixed target instead of the curriculum."""
    seed: int = 0
    device: str = "auto"
    """Where the LM runs; the small policy always runs on the CPU."""
    progress: bool = True
    hyperparams: Optional[str] = None
    """Another hyperparameter YAML file."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Extra hyperparameters merged over the preset (e.g. from tests)."""
    resume: Optional[str] = None
    """A run folder to continue from its latest checkpoint (its config.json replaces the other arguments)."""
    overwrite: bool = False
    """Start afresh in an ``out`` folder that already holds a run (its checkpoints and logs are removed)."""


def make_env(args: TrainArgs, hp: Dict[str, Any]) -> gym.Env:
    reward = RewardConfig(**hp["reward"]) if hp.get("reward") else None
    env = gym.make(ENV_ID, model=args.model, device=args.device, seed=args.seed, progress=args.progress,
                   reward_config=reward, **hp["env_kwargs"])
    stages = [args.target_bits] if args.target_bits is not None else hp["curriculum"]
    episodes_per_stage = max(1, math.ceil(hp["episodes"] / len(stages)))
    return Monitor(CurriculumWrapper(env, stages, episodes_per_stage))


def _rollout(model: MaskablePPO, env: gym.Env) -> Dict[str, Any]:
    """One deterministic episode of the trained policy."""
    obs, _ = env.reset()
    done = False
    while not done:
        action, _ = model.predict(obs, action_masks=env.get_wrapper_attr("action_masks")(), deterministic=True)
        obs, _, done, _, info = env.step(int(action))
    return info


def _resumed_args(args: TrainArgs):
    run = Path(args.resume)
    config_path = run / "config.json"
    if not config_path.exists():
        raise ConfigError(f"--resume {run}: no config.json there; pass the folder a `windquant train --out` run wrote.")
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise ConfigError(f"--resume {run}: the run has no complete checkpoint yet (checkpoints/{LATEST}); start it again with `windquant train --out {run} --overwrite`.")
    saved = json.loads(config_path.read_text())
    resumed = TrainArgs(**{**saved["args"], "resume": str(run), "out": str(run), "progress": args.progress, "overwrite": False})
    return resumed, saved["hyperparams"], checkpoint


def train(args: TrainArgs) -> Dict[str, Any]:
    checkpoint = None
    if args.resume:
        args, hp, checkpoint = _resumed_args(args)
    else:
        hp = load_hyperparams(args.preset, args.hyperparams)
        hp.update(args.overrides)
        if args.episodes is not None:
            hp["episodes"] = args.episodes
        if args.gamma is not None:
            hp["gamma"] = args.gamma
    out = Path(args.out)
    if checkpoint is None and has_run(out):
        if not args.overwrite:
            raise ConfigError(
                f"{out} already holds a training run (episodes.csv / checkpoints/). Continue it with "
                f"`windquant train --resume {out}`, start afresh there with --overwrite, or pick another --out."
            )
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        (out / "config.json").write_text(json.dumps({"args": asdict(args), "hyperparams": hp}, indent=1, default=str))

    started = time.perf_counter()
    env = make_env(args, hp)
    base = env.unwrapped
    n_units = base.n_units
    if checkpoint is not None:
        state = read_state(checkpoint)
        model = MaskablePPO.load(checkpoint / "model.zip", env=env, device="cpu", tensorboard_log=str(out / "tb"))
        base.load_state_dict(state["env"])
        env.get_wrapper_attr("load_state_dict")(state["curriculum"])
    else:
        model = _new_model(env, hp, n_units, out, args.seed)
    recorder = EpisodeRecorder(out, base.problem, hp["episodes"], progress=args.progress)
    if checkpoint is not None:
        recorder.load_state_dict(state["recorder"])
    checkpoints = ResumableCheckpoint(out / "checkpoints", hp["checkpoint_every"], env, recorder)
    setup_seconds = time.perf_counter() - started
    remaining = max(0, hp["episodes"] - recorder.episodes)
    if remaining:
        model.learn(total_timesteps=remaining * n_units, callback=CallbackList([recorder, checkpoints]),
                    tb_log_name="maskable_ppo", reset_num_timesteps=checkpoint is None)
    checkpoints.init_callback(model)
    checkpoints.save()
    train_seconds = time.perf_counter() - started - setup_seconds
    model.save(out / "final_model")
    return _evaluate(args, hp, env, model, recorder, setup_seconds, train_seconds, out, trained=remaining)


def _new_model(env, hp, n_units, out, seed) -> MaskablePPO:
    return MaskablePPO(
        WindQuantPolicy,
        env,
        learning_rate=hp["learning_rate"],
        n_steps=n_units,  # one rollout = one episode
        batch_size=min(hp["batch_size"], n_units),
        n_epochs=hp["n_epochs"],
        gamma=hp["gamma"],
        gae_lambda=hp["gae_lambda"],
        clip_range=hp["clip_range"],
        ent_coef=hp["ent_coef"],
        vf_coef=hp["vf_coef"],
        policy_kwargs={"hidden_size": hp["hidden_size"]},
        tensorboard_log=str(out / "tb"),
        seed=seed,
        device="cpu",
        verbose=0,
    )


def _evaluate(args, hp, env, model, recorder, setup_seconds, train_seconds, out, trained) -> Dict[str, Any]:
    base = env.unwrapped
    n_units = base.n_units
    # Evaluation at the final target: the deterministic policy, and the best plan seen.
    curriculum = env.get_wrapper_attr("freeze")
    final_target = args.target_bits if args.target_bits is not None else hp["curriculum"][-1]
    curriculum(final_target)
    final = _rollout(model, env)
    problem = base.problem
    held_out = eval_windows(load_texts("wiki-sample", split="eval"), problem.tokenizer, hp["eval_seq_len"], hp["eval_windows"])
    fp_heldout = perplexity(problem.model, held_out)
    rows = {"unquantized": {"effective_bits": 16.0, "storage_bits": 16.0, "proxy_ppl": problem.baseline_ppl, "heldout_ppl": fp_heldout}}
    # (plan, its proxy PPL as the env measured it: the proxy is deterministic, no need to rerun it)
    candidates = {"policy (deterministic)": (final["plan"], final["proxy_ppl"])}
    best = recorder.best.get(final_target)
    if best is not None:
        candidates["best plan seen in training"] = (best["plan"], best["proxy_ppl"])
    for name, (actions, proxy_ppl) in candidates.items():
        bits = problem.table.plan_bits(actions)
        with quantized_weights(problem.model, problem.table, actions):
            heldout = perplexity(problem.model, held_out)
        rows[name] = {**bits, "proxy_ppl": proxy_ppl, "heldout_ppl": heldout}
        slug = "final_plan" if name.startswith("policy") else "best_plan"
        # proxy passes spent to choose it: every training episode, and for the policy its own rollout
        evaluations = recorder.episodes + 1 if slug == "final_plan" else recorder.episodes
        QuantPlan.from_problem(problem, actions, target_bits=final_target, proxy_dtype=problem.proxy_dtype,
                               proxy_metric=base.proxy_metric, evaluations=evaluations,
                               **rows[name]).save(out / f"{slug}.json")
    summary = {
        "model": args.model, "preset": args.preset, "episodes": hp["episodes"], "gamma": hp["gamma"],
        "target_bits": final_target, "n_units": n_units, "setup_seconds": setup_seconds,
        "train_seconds": train_seconds, "seconds_per_episode": train_seconds / max(1, trained),
        "resumed_from_episode": hp["episodes"] - trained if args.resume else None,
        "heldout_tokens": int(held_out.numel()), "proxy_dtype": problem.proxy_dtype,
        "model_dtype": str(next(problem.model.parameters()).dtype).replace("torch.", ""), "results": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    env.close()
    print_summary(summary)
    return summary


def print_summary(summary: Dict[str, Any]) -> None:
    print(f"\nWindQuant-v0 on {summary['model']}: {summary['episodes']} episodes of {summary['n_units']} units, "
          f"target {summary['target_bits']} bits, {summary['train_seconds']:.0f} s training "
          f"({summary['seconds_per_episode']:.1f} s/episode) after {summary['setup_seconds']:.0f} s setup")
    print(f"{'':30} {'effective':>9} {'storage':>8} {'proxy PPL':>10} {'held-out PPL':>12}")
    for name, row in summary["results"].items():
        print(f"{name:30} {row['effective_bits']:9.3f} {row['storage_bits']:8.3f} {row['proxy_ppl']:10.2f} {row['heldout_ppl']:12.2f}")
    model_dtype = summary.get("model_dtype", "float32")
    proxy = "matrix products in bf16 (autocast)" if summary.get("proxy_dtype") == "bfloat16" else f"in {model_dtype}"
    print(f"(proxy PPL: {proxy}; held-out PPL in {model_dtype}: {summary['heldout_tokens']} tokens of the "
          "wiki-sample eval split)")
