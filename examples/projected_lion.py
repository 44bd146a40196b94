"""adampx.Projected on an optimizer torch does not ship: Lion, with and without the projection.

Trains a small BatchNorm CNN on scikit-learn's digits with Lion alone, with Lion's own
decoupled weight decay, and wrapped in ``adampx.Projected`` with Projected's weight decay,
same seed, data and lr; tracks the scale-invariant conv weights with
``NormMonitor``; prints a table and writes the figure used in docs/projected.md. Then
measures the extra memory of Projected's step on this model and on ResNet-50's shapes:

    python examples/projected_lion.py --out docs/figures

Needs the ``demo`` extra (scikit-learn, matplotlib). About 80 seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from digits_cnn import load_digits, make_model, train_epoch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import adampx
from adampx.tools.monitor import NormMonitor, NormRecord
from adampx.tools.plots import plot_norm_curves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_time import resnet50_shapes

LR = 3e-4  # Lion's usual lr is 3-10x below AdamW's (1e-3 in examples/diagnostics_digits.py)
WEIGHT_DECAY = 0.1  # and its weight decay 3-10x above AdamW's (1e-2 there)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023, arXiv 2302.06675): sign of an interpolation of momentum and
    gradient; written for this example, not a tuned implementation.

    Per step, with ``m`` the momentum (zero at first) and ``g`` the gradient::

        p ← p·(1 − lr·weight_decay)               (decoupled, as in the paper)
        p ← p − lr·sign(β1·m + (1 − β1)·g)
        m ← β2·m + (1 − β2)·g
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad Lion hyperparameters: {lr=}, {betas=}, {weight_decay=}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(m.lerp(p.grad, 1 - beta1).sign_(), alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)
        return loss


def groups_of(model: nn.Module) -> list[dict[str, Any]]:
    """Weights, and biases plus BatchNorm gains without weight decay: ``weight_decay`` for
    Lion's own decay, ``projected_weight_decay`` for Projected's (adampx.param_groups sets
    only the first, which Projected does not read)."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    small = [p for p in model.parameters() if p.dim() <= 1]
    return [
        {"params": weights},
        {"params": small, "weight_decay": 0.0, "projected_weight_decay": 0.0},
    ]


RUNS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "Lion": lambda groups: Lion(groups, lr=LR),
    f"Lion, weight_decay={WEIGHT_DECAY}": lambda groups: Lion(
        groups, lr=LR, weight_decay=WEIGHT_DECAY
    ),
    f"Projected(Lion), weight_decay={WEIGHT_DECAY}": lambda groups: adampx.Projected(
        Lion(groups, lr=LR), weight_decay=WEIGHT_DECAY
    ),
}


def total_norm(records: list[NormRecord], step: int) -> float:
    """sqrt(Σ ‖w‖²) over the tracked tensors at one logged step."""
    return sum(r.norm**2 for r in records if r.step == step) ** 0.5


def median_of(records: list[NormRecord], step: int, field: str) -> float:
    return statistics.median(getattr(r, field) for r in records if r.step == step)


def train(
    name: str, epochs: int, data: Any
) -> tuple[float, list[NormRecord], nn.Module, torch.optim.Optimizer]:
    (x_train, y_train), (x_test, y_test) = data.train.tensors, data.test.tensors
    torch.manual_seed(0)
    model = make_model()
    optimizer = RUNS[name](groups_of(model))
    track = lambda n, p: p.dim() == 4  # noqa: E731  (the convs; adampx.inspect confirms it)
    with NormMonitor(model, optimizer, every=5, track=track) as monitor:
        for epoch in range(epochs):
            train_epoch(model, optimizer, x_train, y_train)
            model.eval()
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"  {name:<34} epoch {epoch + 1:>2}/{epochs}  test accuracy {accuracy:.4f}")
    return accuracy, monitor.records, model, optimizer


# --- memory -------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors that operations create and that are still alive, and their peak
    (as benchmarks/step_time.py counts a step's extra memory: tensors, not allocator
    blocks; views of an input's storage are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        flat_in = tree_flatten((args, kwargs or {}))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in inputs or key in self._seen or nbytes == 0:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key, nbytes)
        return out


def step_peak(optimizer: torch.optim.Optimizer) -> int:
    """Peak bytes of the tensors one step creates (the optimizer has stepped before)."""
    with LiveBytes() as mode:
        optimizer.step()
    return mode.peak


def resnet50_params() -> list[nn.Parameter]:
    """Random float32 params of ResNet-50's shapes, with gradients orthogonal to each conv
    output channel's weights (as a BatchNorm after the conv leaves them), so that the
    projection fires on the convs."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in resnet50_shapes():  # benchmarks/step_time.py's
        p = nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        g = torch.randn(shape, generator=gen) * 1e-3
        if len(shape) == 4:
            rows, grows = p.detach().view(shape[0], -1), g.view(shape[0], -1)
            along = (rows * grows).sum(1, keepdim=True) / rows.square().sum(1, keepdim=True)
            g = (grows - along * rows).view(shape)
        p.grad = g
        params.append(p)
    return params


def memory_rows(model_params: Callable[[], list[nn.Parameter]]) -> dict[str, float]:
    """Bytes of all params, of the tested ones (two or more dims: the copy Projected keeps),
    of the 4-d ones (the scale-invariant convs), and the measured peak of one step of Lion
    and of Projected(Lion) (second step: Lion's momentum exists already)."""
    row: dict[str, float] = {}
    params = model_params()
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    row["all"] = nbytes(params)
    row["tested"] = nbytes([p for p in params if p.dim() > 1])
    row["conv"] = nbytes([p for p in params if p.dim() == 4])
    makers: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "Lion": lambda ps: Lion(ps, lr=LR),
        "Projected(Lion)": lambda ps: adampx.Projected(Lion(ps, lr=LR), weight_decay=WEIGHT_DECAY),
    }
    for label, make in makers.items():
        optimizer = make(model_params())
        optimizer.step()
        row[label] = step_peak(optimizer)
        del optimizer
    return row


def digits_params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    model = make_model()
    model(torch.randn(64, 1, 8, 8)).square().mean().backward()
    return list(model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--no-resnet50", action="store_true", help="skip the memory count on ResNet-50's shapes"
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_digits(seed=0)

    start = time.perf_counter()
    results = {}
    for name in RUNS:
        accuracy, records, _, _ = train(name, args.epochs, data)
        results[name] = (accuracy, records)

    first, last = results["Lion"][1][0].step, results["Lion"][1][-1].step
    print(
        f"\ndigits CNN, {args.epochs} epochs, lr {LR}, seed 0; the three convs (scale invariant),"
        f" logged every 5 steps: step {first} → step {last}"
    )
    header = (
        f"{'optimizer':<34} {'test acc':>8}  {'‖w‖ start → end':>17}  "
        f"{'lr/‖w‖² (median) start → end':>30}  {'‖Δw‖/‖w‖ (median) start → end':>31}"
    )
    print(header)
    print("-" * len(header))
    for name, (accuracy, records) in results.items():
        norms = f"{total_norm(records, first):.3f} → {total_norm(records, last):.3f}"
        eff, rel = (
            f"{median_of(records, first, f):.3e} → {median_of(records, last, f):.3e}"
            for f in ("effective_step", "relative_update")
        )
        print(f"{name:<34} {accuracy:>8.4f}  {norms:>17}  {eff:>30}  {rel:>31}")
    print(f"training: {time.perf_counter() - start:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    path = plot_norm_curves(
        {name: records for name, (_, records) in results.items()},
        args.out / "projected_lion_norms.png",
        title=f"digits CNN, Lion (lr {LR}) with and without adampx.Projected: the three convs",
    )
    print(f"figure: {path}")

    print("\nextra memory of one step (tensors a step creates, peak; float32):")
    sets = {"digits CNN": digits_params}
    if not args.no_resnet50:
        sets["ResNet-50 shapes"] = resnet50_params
    header = (
        f"{'params':<17} {'all params':>11} {'tested (≥2-d)':>14} {'4-d convs':>10} "
        f"{'Lion step':>10} {'Projected(Lion) step':>21} {'difference':>11} {'÷ tested':>9}"
    )
    print(header)
    print("-" * len(header))
    for label, make in sets.items():
        row = memory_rows(make)
        diff = row["Projected(Lion)"] - row["Lion"]

        def size(n: float) -> str:
            return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

        print(
            f"{label:<17} {size(row['all']):>11} {size(row['tested']):>14} "
            f"{size(row['conv']):>10} {size(row['Lion']):>10} "
            f"{size(row['Projected(Lion)']):>21} {size(diff):>11} {diff / row['tested']:>8.2f}×"
        )
    print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
