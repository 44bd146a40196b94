"""The CPU default path's small tested tensors, tested and stepped together.

:mod:`adampx._torch_fused` finishes one tested tensor at a time, in about 20 to 30
operations of a few microseconds each whatever the tensor's size. On a tensor of a few
thousand elements those operations, not its bytes, are the cost: SGDP on ResNet-50's tensor
layout with 2 elements per row took about 10 ms per step, against 1.4 ms for torch's fused
SGD (6.5 ms since). Tested tensors of up to :data:`SMALL_ELEMENTS` elements are stepped
here instead, in chunks of consecutive tensors of about :data:`CHUNK_ELEMENTS` elements
(a chunk stays in cache between its test and its step):

1. Per tensor only its row sums, written into slices of one vector per sum over the
   chunk's rows: ``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` (and SGDP's ``p_i·b_i``, ``b`` the
   momentum before the step). Row dots are ``torch.linalg.vecdot``: on tensors this small
   it costs half of the sparse product that large tensors take.
2. The test of every tensor of the chunk at once (:func:`adampx._segments.test`, as the
   CUDA flat step runs it), and the per-row factors of the projection for all rows at once.
3. The rows rescaled, and the update, in multi-tensor operations:
   SGDP: ``p ← p·(keep + lr·c)`` in one ``torch._foreach_mul_``; the caller then steps
   the chunk in one ``torch._fused_sgd_`` call, while it is still in cache.
   AdamP: ``torch._fused_adamw_`` without weight decay on a zeroed scratch ``w`` (one view
   per tensor) updates ``m``, ``v`` and leaves the step ``w = −(lr/bc1)·u``; then
   ``p·w`` per tensor, and ``p ← w + p·(keep − c)`` in ``torch._foreach_addcmul_`` and
   ``torch._foreach_copy_``, which is ALGORITHM.md's step rearranged, as on the per-tensor
   path.

Nothing is read back to Python: the decisions stay tensors and pick the factors with
``where``. Tensors the projection does not take get the factor ``keep`` (a decay, or 1).
The per-tensor path's numbers differ only in rounding: the layer view's whole-tensor sums
are added in another order, and an unprojected AdamP tensor's decay is applied as a factor
instead of inside the fused kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from adampx._segments import Segments, Test, cached_segments
from adampx._segments import test as segment_test
from adampx._shared_step import Decisions, sgdp_direction_dots
from adampx._tensors import Workspace, row_shape, row_view, scratch

# tested tensors of up to this many elements are stepped here, ...
SMALL_ELEMENTS = 1 << 16
# ... in chunks of consecutive tensors of about this many elements
CHUNK_ELEMENTS = 1 << 20


def split_small(ps: list[Tensor], tested: list[int]) -> tuple[list[list[int]], list[int]]:
    """The small tested tensors (indices into ``ps``) in chunks, and the other tested ones."""
    chunks: list[list[int]] = []
    large: list[int] = []
    size = 0
    for k in tested:
        n = ps[k].numel()
        if n > SMALL_ELEMENTS:
            large.append(k)
            continue
        if not chunks or size + n > CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(k)
        size += n
    return chunks, large


class _Sums(NamedTuple):
    """A chunk's row sums: one vector per sum over all its rows, and each tensor's slices."""

    segments: Segments
    p_norm: Tensor
    g_norm: Tensor
    gp: Tensor
    extra: Tensor  # SGDP: p_i·b_i; AdamP: p_i·w_i
    slices: list[tuple[Tensor, Tensor, Tensor, Tensor]]  # per tensor, of the four above


def _sums(shapes: list[tuple[int, int]], like: Tensor, workspace: Workspace | None) -> _Sums:
    """The :class:`_Sums` of tensors of these ``[n0, N/n0]`` shapes (kept per shape list)."""

    def build() -> _Sums:
        segs = cached_segments(workspace, shapes, like.device)
        sums = like.new_empty(4, segs.rows)
        slices = []
        start = 0
        for n0, _ in shapes:
            slices.append(tuple(sums[j, start : start + n0] for j in range(4)))
            start += n0
        return _Sums(segs, sums[0], sums[1], sums[2], sums[3], slices)  # type: ignore[arg-type]

    if workspace is None:
        return build()
    return workspace.constant(("small", tuple(shapes), like.dtype), build)


def _rows(chunk: list[int], shapes: list[tuple[int, int]], tensors: list[Tensor]) -> list[Tensor]:
    """The ``[n0, N/n0]`` row views of the chunk's tensors among ``tensors``."""
    return [row_view(tensors[k], n0) for k, (n0, _) in zip(chunk, shapes, strict=True)]


class _Tested(NamedTuple):
    """A chunk after its test: the tensors' row views, the row sums and the outcome."""

    shapes: list[tuple[int, int]]  # [n0, N/n0]
    p_rows: list[Tensor]
    g_rows: list[Tensor]
    sums: _Sums
    test: Test


def _test_chunk(
    chunk: list[int],
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    decay: float,
    eps: float,
    delta: float,
    wd_ratio: float,
    decisions: Decisions | None,
    workspace: Workspace | None,
) -> _Tested:
    """The row sums of every tensor of the chunk (with ``momentum_buffers``, SGDP's ``p·b``
    too, into ``sums.extra``), then the test of all of them at once."""
    shapes = [row_shape(ps[k]) for k in chunk]
    p_rows, g_rows = _rows(chunk, shapes, ps), _rows(chunk, shapes, gs)
    b_rows = None if momentum_buffers is None else _rows(chunk, shapes, momentum_buffers)
    sums = _sums(shapes, ps[chunk[0]], workspace)
    for j, (p, g) in enumerate(zip(p_rows, g_rows, strict=True)):
        p_norm, g_norm, gp, pb = sums.slices[j]
        torch.linalg.vector_norm(p, dim=1, out=p_norm)
        torch.linalg.vector_norm(g, dim=1, out=g_norm)
        torch.linalg.vecdot(p, g, dim=1, out=gp)
        if b_rows is not None:
            torch.linalg.vecdot(p, b_rows[j], dim=1, out=pb)
    test = segment_test(
        sums.segments, sums.p_norm, sums.g_norm, sums.gp, [params[k] for k in chunk],
        delta=delta, eps=eps, wd_ratio=wd_ratio, decay=decay, decisions=decisions,
    )  # fmt: skip
    return _Tested(shapes, p_rows, g_rows, sums, test)


def _columns(factors: Tensor, sums: _Sums) -> list[Tensor]:
    """A per-row vector over the chunk's rows cut into each tensor's ``[n0, 1]`` column."""
    return list(factors.unsqueeze(1).split(sums.segments.lengths))


def sgdp_rescale_(
    chunk: list[int],
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    decay: float,
    eps: float,
    delta: float,
    wd_ratio: float,
    decisions: Decisions | None,
    workspace: Workspace | None,
) -> None:
    """``p ← p·(keep + lr·c)`` for the chunk's tensors: all of SGDP's step but the fused SGD
    update ``b ← μ·b + (1−τ)·g; p ← p − lr·d``, which the caller runs after. ``lr`` and
    ``decay`` (``lr·λ/(1−μ)``) are Python floats."""
    tested = _test_chunk(
        chunk, params, ps, gs, momentum_buffers, decay=decay, eps=eps, delta=delta,
        wd_ratio=wd_ratio, decisions=decisions, workspace=workspace,
    )  # fmt: skip
    sums, test = tested.sums, tested.test
    direction = sgdp_direction_dots(
        sums.extra, sums.gp, momentum=momentum, dampening=dampening, nesterov=nesterov,
        maximize=maximize,
    )  # fmt: skip
    factors = test.per_row(test.keep).add_(test.coefficients(direction).mul_(lr))
    torch._foreach_mul_(tested.p_rows, _columns(factors, sums))


def adamp_step_(
    chunk: list[int],
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    decay: float,
    kernel: dict[str, Any],
    eps: float,
    delta: float,
    wd_ratio: float,
    decisions: Decisions | None,
    workspace: Workspace | None,
) -> None:
    """AdamP's step of the chunk's tensors (their step counters already incremented);
    ``decay``: ``lr·λ`` as a Python float; ``kernel``: the options of
    ``torch._fused_adamw_``."""
    shapes, p_rows, g_rows, sums, test = _test_chunk(
        chunk, params, ps, gs, None, decay=decay, eps=eps, delta=delta, wd_ratio=wd_ratio,
        decisions=decisions, workspace=workspace,
    )  # fmt: skip
    like = ps[chunk[0]]
    sizes = [n0 * length for n0, length in shapes]
    work = scratch(workspace, "small", sum(sizes), like.dtype, like.device).zero_()
    w_rows = [w.view(shape) for w, shape in zip(work.split(sizes), shapes, strict=True)]
    # w ← −lr·u/bc1, and m, v updated
    torch._fused_adamw_(
        w_rows,
        g_rows,
        _rows(chunk, shapes, exp_avgs),
        _rows(chunk, shapes, exp_avg_sqs),
        [],
        [state_steps[k] for k in chunk],
        lr=lr,
        weight_decay=0.0,
        **kernel,
    )
    for j, (p, w) in enumerate(zip(p_rows, w_rows, strict=True)):
        torch.linalg.vecdot(p, w, dim=1, out=sums.slices[j][3])
    # w_i − c_i p_i is the projected step: p ← w + p·(keep − c)
    factors = test.per_row(test.keep).sub_(test.coefficients(sums.extra))
    torch._foreach_addcmul_(w_rows, p_rows, _columns(factors, sums))
    torch._foreach_copy_(p_rows, w_rows)
