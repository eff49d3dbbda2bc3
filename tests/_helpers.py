"""Helpers shared by test modules (``tests/`` is on sys.path under pytest's rootdir import mode)."""

import torch


def snapshot(model):
    """A copy of every parameter, to check later that nothing was changed."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bitwise_equal(model, saved):
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name


def random_hessians(model, chunk_size: int, seed: int = 0, tokens: int = 0):
    """Calibration-like Hessian blocks (``mean_t x x^T`` per chunk of every unit's module)
    from random correlated inputs: what a table with compensation or the output error
    needs, without a calibration pass."""
    import windquant_gym as wq

    generator = torch.Generator().manual_seed(seed)
    hessians = {}
    for unit in wq.find_units(model, chunk_size):
        if unit.module in hessians:
            continue
        n_chunks = -(-unit.in_features // chunk_size)
        size = min(chunk_size, unit.in_features)
        count = tokens or 4 * size
        mix = torch.randn(size, size, generator=generator) / size**0.5 + torch.eye(size)
        x = torch.randn(n_chunks, count, size, generator=generator) @ mix  # correlated columns
        hessians[unit.module] = x.transpose(1, 2) @ x / count
    return hessians
