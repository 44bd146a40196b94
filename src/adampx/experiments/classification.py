"""One image-classification run: a BatchNorm ResNet trained with one optimizer and seed.

The optimizers and their settings (the reference package's recommendations for the projected
optimizers; the paper's matching baselines):

=========  ==========================================================  =====================
name       settings                                                    weight decay "on"
=========  ==========================================================  =====================
SGD        ``torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True)``     1e-4 (L2)
SGDP       ``adampx.SGDP(lr=0.1, momentum=0.9, nesterov=True)``         1e-5 (×1/(1−μ) = 1e-4)
Adam       ``torch.optim.Adam(lr=1e-3)``                                1e-4 (L2)
AdamW      ``torch.optim.AdamW(lr=1e-3)``                               1e-2 (decoupled)
AdamP      ``adampx.AdamP(lr=1e-3)``                                    1e-2 (decoupled)
=========  ==========================================================  =====================

"off" sets every weight decay to 0 (then Adam and AdamW coincide). All parameters are decayed
alike, as in the paper. The learning rate follows a cosine schedule to 0 over the run.

What is measured: test accuracy, and the weight norm of the scale-invariant weights (found by
``adampx.inspect`` on the freshly built model) at the start and the end, with their curves
(norm, ``‖Δw‖/‖w‖``, ``lr/‖w‖²``) recorded by ``adampx.NormMonitor``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import adampx
from adampx.experiments.data import DataSplits
from adampx.experiments.models import build_model
from adampx.tools.monitor import NormMonitor, NormRecord
from adampx.util.tensors import replicated

__all__ = [
    "OPTIMIZERS",
    "RunResult",
    "TrainedRun",
    "scale_invariant_names",
    "train_classifier",
]

Params = Iterable[nn.Parameter]
OPTIMIZERS: dict[str, tuple[Callable[[Params, float], torch.optim.Optimizer], float]] = {
    "SGD": (
        lambda ps, wd: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd),
        1e-4,
    ),
    "SGDP": (lambda ps, wd: adampx.SGDP(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd),
             1e-5),
    "Adam": (lambda ps, wd: torch.optim.Adam(ps, lr=1e-3, weight_decay=wd), 1e-4),
    "AdamW": (lambda ps, wd: torch.optim.AdamW(ps, lr=1e-3, weight_decay=wd), 1e-2),
    "AdamP": (lambda ps, wd: adampx.AdamP(ps, lr=1e-3, weight_decay=wd), 1e-2),
}  # fmt: skip


@dataclass
class TrainedRun:
    """What every trained run of the reproduction measures: the final training loss, the
    norm of the weights it follows at the start and the end, its weight decay, its training
    time and steps."""

    train_loss: float
    norm_start: float
    norm_end: float
    weight_decay: float
    seconds: float
    steps: int


@dataclass
class RunResult(TrainedRun):
    """What one classification run measured (beyond :class:`TrainedRun`'s fields).

    ``curve``: per logged step, the total norm and median step sizes of the scale-invariant
    weights; ``layers``: per-layer ``NormRecord`` fields at the first and last logged step;
    ``views``: ``[step, view]`` of every tensor AdamP/SGDP tested at the logged steps.
    """

    test_accuracy: float
    curve: list[dict[str, float]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    views: list[list[Any]] = field(default_factory=list)


def scale_invariant_names(model: nn.Module, data: DataSplits, device: torch.device) -> set[str]:
    """Names of the weights ``adampx.inspect`` finds scale invariant (channel or layer)."""
    x = torch.stack([data.train[i][0] for i in range(min(128, len(data.train)))]).to(device)  # type: ignore[arg-type]
    report = adampx.inspect(model, x)
    return {r.name for r in report if r.invariance != "none" and len(r.shape) > 1}


def _curve(records: list[NormRecord]) -> list[dict[str, float]]:
    """Per logged step: total norm of the tracked weights, medians of the step sizes, lr."""
    by_step: dict[int, list[NormRecord]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    curve = []
    for step, rs in sorted(by_step.items()):
        rel = sorted(r.relative_update for r in rs)
        eff = sorted(r.effective_step for r in rs)
        curve.append(
            {
                "step": step,
                "norm": math.sqrt(sum(r.norm**2 for r in rs)),
                "relative_update": rel[len(rel) // 2],
                "effective_step": eff[len(eff) // 2],
                "lr": rs[0].lr,
            }
        )
    return curve


def _invariant_norm(model: nn.Module, names: set[str]) -> float:
    params = [p for n, p in model.named_parameters() if n in names]
    # sharded params (FSDP2) give sharded sums: take their full value
    squares = [replicated(p.detach().double().square().sum()).cpu() for p in params]
    return float(torch.stack(squares).sum().sqrt()) if squares else float("nan")


def train_classifier(
    data: DataSplits,
    *,
    model_name: str,
    optimizer_name: str,
    weight_decay_on: bool,
    seed: int,
    epochs: int,
    batch_size: int,
    device: torch.device,
    invariant: set[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    workers: int = 0,
    parallel: str = "ddp",
) -> RunResult:
    """Train ``model_name`` on ``data`` with ``optimizer_name`` and return what it measured.

    Under ``torchrun`` (an initialised process group) the model is wrapped in
    ``DistributedDataParallel`` (or sharded with FSDP2's ``fully_shard``) and each rank
    trains on its shard of every epoch; the test accuracy is computed on the whole test set
    by every rank.

    Args:
        data: the dataset splits.
        model_name: a name of ``adampx.experiments.models.MODELS``.
        optimizer_name: a key of :data:`OPTIMIZERS`.
        weight_decay_on: use the optimizer's weight decay from the table, else 0.
        seed: seeds the model's initialisation and the data order.
        epochs, batch_size: training length and batch size.
        device: where to train.
        invariant: names of the scale-invariant weights (found with ``inspect`` if None).
        progress: called as ``progress(step, total_steps, loss)`` after every step.
        workers: DataLoader worker processes.
        parallel: under torchrun, ``"ddp"`` (DistributedDataParallel) or ``"fsdp2"``
            (``fully_shard``: params, gradients and optimizer state sharded over the ranks).
    """
    make_optimizer, default_wd = OPTIMIZERS[optimizer_name]
    weight_decay = default_wd if weight_decay_on else 0.0
    torch.manual_seed(seed)
    model = build_model(model_name, data.num_classes, data.in_channels, data.image_size).to(device)
    if invariant is None:
        invariant = scale_invariant_names(model, data, device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(data.train, seed=seed) if distributed else None
    )
    loader = DataLoader(
        data.train,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        drop_last=False,
    )
    net: nn.Module = model
    if distributed and parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)  # in place: params become DTensors sharded on dim 0
    elif distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=None)
    optimizer = make_optimizer(model.parameters(), weight_decay)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    norm_start = _invariant_norm(model, invariant)
    every = max(1, total // 100)
    start = time.perf_counter()
    step, loss = 0, torch.tensor(float("nan"))
    views: list[list[Any]] = []
    with NormMonitor(model, optimizer, every=every, track=lambda n, p: n in invariant) as monitor:
        for epoch in range(epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(net(x.to(device)), y.to(device))
                loss.backward()
                logged = (step + 1) % every == 0 and hasattr(optimizer, "statistics")
                _track_statistics(optimizer, logged)  # AdamP / SGDP: only on logged steps
                optimizer.step()
                if logged:
                    views += [[step + 1, s.view] for s in optimizer.statistics()]  # type: ignore[attr-defined]
                scheduler.step()
                step += 1
                if progress is not None and (step % 10 == 0 or step == total):
                    progress(step, total, float(loss.detach()))  # a host sync every 10 steps only
        loss_value = float(loss.detach())
    seconds = time.perf_counter() - start
    return RunResult(
        test_accuracy=evaluate(model, data, batch_size, device),
        train_loss=loss_value,
        norm_start=norm_start,
        norm_end=_invariant_norm(model, invariant),
        weight_decay=weight_decay,
        seconds=seconds,
        steps=step,
        curve=_curve(monitor.records),
        layers=_first_and_last(monitor.records),
        views=views,
    )


def _track_statistics(optimizer: torch.optim.Optimizer, on: bool) -> None:
    for group in optimizer.param_groups:
        if "track_statistics" in group:
            group["track_statistics"] = on


def _first_and_last(records: list[NormRecord]) -> list[dict[str, Any]]:
    """The per-layer records of the first and the last logged step (for norm-growth bars)."""
    if not records:
        return []
    ends = (records[0].step, records[-1].step)
    return [asdict(r) for r in records if r.step in ends]


@torch.no_grad()
def evaluate(model: nn.Module, data: DataSplits, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy on the test split (model in eval mode: BatchNorm running statistics)."""
    model.eval()
    correct = 0
    for x, y in DataLoader(data.test, batch_size=4 * batch_size):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / len(data.test)  # type: ignore[arg-type]
