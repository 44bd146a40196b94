"""The ``cpu`` backend's small tested tensors, tested and stepped together.

:mod:`adampx.backends.cpu.large` finishes one tested tensor at a time, in a few dozen
operations whatever the tensor's size. On a tensor of a few thousand elements those
operations' fixed costs, not its bytes, are the cost. Tested tensors of up to
:data:`SMALL_ELEMENTS` elements are stepped here instead, in chunks of consecutive tensors of
about :data:`CHUNK_ELEMENTS` elements (a chunk stays in cache between its test and its
step):

1. Per tensor only its row sums, written into slices of one vector per sum over the
   chunk's rows: ``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` (and SGDP's ``p_i·b_i``, ``b`` the
   momentum before the step). Row dots are ``torch.linalg.vecdot``: on tensors this small
   its fixed cost is below that of the sparse product that large tensors take.
2. The test of every tensor of the chunk at once (:func:`adampx.algorithm.projection.test`
   on :class:`adampx.algorithm.segments.Segments`), and the per-row factors of the
   projection for all rows at once.
3. The rows rescaled, and the update, in multi-tensor operations:
   SGDP: ``p ← p·(keep + lr·c)`` in one ``torch._foreach_mul_``; the caller then steps
   the chunk in one ``torch._fused_sgd_`` call, while it is still in cache.
   AdamP: Adam's step into a zeroed scratch ``w`` (one view per tensor), then ``p·w`` per
   tensor, and ``p ← w + p·(keep − c)`` in ``torch._foreach_addcmul_`` and
   ``torch._foreach_copy_``.

Nothing is read back to Python: the decisions stay tensors and pick the factors with
``where``. Tensors the projection does not take get the factor ``keep`` (a decay, or 1).
The large tensors' numbers differ only in rounding: the layer view's whole-tensor sums
are added in another order, and an unprojected AdamP tensor's decay is applied as a factor
instead of inside the fused kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from adampx.algorithm.projection import Outcome, test
from adampx.algorithm.segments import Segments, cached_segments
from adampx.algorithm.spec import Step, lr_float
from adampx.backends.torch_kernels import adam_step_into_
from adampx.util.tensors import Batch, row_shape, row_view
from adampx.util.workspace import Workspace, scratch

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
    sums: Tensor  # [4, rows]: ‖p_i‖, ‖g_i‖, p_i·g_i, and SGDP's p_i·b_i or AdamP's p_i·w_i
    slices: list[tuple[Tensor, Tensor, Tensor, Tensor]]  # per tensor, of the four


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
        return _Sums(segs, sums, slices)  # type: ignore[arg-type]

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
    outcome: Outcome
    keep: Tensor  # per tensor, the decay factor


def _test_chunk(
    step: Step,
    batch: Batch,
    chunk: list[int],
    momentum_buffers: list[Tensor] | None,
    decay: float,
    workspace: Workspace | None,
) -> _Tested:
    """The row sums of every tensor of the chunk (with ``momentum_buffers``, SGDP's ``p·b``
    too, into the fourth sum), then the test of all of them at once."""
    shapes = [row_shape(batch.ps[k]) for k in chunk]
    p_rows, g_rows = _rows(chunk, shapes, batch.ps), _rows(chunk, shapes, batch.gs)
    b_rows = None if momentum_buffers is None else _rows(chunk, shapes, momentum_buffers)
    sums = _sums(shapes, batch.ps[chunk[0]], workspace)
    for j, (p, g) in enumerate(zip(p_rows, g_rows, strict=True)):
        p_norm, g_norm, gp, pb = sums.slices[j]
        torch.linalg.vector_norm(p, dim=1, out=p_norm)
        torch.linalg.vector_norm(g, dim=1, out=g_norm)
        torch.linalg.vecdot(p, g, dim=1, out=gp)
        if b_rows is not None:
            torch.linalg.vecdot(p, b_rows[j], dim=1, out=pb)
    outcome = test(sums.sums[:2], sums.sums[2], sums.segments, delta=step.delta, eps=step.eps)
    outcome.record(step.decisions, [batch.params[k] for k in chunk], step.delta)
    keep = outcome.keep(decay, step.wd_ratio)
    return _Tested(shapes, p_rows, g_rows, sums, outcome, keep)


def _columns(factors: Tensor, sums: _Sums) -> list[Tensor]:
    """A per-row vector over the chunk's rows cut into each tensor's ``[n0, 1]`` column."""
    return list(factors.unsqueeze(1).split(sums.segments.lengths))


def sgdp_rescale_(step: Step, batch: Batch, chunk: list[int], workspace: Workspace | None) -> None:
    """``p ← p·(keep + lr·c)`` for the chunk's tensors: all of SGDP's step but the fused SGD
    update ``b ← μ·b + (1−τ)·g; p ← p − lr·d``, which the caller runs after."""
    decay = step.decay_value() if step.weight_decay != 0 else 0.0
    lr = lr_float(step.lr)
    (momentum_buffers,) = batch.states
    tested = _test_chunk(step, batch, chunk, momentum_buffers, decay, workspace)
    sums, outcome = tested.sums, tested.outcome
    direction = step.direction_dots(sums.sums[3], sums.sums[2])
    segments = sums.segments
    factors = segments.per_row(tested.keep).add_(outcome.coefficients(direction).mul_(lr))
    torch._foreach_mul_(tested.p_rows, _columns(factors, sums))


def adamp_step_(step: Step, batch: Batch, chunk: list[int], workspace: Workspace | None) -> None:
    """AdamP's step of the chunk's tensors (their step counters already incremented)."""
    tested = _test_chunk(step, batch, chunk, None, step.decay_value(), workspace)
    shapes, p_rows, sums = tested.shapes, tested.p_rows, tested.sums
    like = batch.ps[chunk[0]]
    sizes = [n0 * length for n0, length in shapes]
    work = scratch(workspace, "small", sum(sizes), like.dtype, like.device).zero_()
    w_rows = [w.view(shape) for w, shape in zip(work.split(sizes), shapes, strict=True)]
    exp_avgs, exp_avg_sqs = batch.states
    adam_step_into_(
        step, w_rows, tested.g_rows, _rows(chunk, shapes, exp_avgs),
        _rows(chunk, shapes, exp_avg_sqs), [batch.steps[k] for k in chunk],
    )  # fmt: skip
    for j, (p, w) in enumerate(zip(p_rows, w_rows, strict=True)):
        torch.linalg.vecdot(p, w, dim=1, out=sums.slices[j][3])
    # w_i − c_i p_i is the projected step: p ← w + p·(keep − c)
    factors = sums.segments.per_row(tested.keep).sub_(tested.outcome.coefficients(sums.sums[3]))
    torch._foreach_addcmul_(w_rows, p_rows, _columns(factors, sums))
    torch._foreach_copy_(p_rows, w_rows)
