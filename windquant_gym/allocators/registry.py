"""The named allocators of ``windquant bench --allocators``: one place that knows them all."""

from __future__ import annotations

from .baselines import HeuristicAllocator, KnapsackAllocator, RandomAllocator, UniformAllocator
from .calibrated_knapsack import CALIBRATED_KNAPSACKS, calibrated_knapsack


def baseline_allocators(seed: int = 0) -> dict:
    """The named baselines of ``windquant bench --allocators all``."""
    return {
        "uniform-2b": UniformAllocator(2),
        "uniform-3b": UniformAllocator(3),
        "random": RandomAllocator(seed),
        "heuristic": HeuristicAllocator(),
        "knapsack": KnapsackAllocator(),
        # the calibrated rule (7 passes), and with the key and value projections' errors calibrated too (10)
        **{name: calibrated_knapsack(name) for name in CALIBRATED_KNAPSACKS},
    }
