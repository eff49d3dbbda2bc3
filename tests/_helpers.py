"""Helpers shared by test modules (``tests/`` is on sys.path under pytest's rootdir import mode)."""

import torch


def snapshot(model):
    """A copy of every parameter, to check later that nothing was changed."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bitwise_equal(model, saved):
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
