"""What a plan search minimises: the model's loss on token blocks, measured by a forward pass
(:class:`ProxyFitness`), or a sum of table errors (:class:`TableErrorFitness`, the knapsack's
objective: for tests and as a free, model-blind baseline).

A fitness is measured on a subset of its token blocks (the search's screening stages) or on
all of them, and says what one measurement costs in *evaluations*: full proxy passes, so a
pass on a quarter of the proxy's tokens costs 0.25. Measurements happen inside
``with fitness.session(start_plan) as evaluate:``, where ``evaluate(plan, rows)`` returns
the fitness of ``plan`` on ``blocks[rows]`` (``rows=None``: all blocks); lower is better.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..eval.divergence import PROXY_METRICS, check_proxy_metric
from ..compute.kernels import proxy_precision
from ..quant.apply import quantized_weights, streamed_quantized_weights

FITNESS_METRICS = PROXY_METRICS
"""Names of the proxy fitnesses: mean next-token NLL on the text, or mean KL divergence to
the unquantized model's next-token distributions on it (top-k reference)."""

Evaluate = Callable[[np.ndarray, Optional[np.ndarray]], float]


def check_fitness_metric(metric) -> str:
    return check_proxy_metric(metric, "fitness")


class ProxyFitness:
    """The proxy loss of a plan: mean NLL (``metric="nll"``) or mean KL divergence to the
    unquantized model (``metric="kl"``) on the problem's calibration blocks, or on other
    ``blocks`` (e.g. more text from the calibration split, against overfitting to the proxy).

    Inside a session the model holds the plans' weights (given back on exit, also on errors);
    a new plan re-assembles only the modules whose units changed, so a search's offspring cost
    little more than their forward pass (a streamed problem, ``stream=True``, assembles every
    layer anew as it runs, as its proxy pass does). ``tokens`` counts the tokens every measurement fed
    through the model, so the evaluations a search reports can be checked."""

    def __init__(self, problem, metric: str = "nll", blocks: Optional[torch.Tensor] = None):
        self.problem = problem
        self.metric = check_fitness_metric(metric)
        if blocks is not None:
            if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[1] < 2 or not len(blocks):
                raise DataError(f"blocks must be an [n, L] tensor of token ids with L >= 2, got "
                                f"{getattr(blocks, 'shape', type(blocks).__name__)}; e.g. sample_token_blocks(...).")
        self.blocks = problem.blocks if blocks is None else blocks
        self.n_blocks = len(self.blocks)
        self._proxy_tokens = problem.blocks.numel()
        self.tokens = 0
        self.name = f"proxy-{metric}" if blocks is None else f"{metric}@{self.blocks.numel()}tokens"

    def cost(self, n_rows: int) -> float:
        """Evaluations (full proxy passes) of one measurement on ``n_rows`` blocks."""
        return n_rows * self.blocks.shape[1] / self._proxy_tokens

    def _reference(self):
        if self.metric != "kl":
            return None
        return self.problem.kl_reference() if self.blocks is self.problem.blocks else self.problem.kl_reference(self.blocks)

    @contextmanager
    def session(self, start: Sequence[int]) -> Iterator[Evaluate]:
        problem = self.problem
        reference = self._reference()  # with the model's own weights, before any plan is applied
        model, table = problem.model, problem.table
        precision = proxy_precision(next(model.parameters()).device, problem.proxy_dtype)
        unit_module = np.array([u.module for u in problem.units], dtype=object)

        def measure(rows: Optional[np.ndarray], plan: Sequence[int]) -> float:
            # the problem's pass counts the proxy passes and reuses the prefix where it can
            losses = problem.forward_pass(plan, rows, blocks=self.blocks, reference=reference)
            self.tokens += self.blocks.shape[1] * (self.n_blocks if rows is None else len(rows))
            return losses.kl if self.metric == "kl" else losses.nll

        if problem.stream:  # large models: each layer's weights assembled anew as it runs, every measurement
            assembler = problem.assembler(per_layer=True, proxy=True)

            def evaluate(plan, rows=None):
                with streamed_quantized_weights(model, table, plan, assembler), precision:
                    return measure(rows, plan)
            yield evaluate
            return

        assembler = problem.assembler(proxy=True)
        loaded = np.array(start, dtype=np.int64)
        with quantized_weights(model, table, loaded, assembler), precision:
            def evaluate(plan, rows=None):
                plan = np.asarray(plan, dtype=np.int64)
                changed = np.flatnonzero(plan != loaded)
                if changed.size:  # the borrowed weights are the assembler's buffers: rewrite them in place
                    with torch.no_grad():
                        assembler.assemble(plan, sorted(set(unit_module[changed])))
                    loaded[:] = plan
                return measure(rows, loaded)
            yield evaluate


class TableErrorFitness:
    """A plan's summed per-unit table error (default: module-normalised, the knapsack's
    objective): no forward pass, so a search on it is free and its optimum is the knapsack's.
    For tests and as a sanity check of a search; ``cost`` pretends a measurement on all
    ``n_blocks`` virtual blocks is one evaluation."""

    metric = "table-error"

    def __init__(self, error: np.ndarray, n_blocks: int = 4):
        self.error = np.asarray(error, dtype=np.float64)
        self.n_blocks = int(n_blocks)
        self.tokens = 0
        self.name = "table-error"

    def cost(self, n_rows: int) -> float:
        return n_rows / self.n_blocks

    @contextmanager
    def session(self, start: Sequence[int]) -> Iterator[Evaluate]:
        rows = np.arange(len(self.error))

        def evaluate(plan, block_rows=None):
            self.tokens += self.n_blocks if block_rows is None else len(block_rows)
            return float(self.error[rows, np.asarray(plan)].sum())

        yield evaluate


__all__ = ["FITNESS_METRICS", "ProxyFitness", "TableErrorFitness", "check_fitness_metric"]
