"""The diagnostics tools on one real model: inspect, statistics, monitor, plots, param groups.

Trains a small BatchNorm CNN on scikit-learn's digits with AdamW and AdamP (and SGD and
SGDP), then writes the figures and the table used in docs/diagnostics.md:

    python examples/diagnostics_digits.py --out docs/figures

Needs the ``demo`` extra (scikit-learn, matplotlib). Under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from digits_cnn import load_digits, make_model, train_epoch

import adampx
from adampx.tools.monitor import NormMonitor, NormRecord
from adampx.tools.plots import plot_norm_curves, plot_norm_growth, plot_projection_fraction
from adampx.tools.statistics import TensorStatistics

OPTIMIZERS = {
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=1e-2),
    "AdamP": lambda groups: adampx.AdamP(groups, lr=1e-3, weight_decay=1e-2, track_statistics=True),
    "SGD": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-5),
    "SGDP": lambda groups: adampx.SGDP(
        groups, lr=0.1, momentum=0.9, weight_decay=1e-5, track_statistics=True
    ),
}


def _extend(views: list[TensorStatistics], optimizer: adampx.AdamP | adampx.SGDP) -> None:
    """Keep the statistics of the optimizer's last step."""
    views += optimizer.statistics()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("diagnostics"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    x_train, y_train = load_digits(seed=0).train.tensors  # type: ignore[attr-defined]

    torch.manual_seed(0)
    report = adampx.inspect(make_model(), x_train[:256])
    print(report, "\n")
    invariant = {r.name for r in report if r.invariance != "none"}

    norms: dict[str, list[NormRecord]] = {}
    views: dict[str, list[TensorStatistics]] = {}
    for name, make_optimizer in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = make_model()
        # The usual recipe: no weight decay on biases and norm gains. (Passing report=report
        # would also turn the projection off for the classifier, which the probe found not
        # scale invariant; here it stays on, so the statistics show AdamP testing it.)
        optimizer = make_optimizer(adampx.param_groups(model))
        track = lambda n, p: n in invariant and p.dim() > 1  # noqa: E731
        views[name] = []
        with NormMonitor(model, optimizer, every=5, track=track) as monitor:
            record = None
            if isinstance(optimizer, adampx.AdamP | adampx.SGDP):
                record = functools.partial(_extend, views[name], optimizer)
            for _ in range(args.epochs):
                train_epoch(model, optimizer, x_train, y_train, after_step=record)
        norms[name] = monitor.records
        first, last = norms[name][0].step, norms[name][-1].step
        total = {
            s: sum(r.norm**2 for r in norms[name] if r.step == s) ** 0.5 for s in (first, last)
        }
        print(
            f"{name:<6} ‖w‖ of the scale-invariant weights: {total[first]:.3f} → {total[last]:.3f}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    for label, keys in [("adam", ("AdamW", "AdamP")), ("sgd", ("SGD", "SGDP"))]:
        runs = {k: norms[k] for k in keys}
        plot_norm_curves(runs, args.out / f"norm_curves_{label}.png", title="digits CNN")
        plot_norm_growth(runs, args.out / f"norm_growth_{label}.png", title="digits CNN")
    fractions = {k: v for k, v in views.items() if v}
    plot_projection_fraction(fractions, args.out / "projection_fraction.png", title="digits CNN")
    print(f"figures in {args.out}/")


if __name__ == "__main__":
    main()
