"""Per-step, per-tensor statistics of AdamP and SGDP: what the projection did and why.

Turned on per param group with ``track_statistics=True`` (off by default; when off the step
does no extra work). When on, each step records for every param with a gradient:

- ``view``: where the projection fired, ``"channel"``, ``"layer"`` or ``"none"``, or
  ``"skipped"`` for tensors that are never tested (0-d, 1-d, ``projection=False``);
- ``max_cosine`` / ``channel_threshold``: ``max_i |cos(g_i, p_i)|`` and ``delta/sqrt(N/n0)``;
- ``layer_cosine`` / ``layer_threshold``: ``|cos(g, p)|`` and ``delta/sqrt(N)``;
- ``norm``: ``‖w‖`` before the step; ``update_norm``: ``‖Δw‖`` of the step;
- ``effective_step``: ``lr/‖w‖²``; ``relative_update``: ``‖Δw‖/‖w‖``.

Everything is computed on the params' devices inside the step, without reading a value back
to the host; :meth:`StatisticsRecorder.read` (``optimizer.statistics()``) copies the last
step's numbers to the host on demand. Recording keeps a copy of each param during the step
(for ``Δw``), so it costs one extra param-sized buffer while the step runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adampx.algorithm.projection import Decisions
from adampx.util.tensors import HALF_DTYPES, replicated

__all__ = ["StatisticsRecorder", "TensorStatistics"]


@dataclass(frozen=True)
class TensorStatistics:
    """One parameter at one step (see the module docstring for the fields)."""

    step: int  # how many steps have recorded statistics so far (this one included)
    name: str
    view: str
    max_cosine: float
    channel_threshold: float
    layer_cosine: float
    layer_threshold: float
    norm: float
    update_norm: float
    lr: float
    effective_step: float
    relative_update: float


@dataclass
class _Pending:
    name: str
    tested: bool
    channel_threshold: float
    layer_threshold: float
    lr: Any
    values: Tensor  # [channel, layer, max_cosine, layer_cosine, norm, update_norm], float64


def _snapshot(p: Tensor) -> Tensor:
    """A copy of ``p`` for measuring ``Δw``, in float32 for half params."""
    dtype = torch.float32 if p.dtype in HALF_DTYPES else p.dtype
    return p.detach().to(dtype=dtype, copy=True)


def _captured(lr: Any) -> Any:
    """The lr as it is now: schedulers update a tensor lr in place after the step."""
    return lr.detach().clone() if isinstance(lr, Tensor) else float(lr)


class StatisticsRecorder:
    """Collects :class:`TensorStatistics` during a step; reads them back on demand."""

    def __init__(self) -> None:
        # A CPU tensor, not a Python int: a compiled step would recompile on every new int.
        self._steps = torch.zeros((), dtype=torch.int64)
        self._pending: list[_Pending] = []

    def start_step(self) -> None:
        """Called at the start of a step that records: count it, forget the last records."""
        self._steps.add_(1)
        self._pending = []

    def clear(self) -> None:
        """Called at the start of a step that records nothing: forget the last records."""
        if self._pending:
            self._pending = []

    @staticmethod
    def snapshot(params: list[Tensor]) -> list[Tensor]:
        """Copies of ``params`` taken before the update."""
        return [_snapshot(p) for p in params]

    def record(
        self,
        group: dict[str, Any],
        group_index: int,
        params: list[Tensor],
        before: list[Tensor],
        decisions: Decisions,
    ) -> None:
        """Store the statistics of ``params`` (updated in place) on their devices."""
        names = group.get("param_names")
        position = {p: i for i, p in enumerate(group["params"])}
        nan = float("nan")
        for p, old in zip(params, before, strict=True):
            new = p.detach().to(old.dtype)
            norm = torch.linalg.vector_norm(old).double()
            update = torch.linalg.vector_norm(new - old).double()
            d = decisions.get(p)
            if d is None:
                tested_values = [torch.full_like(norm, nan)] * 4
            else:
                tested_values = [
                    d.channel.double(),
                    d.layer.double(),
                    d.max_cosine_channel.double(),
                    d.cosine_layer.double(),
                ]
            index = position[p]
            self._pending.append(
                _Pending(
                    name=names[index] if names else f"group{group_index}.param{index}",
                    tested=d is not None,
                    channel_threshold=d.channel_threshold if d is not None else nan,
                    layer_threshold=d.layer_threshold if d is not None else nan,
                    lr=_captured(group["lr"]),
                    values=torch.stack([replicated(v) for v in (*tested_values, norm, update)]),
                )
            )

    def read(self) -> list[TensorStatistics]:
        """The last recorded step's statistics on the host (one device-to-host copy)."""
        if not self._pending:
            return []
        steps = int(self._steps)
        devices = {e.values.device for e in self._pending}
        if len(devices) == 1:  # one copy for all
            rows = torch.stack([e.values for e in self._pending]).cpu().tolist()
        else:
            rows = [e.values.cpu().tolist() for e in self._pending]
        out = []
        for e, (channel, layer, max_cos, layer_cos, norm, update) in zip(
            self._pending, rows, strict=True
        ):
            lr = float(e.lr)
            if not e.tested:
                view = "skipped"
            else:
                view = "channel" if channel else "layer" if layer else "none"
            out.append(
                TensorStatistics(
                    step=steps,
                    name=e.name,
                    view=view,
                    max_cosine=max_cos,
                    channel_threshold=e.channel_threshold,
                    layer_cosine=layer_cos,
                    layer_threshold=e.layer_threshold,
                    norm=norm,
                    update_norm=update,
                    lr=lr,
                    effective_step=lr / norm**2 if norm > 0 else math.inf,
                    relative_update=update / norm if norm > 0 else math.inf,
                )
            )
        return out
