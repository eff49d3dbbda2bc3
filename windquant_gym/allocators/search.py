"""Evolutionary search on the true objective (after EvoPress, Sieberling et al. 2024).

The knapsack minimises a *sum of per-unit errors*; the model's loss is not a sum. The search
starts from a good plan (the knapsack's) and improves it on the loss itself, measured by a
forward pass (:mod:`.fitness`):

* elitist (1 + lambda): each generation makes ``offspring`` mutants of the parent, and the
  best of them replaces it only if it is at least as good on the full fitness set;
* a mutant raises ``min(U{1..max_flips}, U{1..max_flips})`` random units by
  ``min(U{1..max_levels}, U{1..max_levels})`` levels (a level: the next allowed action with
  more bits), then, while the plan is over budget, lowers other random units one level; or,
  as often, it first lowers units and then raises others one level while the budget allows.
  The compensating units are drawn among those of the same shape as a unit moved first
  (like for like, as EvoPress does) with chance ``same_shape``, else among all, so budget
  also moves between modules. Budget-neutral as far as the bit widths allow (ours are not
  evenly spaced: 16, 8, 4, 3, 2, 1.58, 1), within budget always. A mutant that changes more
  than ``max_changes`` units, or uses less than ``min_refund`` of the bits it frees, or
  was made before, is discarded;
* multi-stage selection: all offspring are measured on a random ``fraction`` of the token
  blocks, the best ``survivors`` go on, ..., and the last stage (all blocks) puts the
  winner against the parent, whose full fitness is known;
* a budget of evaluations in full-proxy-pass equivalents (a pass on a quarter of the tokens
  counts 0.25), the start plan's own measurement included; a generation starts only if it
  fits in what is left.

Every plan the search makes meets the budget and the precision rules exactly, so the env's
masks would allow every one of its actions. The search is deterministic for a seed, and
budget-blind until it stops: a run with budget B returns the plan a longer run with the same
seed held after spending B (``SearchResult.snapshots`` records those for given budgets).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, TableMismatchError
from ..envs.windquant import BUDGET_TOLERANCE
from .base import PlannedAllocator
from .baselines import HeuristicAllocator, KnapsackAllocator
from .calibrated_knapsack import CALIBRATED_KNAPSACKS, calibrated_knapsack
from .fitness import FITNESS_METRICS, ProxyFitness, check_fitness_metric


def _positive_number(value, name: str, hint: str, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"SearchConfig.{name} must be a positive {'integer' if integer else 'number'}, got {value!r}; {hint}.")


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of the search but its seed and start plan. Chosen on the proxy (SmolLM2-135M,
    cpu preset: ``benchmarks/search_study.py``), never on held-out text."""

    evaluations: float = 300
    """Budget in full-proxy-pass equivalents, the start plan's measurement included."""
    fitness: str = "nll"
    """``"nll"``: the proxy loss on the calibration text; ``"kl"``: KL divergence to the
    unquantized model's next-token distributions on it (top-128 reference)."""
    offspring: int = 16
    """Mutants per generation (lambda)."""
    stages: Tuple[Tuple[float, int], ...] = ((0.125, 2), (1.0, 1))
    """Selection stages ``(fraction of the token blocks, survivors)``: the offspring are measured
    on a fresh random fraction of the blocks and the best ``survivors`` go on to the next
    stage. The last stage must be ``(1.0, 1)``: the winner against the parent on all blocks."""
    max_flips: int = 3
    """Units a mutant moves first: ``min(U{1..max_flips}, U{1..max_flips})`` (EvoPress: 3)."""
    max_levels: int = 3
    """Levels a unit moved first goes: ``min(U{1..max_levels}, U{1..max_levels})``. One level
    at a time traps plans in local optima (measured on small knapsack instances: 45 of 60
    optima reached with 1, all 60 with 3)."""
    max_changes: int = 10
    """Moves a mutant may make in all (those made first plus the compensating ones; a unit
    lowered twice counts twice)."""
    same_shape: float = 0.5
    """Chance that a lowered unit is drawn among those of the same shape as a raised one (an
    exchange of like for like, as EvoPress does); otherwise among all units, so that budget
    can move between modules of different shapes too."""
    min_refund: float = 0.8
    """A mutant must spend at least this share of the bits it frees (bits raised / bits
    lowered), so that mutation does not leak budget."""
    version: int = 1

    def __post_init__(self) -> None:
        _positive_number(self.evaluations, "evaluations", "e.g. 300 (full proxy passes, the start plan's included)")
        check_fitness_metric(self.fitness)
        _positive_number(self.offspring, "offspring", "e.g. 16", integer=True)
        _positive_number(self.max_flips, "max_flips", "EvoPress uses 3", integer=True)
        _positive_number(self.max_levels, "max_levels", "1 climbs one level at a time", integer=True)
        _positive_number(self.max_changes, "max_changes", "e.g. 10", integer=True)
        if isinstance(self.same_shape, bool) or not isinstance(self.same_shape, (int, float)) or not 0 <= self.same_shape <= 1:
            raise ConfigError(f"SearchConfig.same_shape must be a probability in [0, 1], got {self.same_shape!r}; e.g. 0.5.")
        if isinstance(self.min_refund, bool) or not isinstance(self.min_refund, (int, float)) or not 0 <= self.min_refund <= 1:
            raise ConfigError(f"SearchConfig.min_refund must lie in [0, 1], got {self.min_refund!r}; e.g. 0.8.")
        try:
            stages = tuple((float(f), int(s)) for f, s in self.stages)
        except (TypeError, ValueError):
            stages = ()
        fractions = [f for f, _ in stages]
        survivors = [s for _, s in stages]
        if (not stages or stages[-1] != (1.0, 1) or any(not 0 < f <= 1 for f in fractions)
                or fractions != sorted(set(fractions)) or any(s < 1 for s in survivors)
                or survivors != sorted(survivors, reverse=True) or survivors[0] > self.offspring):
            raise ConfigError(
                f"SearchConfig.stages must be (fraction, survivors) pairs with fractions rising in (0, 1], survivors "
                f"falling and at most offspring={self.offspring}, ending with (1.0, 1); got {self.stages!r}. "
                "E.g. ((0.125, 2), (1.0, 1))."
            )
        object.__setattr__(self, "stages", stages)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["stages"] = [list(s) for s in self.stages]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ConfigError(f"Unknown SearchConfig fields {sorted(set(data) - known)}; known: {sorted(known)}.")
        return cls(**{**data, **({"stages": tuple(tuple(s) for s in data["stages"])} if "stages" in data else {})})

    @classmethod
    def from_json(cls, text: str) -> "SearchConfig":
        return cls.from_dict(json.loads(text))


@dataclass
class SearchResult:
    plan: np.ndarray
    """The best plan found (the start plan if nothing beat it)."""
    fitness: float
    """Its fitness on all the fitness's blocks."""
    start_fitness: float
    evaluations: float
    """Spent, in full-proxy-pass equivalents (the start plan's measurement included)."""
    generations: int
    offspring: int
    """Mutants measured (at least on the first stage)."""
    accepted: int
    """Generations whose winner replaced the parent."""
    seconds: float
    history: List[Dict[str, float]] = field(default_factory=list, repr=False)
    """Per generation: ``generation``, ``evaluations`` (spent after it), ``fitness`` (of the parent after it)."""
    snapshots: Dict[float, Dict[str, Any]] = field(default_factory=dict, repr=False)
    """For each budget in ``snapshot_at``: ``{"plan", "fitness", "evaluations", "seconds"}``, what a
    run with that budget returns (and the wall time it took)."""


class _Ladders:
    """Per unit, its allowed actions ordered by cost, one per distinct stored action (two
    requested actions that store the same thing are one level): "one level up" is the next
    allowed action with more bits."""

    def __init__(self, cost: np.ndarray, allowed: np.ndarray, stored: Optional[np.ndarray]):
        n_units, n_actions = cost.shape
        stored = np.broadcast_to(np.arange(n_actions), cost.shape) if stored is None else stored
        self.cost = cost
        self.table = np.full(cost.shape, -1, dtype=np.int64)  # [unit, level] -> action (-1 past its top level)
        self.level_of = np.full(cost.shape, -1, dtype=np.int64)  # [unit, action] -> level (of its stored action)
        self.top = np.zeros(n_units, dtype=np.int64)
        for i in range(n_units):
            kept: Dict[int, int] = {}
            for a in np.flatnonzero(allowed[i]):
                kept.setdefault(int(stored[i, a]), int(a))  # the first requested action storing it
            actions = sorted(kept.values(), key=lambda a: (cost[i, a], a))
            self.table[i, : len(actions)] = actions
            self.top[i] = len(actions) - 1
            by_stored = {int(stored[i, a]): level for level, a in enumerate(actions)}
            for a in np.flatnonzero(allowed[i]):
                self.level_of[i, a] = by_stored[int(stored[i, a])]


def _same_shape_groups(cost: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Group id per unit: units with the same cost of every action and the same rules are interchangeable."""
    keys = [tuple(np.round(c, 6)) + tuple(a) for c, a in zip(np.where(allowed, cost, -1.0), allowed)]
    ids: Dict[tuple, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys])


def _biased_count(rng: np.random.Generator, most: int) -> int:
    """``min(U{1..most}, U{1..most})``: 1 most often (EvoPress's number of flips)."""
    return min(int(rng.integers(1, most + 1)), int(rng.integers(1, most + 1)))


def _mutate(plan: np.ndarray, rng: np.random.Generator, ladders: _Ladders, groups: np.ndarray, budget: float,
            config: SearchConfig) -> Optional[np.ndarray]:
    """One mutant of ``plan`` within ``budget`` and the rules, or None if this draw is discarded.

    Half the mutants first raise units and then lower others until the plan fits the budget;
    the other half first lower units and then raise others while the budget allows (so that
    bits held by a unit at 8 or 16 bits can be spread over several units, and back)."""
    cost, top = ladders.cost, ladders.top
    rows = np.arange(len(plan))
    child, level = plan.copy(), ladders.level_of[rows, plan].copy()
    total = float(cost[rows, plan].sum())
    moved: List[int] = []
    bits = {+1: 0.0, -1: 0.0}  # bits added by raising, freed by lowering

    def move(i: int, steps: int) -> None:  # steps > 0 raises, < 0 lowers
        nonlocal total
        new = ladders.table[i, level[i] + steps]
        delta = float(cost[i, new] - cost[i, child[i]])
        child[i], level[i] = new, level[i] + steps
        total += delta
        bits[1 if steps > 0 else -1] += abs(delta)
        moved.append(i)

    def pick(candidates: np.ndarray) -> int:
        """A random candidate, with chance ``same_shape`` one of the same shape as a unit moved first."""
        if rng.random() < config.same_shape:
            alike = candidates[groups[candidates] == groups[first[int(rng.integers(len(first)))]]]
            if alike.size:
                return int(rng.choice(alike))
        return int(rng.choice(candidates))

    direction = 1 if rng.random() < 0.5 else -1
    for _ in range(_biased_count(rng, config.max_flips)):
        room = top - level if direction > 0 else level.copy()  # levels it can go up, or down
        room[moved] = 0
        candidates = np.flatnonzero(room > 0)
        if not candidates.size:
            break
        i = int(rng.choice(candidates))
        move(i, direction * min(_biased_count(rng, config.max_levels), int(room[i])))
    if not moved:
        return None
    first = list(moved)
    if direction > 0:  # pay for the raises
        while total > budget + BUDGET_TOLERANCE:
            lowerable = level > 0
            lowerable[first] = False
            candidates = np.flatnonzero(lowerable)
            if not candidates.size or len(moved) >= config.max_changes:
                return None
            move(pick(candidates), -1)
    else:  # spend what the lowering freed
        while len(moved) < config.max_changes:
            raisable = level < top
            raisable[first] = False
            candidates = np.flatnonzero(raisable)
            if candidates.size:
                up = ladders.table[candidates, level[candidates] + 1]
                candidates = candidates[cost[candidates, up] - cost[candidates, child[candidates]] <= budget - total + BUDGET_TOLERANCE]
            if not candidates.size:
                break
            move(pick(candidates), +1)
    if bits[-1] > 0 and bits[1] / bits[-1] < config.min_refund:
        return None
    return child


def evolve(
    start: Sequence[int],
    fitness,
    cost: np.ndarray,
    allowed: np.ndarray,
    budget: float,
    config: SearchConfig = SearchConfig(),
    seed: int = 0,
    stored: Optional[np.ndarray] = None,
    snapshot_at: Sequence[float] = (),
    progress: bool = False,
    start_fitness: Optional[float] = None,
) -> SearchResult:
    """Search from ``start`` for a plan of lower ``fitness`` within ``budget`` (summed ``cost[i, a]``)
    and ``allowed[i, a]``. ``stored[i, a]``: the action stored when ``a`` is requested (fallback),
    so that actions storing the same thing count as one level. ``start_fitness``: its full
    fitness when already known (then not measured, nor counted). A :class:`ProxyFitness` must
    measure what ``config.fitness`` names."""
    cost = np.asarray(cost, dtype=np.float64)
    allowed = np.asarray(allowed, dtype=bool)
    plan = np.asarray(start, dtype=np.int64).copy()
    rows = np.arange(len(plan))
    if plan.shape != (len(cost),):
        raise TableMismatchError(f"The start plan needs one action per unit: {len(cost)}, got shape {plan.shape}.")
    if not allowed[rows, plan].all():
        bad = int(np.flatnonzero(~allowed[rows, plan])[0])
        raise ConfigError(f"The start plan breaks the precision rules at unit {bad} (action {plan[bad]}); start from a valid plan.")
    if cost[rows, plan].sum() > budget + BUDGET_TOLERANCE:
        raise ConfigError(
            f"The start plan spends {cost[rows, plan].sum() / budget:.4f} x the budget; start from a plan within it "
            "(e.g. the knapsack's)."
        )
    metric = getattr(fitness, "metric", None)
    if metric in FITNESS_METRICS and metric != config.fitness:
        raise ConfigError(f"The fitness measures {metric!r} but config.fitness is {config.fitness!r}; make them agree "
                          f"(SearchConfig(fitness={metric!r})).")
    stage_rows = [max(1, min(fitness.n_blocks, round(fraction * fitness.n_blocks))) for fraction, _ in config.stages]
    stage_rows[-1] = fitness.n_blocks
    stage_cost = [fitness.cost(n) for n in stage_rows]
    planned, count = 0.0, config.offspring  # evaluations of a generation with every offspring made
    for (_, survivors), one_cost in zip(config.stages, stage_cost):
        planned, count = planned + count * one_cost, min(count, survivors)
    full_cost = stage_cost[-1] if start_fitness is None else 0.0
    too_small = [b for b in (config.evaluations, *snapshot_at) if b + 1e-9 < full_cost]
    if too_small:
        raise ConfigError(f"A budget of {too_small[0]:g} evaluations does not pay for one full measurement of the start "
                          f"plan ({full_cost:g}); give at least {full_cost:g}.")

    def stops_at(limit: float) -> bool:  # the one rule: a run with this budget stops here
        return spent + planned > limit + 1e-9

    rng = np.random.default_rng(seed)
    ladders = _Ladders(cost, allowed, stored)
    groups = _same_shape_groups(cost, allowed)
    pending = sorted(float(b) for b in snapshot_at)
    snapshots: Dict[float, Dict[str, Any]] = {}
    seen = {plan.tobytes()}
    started = time.perf_counter()
    spent, generations, measured, accepted = 0.0, 0, 0, 0
    history: List[Dict[str, float]] = []

    def snapshot() -> Dict[str, Any]:
        return {"plan": plan.copy(), "fitness": best, "evaluations": spent, "seconds": time.perf_counter() - started}

    bar = tqdm(total=config.evaluations, desc=f"search ({config.fitness})", unit="eval", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:g} evaluations [{elapsed}<{remaining}{postfix}]")
    try:
        with fitness.session(plan) as evaluate:
            if start_fitness is None:
                start_fitness = evaluate(plan, None)
                spent += full_cost
                bar.update(full_cost)
            best = float(start_fitness)
            bar.set_postfix_str(f"best {best:.4f}")
            while True:
                for mark in [b for b in pending if stops_at(b)]:
                    snapshots[mark] = snapshot()
                    pending.remove(mark)
                if stops_at(config.evaluations):
                    break
                children: List[np.ndarray] = []
                for _ in range(20 * config.offspring):
                    if len(children) == config.offspring:
                        break
                    child = _mutate(plan, rng, ladders, groups, budget, config)
                    if child is not None and child.tobytes() not in seen:
                        seen.add(child.tobytes())
                        children.append(child)
                if not children:  # 20 draws per offspring found nothing new: the neighbourhood is (nearly) used up
                    break
                measured += len(children)
                scores: List[float] = []
                for (fraction, survivors), n_rows, one_cost in zip(config.stages, stage_rows, stage_cost):
                    subset = None if n_rows == fitness.n_blocks else np.sort(rng.choice(fitness.n_blocks, n_rows, replace=False))
                    scores = [evaluate(child, subset) for child in children]
                    spent += one_cost * len(children)
                    bar.update(one_cost * len(children))
                    keep = np.argsort(scores, kind="stable")[:survivors]
                    children, scores = [children[k] for k in keep], [scores[k] for k in keep]
                generations += 1
                if scores[0] <= best:  # the last stage measured the winner on all blocks, like the parent
                    plan, best = children[0], float(scores[0])
                    accepted += 1
                history.append({"generation": generations, "evaluations": spent, "fitness": best})
                bar.set_postfix_str(f"best {best:.4f}, generation {generations}")
    finally:
        bar.close()
    for mark in pending:  # budgets beyond where the search stopped: its final plan
        snapshots[mark] = snapshot()
    return SearchResult(plan, best, float(start_fitness), spent, generations, measured, accepted,
                        time.perf_counter() - started, history, snapshots)


_STARTS = {"knapsack": KnapsackAllocator, "heuristic": HeuristicAllocator,
           **{name: functools.partial(calibrated_knapsack, name) for name in CALIBRATED_KNAPSACKS}}


class SearchAllocator(PlannedAllocator):
    """Evolutionary search on the model's loss, from the knapsack's plan (or ``start``: an
    allocator name, ``knapsack``, ``heuristic``, ``calibrated-knapsack`` or ``calibrated-knapsack-kv``;
    a planned allocator; or one action per unit), within the env's budget and rules. See
    :mod:`windquant_gym.allocators.search`.

    ``SearchAllocator(evaluations=300, fitness="kl", seed=1)``: keyword arguments build a
    :class:`SearchConfig` (or pass ``config=``). ``blocks``: measure the fitness on these
    token blocks instead of the problem's calibration blocks (costs count their tokens).
    After a plan is made, ``result`` holds the :class:`SearchResult` and ``evaluations`` what
    it spent."""

    exact = True  # every plan it makes meets the budget and the rules

    def __init__(self, config: Optional[SearchConfig] = None, *, seed: int = 0, start: Any = "knapsack",
                 blocks=None, snapshot_at: Sequence[float] = (), progress: bool = True, **config_fields):
        super().__init__()
        if config is not None and config_fields:
            raise ConfigError(f"Pass either config= or SearchConfig fields ({sorted(config_fields)}), not both.")
        self.config = config if config is not None else SearchConfig(**config_fields)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
        if isinstance(start, str) and start not in _STARTS:
            raise ConfigError(f"start={start!r} is not a known allocator; use one of {sorted(_STARTS)}, an allocator "
                              "with make_plan(env), or one action per unit.")
        self.seed, self.start, self.blocks, self.snapshot_at, self.progress = int(seed), start, blocks, snapshot_at, progress
        self.name = f"search-{self.config.fitness}"
        self.result: Optional[SearchResult] = None
        self.evaluations: Optional[float] = None

    def start_plan(self, env) -> np.ndarray:
        start = self.start
        if isinstance(start, str):
            start = _STARTS[start]()
        if hasattr(start, "make_plan"):
            return np.asarray(start.make_plan(env), dtype=np.int64)
        return env.table.check_plan(start)

    def make_plan(self, env) -> np.ndarray:
        """The search from the start plan. A start that spends proxy passes itself (the calibrated
        knapsack's 7) spends them out of the budget: ``evaluations`` and every snapshot's count
        include them, so "budget N" means N passes in all, start included, as for a training run."""
        problem = env.problem
        passes_before = problem.proxy_passes
        start = self.start_plan(env)
        start_cost = problem.proxy_passes - passes_before
        config, snapshot_at = self.config, list(self.snapshot_at)
        if start_cost > 0:
            short = [b for b in (config.evaluations, *snapshot_at) if b - start_cost < 1]
            if short:
                raise ConfigError(f"A budget of {short[0]:g} evaluations does not pay for the start plan's {start_cost:g} "
                                  "proxy passes and one measurement; give the search a larger budget.")
            config = dataclasses.replace(config, evaluations=config.evaluations - start_cost)
            snapshot_at = [b - start_cost for b in snapshot_at]
        fitness = ProxyFitness(problem, config.fitness, self.blocks)
        result = evolve(
            start, fitness, env.table.unit_effective_bits, env.rule_mask, env.budget_bits, config,
            seed=self.seed, stored=env.table.stored_action, snapshot_at=snapshot_at, progress=self.progress,
        )
        if start_cost > 0:  # counted in the caller's units: passes in all, snapshots under the budgets asked for
            result.evaluations += start_cost
            result.snapshots = {asked: {**result.snapshots[shifted], "evaluations": result.snapshots[shifted]["evaluations"]
                                        + start_cost} for asked, shifted in zip(self.snapshot_at, snapshot_at)}
        self.start_evaluations = start_cost
        self.result = result
        self.evaluations = result.evaluations
        return result.plan


__all__ = ["SearchAllocator", "SearchConfig", "SearchResult", "evolve"]
