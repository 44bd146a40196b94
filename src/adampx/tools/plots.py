"""Figures of the weight-norm effect (matplotlib, from the ``plot`` extra).

- :func:`plot_norm_curves`: norm of the tracked weights, their relative update ``‖Δw‖/‖w‖``
  and effective step size ``lr/‖w‖²`` per step, one line per run, side by side;
- :func:`plot_norm_growth`: per-layer bars of ``‖w_end‖ / ‖w_start‖``, grouped by run;
- :func:`plot_projection_fraction`: fraction of tested tensors that AdamP/SGDP projected at
  each step, one line per run.

Inputs are the records of :class:`adampx.tools.monitor.NormMonitor` and of
``optimizer.statistics()``; every function writes a PNG and returns its path.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from adampx.tools.monitor import NormRecord

__all__ = ["plot_norm_curves", "plot_norm_growth", "plot_projection_fraction"]


class _ViewRecord(Protocol):
    step: int
    view: str


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'adampx[plot]'") from e
    return plt


def _by_step(records: Sequence[NormRecord]) -> dict[int, list[NormRecord]]:
    steps: dict[int, list[NormRecord]] = defaultdict(list)
    for r in records:
        steps[r.step].append(r)
    return dict(sorted(steps.items()))


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_norm_curves(
    runs: Mapping[str, Sequence[NormRecord]], path: str | Path, *, title: str = ""
) -> Path:
    """Three panels over steps, one line per run: total norm, relative update, lr/‖w‖².

    The total norm is ``sqrt(Σ ‖w‖²)`` over the tracked tensors; the relative update and the
    effective step size are medians over them.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, records in runs.items():
        steps = _by_step(records)
        xs = list(steps)
        axes[0].plot(xs, [sum(r.norm**2 for r in rs) ** 0.5 for rs in steps.values()], label=label)
        axes[1].plot(
            xs, [statistics.median(r.relative_update for r in rs) for rs in steps.values()]
        )
        axes[2].plot(xs, [statistics.median(r.effective_step for r in rs) for rs in steps.values()])
    axes[0].set_ylabel("‖w‖ of tracked weights")
    axes[1].set_ylabel("median ‖Δw‖ / ‖w‖")
    axes[2].set_ylabel("median lr / ‖w‖²")
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_norm_growth(
    runs: Mapping[str, Sequence[NormRecord]], path: str | Path, *, title: str = ""
) -> Path:
    """Per-layer bars of ``‖w‖`` at the last logged step over ``‖w‖`` at the first."""
    plt = _pyplot()
    growth: dict[str, dict[str, float]] = {}
    names: list[str] = []
    for label, records in runs.items():
        steps = _by_step(records)
        if not steps:
            continue
        first, last = next(iter(steps.values())), list(steps.values())[-1]
        start = {r.name: r.norm for r in first}
        growth[label] = {r.name: r.norm / start[r.name] for r in last if start.get(r.name)}
        names += [n for n in growth[label] if n not in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) * max(1, len(growth))), 4))
    width = 0.8 / max(1, len(growth))
    for k, (label, values) in enumerate(growth.items()):
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, [values.get(n, float("nan")) for n in names], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("‖w_end‖ / ‖w_start‖")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_projection_fraction(
    runs: Mapping[str, Sequence[_ViewRecord]], path: str | Path, *, title: str = ""
) -> Path:
    """Fraction of tested tensors projected (channel or layer view) at each step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, records in runs.items():
        tested: dict[int, list[bool]] = defaultdict(list)
        for r in records:
            if r.view != "skipped":
                tested[r.step].append(r.view in ("channel", "layer"))
        xs = sorted(tested)
        ax.plot(xs, [sum(tested[s]) / len(tested[s]) for s in xs], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of tested tensors projected")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)
