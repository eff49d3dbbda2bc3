"""The training recipe, typed: what a block of ``hyperparams.yml`` may say, validated.

A preset (a block merged over ``default``) loads into :class:`Recipe`: frozen dataclasses in
the torchao ``core/config.py`` way, each checked in ``__post_init__``, a key the recipe does
not know refused by name (with the nearest known one), JSON/YAML round-trip exact
(:meth:`Recipe.to_dict` / :meth:`Recipe.from_dict`). ``windquant train`` validates every
preset through it; the run's ``config.json`` keeps :meth:`Recipe.to_dict`.

The sections handed to a config of their own are checked against that config's fields:
``env_kwargs`` against ``WindQuant-v0``'s keyword arguments, ``reward`` against
:class:`~windquant_gym.envs.RewardConfig`, ``loss_reward`` against
:class:`~windquant_gym.envs.LossRewardConfig` (which then validate the values)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..errors import ConfigError
from ..allocators.calibrated_knapsack import CALIBRATED_KNAPSACKS
from ..quant.bitwidths import check_bits

RECIPE_VERSION = 1

OBSERVATIONS = ("paper", "action-costs")
REWARD_KINDS = ("eq5", "proxy-loss")
DEMONSTRATIONS = ("knapsack", *CALIBRATED_KNAPSACKS)
LR_SCHEDULES = ("constant", "linear")
HELDOUT_SUMMARIES = ("full", "returned")
ADVANTAGES = ("gae", "episode-baseline")
CALIBRATE_EACH = "each"
"""``warm_start.calibrate_at: each``: the teacher calibrated at every curriculum target."""


def _refuse_unknown(section: str, given: Mapping[str, Any], known) -> None:
    unknown = [k for k in given if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        where = f"{section.rstrip('.')}: " if section else ""
        raise ConfigError(f"Unknown key(s) in a hyperparameter block, {where}{', '.join(hints)}; the known keys are "
                          f"{sorted(known)}. Fix the name in the YAML (agents/hyperparams.yml or --hyperparams).")


def _number(section: str, name: str, value: Any, *, low: float = -math.inf, low_open: bool = False,
            integer: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        need = "an integer" if integer else "a finite number"
        bound = f" {'>' if low_open else '>='} {low:g}" if low > -math.inf else ""
        raise ConfigError(f"{section}{name} must be {need}{bound}, got {value!r} (hyperparameter YAML).")


def _choice(section: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}{name} must be one of {list(choices)}, got {value!r} (hyperparameter YAML).")


def _flag(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{section}{name} must be true or false, got {value!r} (hyperparameter YAML).")


class _Section:
    """Shared by the recipe's dataclasses: built from a dict with unknown keys refused, and
    back to a dict of plain values (None-valued optional keys left out, as the YAML does)."""

    _section = ""

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]):
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls._section or 'A hyperparameter block'} must be a mapping, got {data!r}.")
        _refuse_unknown(cls._section, data, {f.name for f in fields(cls)})
        return cls(**dict(data))

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = json.loads(json.dumps(value))  # a plain copy
            out[f.name] = value
        return out


@dataclass(frozen=True)
class CloneRecipe(_Section):
    """Settings of one behaviour-cloning fit (:func:`~windquant_gym.agents.imitation.behaviour_clone`)."""

    epochs: int = 200
    learning_rate: float = 3e-3
    batch_size: int = 256
    entropy_coef: float = 0.0
    value_coef: float = 1.0
    target_accuracy: float = 1.0
    """Stop once the deterministic policy replays this share of the demonstrated steps."""

    def __post_init__(self) -> None:
        s = self._section
        _number(s, "epochs", self.epochs, low=1, integer=True)
        _number(s, "batch_size", self.batch_size, low=1, integer=True)
        _number(s, "learning_rate", self.learning_rate, low=0, low_open=True)
        for name in ("entropy_coef", "value_coef", "target_accuracy"):
            _number(s, name, getattr(self, name), low=0)

    def clone_settings(self) -> Dict[str, Any]:
        """The keyword arguments of ``behaviour_clone``."""
        return {f.name: getattr(self, f.name) for f in fields(CloneRecipe)}


@dataclass(frozen=True)
class WarmStartRecipe(CloneRecipe):
    """``warm_start:``: behaviour cloning on a teacher's plans before PPO (agents/imitation.py)."""

    _section = "warm_start."
    demonstrations: str = "knapsack"
    """The teacher: ``knapsack`` (no proxy pass), ``calibrated-knapsack`` (7 passes) or
    ``calibrated-knapsack-kv`` (10: the key and value projections' errors calibrated too)."""
    fit_critic: bool = True
    """Fit the critic to measured walks through the teacher's plans (one pass per target)."""
    calibrate_at: Optional[Union[float, str]] = None
    """Target the calibrated knapsack's layer factors are chosen at, once, its scales then serving
    every target (default: the final one); ``each``: calibrated anew at every curriculum target,
    each target then keeping the best on the proxy of every target's scales
    (:func:`~windquant_gym.allocators.calibrated_knapsack.calibrate_each`: 30 passes for
    ``calibrated-knapsack-kv`` over three targets, plus one per other distinct set at each)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self._section, "demonstrations", self.demonstrations, DEMONSTRATIONS)
        _flag(self._section, "fit_critic", self.fit_critic)
        if isinstance(self.calibrate_at, str):
            if self.calibrate_at != CALIBRATE_EACH:
                raise ConfigError(f"warm_start.calibrate_at must be a number of bits or {CALIBRATE_EACH!r}, got "
                                  f"{self.calibrate_at!r} (hyperparameter YAML); e.g. calibrate_at: 2.0 or calibrate_at: each.")
        elif self.calibrate_at is not None:
            check_bits(self.calibrate_at, "warm_start.calibrate_at", "calibrate_at: 2.0 (or each)")
        if self.calibrate_at is not None and self.demonstrations not in CALIBRATED_KNAPSACKS:
            raise ConfigError(f"warm_start.calibrate_at is set ({self.calibrate_at!r}) but the teacher "
                              f"{self.demonstrations!r} is not calibrated; use demonstrations: calibrated-knapsack "
                              "(or -kv), or drop calibrate_at.")


@dataclass(frozen=True)
class SelfImitationRecipe(CloneRecipe):
    """``self_imitation:``: re-clone the policy onto the best plans seen, after each update."""

    _section = "self_imitation."


SELECT_BY = ("proxy", "validation")


@dataclass(frozen=True)
class SelectionRecipe(_Section):
    """``selection:``: which plan a run returns at each target (:mod:`.selection`). Without the
    block: the better by the proxy of the deterministic policy's plan and the best plan seen."""

    _section = "selection."
    by: str = "validation"
    """``validation``: the best on the calibration text's validation split of the
    ``candidates`` best plans seen (by the proxy) and the policy's; ``proxy``: today's choice."""
    candidates: int = 4
    """How many of the best plans seen (distinct, by the proxy) are measured on the validation split."""
    windows: int = 16
    """Validation blocks each candidate is measured on (their passes count as proxy passes). 16 x
    256: on the validation split alone, 16 windows' ranking of 12 returned 2.0-bit plans agreed
    with the other 48 windows' at a mean rank correlation of 0.87 (32: 0.90, 8: 0.80; issue 21)."""
    seq_len: int = 256

    def __post_init__(self) -> None:
        s = self._section
        _choice(s, "by", self.by, SELECT_BY)
        for name in ("candidates", "windows"):
            _number(s, name, getattr(self, name), low=1, integer=True)
        _number(s, "seq_len", self.seq_len, low=2, integer=True)


@dataclass(frozen=True)
class SweepResources(_Section):
    """``sweep_resources:``: what ``windquant sweep`` reserves per run on Ray."""

    _section = "sweep_resources."
    cpus: float = 1
    gpus: float = 0

    def __post_init__(self) -> None:
        _number(self._section, "cpus", self.cpus, low=0, low_open=True)
        _number(self._section, "gpus", self.gpus, low=0)


def _env_keywords() -> set:
    from ..envs.windquant import WindQuantEnv

    params = inspect.signature(WindQuantEnv.__init__).parameters
    return {name for name in params if name not in ("self", "model", "device", "progress", "reward_config")}


def _config_fields(config_class) -> set:
    return {f.name for f in fields(config_class)} - {"version"}


@dataclass(frozen=True)
class Recipe(_Section):
    """One preset of ``hyperparams.yml``, merged over ``default``. Defaults are the paper's
    (sections 3.4 and 4.1) where it gives them; ours are marked."""

    version: int = RECIPE_VERSION
    # ----- PPO (paper 3.4 / 4.1) -----
    learning_rate: float = 5e-4
    lr_schedule: Optional[str] = None
    """``constant`` (default) or ``linear`` (falling to 0)."""
    clip_range: float = 0.2
    ent_coef: float = 0.05
    vf_coef: float = 0.5
    n_epochs: int = 3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    batch_size: int = 128
    """Ours: the PPO minibatch inside a rollout of whole episodes."""
    hidden_size: int = 128
    """Ours: the policy's width."""
    shared_trunk: Optional[bool] = None
    """Policy and critic share one trunk (default: true, SB3's layout)."""
    episodes_per_update: Optional[int] = None
    """Episodes per PPO rollout (default 1)."""
    ppo_updates: Optional[bool] = None
    """false: PPO's learning rate 0, the control that isolates its gradient (default true)."""
    advantage: Optional[str] = None
    """``gae`` (default: SB3's, from the critic) or ``episode-baseline``: every step of an episode
    gets the episode's return minus the mean of the rollout's other episodes at its target
    (leave-one-out; :mod:`.episode_baseline`)."""
    # ----- length and targets -----
    episodes: int = 100
    curriculum: Tuple[float, ...] = (3.0, 2.5, 2.0, 2.0)
    sampled_targets: Optional[Tuple[float, ...]] = None
    """Targets drawn per episode (one policy for every budget) in place of the curriculum."""
    front: Optional[bool] = None
    """Write front.{json,csv,md} at the end (default: for ``sampled_targets``)."""
    # ----- evaluation, checkpoints, sweeps -----
    eval_windows: int = 64
    eval_seq_len: int = 256
    heldout_summary: Optional[str] = None
    """Which plans the end-of-run summary measures on the held-out windows: ``full`` (default:
    the unquantized model, the policy's and the best-seen plan, the teacher's and the
    knapsack's) or ``returned`` (the returned plan and the one it is compared with, the
    teacher's where there is one: two held-out passes instead of up to five)."""
    checkpoint_every: int = 10
    sweep_resources: Optional[SweepResources] = None
    selection: Optional[SelectionRecipe] = None
    """How the returned plan is chosen (default: by the proxy); :class:`SelectionRecipe`."""
    # ----- the env and what the policy sees and is paid -----
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``gym.make("WindQuant-v0", ...)`` (``seed`` picks the calibration)."""
    observation: Optional[str] = None
    """``paper`` (default: the 15 features) or ``action-costs``."""
    normalize_observation: Optional[bool] = None
    reward_kind: Optional[str] = None
    """``eq5`` (default: the env's own, configured by ``reward``) or ``proxy-loss``."""
    reward: Optional[Mapping[str, Any]] = None
    """:class:`~windquant_gym.envs.RewardConfig` fields."""
    loss_reward: Optional[Mapping[str, Any]] = None
    """:class:`~windquant_gym.envs.LossRewardConfig` fields (``gamma`` comes from the recipe)."""
    warm_start: Optional[WarmStartRecipe] = None
    self_imitation: Optional[SelfImitationRecipe] = None

    def __post_init__(self) -> None:
        from ..envs import LossRewardConfig, RewardConfig

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.version != RECIPE_VERSION:
            raise ConfigError(f"Recipe version {self.version!r} is not this code's ({RECIPE_VERSION}); "
                              "write the block for this version or upgrade windquant-gym.")
        for name in ("learning_rate", "clip_range", "gamma", "gae_lambda"):
            _number("", name, getattr(self, name), low=0)
        for name in ("ent_coef", "vf_coef"):
            _number("", name, getattr(self, name), low=0)
        for name in ("n_epochs", "batch_size", "hidden_size", "episodes", "eval_windows", "eval_seq_len", "checkpoint_every"):
            _number("", name, getattr(self, name), low=1, integer=True)
        if self.episodes_per_update is not None:
            _number("", "episodes_per_update", self.episodes_per_update, low=1, integer=True)
        for name in ("shared_trunk", "ppo_updates", "front", "normalize_observation"):
            if getattr(self, name) is not None:
                _flag("", name, getattr(self, name))
        if self.advantage is not None:
            _choice("", "advantage", self.advantage, ADVANTAGES)
        if self.heldout_summary is not None:
            _choice("", "heldout_summary", self.heldout_summary, HELDOUT_SUMMARIES)
        if self.lr_schedule is not None:
            _choice("", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.observation is not None:
            _choice("", "observation", self.observation, OBSERVATIONS)
        if self.normalize_observation is False and (self.observation or "paper") != "action-costs":
            # the switch belongs to ActionCostObservation; with the paper's features it did nothing
            # (issue 21: two such runs repeated cpu's episodes exactly)
            raise ConfigError(
                f"normalize_observation: false only changes observation: action-costs (ActionCostObservation's "
                f"normalisation), but the observation is {self.observation or 'paper'!r}, whose features have no such "
                "switch; set observation: action-costs, or drop normalize_observation (hyperparameter YAML)."
            )
        if self.reward_kind is not None:
            _choice("", "reward_kind", self.reward_kind, REWARD_KINDS)
        for name, example in (("curriculum", "curriculum: [3.0, 2.5, 2.0]"), ("sampled_targets", "sampled_targets: [1.75, 2.0, 3.5]")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not list(value):
                raise ConfigError(f"{name} must be a non-empty list of targets in bits, got {value!r}; e.g. {example}.")
            set_(name, tuple(check_bits(list(value), name, example)))
        if not isinstance(self.env_kwargs, Mapping):
            raise ConfigError(f"env_kwargs must be a mapping of WindQuant-v0's keyword arguments, got {self.env_kwargs!r}.")
        _refuse_unknown("env_kwargs", self.env_kwargs, _env_keywords())
        for name, config in (("reward", RewardConfig), ("loss_reward", LossRewardConfig)):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{name} must be a mapping of {config.__name__} fields, got {value!r}.")
                _refuse_unknown(name, value, _config_fields(config) - ({"gamma"} if name == "loss_reward" else set()))
        for name, section in (("warm_start", WarmStartRecipe), ("self_imitation", SelfImitationRecipe),
                              ("sweep_resources", SweepResources), ("selection", SelectionRecipe)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, section):
                set_(name, section.from_dict(value))

    @property
    def chooses_on_validation(self) -> bool:
        """Whether the returned plans are chosen on the validation split (``selection: {by: validation}``)."""
        return self.selection is not None and self.selection.by == "validation"

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "Recipe":
        if not isinstance(data, Mapping):
            raise ConfigError(f"A hyperparameter block must be a mapping of settings, got {data!r}.")
        return super().from_dict(data)


def as_recipe(recipe) -> Recipe:
    """``recipe`` as a :class:`Recipe` (a plain hyperparameter dict is validated into one)."""
    return recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
