"""A short real training run: AdamW vs AdamP and SGD vs SGDP on handwritten digits.

The data set is scikit-learn's digits (1,797 real 8×8 images, shipped inside the package, no
download), the model a small CNN whose conv weights all feed BatchNorm, so they are scale
invariant — the case the paper is about. For each optimizer the run prints the test accuracy
and the norm of the scale-invariant weights at the start and at the end: the momentum
optimizers inflate it, the projected ones keep it near where it started.

This is the README's first command until the full reproduction (``adampx reproduce``) lands.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from adampx import SGDP, AdamP

OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    # The reference package's recommended settings, and the same settings for the baseline.
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2),
    "AdamP": lambda ps: AdamP(ps, lr=1e-3, weight_decay=1e-2),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5),
    "SGDP": lambda ps: SGDP(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5),
}


@dataclass
class RunResult:
    optimizer: str
    test_accuracy: float
    norm_start: float
    norm_end: float
    seconds: float


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``, 80/20 split by seed."""
    from adampx.experiments.data import DataError, load_dataset

    try:
        data = load_dataset("digits", seed=seed)
    except DataError as e:  # scikit-learn missing
        raise SystemExit(str(e)) from None
    x_train, y_train = data.train.tensors  # type: ignore[attr-defined]
    x_test, y_test = data.test.tensors  # type: ignore[attr-defined]
    return x_train, y_train, x_test, y_test


def make_model() -> nn.Sequential:
    """A small CNN; every conv is bias-free and followed by BatchNorm (scale invariant)."""

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


def scale_invariant_norm(model: nn.Module) -> float:
    """Euclidean norm of all conv weights (each feeds a BatchNorm) taken together."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return float(torch.stack([m.weight.detach().square().sum() for m in convs]).sum().sqrt())


def train_one(name: str, data: tuple[torch.Tensor, ...], epochs: int, seed: int) -> RunResult:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    norm_start = scale_invariant_norm(model)
    start = time.perf_counter()
    batch = 64
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train))
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
        print(
            f"\r  {name:<6} epoch {epoch + 1:>2}/{epochs}  loss {loss.item():.3f}",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print("\r" + " " * 50 + "\r", end="", file=sys.stderr)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return RunResult(
        name, accuracy, norm_start, scale_invariant_norm(model), time.perf_counter() - start
    )


def run(epochs: int = 15, seed: int = 0, optimizers: list[str] | None = None) -> list[RunResult]:
    """Train the CNN once per optimizer and print a table; returns the results."""
    names = optimizers or list(OPTIMIZERS)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")
    data = load_digits(seed)
    print(
        f"digits: {len(data[1])} train / {len(data[3])} test images, {epochs} epochs, "
        f"seed {seed}, torch {torch.__version__}"
    )
    results = [train_one(name, data, epochs, seed) for name in names]
    header = f"{'optimizer':<10}{'test acc':>10}{'‖w‖ start':>12}{'‖w‖ end':>10}{'growth':>9}"
    print(f"\n{header}{'s':>7}")
    for r in results:
        print(
            f"{r.optimizer:<10}{100 * r.test_accuracy:>9.1f}%{r.norm_start:>12.2f}"
            f"{r.norm_end:>10.2f}{r.norm_end / r.norm_start:>8.2f}×{r.seconds:>7.1f}"
        )
    print(
        "\n‖w‖: norm of the scale-invariant conv weights (each feeds a BatchNorm). The paper's\n"
        "claim: momentum optimizers inflate it, which shrinks the effective step size\n"
        "lr/‖w‖²; AdamP and SGDP project the radial part away and keep it down. One seed on\n"
        "a small data set cannot resolve accuracy differences of a few tenths of a point."
    )
    return results
