"""Log per-layer weight norms and effective step sizes of any model under any torch optimizer.

``NormMonitor`` attaches to an optimizer through torch's step hooks, so that Adam, AdamW, SGD
and AdamP runs are measured the same way. Every ``every`` steps it records, for each tracked
parameter (by default every tensor with two or more dimensions: the weights the paper is
about):

- ``norm``: ``‖w‖`` after the step;
- ``update_norm``: ``‖Δw‖``, the change the step made;
- ``lr``: the learning rate of the parameter's group;
- ``effective_step``: ``lr / ‖w‖²``, the effective step size of a scale-invariant weight;
- ``relative_update``: ``‖Δw‖ / ‖w_before‖``, the observed relative step.

Records go to a CSV or JSON-lines file (chosen by the path's suffix), to TensorBoard (when
installed), to a callback, and stay in ``monitor.records``. Reading the norms costs one
device-to-host copy per logging step, after the optimizer's step, never inside it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from adampx.util.tensors import replicated

__all__ = ["NormMonitor", "NormRecord", "read_records"]


@dataclass(frozen=True)
class NormRecord:
    """One parameter at one logged step (see the module docstring for the fields)."""

    step: int
    name: str
    norm: float
    update_norm: float
    lr: float
    effective_step: float
    relative_update: float


_FIELDS = [f for f in NormRecord.__dataclass_fields__]


class NormMonitor:
    """Record weight norms and effective step sizes every ``every`` optimizer steps.

    Args:
        model: the model whose parameters are tracked (names come from it).
        optimizer: any ``torch.optim.Optimizer`` that updates them.
        every: log every ``every``-th step (the first logged step is step ``every``).
        path: optional ``.csv`` or ``.jsonl`` file; appended to as records arrive.
        tensorboard: optional ``torch.utils.tensorboard.SummaryWriter`` (or a log directory,
            for which one is created); scalars are tagged ``norm/<name>`` etc.
        callback: optional function called with the list of records of each logged step.
        track: which parameters to track: a predicate on ``(name, param)``; the default
            tracks tensors with two or more dimensions.

    Use it as a context manager, or call :meth:`close` to remove the hooks and close files.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 1,
        path: str | Path | None = None,
        tensorboard: Any = None,
        callback: Callable[[list[NormRecord]], None] | None = None,
        track: Callable[[str, Tensor], bool] | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (must be an int >= 1)")
        keep = track or (lambda name, p: p.dim() > 1)
        self.params = [(n, p) for n, p in model.named_parameters() if keep(n, p)]
        if not self.params:
            raise ValueError("NormMonitor: no parameter of the model matches `track`")
        self.optimizer = optimizer
        self.every = every
        self.callback = callback
        self.records: list[NormRecord] = []
        self.steps = 0
        self._group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in self.params if p not in self._group_of]
        if missing:
            raise ValueError(f"NormMonitor: parameters not in the optimizer: {missing[:5]}")
        self._before: list[Tensor] | None = None
        self._file, self._writer = _open_sink(path)
        self._tensorboard = _tensorboard_writer(tensorboard)
        self._owns_tensorboard = self._tensorboard is not tensorboard
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def _logging_step(self) -> bool:
        return (self.steps + 1) % self.every == 0

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._logging_step():
            self._before = [p.detach().clone() for _, p in self.params]

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._before is None:
            self.steps += 1
            return
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor) and found_inf.item() != 0:
            # a GradScaler step that an optimizer taking the scaler's flag skipped
            self._before = None
            return
        self.steps += 1
        after = [p.detach() for _, p in self.params]
        diffs = [a - b for a, b in zip(after, self._before, strict=True)]

        def norms(tensors: list[Tensor]) -> Tensor:
            # sharded params (FSDP2) give sharded norms: take their full value
            return torch.stack([replicated(n).double().cpu() for n in torch._foreach_norm(tensors)])

        values = torch.stack([norms(after), norms(diffs), norms(self._before)]).tolist()
        self._before = None
        batch = []
        for (name, p), norm, dnorm, norm_before in zip(self.params, *values, strict=True):
            lr = float(self._group_of[p]["lr"])
            batch.append(
                NormRecord(
                    step=self.steps,
                    name=name,
                    norm=norm,
                    update_norm=dnorm,
                    lr=lr,
                    effective_step=lr / norm**2 if norm > 0 else float("inf"),
                    relative_update=dnorm / norm_before if norm_before > 0 else float("inf"),
                )
            )
        self.records.extend(batch)
        self._emit(batch)

    def _emit(self, batch: list[NormRecord]) -> None:
        if self._writer is not None:
            for r in batch:
                self._writer(asdict(r))
            assert self._file is not None
            self._file.flush()
        if self._tensorboard is not None:
            for r in batch:
                for key in ("norm", "update_norm", "effective_step", "relative_update"):
                    self._tensorboard.add_scalar(f"{key}/{r.name}", getattr(r, key), r.step)
        if self.callback is not None:
            self.callback(batch)

    def close(self) -> None:
        """Remove the hooks and close the output file and TensorBoard writer."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            if self._owns_tensorboard:
                self._tensorboard.close()
            else:
                self._tensorboard.flush()

    def __enter__(self) -> NormMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_sink(
    path: str | Path | None,
) -> tuple[TextIO | None, Callable[[dict[str, Any]], None] | None]:
    if path is None:
        return None, None
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise ValueError(f"NormMonitor path must end in .csv or .jsonl, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    f = path.open("a", newline="")
    if path.suffix == ".jsonl":

        def write_line(row: dict[str, Any]) -> None:
            f.write(json.dumps(row) + "\n")

        return f, write_line
    writer = csv.DictWriter(f, fieldnames=_FIELDS)
    if new:
        writer.writeheader()

    def write_row(row: dict[str, Any]) -> None:
        writer.writerow(row)

    return f, write_row


def _tensorboard_writer(tensorboard: Any) -> Any:
    if tensorboard is None or hasattr(tensorboard, "add_scalar"):
        return tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard"
        ) from e
    return SummaryWriter(log_dir=str(tensorboard))


def read_records(path: str | Path) -> list[NormRecord]:
    """Read the records a :class:`NormMonitor` wrote to a ``.csv`` or ``.jsonl`` file."""
    path = Path(path)
    with path.open(newline="") as f:
        rows: Iterable[dict[str, Any]] = (
            (json.loads(line) for line in f if line.strip())
            if path.suffix == ".jsonl"
            else list(csv.DictReader(f))
        )
        return [
            NormRecord(
                step=int(r["step"]),
                name=str(r["name"]),
                **{k: float(r[k]) for k in _FIELDS if k not in ("step", "name")},
            )
            for r in rows
        ]
