"""A small float64 network shared by the checkpoint and API tests, and its batches.

A Linear+BatchNorm block (the projection fires per row), a Linear+LayerNorm block (it fires
on the whole weight), 1-d gains and biases, and a plain head.
"""

import torch
from torch import nn


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The network, initialised from ``seed``, in ``dtype``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8, bias=False),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 8, bias=False),
        nn.LayerNorm(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(dtype)


def loss_at(model: nn.Module, i: int) -> torch.Tensor:
    """Loss of ``model`` on the deterministic batch number ``i``."""
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 6, generator=gen).to(dtype)
    y = torch.randn(16, 3, generator=gen).to(dtype)
    return nn.functional.mse_loss(model(x), y)
