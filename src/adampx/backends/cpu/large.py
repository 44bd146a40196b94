"""The ``cpu`` backend's larger tested tensors: one at a time, each finished in cache.

No compile step: the moment updates run in torch's ``torch._fused_adamw_`` /
``torch._fused_sgd_`` (one vectorised pass each), and only the row statistics and the
per-row rescaling of the projection are separate passes. The numbers are those of
``docs/algorithm.md``; only the order of floating-point operations differs from the eager
math.

Each tested tensor (rows = the channel view ``[n0, N/n0]``) is finished before the next one
starts, so that what its second pass reads again is still in cache (the test needs all rows
of a tensor, so a tensor cannot be finished in one pass). Row dot products run in
``torch.sparse.sampled_addmm`` (:func:`row_dots`): one pass over both operands that writes
nothing param-sized (a product into scratch and a row sum take two passes and a write).

1. Row sums ``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` (three passes over ``p`` and ``g``), and the
   scale-invariance test on them (:func:`adampx.algorithm.projection.test`); its outcome is
   read as Python values (these are CPU tensors, there is no device to wait for), so that
   the tensor takes only the work its outcome needs.
2. AdamP, not projected: ``keep = 1 − lr·λ`` makes the step AdamW's. Projected per row, in
   blocks of whole rows of about :data:`BLOCK_ELEMENTS` elements (so that a block's scratch
   stays in cache between its passes, and the scratch is one block): Adam's step into a
   zeroed scratch ``w``, then ``p ← w + p·(keep − c)`` (:mod:`adampx.backends.torch_kernels`).
   Projected as a whole (rare): the same with ``w`` as large as the tensor, since ``c``
   needs all its rows.
3. SGDP, projected: ``p·b`` (``b`` the momentum before the step), then the direction's row
   dots by linearity; the rows (or the whole tensor) rescaled by ``keep + lr·c`` and then
   torch's fused SGD step. Not projected: the rescale by ``keep`` and the same SGD step.
   SGDP keeps no scratch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from adampx.algorithm.projection import (
    OneTensor,
    channel_view,
    layer_view,
    radial_scale,
    test,
)
from adampx.algorithm.spec import Step, lr_float
from adampx.backends.torch_kernels import adam_step_into_, add_step_, sgd_
from adampx.util.tensors import Batch, row_shape, row_view
from adampx.util.workspace import Workspace, scratch

# a tensor is worked on in blocks of whole rows of about this many elements, so that a
# block's scratch stays in cache between the passes over it; and the scratch is that small
BLOCK_ELEMENTS = 1 << 19


def _in_blocks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """``tensors`` (matrices and per-row vectors, all with the same rows) cut alike into
    blocks of whole rows of about :data:`BLOCK_ELEMENTS` elements of the first; the
    tensors themselves where that is one block."""
    rows, length = tensors[0].shape
    per = max(1, BLOCK_ELEMENTS // length)
    if per >= rows:
        yield tensors
        return
    for start in range(0, rows, per):
        yield tuple(t[start : start + per] for t in tensors)


def _block_size(ps: list[Tensor], tested: list[int]) -> int:
    """Elements of the largest block of a tested tensor: the size of a block's scratch."""
    size = 0
    for k in tested:
        rows, length = row_shape(ps[k])
        size = max(size, min(rows, max(1, BLOCK_ELEMENTS // length)) * length)
    return size


def _matrix(buffer: Tensor, shape: torch.Size) -> Tensor:
    """The first elements of a flat buffer as a dense matrix of ``shape``."""
    return buffer.as_strided(shape, (shape[1], 1))


class _Diagonal(NamedTuple):
    """Where the row sums of an ``[n, ·]`` matrix go, kept per row count ``n``: the sparsity
    pattern of an ``[n, n]`` diagonal and two outputs of that pattern (:func:`row_dots`)
    and the two row norms of the test. Views of them are kept too, so that a step makes
    none."""

    pattern: Tensor
    outputs: tuple[Tensor, Tensor]
    dots: tuple[Tensor, Tensor]  # [n]: the outputs' values
    columns: tuple[Tensor, Tensor]  # [n, 1] views of ``dots``
    norms: Tensor  # [2, n]: ‖p_i‖, ‖g_i‖
    p_norm: Tensor  # [n] view of norms[0]
    g_norm: Tensor  # [n] view of norms[1]


def diagonal(rows: int, dtype: torch.dtype, workspace: Workspace | None) -> _Diagonal:
    """:class:`_Diagonal` of ``rows`` rows (kept in the workspace, once per size)."""

    def build() -> _Diagonal:
        index = torch.arange(rows + 1)
        values = torch.zeros(3, rows, dtype=dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": not the user's
            warnings.simplefilter("ignore")
            pattern, *outputs = (
                torch.sparse_csr_tensor(index, index[:rows], v, (rows, rows),
                                        check_invariants=False)
                for v in values
            )  # fmt: skip
        # the dots are read from ``values``: the outputs must hold them, not copies, and
        # sampled_addmm must write there (true of torch 2.13; checked once per row count)
        zeros = torch.zeros(rows, 1, dtype=dtype)
        for output, v in zip(outputs, values[1:], strict=True):
            torch.sparse.sampled_addmm(pattern, zeros, zeros.t(), beta=0.0, out=output)
            if output.values().data_ptr() != v.data_ptr():
                raise RuntimeError(
                    "adampx's default CPU step needs torch.sparse.sampled_addmm(out=...) to "
                    f"write into the values it was given, which torch {torch.__version__} "
                    "does not; use fused=True"
                )
        norms = torch.empty(2, rows, dtype=dtype)
        return _Diagonal(
            pattern=pattern,
            outputs=(outputs[0], outputs[1]),
            dots=(values[1], values[2]),
            columns=(values[1].unsqueeze(1), values[2].unsqueeze(1)),
            norms=norms,
            p_norm=norms[0],
            g_norm=norms[1],
        )

    if workspace is None:
        return build()
    return workspace.constant(("diagonal", rows, dtype), build)


def row_dots(
    a: Tensor,
    b: Tensor,
    workspace: Workspace | None,
    slot: int = 0,
    *,
    column: bool = False,
    kept: _Diagonal | None = None,
) -> Tensor:
    """``a_i·b_i`` of every row of two ``[rows, length]`` matrices, as a ``[rows]`` vector
    (or a ``[rows, 1]`` column), written into ``kept`` (by default the workspace's
    :class:`_Diagonal` of this row count).

    One pass over ``a`` and ``b`` that writes nothing param-sized: ``torch.sparse.
    sampled_addmm`` computes the product ``a @ b.T`` at the diagonal only (a product into
    scratch and a row sum would take two passes and a write). The result is a view of a kept
    output (``slot`` 0 or 1), valid until the next call with the same slot and row count.
    """
    into = diagonal(a.shape[0], a.dtype, workspace) if kept is None else kept
    torch.sparse.sampled_addmm(into.pattern, a, b.t(), beta=0.0, out=into.outputs[slot])
    return into.columns[slot] if column else into.dots[slot]


class _Tested(NamedTuple):
    """One tensor's test, with its outcome read as Python values where the work depends on
    them (these are CPU tensors: there is no device to wait for)."""

    channel: bool
    layer: bool
    keep: float  # the decay factor 1 − a·r
    gp: Tensor  # [rows, 1]: p_i·g_i, a view of the kept diagonal's outputs
    # the projection's (‖p‖ + eps)²: channel view per row, [rows, 1]; layer view 0-d
    scale: Tensor | None

    @property
    def projected(self) -> bool:
        return self.channel or self.layer


def _test(
    step: Step, param: Tensor, p: Tensor, g: Tensor, decay: float, workspace: Workspace | None
) -> _Tested:
    """The row sums of ``p`` and ``g`` (``[n0, N/n0]`` views), three passes that write
    nothing param-sized, and the test on them (the layer view only where the channel view
    fails, unless the decisions are kept); the tensors of the outcome are views of the kept
    :class:`_Diagonal` of this row count, valid until its next test."""
    rows, length = p.shape
    kept = diagonal(rows, p.dtype, workspace)
    torch.linalg.vector_norm(p, dim=1, out=kept.p_norm)
    torch.linalg.vector_norm(g, dim=1, out=kept.g_norm)
    gp = row_dots(p, g, workspace, slot=0, kept=kept)
    one, delta, eps = OneTensor(rows, length), step.delta, step.eps
    if step.decisions is not None:
        outcome = test(kept.norms, gp, one, delta=delta, eps=eps)
        outcome.record(step.decisions, [param], delta)
        channel, layer, whole = bool(outcome.channel), bool(outcome.layer), outcome.p_whole
    else:
        channel, layer = bool(channel_view(kept.norms, gp, one, delta=delta, eps=eps)[1]), False
        if not channel:
            norms, _, passed = layer_view(kept.norms, gp, one, delta=delta, eps=eps)
            layer, whole = bool(passed), norms[0]
    keep = step.keep(step.wd_ratio if channel or layer else 1.0, decay)
    scale = None
    if channel:
        scale = radial_scale(kept.p_norm, eps).unsqueeze(1)
    elif layer:
        scale = radial_scale(whole, eps)
    return _Tested(channel, layer, keep, kept.columns[0], scale)  # type: ignore[arg-type]


def adamp_(step: Step, batch: Batch, large: list[int], workspace: Workspace | None) -> None:
    """AdamP's step of the tested tensors ``large`` (their step counters incremented)."""
    ps, gs = batch.ps, batch.gs
    (exp_avgs, exp_avg_sqs), steps = batch.states, batch.steps
    like, size = ps[large[0]], _block_size(ps, large)
    decay = step.decay_value()
    projected_keep: Tensor | None = None
    for k in large:  # each tensor finished while it is in cache
        n0 = batch.params[k].shape[0]
        p, g = row_view(ps[k], n0), row_view(gs[k], n0)
        m, v, counter = row_view(exp_avgs[k], n0), row_view(exp_avg_sqs[k], n0), steps[k]
        tested = _test(step, batch.params[k], p, g, decay, workspace)
        if not tested.projected:  # keep = 1 − lr·λ: AdamW
            torch._fused_adamw_(
                [p], [g], [m], [v], [], [counter], lr=step.lr, weight_decay=step.weight_decay,
                beta1=step.beta1, beta2=step.beta2, eps=step.eps, amsgrad=False,
                maximize=step.maximize,
            )  # fmt: skip
            continue
        assert tested.scale is not None
        if tested.layer:  # c for the whole tensor: the step of all its rows first
            w = scratch(workspace, "whole", p.numel(), p.dtype, p.device).view(p.shape).zero_()
            adam_step_into_(step, [w], [g], [m], [v], [counter])
            pw = row_dots(p, w, workspace, slot=1).sum()
            add_step_(p, w, tested.keep - pw / tested.scale)
        else:  # c per row: block by block
            if projected_keep is None or projected_keep.dtype != p.dtype:
                projected_keep = torch.tensor(tested.keep, dtype=p.dtype)
            work = scratch(workspace, "work", size, like.dtype, like.device)
            for p_b, g_b, m_b, v_b, scale_b in _in_blocks(p, g, m, v, tested.scale):
                w = _matrix(work, p_b.shape).zero_()
                adam_step_into_(step, [w], [g_b], [m_b], [v_b], [counter])
                pw = row_dots(p_b, w, workspace, slot=1, column=True)
                # w − c·p is the projected step: p ← p·(keep − c) + w, c = p·w/(‖p‖ + eps)²
                add_step_(p_b, w, torch.addcdiv(projected_keep, pw, scale_b, value=-1))


def sgdp_(step: Step, batch: Batch, large: list[int], workspace: Workspace | None) -> None:
    """SGDP's step of the tested tensors ``large``."""
    (momentum_buffers,) = batch.states
    decay = step.decay_value() if step.weight_decay != 0 else 0.0
    lr = lr_float(step.lr)
    projected_keep: Tensor | None = None
    for k in large:  # each tensor finished while it is in cache
        n0 = batch.params[k].shape[0]
        p, g = row_view(batch.ps[k], n0), row_view(batch.gs[k], n0)
        b = row_view(momentum_buffers[k], n0)
        tested = _test(step, batch.params[k], p, g, decay, workspace)
        if tested.projected:
            assert tested.scale is not None
            # p ← p·(keep + lr·c) − lr·d with c = p·d / (‖p‖ + eps)², the last part in SGD
            pb = row_dots(p, b, workspace, slot=1, column=True)
            dots = step.direction_dots(pb, tested.gp)
            if tested.channel:
                if projected_keep is None or projected_keep.dtype != p.dtype:
                    projected_keep = torch.tensor(tested.keep, dtype=p.dtype)
                scale = torch.addcdiv(projected_keep, dots, tested.scale, value=lr)
            else:
                scale = tested.keep + lr * (dots.sum() / tested.scale)
            p.mul_(scale)
        elif tested.keep != 1.0:
            p.mul_(tested.keep)
        sgd_(step, [p], [g], [b])
