"""The scale-invariance test of many tensors at once, on their concatenated row sums.

The flat multi-tensor step (``adampx._flat_step``, CUDA's default) gathers the row sums
``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` of all tested tensors of one dtype into vectors that hold
the rows of tensor 0, then those of tensor 1, and so on. The test of
``../shared/ALGORITHM.md`` then runs for every tensor at once with segment reductions: a few
dozen small operations per step instead of a few dozen per tensor, which is what makes the
step's cost independent of the number of tensors on a GPU. (The CPU's default path,
``adampx._torch_fused``, tests one tensor at a time instead, so that it can finish each
tensor while it is in cache.)

Nothing here reads a value back to the host: the decisions are boolean tensors, and the
small index tensors that describe the segments (:class:`Segments`) are built once and kept
in the optimizer's workspace on the device, so that a step is capturable in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from adampx._shared_step import Decisions
from adampx._tensors import Workspace
from adampx.projection import Decision

# where torch.segment_reduce is fast; elsewhere padded blocks are reduced (see _reduce)
SEGMENT_REDUCE_DEVICES: tuple[str, ...] = ("cpu",)


class Segments(NamedTuple):
    """How the concatenated rows split into tensors: Python numbers and their device copies."""

    lengths: list[int]  # rows per tensor
    row_lengths: list[int]  # elements per row, per tensor
    rows: int  # rows in all
    lengths_t: Tensor  # ``lengths`` on the device (int64)
    sizes_t: Tensor  # [2, tensors] on the device (float64): row length, tensor size
    padded: Tensor | None  # off the CPU: [tensors, most rows] row indices, ``rows`` as padding

    def thresholds(self, delta: float, dtype: torch.dtype) -> Tensor:
        """[2, tensors]: ``delta / sqrt(row length)`` and ``delta / sqrt(size)``.

        Computed on the device in float64 (correctly rounded square root and division, so
        the same doubles as the per-tensor test's Python floats), then cast to ``dtype``;
        ``delta`` may change between steps without a copy from the host.
        """
        # torch.div, not ``delta / t`` (a reciprocal and a product: two roundings)
        return torch.div(self.sizes_t.new_full((), delta), self.sizes_t.sqrt()).to(dtype)


# a padded block at most this many times the rows (plus a constant), else segment_reduce
PADDING_LIMIT = 8


def segments(shapes: Sequence[tuple[int, ...]], device: torch.device) -> Segments:
    """The :class:`Segments` of tested tensors of these shapes (in order)."""
    lengths = [s[0] for s in shapes]
    row_lengths = [math.prod(s) // s[0] for s in shapes]
    sizes = [row_lengths, [k * n for k, n in zip(row_lengths, lengths, strict=True)]]
    rows = sum(lengths)
    # a padded block that would dwarf the rows (one tensor with far more rows than the
    # others, e.g. a large embedding) is not built: segment_reduce is slow there, not large
    padded = torch.device(device).type not in SEGMENT_REDUCE_DEVICES and (
        len(lengths) * max(lengths) <= PADDING_LIMIT * rows + (1 << 16)
    )
    return Segments(
        lengths=lengths,
        row_lengths=row_lengths,
        rows=rows,
        lengths_t=torch.tensor(lengths, device=device),
        sizes_t=torch.tensor(sizes, dtype=torch.float64, device=device),
        padded=_padded_index(lengths, device) if padded else None,
    )


def _padded_index(lengths: list[int], device: torch.device) -> Tensor:
    """Per tensor the indices of its rows, padded with ``sum(lengths)`` to the longest."""
    rows = sum(lengths)
    index = torch.full((len(lengths), max(lengths)), rows, dtype=torch.int64)
    start = 0
    for t, n in enumerate(lengths):
        index[t, :n] = torch.arange(start, start + n)
        start += n
    return index.to(device)


def cached_segments(
    workspace: Workspace | None, shapes: Sequence[tuple[int, ...]], device: torch.device
) -> Segments:
    """:func:`segments`, kept in ``workspace`` (if any) under the shapes and device.

    A new set of shapes (a param that gets no gradient in some steps, say) builds and copies
    its index tensors to the device once: on CUDA that first step of the new set waits for
    the host copy. The workspace keeps the most recent few sets only.
    """
    if workspace is None:
        return segments(shapes, device)
    key = ("segments", tuple(shapes), str(device))
    return workspace.constant(key, lambda: segments(shapes, device))


def _reduce(x: Tensor, segs: Segments, how: str) -> Tensor:
    """Sum or max of each tensor's rows of ``x`` (dim 0 runs over the rows of all tensors).

    On the CPU ``torch.segment_reduce``. Elsewhere its CUDA kernel gives each segment one
    thread, which loops over tens of thousands of rows (milliseconds per call on an H100);
    there the rows are gathered into a padded ``[tensors, most rows]`` block (padding 0 for
    sums, −inf for maxima) and reduced along dim 1, in parallel and deterministically.
    """
    if segs.padded is None:
        return torch.segment_reduce(x, how, lengths=segs.lengths_t, unsafe=True)
    fill = x.new_full((1, *x.shape[1:]), 0.0 if how == "sum" else -math.inf)
    block = torch.cat((x, fill))[segs.padded]
    return block.sum(1) if how == "sum" else block.amax(1)


def segment_sum(x: Tensor, segs: Segments) -> Tensor:
    """Per tensor, the sum of its rows of ``x``."""
    return _reduce(x, segs, "sum")


class Test(NamedTuple):
    """The outcome of the test, per row or per tensor, and what the projection needs."""

    segments: Segments
    channel: Tensor  # per row: its tensor passed in the channel view
    layer: Tensor  # per tensor: passed in the layer view (and not the channel view)
    row_scale: Tensor  # per row: (‖p_i‖ + eps)²
    layer_scale: Tensor  # per tensor: (‖p‖ + eps)²
    keep: Tensor  # per tensor: the weight-decay factor 1 − decay·r

    @property
    def rows(self) -> int:
        return self.segments.rows

    def part(self, segs: Segments, rows: slice, tensors: slice) -> Test:
        """The outcome for the tensors ``tensors`` (rows ``rows``), whose segments are ``segs``."""
        return Test(
            segments=segs,
            channel=self.channel[rows],
            layer=self.layer[tensors],
            row_scale=self.row_scale[rows],
            layer_scale=self.layer_scale[tensors],
            keep=self.keep[tensors],
        )

    def per_row(self, x: Tensor) -> Tensor:
        """A per-tensor vector repeated for each of the tensor's rows."""
        s = self.segments
        return x.repeat_interleave(s.lengths_t, output_size=s.rows)

    def coefficients(self, dots: Tensor) -> Tensor:
        """``c_i`` with ``d_i − c_i p_i`` the projected row, from the row dots ``p_i·d_i`` of
        all rows of all tensors.

        Chosen with ``where``, never by multiplying with zero: a NaN in one row of a tensor
        that is not projected stays in that row.
        """
        zero = dots.new_zeros(())
        whole = segment_sum(dots, self.segments)
        layer = torch.where(self.layer, whole / self.layer_scale, zero)
        return torch.where(self.channel, dots / self.row_scale, self.per_row(layer))


def test(
    segs: Segments,
    p_norm: Tensor,
    g_norm: Tensor,
    gp: Tensor,
    params: list[Tensor],
    *,
    delta: float,
    eps: float,
    wd_ratio: float,
    decay: float | Tensor,
    decisions: Decisions | None,
) -> Test:
    """The test of ALGORITHM.md for every tensor, from its concatenated row sums.

    Args:
        segs: the tested tensors' :class:`Segments`.
        p_norm, g_norm, gp: per row ``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i``.
        params: the tested params as the user holds them, in order (keys of ``decisions``).
        delta, eps, wd_ratio: as in ALGORITHM.md.
        decay: the decay amount ``a`` (``keep = 1 − a·r``).
        decisions: if given, receives every tensor's :class:`Decision`.
    """
    cos = gp.abs() / (g_norm.clamp_min(eps) * p_norm.clamp_min(eps))
    max_cos = _reduce(cos, segs, "max")
    squares = segment_sum(torch.stack((p_norm, g_norm), 1).square(), segs)
    p_whole, g_whole = squares.T.sqrt()
    gp_whole = segment_sum(gp, segs)
    cos_layer = gp_whole.abs() / (g_whole.clamp_min(eps) * p_whole.clamp_min(eps))
    channel_threshold, layer_threshold = segs.thresholds(delta, gp.dtype)
    channel = max_cos < channel_threshold
    layer = (cos_layer < layer_threshold) & ~channel
    zero = gp.new_zeros(())
    ratio = torch.where(channel | layer, torch.full_like(zero, wd_ratio), zero + 1)
    keep = 1 - decay * ratio
    if decisions is not None:
        for t, param in enumerate(params):
            k, n = segs.row_lengths[t], segs.lengths[t]
            decisions[param] = Decision(
                channel[t],
                layer[t],
                max_cos[t],
                cos_layer[t],
                delta / math.sqrt(k),
                delta / math.sqrt(k * n),
            )
    return Test(
        segments=segs,
        channel=channel.repeat_interleave(segs.lengths_t, output_size=segs.rows),
        layer=layer,
        row_scale=(p_norm + eps).square(),
        layer_scale=(p_whole + eps).square(),
        keep=keep,
    )
