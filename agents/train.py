"""Train MaskablePPO on WindQuant-v0: ``windquant train --model smollm2-135m --preset cpu``.

Writes to ``--out``: ``episodes.csv`` (one row per episode), TensorBoard logs (``tb/``),
checkpoints (``checkpoints/``), ``best_plan_<target>.json`` (the best plan seen in training),
``policy_plan_<target>.json`` (the trained policy's deterministic plan) and
``returned_plan_<target>.json`` (the better of the two by proxy) for every target of the
curriculum; ``final_plan.json``, ``best_plan.json`` and ``returned_plan.json`` at the final
target, and ``summary.json``; ends with a printed summary beside the knapsack and the
unquantized model.

A preset may warm-start the policy (``warm_start:``): behaviour cloning on the knapsack's
plans at the curriculum's targets, before PPO (:mod:`windquant_gym.agents.imitation`).

A preset with ``sampled_targets: [...]`` (``cpu-front``) draws every episode's target from that
list instead of following a curriculum: one policy for every budget. A run over several
targets also writes the size/quality front (``front.{json,csv,md}``, :mod:`.front`): at
every target the policy's one-pass plan beside the calibrated knapsack's and the knapsack's.

Every proxy pass the run makes is counted (``QuantProblem.proxy_passes``): the warm start's,
one per training episode, one per target for the final rollouts and the summary's baselines;
``summary.json``'s ``evaluations`` is their sum, and a test checks it against a hook on the
model's forward.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import gymnasium as gym
import numpy as np
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.monitor import Monitor

from ..data import eval_windows, load_texts
from ..envs import ENV_ID, CurriculumWrapper, RewardConfig, TargetSampler
from ..eval.bootstrap import describe_change, paired_bootstrap
from ..harness.episodes import play_episode
from ..plan import QuantPlan
from ..errors import ConfigError
from ..quant.bitwidths import check_bits
from .callbacks import EpisodeRecorder
from .front import HeldoutCache, front_row, write_front
from .checkpoints import LATEST, ResumableCheckpoint, clear_run, has_run, latest_checkpoint, read_state
from ..allocators.baselines import KnapsackAllocator
from ..allocators.calibrated_knapsack import CALIBRATED_KNAPSACKS, calibrate_each, calibrated_knapsack
from .hyperparams import load_hyperparams, merge_hyperparams
from .recipe import CALIBRATE_EACH, Recipe, as_recipe
from .imitation import behaviour_clone, collect_demonstrations
from .policy import WindQuantPolicy
from .episode_baseline import EpisodeBaseline
from .self_imitation import SelfImitation
from .selection import ValidationChoice
from .policy_view import policy_view


@dataclass(frozen=True)
class TrainArgs:
    """What ``windquant train`` is asked to do; its flags are generated from these fields
    (:mod:`.flags`), the recipe itself is the preset's (:class:`~.recipe.Recipe`)."""

    model: str = "smollm2-135m"
    """A load_model preset name or a local model folder."""
    preset: str = ENV_ID
    """Block of agents/hyperparams.yml, e.g. cpu or smoke."""
    out: str = "runs/windquant"
    """Run folder."""
    episodes: Optional[int] = None
    """Override the preset's episode count."""
    gamma: Optional[float] = None
    """Override the discount (paper: 0.99; 1.0 gives the episode-end reward full weight)."""
    target_bits: Optional[float] = None
    """Train at one fixed target instead of the curriculum."""
    seed: int = 0
    """The agent's seed: policy initialisation, sampling, minibatches."""
    calibration_seed: Optional[int] = None
    """Override the preset's env_kwargs.seed, which picks the calibration blocks (the proxy's
    text, hence the table); the preset fixes it so that agent seeds mean one thing."""
    device: str = "auto"
    """Where the LM runs (auto, cpu, cuda); the small policy always runs on the CPU."""
    progress: bool = True
    """Progress bars (calibration, table build, training)."""
    hyperparams: Optional[str] = None
    """Another hyperparameter YAML file."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Extra hyperparameters merged over the preset (e.g. from tests)."""
    resume: Optional[str] = None
    """Continue this run folder from its latest checkpoint (other options are read from its config.json)."""
    overwrite: bool = False
    """Start afresh in an --out folder that already holds a run (its checkpoints and logs are removed)."""

    def __post_init__(self) -> None:
        for name in ("seed", "calibration_seed", "episodes"):
            value = getattr(self, name)
            low = 1 if name == "episodes" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"TrainArgs.{name} must be an integer >= {low}, got {value!r}; e.g. --{name.replace('_', '-')} {low}.")
        if self.gamma is not None and not (isinstance(self.gamma, (int, float)) and 0.0 <= self.gamma <= 1.0):
            raise ConfigError(f"TrainArgs.gamma must lie in [0, 1], got {self.gamma!r}; e.g. --gamma 0.99.")
        if self.target_bits is not None:
            check_bits(self.target_bits, "target_bits", "--target-bits 2.0")


def calibration_seed(args: TrainArgs, recipe: Recipe) -> int:
    recipe = as_recipe(recipe)
    return int(args.calibration_seed if args.calibration_seed is not None else recipe.env_kwargs.get("seed", 0))


def stages(args: TrainArgs, recipe: Recipe) -> List[float]:
    """The targets the run trains at, in curriculum order (or the sampled list)."""
    recipe = as_recipe(recipe)
    if args.target_bits is not None:
        return [float(args.target_bits)]
    if _sampled(recipe):
        return [float(t) for t in recipe.sampled_targets]
    return [float(t) for t in recipe.curriculum]


def _sampled(recipe: Recipe) -> bool:
    return recipe.sampled_targets is not None  # its form is the Recipe's to check


def summary_target(args: TrainArgs, recipe: Recipe) -> float:
    """The target the printed summary is about: the curriculum's last stage, or the lowest of
    the sampled targets (the hardest budget)."""
    recipe = as_recipe(recipe)
    targets = stages(args, recipe)
    return min(targets) if args.target_bits is None and _sampled(recipe) else targets[-1]


def _writes_front(args: TrainArgs, recipe: Recipe) -> bool:
    """A run over several targets writes the front when the preset says ``front: true``
    (default: for ``sampled_targets``)."""
    return len(set(stages(args, recipe))) > 1 and (recipe.front if recipe.front is not None else _sampled(recipe))


def make_env(args: TrainArgs, recipe: Recipe) -> gym.Env:
    """``Monitor(CurriculumWrapper(observation(reward(WindQuant-v0))))`` as the preset says
    (``TargetSampler`` in place of the curriculum for ``sampled_targets``)."""
    recipe = as_recipe(recipe)
    reward = RewardConfig(**recipe.reward) if recipe.reward else None
    env_kwargs = {k: v for k, v in recipe.env_kwargs.items() if k != "seed"}
    env = gym.make(ENV_ID, model=args.model, device=args.device, seed=calibration_seed(args, recipe), progress=args.progress,
                   reward_config=reward, **env_kwargs)
    targets = stages(args, recipe)
    if args.target_bits is None and _sampled(recipe):
        return Monitor(TargetSampler(policy_view(env, recipe), targets, seed=args.seed))
    episodes_per_stage = max(1, math.ceil(recipe.episodes / len(targets)))
    return Monitor(CurriculumWrapper(policy_view(env, recipe), targets, episodes_per_stage))


def _rollout(model: MaskablePPO, env: gym.Env) -> Dict[str, Any]:
    """One deterministic episode of the trained policy."""
    info, _ = play_episode(env, lambda obs, mask: model.predict(obs, action_masks=mask, deterministic=True)[0])
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
        args, saved, checkpoint = _resumed_args(args)
        recipe = Recipe.from_dict(saved)
    else:
        block = load_hyperparams(args.preset, args.hyperparams)
        flags = {k: v for k, v in (("episodes", args.episodes), ("gamma", args.gamma)) if v is not None}
        # nested keys merge (warm_start: {epochs: 5} keeps the rest); the result is checked as a Recipe
        recipe = Recipe.from_dict(merge_hyperparams(block, {**args.overrides, **flags}))
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
        (out / "config.json").write_text(json.dumps({"args": asdict(args), "hyperparams": recipe.to_dict()}, indent=1, default=str))

    started = time.perf_counter()
    env = make_env(args, recipe)
    base = env.unwrapped
    n_units = base.n_units
    if checkpoint is not None:
        state = read_state(checkpoint)
        model = MaskablePPO.load(checkpoint / "model.zip", env=env, device="cpu", tensorboard_log=str(out / "tb"))
        base.load_state_dict(state["env"])
        env.get_wrapper_attr("load_state_dict")(state["curriculum"])
    else:
        model = _new_model(env, recipe, n_units, out, args.seed)
    targets = sorted(set(stages(args, recipe)))
    # the summary's baseline, and the front's at every target
    knapsack = _knapsack_plans(base, targets if _writes_front(args, recipe) else [summary_target(args, recipe)])
    # a second view of the same problem, for walks that must not touch the training episode
    view = policy_view(gym.make(ENV_ID, model=base.problem.model, problem=base.problem, proxy_metric=base.proxy_metric,
                                progress=False), recipe)
    warm_start = _warm_start(model, view, recipe, targets, summary_target(args, recipe), args) if checkpoint is None and recipe.warm_start else None
    start_plans = _start_plans(out, (warm_start or {}).pop("plans", None))
    recorder = EpisodeRecorder(out, base.problem, recipe.episodes, progress=args.progress,
                               keep=recipe.selection.candidates if recipe.chooses_on_validation else 1)
    for info in (warm_start or {}).pop("final_infos", {}).values():  # measured plans count as seen
        recorder.consider(info, episode=0)
        if base.race is not None and info.get("proxy_complete", True):  # the bar a raced episode must come near
            base.race.consider(info["target_bits"], info["ppl_ratio"])
    warm_start = _warm_start_record(out, warm_start, resumed=checkpoint is not None)
    callbacks = [recorder]
    if recipe.advantage == "episode-baseline":
        callbacks.append(EpisodeBaseline())
    if recipe.self_imitation:
        callbacks.append(SelfImitation(view, recorder, start_plans, seed=args.seed, **recipe.self_imitation.clone_settings()))
    if checkpoint is not None:
        recorder.load_state_dict(state["recorder"])
    if base.race is not None:  # its per-block baseline pass (spent again on a resume)
        recorder.evaluations += base.race.setup_passes
    checkpoints = ResumableCheckpoint(out / "checkpoints", recipe.checkpoint_every, env, recorder)
    setup_seconds = time.perf_counter() - started
    remaining = max(0, recipe.episodes - recorder.episodes)
    if remaining:
        model.learn(total_timesteps=remaining * n_units, callback=CallbackList([*callbacks, checkpoints]),
                    tb_log_name="maskable_ppo", reset_num_timesteps=checkpoint is None)
    checkpoints.init_callback(model)
    checkpoints.save()
    train_seconds = time.perf_counter() - started - setup_seconds
    model.save(out / "final_model")
    return _evaluate(args, recipe, env, model, recorder, setup_seconds, train_seconds, out, trained=remaining,
                     knapsack=knapsack, warm_start=warm_start, start_plans=start_plans)


def _knapsack_plans(base, targets: List[float]) -> Dict[float, np.ndarray]:
    """The knapsack's plan at each target."""
    plans = {}
    for target in targets:
        base.set_target_bits(target)
        plans[target] = KnapsackAllocator().make_plan(base)
    return plans


def _warm_start_record(out: Path, warm_start: Optional[Dict[str, Any]], resumed: bool) -> Optional[Dict[str, Any]]:
    """What the warm start did and spent (its proxy passes count in the run's evaluations), kept
    in the run folder: a resumed run does not warm-start again, and still reports it."""
    path = out / "warm_start.json"
    if resumed:
        return json.loads(path.read_text()) if path.exists() else None
    if warm_start is not None:
        path.write_text(json.dumps(warm_start, default=float))
    return warm_start


def _start_plans(out: Path, plans: Optional[Dict[float, np.ndarray]]) -> Dict[float, np.ndarray]:
    """The plans self-imitation holds to at targets with nothing seen yet: the warm start's
    (kept in the run folder, so that a resumed run has them), else none."""
    path = out / "warm_start_plans.json"
    if plans is not None:
        path.write_text(json.dumps({f"{t:g}": np.asarray(p).tolist() for t, p in plans.items()}))
        return plans
    if path.exists():
        return {float(t): np.asarray(p, dtype=np.int64) for t, p in json.loads(path.read_text()).items()}
    return {}  # no warm start: self-imitation follows the policy's own best plans only




def _warm_start(model: MaskablePPO, view: gym.Env, recipe: Recipe, targets: List[float], final_target: float,
                args) -> Dict[str, Any]:
    """Behaviour cloning of the fresh policy on a teacher's plans at the curriculum's targets:
    the knapsack's (no proxy pass), or the calibrated knapsack's (its scales chosen once, at
    ``calibrate_at`` or the final target: 7 proxy passes, 10 for ``-kv`` and ``-fisher``, whose module
    sensitivities are measured first, timed in ``sensitivity_seconds``; ``calibrate_at: each``:
    at every target, each keeping the best of all targets' scales). With ``fit_critic`` the critic
    is fitted to the returns of measured walks through those plans (one proxy pass per target);
    the measured plans count as seen."""
    settings = recipe.warm_start  # validated: the teacher is one of recipe.DEMONSTRATIONS
    source, fit_critic = settings.demonstrations, settings.fit_critic
    started = time.perf_counter()
    base = view.unwrapped
    passes_before = base.problem.proxy_passes
    stats: Dict[str, Any] = {"demonstrations": source}
    if source in CALIBRATED_KNAPSACKS and CALIBRATED_KNAPSACKS[source].sensitivity == "fisher":
        # measured once, before any plan: its cost is backward passes, not proxy passes, so it is timed apart
        measured = time.perf_counter()
        base.problem.module_sensitivity(progress=args.progress)
        stats["sensitivity_seconds"] = time.perf_counter() - measured
    if source in CALIBRATED_KNAPSACKS and settings.calibrate_at == CALIBRATE_EACH:
        # one calibration per target: one target's scales can be wrong at another (issue 21: the
        # 2.0-bit scales cost cpu-quick-kv's 2.5-bit start +4.8% held out on a Xeon)
        each = calibrate_each(source, base, targets)
        plans = each.plans
        stats.update(scales={f"{t:g}": s for t, s in each.scales.items()}, calibration_evaluations=each.evaluations,
                     calibration_evaluations_per_target={f"{t:g}": n for t, n in each.evaluations_per_target.items()},
                     calibrate_at=CALIBRATE_EACH)
    elif source in CALIBRATED_KNAPSACKS:
        calibrate_at = float(settings.calibrate_at if settings.calibrate_at is not None else final_target)
        teacher = calibrated_knapsack(source, calibrate_at=calibrate_at)
        scales, _ = teacher.calibrate(base)
        plans = {t: teacher.plan_at(base, t) for t in targets}
        stats.update(scales=scales, calibration_evaluations=teacher.evaluations, calibrate_at=calibrate_at)
    else:
        plans = _knapsack_plans(base, targets)
    # measured walks (one proxy pass per target) give the critic its targets
    demos = collect_demonstrations(view, plans, gamma=float(recipe.gamma) if fit_critic else None)
    stats.update(behaviour_clone(model.policy, demos, seed=args.seed, progress=args.progress, **settings.clone_settings()))
    stats["seconds"] = time.perf_counter() - started
    stats["steps"] = len(demos)
    stats["evaluations"] = base.problem.proxy_passes - passes_before  # proxy passes spent: calibration + measured walks
    stats["teacher_proxy_ppl"] = {f"{t:g}": info["proxy_ppl"] for t, info in demos.final_infos.items()}
    stats["final_infos"] = demos.final_infos
    stats["plans"] = plans
    return stats


def _learning_rate(recipe: Recipe):
    """The preset's learning rate, constant or (``lr_schedule: linear``) falling to 0."""
    rate = float(recipe.learning_rate)
    schedule = (recipe.lr_schedule or "constant")
    if schedule == "constant":
        return rate
    if schedule == "linear":
        return lambda progress_remaining: rate * progress_remaining
    raise ConfigError(f"lr_schedule must be 'constant' or 'linear', got {schedule!r} (hyperparams.yml).")


def _new_model(env, recipe, n_units, out, seed) -> MaskablePPO:
    episodes_per_update = recipe.episodes_per_update or 1
    ppo_updates = True if recipe.ppo_updates is None else recipe.ppo_updates
    return MaskablePPO(
        WindQuantPolicy,
        env,
        # ppo_updates: false is the control that isolates PPO's gradient: the stock algorithm runs
        # (sampling, rollouts, self-imitation between them) with a learning rate of 0, so Adam's
        # steps leave actor and critic where the warm start and self-imitation put them
        learning_rate=_learning_rate(recipe) if ppo_updates else 0.0,
        n_steps=n_units * episodes_per_update,  # a rollout = whole episodes
        batch_size=min(recipe.batch_size, n_units * episodes_per_update),
        n_epochs=recipe.n_epochs,
        gamma=recipe.gamma,
        gae_lambda=recipe.gae_lambda,
        clip_range=recipe.clip_range,
        ent_coef=recipe.ent_coef,
        vf_coef=recipe.vf_coef,
        policy_kwargs={"hidden_size": recipe.hidden_size, "shared_trunk": (True if recipe.shared_trunk is None else recipe.shared_trunk)},
        tensorboard_log=str(out / "tb"),
        seed=seed,
        device="cpu",
        verbose=0,
    )


def _score(info: Dict[str, Any]) -> float:
    """What the env's reward measures a plan by: lower is better."""
    return info["proxy_kl"] if info.get("proxy_metric") == "kl" else info["proxy_ppl"]


def _evaluate(args, recipe, env, model, recorder, setup_seconds, train_seconds, out, trained, knapsack,
              warm_start=None, start_plans=None) -> Dict[str, Any]:
    """At every target the run trained at: the deterministic policy's plan (one proxy pass),
    the best plan seen in training, and the one of them with the better proxy (the run's
    result; chosen on the proxy, never on held-out text), or with ``selection: {by:
    validation}`` the one of them and the next best plans seen that is best on the validation
    split (:mod:`.selection`; its passes counted with the policy's). At the summary's target, held-out
    perplexity of those, of the teacher's and of the knapsack's plan, each compared with the
    teacher's (else the knapsack's) by a paired bootstrap over the held-out windows. With
    several targets, the front (:mod:`.front`) at all of them."""
    base = env.unwrapped
    problem = base.problem
    n_units = base.n_units
    freeze = env.get_wrapper_attr("freeze")
    targets = list(dict.fromkeys(stages(args, recipe)))
    final_target = summary_target(args, recipe)
    metric = base.proxy_metric
    warm_start = warm_start or {}
    passes_before = problem.proxy_passes
    base.race = None  # the final plans are measured on every block
    selection = recipe.selection
    choice = ValidationChoice(problem, selection.windows, selection.seq_len) if recipe.chooses_on_validation else None
    per_target = {}
    for target in targets:
        freeze(target)
        rollout = _rollout(model, env)
        candidates = {"policy": rollout}
        best = recorder.best.get(target)
        if best is not None:
            candidates["best seen"] = dict(best)
        if choice is not None:
            for rank, entry in enumerate(recorder.top.get(target, [])[1:], start=2):
                candidates[f"seen #{rank}"] = dict(entry)
            chosen = choice.choose(candidates)
        else:
            chosen = min(candidates, key=lambda name: _score(candidates[name]))
        per_target[target] = {"candidates": candidates, "returned": chosen}
    # proxy passes that chose the policy's plans: the warm start's, one per training episode, the rollouts
    policy_evaluations = warm_start.get("evaluations", 0) + recorder.evaluations + (problem.proxy_passes - passes_before)
    for target, entry in per_target.items():
        candidates = entry["candidates"]
        for slug, info in (("policy_plan", candidates["policy"]), ("best_plan", candidates.get("best seen")),
                           ("returned_plan", candidates[entry["returned"]])):
            if info is None:
                continue
            metrics = {k: info[k] for k in ("effective_bits", "storage_bits", "proxy_ppl", "proxy_kl") if k in info}
            QuantPlan.from_problem(problem, info["plan"], target_bits=target, proxy_dtype=problem.proxy_dtype,
                                   proxy_metric=metric, evaluations=policy_evaluations, allocator=f"MaskablePPO {slug}",
                                   **metrics).save(out / f"{slug}_{target:g}.json")
    front = _writes_front(args, recipe)
    teacher = _teacher(warm_start, start_plans)
    has_teacher = teacher is not None and final_target in teacher["plans"]
    # "returned": only the returned plan and its reference on held-out text (the knapsack only as that reference)
    full = (recipe.heldout_summary or "full") == "full"
    passes_before = problem.proxy_passes
    knapsack_targets = targets if front else ([final_target] if full or not has_teacher else [])
    knapsack_proxy = {t: math.exp(problem.proxy_nll(knapsack[t])) for t in knapsack_targets}
    baseline_evaluations = problem.proxy_passes - passes_before  # the summary's (and front's) knapsack rows
    held_out = eval_windows(load_texts("wiki-sample", split="eval"), problem.tokenizer, recipe.eval_seq_len, recipe.eval_windows)
    heldout = HeldoutCache(problem, held_out)
    rows = {}
    if full:
        fp_windows = heldout(None)
        rows["unquantized"] = {"effective_bits": 16.0, "storage_bits": 16.0, "proxy_ppl": problem.baseline_ppl,
                               "heldout_ppl": math.exp(float(np.mean(fp_windows)))}
    final = per_target[final_target]
    names = _CandidateNames()
    measured = final["candidates"] if full else {final["returned"]: final["candidates"][final["returned"]]}
    plans = {names[name]: info["plan"] for name, info in measured.items()}
    proxies = {names[name]: info["proxy_ppl"] for name, info in measured.items()}
    if has_teacher:
        plans[TEACHER_ROW] = teacher["plans"][final_target]
        proxies[TEACHER_ROW] = teacher["proxy_ppl"][final_target]
    if final_target in knapsack_proxy:
        plans["knapsack"] = knapsack[final_target]
        proxies["knapsack"] = knapsack_proxy[final_target]
    reference = TEACHER_ROW if TEACHER_ROW in plans else "knapsack"
    for name, actions in plans.items():
        windows = heldout(actions)
        rows[name] = {**problem.table.plan_bits(actions), "proxy_ppl": proxies[name],
                      "heldout_ppl": math.exp(float(np.mean(windows)))}
        if name != reference:
            comparison = paired_bootstrap(heldout(plans[reference]), windows)
            rows[name]["vs"] = {"reference": reference, **comparison.to_dict()}
    returned_name = names[final["returned"]]
    rows[returned_name]["returned"] = True
    # the final target's files under their historical names
    for slug in ("policy_plan", "best_plan", "returned_plan"):
        path = out / f"{slug}_{final_target:g}.json"
        if path.exists():
            (out / f"{'final_plan' if slug == 'policy_plan' else slug}.json").write_text(path.read_text())
    if front:
        _write_front(out, problem, per_target, knapsack, knapsack_proxy, teacher, policy_evaluations, held_out, heldout,
                     args, recipe, chosen_on="the validation split" if choice else "the proxy")
    summary = {
        "model": args.model, "preset": args.preset, "episodes": recipe.episodes, "gamma": recipe.gamma,
        "target_bits": final_target, "n_units": n_units, "setup_seconds": setup_seconds,
        "train_seconds": train_seconds, "seconds_per_episode": train_seconds / max(1, trained),
        "resumed_from_episode": recipe.episodes - trained if args.resume else None,
        "agent_seed": args.seed, "calibration_seed": calibration_seed(args, recipe),
        "evaluations": policy_evaluations + baseline_evaluations,
        "policy_evaluations": policy_evaluations, "baseline_evaluations": baseline_evaluations,
        "training_episodes": recorder.episodes,
        "training_evaluations": recorder.evaluations, "complete_episodes": recorder.complete_episodes,
        "ppo_updates": (recipe.ppo_updates is not False),
        "warm_start": warm_start or None,
        "heldout_tokens": int(held_out.numel()), "heldout_windows": int(len(held_out)),
        "heldout_summary": recipe.heldout_summary or "full", "heldout_passes": len(heldout),
        "proxy_dtype": problem.proxy_dtype,
        "model_dtype": str(next(problem.model.parameters()).dtype).replace("torch.", ""), "results": rows,
        "returned": returned_name,
        "selection": (f"on the validation split: {len(choice.blocks)} x {choice.blocks.shape[1]} tokens of calibration text, "
                      f"{choice.passes_per_plan:g} proxy passes per plan, the {selection.candidates} best plans seen by the "
                      "proxy and the policy's" if choice else "on the proxy"),
        "targets": {f"{t:g}": {"returned": names[v["returned"]],
                               **{names[n]: {k: i[k] for k in ("proxy_ppl", "proxy_kl", "validation_ppl") if k in i}
                                  for n, i in v["candidates"].items()}}
                    for t, v in per_target.items()},
        "front": "front.json" if front else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    env.close()
    print_summary(summary)
    return summary


TEACHER_ROW = "calibrated knapsack (teacher)"


class _CandidateNames(dict):
    """What the summary calls a candidate plan: ``policy``, ``best seen``, ``seen #k``."""

    def __init__(self):
        super().__init__({"policy": "policy (deterministic)", "best seen": "best plan seen in training"})

    def __missing__(self, key: str) -> str:
        if key.startswith("seen #"):
            return f"plan {key[5:]} seen in training (by proxy)"
        raise KeyError(key)


def _teacher(warm_start: Dict[str, Any], start_plans: Optional[Dict[float, np.ndarray]]) -> Optional[Dict[str, Any]]:
    """The calibrated-knapsack teacher's plans, measured proxy PPL and cost, when the warm
    start had one (its plans are kept in the run folder, so a resumed run has them)."""
    if warm_start.get("demonstrations") not in CALIBRATED_KNAPSACKS or not start_plans:
        return None
    proxies = {float(t): float(p) for t, p in warm_start.get("teacher_proxy_ppl", {}).items()}
    plans = {float(t): np.asarray(p, dtype=np.int64) for t, p in start_plans.items() if float(t) in proxies}
    return {"plans": plans, "proxy_ppl": proxies, "calibration_evaluations": float(warm_start.get("calibration_evaluations", 0)),
            "calibration_evaluations_per_target": warm_start.get("calibration_evaluations_per_target"),
            "calibrate_at": warm_start.get("calibrate_at"), "name": warm_start["demonstrations"]}


def _teacher_evaluations(teacher: Dict[str, Any], target: float) -> float:
    """Proxy passes the teacher's plan at ``target`` cost: its calibration (the plan measured
    there) where it was calibrated at that target, else the calibration plus one pass; calibrated
    at each target, every target's calibration and the other scales measured at this one."""
    if teacher["calibrate_at"] == CALIBRATE_EACH:
        return float(teacher["calibration_evaluations_per_target"][f"{target:g}"])
    own = teacher["calibrate_at"] is not None and math.isclose(float(teacher["calibrate_at"]), target)
    return teacher["calibration_evaluations"] + (0.0 if own else 1.0)


def _write_front(out, problem, per_target, knapsack, knapsack_proxy, teacher, policy_evaluations, held_out, heldout,
                 args, recipe, chosen_on: str = "the proxy") -> None:
    """``front.{json,csv,md}``: per target the policy's one-pass plan (``MaskablePPO``), the
    run's returned plan, the teacher's (``calibrated-knapsack``: its calibration passes plus
    its own measurement) and the knapsack's (1 pass), with their held-out PPL."""
    plans_dir = out / "front_plans"
    rows = []
    for target, entry in per_target.items():
        policy = entry["candidates"]["policy"]
        returned = entry["candidates"][entry["returned"]]
        rows.append(front_row(problem, heldout, "MaskablePPO", target, policy["plan"], policy["proxy_ppl"], policy_evaluations,
                              plans_dir))
        rows.append(front_row(problem, heldout, "MaskablePPO (returned)", target, returned["plan"], returned["proxy_ppl"],
                              policy_evaluations, plans_dir))
        if teacher is not None and target in teacher["plans"]:
            rows.append(front_row(problem, heldout, teacher["name"], target, teacher["plans"][target],
                                  teacher["proxy_ppl"][target], _teacher_evaluations(teacher, target), plans_dir))
        rows.append(front_row(problem, heldout, "knapsack", target, knapsack[target], knapsack_proxy[target], 1.0, plans_dir))
    meta = {"model": args.model, "preset": args.preset, "agent_seed": args.seed, "calibration_seed": calibration_seed(args, recipe),
            "heldout": f"wiki-sample eval, {len(held_out)} x {held_out.shape[1]} tokens",
            "policy_evaluations": policy_evaluations, "proxy_dtype": problem.proxy_dtype,
            "unquantized_heldout_window_nll": heldout(None),  # tells whether another file used the same windows
            "note": "MaskablePPO: the deterministic policy's plan, one pass per budget, no retraining; MaskablePPO "
                    f"(returned): the best on {chosen_on} of it and the best plans seen in training at that budget"}
    write_front(rows, out, meta)


def _raced(summary: Dict[str, Any]) -> str:
    episodes, complete = summary["training_episodes"], summary.get("complete_episodes", summary["training_episodes"])
    if complete == episodes:
        return ""
    return (f" ({summary['training_evaluations']:.4g} passes with the per-block baseline: {complete} measured on every "
            f"block, {episodes - complete} stopped after race_blocks)")


def print_summary(summary: Dict[str, Any]) -> None:
    print(f"\nWindQuant-v0 on {summary['model']}: {summary['episodes']} episodes of {summary['n_units']} units, "
          f"target {summary['target_bits']} bits, {summary['train_seconds']:.0f} s training "
          f"({summary['seconds_per_episode']:.1f} s/episode) after {summary['setup_seconds']:.0f} s setup")
    reference = next((row["vs"]["reference"] for row in summary["results"].values() if row.get("vs")), None)
    versus = f"vs {reference}" if reference else ""
    width = max([30, *map(len, summary["results"])])
    print(f"{'':{width}} {'effective':>9} {'storage':>8} {'proxy PPL':>10} {'held-out PPL':>12}  {versus}")
    for name, row in summary["results"].items():
        mark = "  <- returned" if row.get("returned") else ""
        change = row.get("vs")
        cell = describe_change(change["change"], change["low"], change["high"]) if change else ""
        print(f"{name:{width}} {row['effective_bits']:9.3f} {row['storage_bits']:8.3f} {row['proxy_ppl']:10.2f} "
              f"{row['heldout_ppl']:12.2f}  {cell:28}{mark}")
    if "policy_evaluations" in summary:
        print(f"proxy passes: {summary['policy_evaluations']:g} chose the policy's plans (warm start "
              f"{(summary.get('warm_start') or {}).get('evaluations', 0):g}, {summary['training_episodes']} training "
              f"episodes{_raced(summary)}, the final rollouts), {summary['baseline_evaluations']:g} measured the knapsack rows")
    if summary.get("heldout_summary") == "returned":
        print(f"(held out: the returned plan and its reference only, heldout_summary: returned; the unquantized model and the "
              f"knapsack: windquant bench --preset {summary['preset']} --target-bits {summary['target_bits']:g} --allocators "
              f"knapsack calibrated-knapsack --plan RUN/returned_plan.json)")
    if summary.get("front"):
        print(f"front at every target: {summary['front']} (front.md; windquant plot RUN draws it)")
    on_validation = summary.get("selection", "on the proxy") != "on the proxy"  # then the final target's choice too
    others = {t: v for t, v in summary.get("targets", {}).items() if on_validation or float(t) != summary["target_bits"]}
    for target, entry in others.items():
        proxies = ", ".join(f"{name} {value['proxy_ppl']:.2f}" + (f" (validation {value['validation_ppl']:.2f})" if "validation_ppl" in value else "")
                            for name, value in entry.items() if name != "returned")
        print(f"at {target} bits, proxy PPL: {proxies} (returned: {entry['returned']}; held-out: windquant bench --plan "
              f"returned_plan_{target}.json)")
    model_dtype = summary.get("model_dtype", "float32")
    proxy = "matrix products in bf16 (autocast)" if summary.get("proxy_dtype") == "bfloat16" else f"in {model_dtype}"
    print(f"(proxy PPL: {proxy}; held-out PPL in {model_dtype}: {summary['heldout_tokens']} tokens of the "
          "wiki-sample eval split)")
