"""Baseline allocators. Each is ``allocator(observation, action_mask) -> action``; those
that plan the whole episode from the quantization table get the env first through
``begin_episode(env)`` (the harness calls it after every reset)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..quant.bitwidths import ACTION_BITS, action_index
from .base import PlannedAllocator, nearest_allowed
from .knapsack import solve_knapsack


class UniformAllocator:
    """The same bit width for every unit (the nearest allowed when the mask forbids it)."""

    def __init__(self, bits: float):
        self.action = action_index(bits)
        self.name = f"uniform-{ACTION_BITS[self.action]:g}b"

    def __call__(self, observation, action_mask) -> int:
        return nearest_allowed(self.action, np.asarray(action_mask, dtype=bool))


class RandomAllocator:
    """A uniformly random allowed action (seeded)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, observation, action_mask) -> int:
        return int(self.rng.choice(np.flatnonzero(action_mask)))


class HeuristicAllocator(PlannedAllocator):
    """The paper's heuristic sensitivity rule (appendix B.3), as stated there: saliency of
    a unit = mean of ``|W_ij| * s_j``; units ranked by saliency; start all at 2 bit; push
    the least salient to 1.58 bit, then 1 bit, until the budget is met; then promote the
    most salient to 4 bit (3 bit where 4 does not fit) while the budget permits."""

    name = "heuristic"

    def make_plan(self, env) -> np.ndarray:
        table, rules = env.table, env.rule_mask
        saliency = np.array([_unit_saliency(env, u) for u in env.units])
        order = np.argsort(-saliency, kind="stable")  # most salient first
        plan = np.full(len(env.units), action_index(2))
        plan = np.where(rules[:, action_index(2)], plan, 0)  # a rule above 2 bit: keep FP16
        cost = table.unit_effective_bits
        rows = np.arange(len(plan))
        spent = cost[rows, plan].sum()
        for target in (action_index(1.58), action_index(1)):
            for i in order[::-1]:  # least salient first
                if spent <= env.budget_bits:
                    break
                if rules[i, target] and cost[i, target] < cost[i, plan[i]]:
                    spent += cost[i, target] - cost[i, plan[i]]
                    plan[i] = target
        for i in order:
            for promoted in (action_index(4), action_index(3)):
                delta = cost[i, promoted] - cost[i, plan[i]]
                if delta > 0 and spent + delta <= env.budget_bits:
                    spent += delta
                    plan[i] = promoted
                    break
        return plan


class KnapsackAllocator(PlannedAllocator):
    """Spends the budget where measured error falls most per bit, like exllamav2's EXL2
    and llama.cpp's target-bpw mixes: an exact (to ``resolution``) multiple-choice knapsack
    over the table's per-unit costs and errors.

    ``error="normalized"`` (default): the table's error (``QuantConfig.error_metric``) over
    the module's full-precision energy, comparable across layers. ``error="raw"``: the
    error as is (measured worse: late layers' large activations dominate it)."""

    exact = True  # the knapsack's plan fits the budget (costs are rounded up)

    def __init__(self, error: str = "normalized", resolution: int = 100_000):
        super().__init__()
        if error not in ("normalized", "raw"):
            raise ConfigError(f"error must be 'normalized' or 'raw', got {error!r}.")
        self.error, self.resolution = error, resolution
        self.name = "knapsack" if error == "normalized" else "knapsack-raw"

    def make_plan(self, env) -> np.ndarray:
        table = env.table
        if self.error == "normalized":
            error = table.module_normalized_error()
        else:
            error = table.stored_error()
        return solve_knapsack(table.unit_effective_bits, error, env.rule_mask, env.budget_bits, self.resolution)


def _unit_saliency(env, unit) -> float:
    weight = env.problem.model.get_submodule(unit.module).weight.detach()[:, unit.col_start : unit.col_end]
    scale = env.problem.calibration.act_scales[unit.module][unit.col_start : unit.col_end].to(weight.device)
    return float((weight.float().abs() * scale).mean())
