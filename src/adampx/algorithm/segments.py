"""Many tensors' rows concatenated: the rows that :func:`adampx.algorithm.projection.test`
sees when it tests many tensors at once.

The CPU backend's small tensors (:mod:`adampx.backends.cpu.small`) gather the row sums
``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` of many tested tensors of one dtype into vectors that hold
the rows of tensor 0, then those of tensor 1, and so on. :class:`Segments` describes that
split and reduces each tensor's rows with ``torch.segment_reduce``, so that the test costs a
few dozen small operations per chunk of tensors instead of a few dozen per tensor.

Nothing here reads a value back to the host: the small index tensors that describe the
segments are built once and kept in the optimizer's workspace on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from adampx.algorithm.projection import threshold
from adampx.util.workspace import Workspace


class Segments:
    """How concatenated rows split into tensors: Python numbers and their device copies;
    reductions over each tensor's rows in ``torch.segment_reduce``."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], device: torch.device) -> None:
        self.lengths = [s[0] for s in shapes]  # rows per tensor
        self.row_lengths = [math.prod(s) // s[0] for s in shapes]  # elements per row
        self.rows = sum(self.lengths)
        self.lengths_t = torch.tensor(self.lengths, device=device)
        # √(row length) and √(size) per tensor, correctly rounded on the host
        self.roots = [
            [math.sqrt(k) for k in self.row_lengths],
            [math.sqrt(k * n) for k, n in zip(self.row_lengths, self.lengths, strict=True)],
        ]
        self.roots_t = torch.tensor(self.roots, dtype=torch.float64, device=device)

    def _reduce(self, x: Tensor, how: str) -> Tensor:
        """Sum or max of each tensor's rows of ``x`` (the last dim runs over all rows)."""
        lengths = self.lengths_t.expand(*x.shape[:-1], -1)
        return torch.segment_reduce(x, how, lengths=lengths, axis=x.dim() - 1, unsafe=True)

    def max(self, x: Tensor) -> Tensor:
        return self._reduce(x, "max")

    def sum(self, x: Tensor) -> Tensor:
        return self._reduce(x, "sum")

    def whole_norms(self, norms: Tensor) -> Tensor:
        return self.sum(norms.square()).sqrt()

    def thresholds(self, delta: float, dtype: torch.dtype) -> tuple[Tensor, ...]:
        # on the device, so that delta may change between steps without a copy from the host
        return tuple(threshold(delta, self.roots_t).to(dtype))  # type: ignore[union-attr]

    def per_row(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.lengths_t, output_size=self.rows)

    def threshold_values(self, delta: float, index: int) -> tuple[float, float]:
        return threshold(delta, self.roots[0][index]), threshold(delta, self.roots[1][index])  # type: ignore[return-value]


def cached_segments(
    workspace: Workspace | None,
    shapes: Sequence[tuple[int, ...]],
    device: torch.device,
) -> Segments:
    """:class:`Segments`, kept in ``workspace`` (if any) under the shapes and device.

    A new set of shapes (a param that gets no gradient in some steps, say) builds and copies
    its index tensors to the device once: on CUDA that first step of the new set waits for
    the host copy. The workspace keeps the most recent few sets only.
    """
    if workspace is None:
        return Segments(shapes, device)
    key = ("segments", tuple(shapes), str(device))
    return workspace.constant(key, lambda: Segments(shapes, device))
