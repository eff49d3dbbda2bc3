"""The allocators that are not learned, and what they share: baselines (uniform, random, the
paper's heuristic, the knapsack), the calibrated knapsack, the search and its fitness.

Each is ``allocator(observation, action_mask) -> action``; a
:class:`~windquant_gym.allocators.base.PlannedAllocator` plans the whole episode from the env
at ``begin_episode(env)``. The benchmark harness and ``agents/`` (teachers, warm start) both
use them; nothing here imports either."""

from .base import PlannedAllocator, nearest_allowed
from .baselines import HeuristicAllocator, KnapsackAllocator, RandomAllocator, UniformAllocator
from .calibrated_knapsack import CalibratedKnapsack, lagrange_rule_plan
from .fitness import FITNESS_METRICS, ProxyFitness, TableErrorFitness
from .knapsack import solve_knapsack
from .registry import baseline_allocators
from .search import SearchAllocator, SearchConfig, SearchResult, evolve

__all__ = [
    "PlannedAllocator", "nearest_allowed", "HeuristicAllocator", "KnapsackAllocator", "RandomAllocator", "UniformAllocator",
    "CalibratedKnapsack", "lagrange_rule_plan", "FITNESS_METRICS", "ProxyFitness", "TableErrorFitness", "solve_knapsack",
    "baseline_allocators", "SearchAllocator", "SearchConfig", "SearchResult", "evolve",
]
