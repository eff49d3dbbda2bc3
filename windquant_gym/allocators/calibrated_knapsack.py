"""The knapsack's rule with layer sensitivities calibrated on the proxy: a handful of proxy
passes that correct the table error where it is most wrong.

The table's error of a unit is its own reconstruction error; it cannot see that an error in
the first decoder layer propagates through every later one, or that the last layer's output
goes straight to the logits. llama.cpp's mixes and exllamav2's measurements give those layers
more bits for this reason, and the search's plans do too (benchmarks/RESULTS.md). Here the
table errors of each layer *group* are multiplied by a factor chosen by coordinate search on
the proxy loss (a few evaluations), and the plan is the sequential Lagrangian rule at the
exact budget (:func:`lagrange_rule_plan`).

``calibrated-knapsack-fisher`` first weights every unit's error by its module's sensitivity as
the model measures it (the Fisher information at the module's output,
:mod:`windquant_gym.eval.sensitivity`), so that the three groups' factors only correct what that
second-order measure misses.
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..envs.budget_price import BudgetPrice
from ..errors import ConfigError
from ..quant.module_kinds import MODULE_KINDS, module_kind
from .base import PlannedAllocator

LAYER_GROUPS = ("first", "last", "keys-values")
"""Groups whose errors can be rescaled: the first decoder layer, the last, and the attention's key
and value projections of every layer."""

DEFAULT_GROUPS = ("first", "last")
"""The groups of :class:`CalibratedKnapsack` by default (7 passes; the teacher of every preset)."""

GROUP_FACTORS = {"first": (1.0, 2.0, 4.0, 8.0), "last": (1.0, 2.0, 4.0, 8.0), "keys-values": (0.25, 0.5, 1.0, 2.0)}
"""The factors tried per group. The first and last layers' errors propagate or reach the logits
unseen by the table, so they only grow; the key and value projections' table errors overstate
what they cost the model at 2-3 bits (on SmolLM2-135M's proxy at 2.0 bits a factor 0.5 on both
gave 89.3 against 101.2 proxy PPL, 0.125-0.35 and 0.75 less, k or v alone about a third of it;
benchmarks/RESULTS.md, issue 21), so theirs may shrink."""

KEY_VALUE_KINDS = (MODULE_KINDS["k_proj"], MODULE_KINDS["v_proj"])
"""The keys-values group: modules whose :func:`~windquant_gym.quant.module_kinds.module_kind` is a
key or value projection (``k_proj`` / ``v_proj``, ``key`` / ``value``)."""


def lagrange_rule_plan(cost: np.ndarray, error: np.ndarray, allowed: np.ndarray, budget: float,
                       prices: Optional[BudgetPrice] = None) -> np.ndarray:
    """The knapsack's Lagrangian rule applied unit by unit at the exact budget: each unit takes
    ``argmin_a error + lam * cost`` at the price ``lam`` that would spend the bits left on the
    units left, among the actions after which the rest can still fit (as the env masks).
    Within a fraction of a percent of the exact knapsack's summed error, in milliseconds."""
    prices = prices or BudgetPrice(cost, error, allowed)
    n_units = len(cost)
    cheapest = np.where(allowed, cost, np.inf).min(axis=1)
    suffix_min = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])
    plan = np.empty(n_units, dtype=np.int64)
    used = 0.0
    for t in range(n_units):
        lam = max(prices.price(t, budget - used), prices.lowest_price)
        fits = allowed[t] & (used + cost[t] + suffix_min[t + 1] <= budget * (1 + 1e-12))
        if not fits.any():
            fits = allowed[t] & (cost[t] <= cheapest[t])
        plan[t] = int(np.argmin(np.where(fits, error[t] + lam * cost[t], np.inf)))
        used += cost[t, plan[t]]
    return plan


def unit_sensitivity(problem, units: Sequence, seed: int = 0) -> np.ndarray:
    """``[N]`` each unit's module's Fisher sensitivity (measured once per problem; ``seed`` draws
    its labels), over its mean (the rule's price absorbs any common factor; this keeps the errors
    near their table scale)."""
    measured = problem.module_sensitivity(seed=seed)
    weights = np.array([measured[u.module] for u in units], dtype=np.float64)
    return weights / max(float(weights.mean()), 1e-30)


def group_masks(units: Sequence) -> Dict[str, np.ndarray]:
    """Units of each of :data:`LAYER_GROUPS`, from the units' decoder-layer indices and module names."""
    layers = np.array([u.layer for u in units])
    keys_values = np.array([module_kind(u.module) in KEY_VALUE_KINDS for u in units])
    return {"first": layers == layers.min(), "last": layers == layers.max(), "keys-values": keys_values}


SENSITIVITIES = ("table", "fisher")
"""What a unit's table error is weighted by before the rule: 'table', nothing (the table's relative
error as it is); 'fisher', its module's Fisher sensitivity measured by the model
(:meth:`~windquant_gym.problem.QuantProblem.module_sensitivity`: one forward and two backward
passes over the statistics set, no proxy pass)."""


class KnapsackVariant(NamedTuple):
    """A named calibrated knapsack: the groups it calibrates and the sensitivity it weights by."""

    groups: Tuple[str, ...]
    sensitivity: str = "table"


CALIBRATED_KNAPSACKS = {
    "calibrated-knapsack": KnapsackVariant(DEFAULT_GROUPS),
    "calibrated-knapsack-kv": KnapsackVariant(LAYER_GROUPS),
    "calibrated-knapsack-fisher": KnapsackVariant(LAYER_GROUPS, "fisher"),
}
"""The named variants (``windquant bench --allocators``, a preset's ``warm_start.demonstrations``,
``--search-start``): 7, 10 and 10 proxy passes."""


def calibrated_knapsack(name: str = "calibrated-knapsack", calibrate_at: Optional[float] = None) -> "CalibratedKnapsack":
    """The variant ``name`` of :data:`CALIBRATED_KNAPSACKS`, with the default factors."""
    if name not in CALIBRATED_KNAPSACKS:
        raise ConfigError(f"Unknown calibrated knapsack {name!r}; choose from {sorted(CALIBRATED_KNAPSACKS)}.")
    variant = CALIBRATED_KNAPSACKS[name]
    return CalibratedKnapsack(groups=variant.groups, calibrate_at=calibrate_at, name=name, sensitivity=variant.sensitivity)


def _checked_factors(group: str, factors: Sequence[float]) -> Tuple[float, ...]:
    factors = tuple(float(f) for f in factors)
    if not factors or any(not np.isfinite(f) or f <= 0 for f in factors) or 1.0 not in factors:
        raise ConfigError(f"factors of group {group!r} must be positive numbers including 1.0, got {factors!r}; "
                          f"e.g. {GROUP_FACTORS[group]}.")
    return factors


class CalibratedKnapsack(PlannedAllocator):
    """The knapsack's rule on table errors rescaled per group of units, the scales chosen on the
    proxy by coordinate search: start at 1 everywhere (one evaluation), then for each group in
    turn try every factor of its ``factors`` and keep the best (``len(factors[g]) - 1`` more per
    group). Spends ``evaluations`` proxy passes (7 with the default groups, 10 with
    ``keys-values`` too: the ``calibrated-knapsack-kv`` allocator); ``scales`` holds the choice.
    ``factors``: one sequence for every group, or a mapping group -> sequence (default
    :data:`GROUP_FACTORS`).

    ``calibrate_at``: target bits to calibrate at, once, the scales then serving every target
    (:meth:`plan_at`); default None: at each episode's own target.

    ``sensitivity``: one of :data:`SENSITIVITIES`; with 'fisher' every unit's error is first
    weighted by its module's measured Fisher sensitivity (``calibrated-knapsack-fisher``), and the
    groups' factors correct what that second-order measure still misses; ``sensitivity_seed`` draws
    the labels of that measurement."""

    exact = True

    def __init__(self, factors: Optional[Sequence[float] | Mapping[str, Sequence[float]]] = None,
                 groups: Sequence[str] = DEFAULT_GROUPS, calibrate_at: Optional[float] = None,
                 name: str = "calibrated-knapsack", sensitivity: str = "table", sensitivity_seed: int = 0):
        super().__init__()
        if sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity must be one of {list(SENSITIVITIES)}, got {sensitivity!r}; 'table' is the "
                              "calibrated knapsack of the presets, 'fisher' weights by the model's measured sensitivity.")
        self.sensitivity, self.sensitivity_seed = sensitivity, sensitivity_seed
        unknown = sorted(set(groups) - set(LAYER_GROUPS))
        if unknown:
            raise ConfigError(f"Unknown layer groups {unknown}; choose from {list(LAYER_GROUPS)}.")
        if isinstance(factors, Mapping):
            unknown = sorted(set(factors) - set(groups))
            if unknown:
                raise ConfigError(f"factors name groups {unknown} that are not in groups={list(groups)}; add them there or drop them.")
        def tried(group: str) -> Sequence[float]:
            if factors is None:
                return GROUP_FACTORS[group]
            return factors.get(group, GROUP_FACTORS[group]) if isinstance(factors, Mapping) else factors

        self.factors: Dict[str, Tuple[float, ...]] = {g: _checked_factors(g, tried(g)) for g in groups}
        """The factors tried per group (:data:`GROUP_FACTORS` unless given)."""
        self.groups, self.calibrate_at = tuple(groups), calibrate_at
        self.name = name
        self.scales: Optional[Dict[str, float]] = None
        self.evaluations = 0.0
        self.history: list = []
        """``(scales, proxy NLL)`` of every evaluation, in order."""

    def _scaled_error(self, env, scales: Dict[str, float]) -> np.ndarray:
        error = env.table.module_normalized_error().copy()
        if self.sensitivity == "fisher":
            error *= unit_sensitivity(env.problem, env.units, self.sensitivity_seed)[:, None]
        masks = group_masks(env.units)
        for group, factor in scales.items():
            error[masks[group]] *= factor
        return error

    def plan_at(self, env, target_bits: float, scales: Optional[Dict[str, float]] = None) -> np.ndarray:
        """The rule's plan at ``target_bits`` with ``scales`` (default: the calibrated ones)."""
        scales = self.scales if scales is None else scales
        if scales is None:
            raise ConfigError("CalibratedKnapsack has no scales yet: call calibrate(env) (or begin_episode) first.")
        budget = target_bits * float(env.table.n_weights.sum())
        return lagrange_rule_plan(env.table.unit_effective_bits, self._scaled_error(env, scales), env.rule_mask, budget)

    def calibrate(self, env) -> Tuple[Dict[str, float], float]:
        """Choose the scales on the proxy; returns them and their proxy NLL."""
        target = env.target_bits if self.calibrate_at is None else float(self.calibrate_at)
        problem = env.problem
        scales = {g: 1.0 for g in self.groups}
        masks = group_masks(env.units)
        empty = [g for g in self.groups if not masks[g].any()]
        if empty:
            raise ConfigError(f"CalibratedKnapsack groups {empty} match no unit of this model (the keys-values group "
                              "looks for modules named k_proj / v_proj or key / value); drop them from groups=.")

        measured: list = []

        def measure(candidate: Dict[str, float]) -> float:
            nll = problem.proxy_nll(self.plan_at(env, target, candidate))
            self.evaluations += 1
            self.history.append((dict(candidate), nll))
            measured.append(dict(candidate))
            return nll

        best = measure(scales)
        for group in self.groups:
            for factor in self.factors[group]:
                candidate = {**scales, group: factor}
                if candidate in measured:
                    continue  # e.g. factor 1 after a smaller factor won: measured already, not better then
                nll = measure(candidate)
                if nll < best:
                    best, scales = nll, candidate
        self.scales = scales
        return scales, best

    def make_plan(self, env) -> np.ndarray:
        """Calibrated anew at every episode's target (``calibrate_at=None``), or once at
        ``calibrate_at`` and reused."""
        if self.calibrate_at is None or self.scales is None:
            self.evaluations, self.history = 0.0, []
            self.calibrate(env)
        return self.plan_at(env, env.target_bits)


class EachCalibration(NamedTuple):
    """What :func:`calibrate_each` found, per target (keyed by target bits)."""

    scales: Dict[float, Dict[str, float]]
    plans: Dict[float, np.ndarray]
    proxy_nll: Dict[float, float]
    evaluations: float
    """Proxy passes spent in all."""
    evaluations_per_target: Dict[float, float]
    """Passes a target's plan needed: every target's calibration and the other scales measured there."""


def calibrate_each(name: str, env, targets: Sequence[float]) -> EachCalibration:
    """The calibrated knapsack ``name`` calibrated at every one of ``targets``, each target then
    keeping the best on the proxy of every target's scales (the others' measured there, one pass
    per other distinct set). Why: the coordinate search starts from factors 1 and can stop short
    at one budget where another budget's scales are better (issue 21: on SmolLM2-135M's bf16 proxy
    on an EPYC the scales calibrated at 2.5 bits give 46.51 proxy PPL there, the 2.0-bit scales
    45.77). So each target's plan is never worse on the proxy than its own calibration's, nor
    than one calibration's reused at every target."""
    if not targets:
        raise ConfigError("calibrate_each needs at least one target; pass the curriculum's targets.")
    calibrated: Dict[float, Tuple[Dict[str, float], float]] = {}
    calibration = 0.0
    for target in targets:
        teacher = calibrated_knapsack(name, calibrate_at=target)
        calibrated[float(target)] = teacher.calibrate(env)
        calibration += teacher.evaluations
    rule = calibrated_knapsack(name)  # plan_at with explicit scales: the rule alone
    scales, plans, nlls, per_target = {}, {}, {}, {}
    cross = 0  # other targets' scales measured at a target
    for target, (own, own_nll) in calibrated.items():
        best, best_nll = own, own_nll
        tried = [own]
        for other, _ in calibrated.values():
            if other in tried:
                continue
            tried.append(other)
            nll = env.problem.proxy_nll(rule.plan_at(env, target, other))
            if nll < best_nll:
                best, best_nll = other, nll
        scales[target], plans[target], nlls[target] = dict(best), rule.plan_at(env, target, best), best_nll
        cross += len(tried) - 1
        per_target[target] = calibration + len(tried) - 1  # every calibration, and the others' scales here
    return EachCalibration(scales, plans, nlls, calibration + cross, per_target)


__all__ = ["CALIBRATED_KNAPSACKS", "CalibratedKnapsack", "KnapsackVariant", "SENSITIVITIES", "unit_sensitivity", "EachCalibration", "calibrate_each", "calibrated_knapsack", "DEFAULT_GROUPS", "GROUP_FACTORS", "KEY_VALUE_KINDS", "LAYER_GROUPS", "group_masks", "lagrange_rule_plan"]
