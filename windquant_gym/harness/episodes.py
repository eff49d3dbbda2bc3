"""Run any allocator on a WindQuant env, episode by episode, with honest accounting.

An allocator is a callable ``(observation, action_mask) -> action`` (optionally with
``begin_episode(env)``, ``name`` and ``evaluations``), any SB3 model (MaskablePPO gets the
masks), or a saved plan (:class:`QuantPlan` or a path to one), which is replayed and validated.

Every result counts the proxy evaluations its allocator spent to choose the plan, in
full-proxy-pass equivalents, the plan's own measurement included: 1 for an allocator that
decides without looking at the model's loss (uniform, heuristic, knapsack, any callable that
does not say otherwise through an ``evaluations`` attribute); what a search spent; the
episodes an SB3 model was trained on plus 1 (its ``num_timesteps`` over the env's units); for
a replayed plan, what its file records.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import TableMismatchError
from ..eval.perplexity import block_nlls
from ..plan import QuantPlan
from ..quant.apply import quantized_weights, streamed_quantized_weights
from ..allocators.base import PlannedAllocator


@dataclass
class EpisodeResult:
    allocator: str
    target_bits: float
    effective_bits: float
    storage_bits: float
    proxy_ppl: float
    heldout_ppl: Optional[float]
    seconds: float
    """Wall time of the episode: every decision plus the proxy evaluation."""
    fallbacks: int
    episode: int = 0
    evaluations: Optional[float] = 1.0
    """Proxy passes (full-pass equivalents) spent to choose the plan; None when unknown."""
    proxy_metric: str = "nll"
    """What the env's reward measured the plan by (``proxy_kl`` is set for ``"kl"``)."""
    proxy_kl: Optional[float] = None
    plan: List[int] = field(default_factory=list, repr=False)
    heldout_window_nll: Optional[List[float]] = field(default=None, repr=False)
    """Mean NLL of each held-out window (what a paired bootstrap compares plans by)."""

    def row(self) -> Dict[str, Any]:
        data = asdict(self)
        data.pop("plan")
        return data


class _SB3Allocator:
    def __init__(self, model):
        from sb3_contrib import MaskablePPO

        self.model = model
        self.masked = isinstance(model, MaskablePPO)
        self.name = type(model).__name__
        self.evaluations: Optional[float] = None
        self.extra_evaluations = 0.0
        """Proxy passes spent besides the training episodes (a measured warm start)."""
        self.training_evaluations: Optional[float] = None
        """Proxy passes the training episodes spent, where the run's summary says (a racing env,
        ``race_blocks``, spends less than one per episode); else one per episode trained."""

    def begin_episode(self, env) -> None:
        # the training episodes' passes (one each unless the run says otherwise); this episode measures one more
        trained = self.model.num_timesteps / env.unwrapped.n_units if self.training_evaluations is None else self.training_evaluations
        self.evaluations = trained + 1 + self.extra_evaluations

    def __call__(self, observation, action_mask) -> int:
        if self.masked:
            action, _ = self.model.predict(observation, action_masks=action_mask, deterministic=True)
        else:
            action, _ = self.model.predict(observation, deterministic=True)
        return int(action)


class _Replay:
    """Plays a saved plan; ``check`` refuses a table the plan was not made for."""

    def __init__(self, plan: QuantPlan, name: str):
        self.saved, self.name, self._t = plan, name, 0
        self.evaluations = plan.metrics.get("evaluations")

    def begin_episode(self, env) -> None:
        self.saved.check(env.unwrapped.table)
        self._t = 0

    def __call__(self, observation, action_mask) -> int:
        action = self.saved.actions[self._t]
        self._t += 1
        return int(action)


def as_allocator(allocator: Any) -> Callable:
    """Wrap SB3 models and saved plans; leave callables as they are."""
    if isinstance(allocator, (str, Path)):
        return _Replay(QuantPlan.load(allocator), f"plan:{Path(allocator).name}")
    if isinstance(allocator, QuantPlan):
        return _Replay(allocator, "plan")
    if hasattr(allocator, "predict") and hasattr(allocator, "policy"):
        return _SB3Allocator(allocator)
    if callable(allocator):
        return allocator
    raise TypeError(f"An allocator must be callable(obs, mask), an SB3 model or a plan; got {type(allocator).__name__}.")


@dataclass
class EpisodeTrace:
    """What one episode showed the allocator, step by step (:func:`play_episode` with ``trace``)."""

    observations: List[np.ndarray] = field(default_factory=list)
    masks: List[np.ndarray] = field(default_factory=list)
    actions: List[int] = field(default_factory=list)
    rewards: List[float] = field(default_factory=list)
    """One per step taken (the last is missing when the episode stopped before its last step)."""


def play_episode(env, policy: Callable, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None,
                 trace: bool = False, stop_before_last: bool = False) -> Tuple[Optional[Dict[str, Any]], Optional[EpisodeTrace]]:
    """The one episode loop: reset ``env`` (``seed``, ``options``), let ``policy(obs, mask)``
    decide every unit (``policy.begin_episode(env)`` first where it has one), return the final
    step's ``info`` and, with ``trace``, every observation, mask, action and reward.

    ``stop_before_last`` leaves the last decision untaken (the info is then None): the episode's
    actions are known without paying its proxy pass, as a behaviour-cloning walk needs."""
    obs, _ = env.reset(seed=seed, options=options)
    if hasattr(policy, "begin_episode"):
        policy.begin_episode(env)
    mask_of = env.get_wrapper_attr("action_masks")
    n_units = env.unwrapped.n_units
    record = EpisodeTrace() if trace else None
    info = None
    for t in range(n_units):
        mask = np.asarray(mask_of(), dtype=bool)
        action = int(policy(obs, mask))
        if record is not None:
            record.observations.append(np.asarray(obs, dtype=np.float32))
            record.masks.append(mask)
            record.actions.append(action)
        if stop_before_last and t == n_units - 1:
            break
        obs, reward, done, _, info = env.step(action)
        if record is not None:
            record.rewards.append(float(reward))
        if done:
            break
    return (None if stop_before_last else info), record


def heldout_window_nlls(env, plan, blocks: torch.Tensor) -> torch.Tensor:
    """``[n]`` mean NLL of each of the held-out ``blocks`` with ``plan`` applied to the env's
    model (restored after); ``plan=None``: the unquantized model."""
    return plan_window_nlls(env.unwrapped.problem, plan, blocks)


def plan_window_nlls(problem, plan, blocks: torch.Tensor) -> torch.Tensor:
    """:func:`heldout_window_nlls` on a :class:`QuantProblem` instead of an env."""
    if plan is None:
        return block_nlls(problem.model, blocks, batch_size=problem.batch_size)
    if problem.stream:  # one decoder layer's weights assembled at a time, as in the proxy pass (per batch here)
        with streamed_quantized_weights(problem.model, problem.table, plan, problem.assembler(per_layer=True)):
            return block_nlls(problem.model, blocks, batch_size=problem.batch_size)
    with quantized_weights(problem.model, problem.table, plan):
        return block_nlls(problem.model, blocks, batch_size=problem.batch_size)


def heldout_perplexity(env, plan, blocks: torch.Tensor) -> float:
    """Perplexity of ``blocks`` with ``plan`` applied to the env's model (restored after)."""
    return math.exp(float(heldout_window_nlls(env, plan, blocks).mean()))


def run_allocator(
    env,
    allocator: Any,
    episodes: int = 1,
    heldout: Optional[torch.Tensor] = None,
    name: Optional[str] = None,
    seed: Optional[int] = None,
) -> List[EpisodeResult]:
    """Run ``allocator`` for ``episodes`` episodes of ``env`` (any wrapper of WindQuant-v0);
    held-out perplexity of each plan when ``heldout`` blocks are given."""
    policy = as_allocator(allocator)
    label = name or getattr(policy, "name", None) or getattr(allocator, "__name__", type(allocator).__name__)
    results = []
    for episode in range(episodes):
        started = time.perf_counter()
        info, _ = play_episode(env, policy, seed=None if seed is None else seed + episode)
        seconds = time.perf_counter() - started
        if isinstance(policy, _Replay):
            _validate_replay(env, policy.saved, info)
        if isinstance(policy, PlannedAllocator) and policy.exact:
            _check_played(env, policy, info)
        windows = heldout_window_nlls(env, info["plan"], heldout) if heldout is not None else None
        results.append(EpisodeResult(
            allocator=label,
            target_bits=info["target_bits"],
            effective_bits=info["effective_bits"],
            storage_bits=info["storage_bits"],
            proxy_ppl=info["proxy_ppl"],
            heldout_ppl=math.exp(float(windows.mean())) if windows is not None else None,
            seconds=seconds,
            fallbacks=info["fallbacks"],
            episode=episode,
            evaluations=getattr(policy, "evaluations", 1.0),
            proxy_metric=info.get("proxy_metric", "nll"),
            proxy_kl=info.get("proxy_kl"),
            plan=list(info["plan"]),
            heldout_window_nll=windows.tolist() if windows is not None else None,
        ))
    return results


def _check_played(env, policy: PlannedAllocator, info: Dict[str, Any]) -> None:
    """An exact planned allocator's plan must be what the env played: no action projected by the masks."""
    differ = np.flatnonzero(np.asarray(info["plan"]) != policy.plan)
    if differ.size:
        i = int(differ[0])
        raise TableMismatchError(
            f"{type(policy).__name__} planned action {policy.plan[i]} for unit {i}, but the env's masks turned it into "
            f"{info['plan'][i]} ({differ.size} units differ): the plan breaks the budget ({info['target_bits']} bits) "
            "or the precision rules. An allocator with exact = True must plan within env.budget_bits and env.rule_mask."
        )


def _validate_replay(env, saved: QuantPlan, info: Dict[str, Any]) -> None:
    played = np.asarray(info["plan"])
    wanted = np.asarray(saved.actions)
    differ = np.flatnonzero(played != wanted)
    if differ.size:
        i = int(differ[0])
        unit = env.unwrapped.units[i]
        raise TableMismatchError(
            f"Replaying the plan changed {differ.size} units, first unit {i} ({unit.module} columns "
            f"{unit.col_start}:{unit.col_end}): action {wanted[i]} was masked and became {played[i]}. "
            f"The plan does not fit this env's budget ({info['target_bits']} bits) or rules; use its target."
        )
    keys = ["effective_bits", "storage_bits"]
    # a proxy PPL measured at another precision (a plan from a bf16-proxy run) is not comparable
    if saved.metrics.get("proxy_dtype", "float32") == env.unwrapped.problem.proxy_dtype:
        keys.append("proxy_ppl")
    for key in keys:
        expected = saved.metrics.get(key)
        if expected is not None and not math.isclose(info[key], expected, rel_tol=1e-6):
            raise TableMismatchError(
                f"Replayed plan gives {key} {info[key]!r}, the plan file says {expected!r}: the env's model, "
                "calibration or evaluation differs from the one the plan was measured on."
            )
