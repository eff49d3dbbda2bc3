"""A WeightAssembler rewrites only the units whose stored action changed since the plan it last
assembled into a buffer; the result must be what a fresh assembly gives, bit for bit."""

import numpy as np
import pytest
import torch

import windquant_gym as wq
from windquant_gym.quant.apply import WeightAssembler


@pytest.fixture(params=["plain", "rotated", "asymmetric"])
def problem(request, tiny_problem, tiny_asymmetric_problem, tiny, tmp_path_factory):
    if request.param == "plain":
        return tiny_problem
    if request.param == "asymmetric":
        return tiny_asymmetric_problem
    model, tokenizer = tiny
    return wq.QuantProblem.build(model, tokenizer, "wiki-sample", wq.QuantConfig(chunk_size=48, rotation="hadamard"),
                                 n_samples=8, seq_len=64, cache=tmp_path_factory.mktemp("rot"), progress=False)


def _plans(n_units, seed=0):
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 7, n_units)
    second = first.copy()
    flip = rng.choice(n_units, size=max(1, n_units // 5), replace=False)
    second[flip] = rng.integers(0, 7, flip.size)  # some units change, to or from skip too
    return first.tolist(), second.tolist(), rng.integers(0, 7, n_units).tolist()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_plan_assembled_over_another_equals_a_fresh_assembly(problem, dtype):
    model, table = problem.model, problem.table
    plans = _plans(len(problem.units))
    reused = WeightAssembler(model, table, dtype=dtype)
    for plan in (*plans, plans[0], plans[0]):
        got = {k: v.clone() for k, v in reused.assemble(plan).items()}
        fresh = WeightAssembler(model, table, dtype=dtype).assemble(plan)
        for name in fresh:
            assert torch.equal(got[name], fresh[name]), name


def test_the_reuse_skips_work_and_notices_writes_to_a_buffer(problem, monkeypatch):
    model, table = problem.model, problem.table
    first, second, _ = _plans(len(problem.units), seed=1)
    assembler = WeightAssembler(model, table)
    assembler.assemble(first)
    written = []
    original = type(table).assemble_module

    def spy(self, module, actions, source, out=None, held=None):
        written.append(sum(1 for a, h in zip(self.stored_actions_of(module, actions), held)
                           if a != h) if held is not None else len(actions))
        return original(self, module, actions, source, out=out, held=held)

    monkeypatch.setattr(type(table), "assemble_module", spy)
    assembler.assemble(first)
    assert sum(written) == 0  # the same plan again: nothing to write
    written.clear()
    assembler.assemble(second)
    changed = sum(a != b for a, b in zip(first, second))  # requested actions that changed (stored ones at most there)
    assert 0 < sum(written) <= changed
    # a buffer written by someone else is assembled afresh, whole
    name = assembler.modules[0]
    assembler._buffers[name].zero_()
    written.clear()
    result = assembler.assemble(second)
    assert written[0] == sum(1 for u in problem.units if u.module == name)
    fresh = WeightAssembler(model, table).assemble(second)
    assert torch.equal(result[name], fresh[name])
