"""The small BatchNorm CNN and the digits data that the examples train (not part of the
package; the examples import it from beside them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adampx.experiments.data import DataError, DataSplits, load_dataset


def load_digits(seed: int) -> DataSplits:
    """scikit-learn's digits (1,797 real 8×8 images, no download), split by ``seed``."""
    try:
        return load_dataset("digits", seed=seed)
    except DataError as e:  # scikit-learn missing
        raise SystemExit(str(e)) from None


def make_model() -> nn.Sequential:
    """A small CNN; every conv is bias-free and followed by BatchNorm (scale invariant,
    channel by channel)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 64,
    after_step: Callable[[], None] | None = None,
) -> None:
    """One epoch of shuffled mini-batches (torch's global generator), cross-entropy loss;
    ``after_step`` runs after every optimizer step."""
    model.train()
    order = torch.randperm(len(y))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
        if after_step is not None:
            after_step()
