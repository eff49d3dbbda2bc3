"""The named allocators of ``windquant bench --allocators``: one place that knows them all."""

from __future__ import annotations

from .baselines import HeuristicAllocator, KnapsackAllocator, RandomAllocator, UniformAllocator
from .calibrated_knapsack import CalibratedKnapsack


def baseline_allocators(seed: int = 0) -> dict:
    """The named baselines of ``windquant bench --allocators all``."""
    return {
        "uniform-2b": UniformAllocator(2),
        "uniform-3b": UniformAllocator(3),
        "random": RandomAllocator(seed),
        "heuristic": HeuristicAllocator(),
        "knapsack": KnapsackAllocator(),
        "calibrated-knapsack": CalibratedKnapsack(),
        # the same rule with the key and value projections' errors calibrated too (10 passes)
        "calibrated-knapsack-kv": CalibratedKnapsack(groups=("first", "last", "keys-values"), name="calibrated-knapsack-kv"),
    }
