"""Benchmark any allocator on WindQuant-v0: baselines, harness, leaderboard."""

from .allocators import (
    HeuristicAllocator,
    KnapsackAllocator,
    PlannedAllocator,
    RandomAllocator,
    UniformAllocator,
    baseline_allocators,
    nearest_allowed,
)
from .calibrated import CalibratedKnapsack, lagrange_rule_plan
from .fitness import FITNESS_METRICS, ProxyFitness, TableErrorFitness
from .harness import EpisodeResult, as_allocator, heldout_perplexity, run_allocator
from .knapsack import solve_knapsack
from .leaderboard import aggregate, format_table, write_leaderboard
from .search import SearchAllocator, SearchConfig, SearchResult, evolve
from .zeroshot import zero_shot  # needs lm-eval only when called

__all__ = [
    "CalibratedKnapsack", "lagrange_rule_plan", "HeuristicAllocator", "KnapsackAllocator", "PlannedAllocator", "RandomAllocator", "UniformAllocator",
    "baseline_allocators", "nearest_allowed", "EpisodeResult", "as_allocator", "heldout_perplexity",
    "run_allocator", "solve_knapsack", "aggregate", "format_table", "write_leaderboard", "zero_shot",
    "FITNESS_METRICS", "ProxyFitness", "TableErrorFitness", "SearchAllocator", "SearchConfig", "SearchResult", "evolve",
]
