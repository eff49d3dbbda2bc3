"""WindQuant-v0: assign a precision to every column chunk of an LLM under a bit budget."""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch.nn as nn
from gymnasium import spaces

from ..errors import ConfigError
from ..eval.divergence import check_proxy_metric
from ..compute.kernels import resolve_proxy_dtype
from ..models.loading import load_model
from ..problem import QuantProblem
from ..quant.bitwidths import ACTION_BITS, N_ACTIONS, SKIP_ACTION, check_bits
from ..quant.config import QuantConfig
from .budget_price import BudgetPrice
from .features import unit_features
from .proxy_race import ProxyRace, check_race
from .rewards import RewardConfig, final_reward, step_reward, update_lambda
from .rules import PrecisionRules

_BITS = np.asarray(ACTION_BITS, dtype=np.float64)
BUDGET_TOLERANCE = 1e-6
"""Bits by which a plan's summed cost may exceed the budget (guards float sums at the exact budget)."""


def quant_config_from_kwargs(
    chunk_size: int = 256, salient_rate: float = 0.03, quant_config: Optional[QuantConfig | Mapping[str, Any]] = None
) -> QuantConfig:
    """The env's :class:`QuantConfig` from its kwargs: ``quant_config`` as given, or a dict of
    its fields (a preset's YAML) read over ``chunk_size`` and ``salient_rate``."""
    if isinstance(quant_config, QuantConfig):
        return quant_config
    if quant_config is None:
        return QuantConfig(chunk_size=chunk_size, salient_rate=salient_rate)
    if isinstance(quant_config, Mapping):
        return QuantConfig.from_dict({"chunk_size": chunk_size, "salient_rate": salient_rate, **quant_config})
    raise ConfigError(
        f"quant_config must be a QuantConfig or a dict of its fields, got {type(quant_config).__name__}; "
        "e.g. quant_config={'compensation': 'none'}."
    )


class WindQuantEnv(gym.Env):
    """
    ## Description

    WINDQuant (Nguyen et al., 2026) as an env. A causal LM's decoder Linear weights are cut
    into units: ``chunk_size`` consecutive input columns of one Linear, all output rows. An
    episode visits every unit once, layer by layer, and the agent picks each unit's
    precision. At the end the plan is applied to the model, the proxy perplexity on the
    calibration blocks is measured, the model gets its own weights back, and the episode-end
    reward scores the plan. Each (unit, action) is quantized once, when the env is built
    (the quantization table, cached on disk): an episode costs N cheap steps and one forward
    pass.

    ## Action Space

    ``Discrete(7)``: the bits of the current unit, ``ACTION_BITS = (16, 8, 4, 3, 2, 1.58, 1)``
    in index order; 0 keeps the unit in FP16 (skip). ``action_masks()`` returns the allowed
    actions: those meeting the minimum-precision rules after which the remaining units
    could still meet the budget at their cheapest allowed action (exact, from the table's
    per-unit costs). It is never all false: when the target cannot be met at all, the
    cheapest allowed actions stay open. A masked action (from an algorithm that ignores
    masks) is projected to the allowed action nearest in bits (ties to more bits) and
    ``info["action_projected"]`` is True.

    ## Observation Space

    ``Box(-inf, inf, (15,), float32)``, paper Table 1 in order: 0 mean, 1 std, 2 abs_mean,
    3 sparsity (``|W| < 1e-6``), 4 outlier_frac (``|W| > 0.5 P99``) of the current unit's
    weights; 5 progress ``t/N``; 6 bits_used_ratio ``B_used / (32 sum n)``; 7
    budget_remaining ``(B_target - B_used) / B_target``; 8 urgency
    ``max(0, 1 - B_r / (b_target n_r))``; 9-11 mean, std, max of the unit's activation
    scales; 12 is_attention; 13 is_mlp; 14 ``b_target / 8``. Bits are effective bits
    (paper eq. 6). After the last step the observation repeats the last unit's features.

    ## Rewards

    Every step: dense shaping (``RewardConfig.step_*``; a skip costs a little, a unit at
    or under the target earns in proportion to the bits it saves, one over it loses a
    little; each step carries 1/N of those weights; optionally, not in the paper and off by
    default, ``RewardConfig.step_error_coef`` charges each step its measured reconstruction
    error). Last step, added: paper eq. 5,
    ``alpha G_c - P_qual - P_budget - P_ppl - P_skip + B_quality`` (see
    :class:`RewardConfig`), each term in ``info["reward_terms"]``. After each episode the
    Lagrange multiplier of ``P_qual`` takes a projected gradient-ascent step.

    ## Starting State

    The first unit, nothing spent. The env itself is deterministic; ``seed`` fixes which
    calibration blocks are sampled.

    ## Episode End

    Terminates after the last unit (N steps); never truncates. The terminal ``info`` holds
    ``plan`` (requested actions), ``stored_plan`` (after fallback), ``effective_bits``,
    ``storage_bits``, ``proxy_ppl`` (and the ``proxy_dtype`` it was measured in),
    ``proxy_metric`` (and with ``"kl"``, ``proxy_kl``), ``baseline_ppl``, ``ppl_ratio``,
    ``loss_increase``, ``fallbacks``,
    ``reward_terms``, ``lagrange_lambda``, ``episode_seconds`` (and of it ``assemble_seconds``,
    ``forward_seconds``: the proxy evaluation's two parts), ``proxy_blocks`` (calibration
    blocks measured), ``proxy_complete`` (all of them) and ``proxy_passes`` (full-pass
    equivalents spent; 1.0 without ``race_blocks``).

    ## Arguments

    ``gym.make("WindQuant-v0", model=..., tokenizer=None, calibration="wiki-sample",
    target_bits=2.0, chunk_size=256, salient_rate=0.03, n_calibration_samples=64,
    calibration_seq_len=256, device="auto", reward_config=None, precision_rules=None,
    quant_config=None, seed=0, cache=True, progress=True, problem=None, proxy_dtype=None,
    proxy_metric="nll", race_blocks=None, race_margin=0.01)``

    * ``model``: an ``nn.Module`` causal LM (then ``tokenizer`` is required) or a name for
      ``load_model`` (``"smollm2-135m"``, ``"tiny-llama"``, a local folder, a hub id). A
      module is borrowed: its weights are back, bit for bit, after every episode.
    * ``calibration``: corpus name/path for ``load_texts`` or a list of strings.
    * ``quant_config``: a full :class:`QuantConfig`, which then overrides ``chunk_size`` and
      ``salient_rate``; or a dict of some of its fields (a preset's YAML), read over them,
      e.g. ``{"compensation": "none", "error_metric": "activation"}`` for the paper's fit.
    * ``problem``: a prepared :class:`QuantProblem` to share between envs.
    * ``proxy_dtype``: precision of the proxy pass, ``"float32"`` (default) or
      ``"bfloat16"`` (bf16 autocast: 1.4x faster on a CPU with avx512_bf16; the proxy PPL
      moves by < 1% and ranked 24 plans identically in ``benchmarks/proxy_precision.py``),
      or ``"auto"``: bfloat16 where the device multiplies in bf16 natively (a CPU with
      avx512_bf16 or AMX, a bf16 GPU), float32 elsewhere; ``info["proxy_dtype"]`` says which.
      The reward compares plan and baseline at the same precision.
    * ``proxy_metric``: what the episode-end reward measures the plan by. ``"nll"``
      (default, the paper): the proxy loss ``L_Q`` on the calibration blocks,
      ``loss_increase = (L_Q - L_0) / L_0`` and ``ppl_ratio = exp(L_Q - L_0)``. ``"kl"``: the
      mean KL divergence ``D`` of the plan's next-token distributions from the unquantized
      model's on the same tokens (top-128 reference, :mod:`windquant_gym.eval.divergence`),
      read as the excess loss over the reference: ``loss_increase = D / L_0`` and
      ``ppl_ratio = exp(D)``, so eq. 5's constants keep their meaning. Costs one extra pass
      of the unquantized model when the env is made; the episode's pass gives both numbers.
    * ``race_blocks``: measure each episode's plan on this many random calibration blocks
      first, and on the rest only when its perplexity ratio there is within ``1 +
      race_margin`` of the best complete measurement at its target (or none exists yet)
      (:mod:`~windquant_gym.envs.proxy_race`, after the search's multi-stage selection). An
      incomplete episode's ``ppl_ratio`` and reward are the estimate from its blocks, against
      the unquantized model's NLL on the same blocks (its ``proxy_ppl``: the proxy baseline
      times that ratio), and ``info["proxy_complete"]`` is false; the bar a plan must come
      near is always a complete measurement. ``None`` (default): every block every episode.
      ``proxy_metric="nll"`` only; costs one unquantized pass when the env is made (the
      per-block baseline).

    ## Version History

    * v0: initial version (paper Table 1 observation, 7 actions, eq. 5 reward). Later
      additions that leave the default's rewards, observations and actions as they were:
      ``RewardConfig.step_error_coef`` (off by default), ``proxy_dtype`` (float32 by default),
      ``proxy_metric`` (``"nll"`` by default). Opt-in wrappers that leave the env as it is:
      :class:`ActionCostObservation` (a 48-dim observation with each action's table error
      and bits, the budget's Lagrangian price and the unit's position) and
      :class:`ProxyLossReward` (``-ln`` of the proxy perplexity ratio plus a potential-based
      dense part), both used by the ``cpu`` training preset; read-only accessors
      ``unit_index``, ``bits_spent``, ``remaining_bits``, ``remaining_weights``,
      ``unit_statistics`` and ``budget_price()`` for them.
      The default :class:`QuantConfig` became version 2 (issue 13): chunk-local error
      compensation (GPTQ) chooses the codes of every quantized copy and the table's error is
      the output error on the calibration tokens. An action still means the same bit width,
      and eq. 5 the same reward, but the same plan now gets better weights, so its proxy loss
      and reward differ from before: ``quant_config={"compensation": "none", "error_metric":
      "activation"}`` rebuilds the earlier table exactly. Plan files carry their quant config
      and table fingerprint, so a plan made on the earlier table is refused on the new one
      with an error that names the difference, never silently re-scored.
      Issue 21 (nothing of the env's rewards, observations or actions changed): the opt-in
      :class:`TargetSampler` wrapper (a target drawn per episode, for one policy over every
      budget); every proxy pass counted on the problem (``QuantProblem.proxy_passes``).
      Issue 22 (nothing of the env's rewards, observations or actions changed): the read-only
      ``budget_pace`` (bits per weight left over the target's; the observation's urgency is
      ``max(0, 1 - budget_pace)``), which :class:`ActionCostObservation` reads instead of
      deriving it again; ``target_bits`` accepts what :func:`~windquant_gym.quant.bitwidths.check_bits`
      accepts (any number in [1, 16], the one range check of the package).
      Issue 21, racing (the default's rewards, observations and actions unchanged): opt-in
      ``race_blocks`` / ``race_margin``; the terminal info's ``proxy_blocks``,
      ``proxy_complete`` and ``proxy_passes``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer: Any = None,
        calibration: str | Sequence[str] = "wiki-sample",
        target_bits: float = 2.0,
        chunk_size: int = 256,
        salient_rate: float = 0.03,
        n_calibration_samples: int = 64,
        calibration_seq_len: int = 256,
        device: str = "auto",
        reward_config: Optional[RewardConfig] = None,
        precision_rules: Optional[PrecisionRules] = None,
        quant_config: Optional[QuantConfig | Mapping[str, Any]] = None,
        seed: int = 0,
        cache: bool | str = True,
        progress: bool = True,
        problem: Optional[QuantProblem] = None,
        proxy_dtype: Optional[str] = None,
        proxy_metric: str = "nll",
        race_blocks: Optional[int] = None,
        race_margin: float = 0.01,
    ):
        super().__init__()
        self.proxy_metric = check_proxy_metric(proxy_metric)
        self.reward_config = reward_config or RewardConfig()
        self.precision_rules = precision_rules or PrecisionRules()
        if not isinstance(self.reward_config, RewardConfig):
            raise ConfigError(f"reward_config must be a RewardConfig, got {type(self.reward_config).__name__}.")
        check_bits(target_bits)  # before the (slow) table build
        if problem is None:
            model_name = None
            if isinstance(model, str):
                model_name = model
                model, loaded_tokenizer = load_model(model, device=device, progress=progress)
                tokenizer = tokenizer or loaded_tokenizer
            elif not isinstance(model, nn.Module):
                raise ConfigError(f"model must be an nn.Module or a model name, got {type(model).__name__}.")
            if tokenizer is None:
                raise ConfigError(
                    f"WindQuant-v0 got a model module ({type(model).__name__}) but no tokenizer: pass tokenizer=... (the one that goes "
                    "with the model), or pass the model by name, e.g. model='smollm2-135m'."
                )
            config = quant_config_from_kwargs(chunk_size, salient_rate, quant_config)
            problem = QuantProblem.build(
                model, tokenizer, calibration, config, n_samples=n_calibration_samples,
                seq_len=calibration_seq_len, seed=seed, cache=cache, progress=progress,
                proxy_dtype="float32" if proxy_dtype is None else proxy_dtype, model_name=model_name,
            )
        elif proxy_dtype is not None and resolve_proxy_dtype(proxy_dtype, next(problem.model.parameters()).device) != problem.proxy_dtype:
            raise ConfigError(
                f"proxy_dtype={proxy_dtype!r} differs from the given problem's proxy_dtype={problem.proxy_dtype!r}; "
                f"leave proxy_dtype out, or build the problem with QuantProblem.build(..., proxy_dtype={proxy_dtype!r})."
            )
        self.problem = problem
        check_race(race_blocks, race_margin, len(problem.blocks), self.proxy_metric)
        self.race: Optional[ProxyRace] = None if race_blocks is None else ProxyRace(problem, race_blocks, race_margin)
        """The episodes' racing measurement (``race_blocks``); ``None``: every block every episode."""
        if self.proxy_metric == "kl":
            problem.kl_reference()  # now, while the model holds its own weights
        self.table = problem.table
        self.units = problem.units
        self.n_units = len(self.units)

        self._static = unit_features(problem.model, self.units, problem.calibration.act_scales)
        self._cost = self.table.unit_effective_bits  # [N, 7] bits of each unit per requested action
        self._n = self.table.n_weights.astype(np.float64)
        self._total = float(self._n.sum())
        self._remaining_weights = np.concatenate([np.cumsum(self._n[::-1])[::-1], [0.0]])
        self._rule_ok = self.precision_rules.allowed(self.units)
        cheapest = np.where(self._rule_ok, self._cost, np.inf).min(axis=1)
        self._suffix_min = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])

        self._budget_price: Optional[BudgetPrice] = None
        self._step_error = None  # optional per-step error shaping, RewardConfig.step_error_coef
        if self.reward_config.step_error_coef > 0:
            n_modules = len({u.module for u in self.units})
            self._step_error = self.reward_config.step_error_coef * self.table.module_normalized_error() / n_modules

        self.action_space = spaces.Discrete(N_ACTIONS)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(15,), dtype=np.float32)
        self.lagrange_lambda = self.reward_config.lambda_init
        self.episode_count = 0
        self.set_target_bits(target_bits)
        self._reset_episode()

    # ----- budget -----------------------------------------------------------------------------
    @property
    def rule_mask(self) -> np.ndarray:
        """``[N, 7]`` bool: actions the minimum-precision rules allow per unit (no budget)."""
        return self._rule_ok.copy()

    @property
    def budget_bits(self) -> float:
        """Total effective bits the current target allows (``target_bits * sum n``)."""
        return self.target_bits * self._total

    @property
    def min_feasible_bits(self) -> float:
        """Lowest average effective bits the precision rules allow."""
        return float(self._suffix_min[0] / self._total)

    @property
    def unit_index(self) -> int:
        """Index of the unit the next action decides (``n_units`` once the episode has ended)."""
        return self._t

    @property
    def remaining_weights(self) -> float:
        """Weights of the units still to decide."""
        return float(self._remaining_weights[self._t])

    @property
    def unit_statistics(self) -> np.ndarray:
        """``[N, 10]`` the per-unit statistics of the observation (:data:`STATIC_FEATURES` order)."""
        return self._static

    @property
    def bits_spent(self) -> float:
        """Effective bits the episode's decisions so far have spent."""
        return self._used

    @property
    def remaining_bits(self) -> float:
        """Effective bits the budget leaves for the units still to decide."""
        return self._budget - self._used

    @property
    def budget_pace(self) -> float:
        """Bits per weight the budget leaves for the units still to decide, over the target's:
        1 on track, below 1 behind (the observation's urgency is ``max(0, 1 - pace)``); 1 once
        no unit is left."""
        left = self._remaining_weights[self._t]
        return float((self._budget - self._used) / (self.target_bits * left)) if left > 0 else 1.0

    def budget_price(self) -> BudgetPrice:
        """The table's :class:`BudgetPrice` (the knapsack's Lagrangian prices) over the
        module-normalised errors and the rules' allowed actions; built once, on first use."""
        if self._budget_price is None:
            self._budget_price = BudgetPrice(self._cost, self.table.module_normalized_error(), self._rule_ok)
        return self._budget_price

    def set_target_bits(self, target_bits: float) -> None:
        """Change the budget (takes effect at the next reset; the curriculum uses this)."""
        target = check_bits(target_bits)
        if target < self.min_feasible_bits - BUDGET_TOLERANCE:
            raise ConfigError(
                f"target_bits={target} is below {self.min_feasible_bits:.4f}, the least the minimum-precision "
                f"rules {self.precision_rules} and {self.table.config.salient_rate:.0%} INT8 protection allow; "
                "raise target_bits or relax precision_rules / salient_rate."
            )
        self.target_bits = target

    # ----- gym API ----------------------------------------------------------------------------
    def _reset_episode(self) -> None:
        self._t = 0
        self._used = 0.0
        self._budget = self.target_bits * self._total
        self._plan = np.zeros(self.n_units, dtype=np.int64)
        self._mask: Optional[np.ndarray] = None
        self._started = time.perf_counter()

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None):
        super().reset(seed=seed)
        if options and "target_bits" in options:
            self.set_target_bits(options["target_bits"])
        self._reset_episode()
        return self._observation(), {"target_bits": self.target_bits, "n_units": self.n_units}

    def action_masks(self) -> np.ndarray:
        """Allowed actions for the current unit, ``bool[7]``, never all false."""
        if self._mask is None:
            t = min(self._t, self.n_units - 1)
            fits = self._used + self._cost[t] + self._suffix_min[t + 1] <= self._budget + BUDGET_TOLERANCE
            mask = self._rule_ok[t] & fits
            if not mask.any():  # infeasible already: the cheapest allowed action(s) stay open
                cost = np.where(self._rule_ok[t], self._cost[t], np.inf)
                mask = cost <= cost.min() + BUDGET_TOLERANCE
            self._mask = mask
        return self._mask.copy()

    def step(self, action):
        if self._t >= self.n_units:
            raise gym.error.ResetNeeded("The episode has ended: call reset() before step().")
        requested = int(action)
        if not 0 <= requested < N_ACTIONS:
            raise gym.error.InvalidAction(f"Action {action!r} is outside Discrete({N_ACTIONS}).")
        mask = self.action_masks()
        chosen = requested if mask[requested] else self._project(requested, mask)
        t = self._t
        cost = float(self._cost[t, chosen])
        self._used += cost
        self._plan[t] = chosen
        stored = int(self.table.stored_action[t, chosen])
        reward = step_reward(self.reward_config, cost / self._n[t], self.target_bits, stored == SKIP_ACTION, self.n_units)
        if self._step_error is not None:
            reward -= float(self._step_error[t, chosen])
        self._t += 1
        self._mask = None
        info: Dict[str, Any] = {"action": chosen, "action_projected": chosen != requested, "stored_action": stored}
        terminated = self._t == self.n_units
        if terminated:
            end = self._finish_episode()
            reward += end["reward_terms"]["total"]
            info.update(end)
        return self._observation(), float(reward), terminated, False, info

    def _project(self, requested: int, mask: np.ndarray) -> int:
        distance = np.abs(_BITS - _BITS[requested]) - _BITS * 1e-9  # ties go to more bits
        distance[~mask] = np.inf
        return int(np.argmin(distance))

    def _finish_episode(self) -> Dict[str, Any]:
        plan = self._plan.copy()
        if self.race is None:
            losses = self.problem.proxy_losses(plan, kl=self.proxy_metric == "kl")
            nll, base_nll = losses.nll, self.problem.baseline_nll
            measured = {"proxy_blocks": len(self.problem.blocks), "proxy_complete": True, "proxy_passes": 1.0}
        else:
            raced = self.race.measure(plan, self.target_bits, self.np_random)
            losses = None
            nll, base_nll = raced.nll, raced.base_nll
            measured = {"proxy_blocks": raced.blocks, "proxy_complete": raced.complete, "proxy_passes": raced.passes}
        proxy_ppl = math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf
        if self.proxy_metric == "nll":
            ratio = proxy_ppl / math.exp(base_nll) if math.isfinite(proxy_ppl) else 1e12
            loss_increase = (nll - base_nll) / base_nll if math.isfinite(nll) else 1e6
        else:  # the KL read as the plan's excess loss over the unquantized model's distributions
            ratio = math.exp(losses.kl) if math.isfinite(losses.kl) and losses.kl < 700 else 1e12
            loss_increase = losses.kl / base_nll if math.isfinite(losses.kl) else 1e6
        bits = self.table.plan_bits(plan)
        stored_plan = self.table.stored_action[np.arange(self.n_units), plan]
        terms = final_reward(
            self.reward_config,
            effective_bits=bits["effective_bits"],
            target_bits=self.target_bits,
            loss_increase=loss_increase,
            ppl_ratio=ratio,
            skip_fraction=float((stored_plan == SKIP_ACTION).mean()),
            lagrange_lambda=self.lagrange_lambda,
        )
        used_lambda = self.lagrange_lambda
        self.lagrange_lambda = update_lambda(self.reward_config, self.lagrange_lambda, loss_increase)
        self.episode_count += 1
        return {
            "plan": plan.tolist(),
            "stored_plan": stored_plan.tolist(),
            "effective_bits": bits["effective_bits"],
            "storage_bits": bits["storage_bits"],
            "target_bits": self.target_bits,
            "proxy_ppl": proxy_ppl,
            "proxy_dtype": self.problem.proxy_dtype,
            "proxy_metric": self.proxy_metric,
            **({"proxy_kl": losses.kl} if losses is not None and losses.kl is not None else {}),
            **measured,
            "baseline_ppl": math.exp(base_nll),
            "ppl_ratio": ratio,
            "loss_increase": loss_increase,
            "fallbacks": bits["fallbacks"],
            "reward_terms": terms,
            "lagrange_lambda": used_lambda,
            "episode_seconds": time.perf_counter() - self._started,
            **self.problem.last_timing,  # assemble_seconds, forward_seconds of the proxy evaluation
        }

    def _observation(self) -> np.ndarray:
        t = min(self._t, self.n_units - 1)
        static = self._static[t]
        remaining_budget = self._budget - self._used
        urgency = max(0.0, 1.0 - self.budget_pace)
        obs = np.empty(15, dtype=np.float32)
        obs[0:5] = static[0:5]
        obs[5] = self._t / self.n_units
        obs[6] = self._used / (32.0 * self._total)
        obs[7] = remaining_budget / self._budget
        obs[8] = urgency
        obs[9:14] = static[5:10]
        obs[14] = self.target_bits / 8.0
        return obs

    # ----- resumable state ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What survives from one episode to the next (for resumable training)."""
        state = {"lagrange_lambda": self.lagrange_lambda, "episode_count": self.episode_count, "target_bits": self.target_bits}
        if self.race is not None:
            state["race_best"] = self.race.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; takes effect at the next reset."""
        self.lagrange_lambda = float(state["lagrange_lambda"])
        self.episode_count = int(state["episode_count"])
        self.set_target_bits(state["target_bits"])
        if self.race is not None:
            self.race.load_state_dict(state.get("race_best", {}))

    def close(self) -> None:
        # Nothing stays borrowed between episodes; drop the reusable weight buffers.
        self.problem._assembler = None
        super().close()
