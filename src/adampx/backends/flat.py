"""The ``flat`` backend, CUDA's default: tested tensors concatenated in a few flat buffers.

On a GPU the per-tensor test costs a few dozen kernel launches per tensor, and launches, not
bytes, set the step time of the eager math. Here the number of operations does not grow with
the number of tensors (``benchmarks/op_count.py`` counts them):

1. The tested tensors are sorted by row length and cut into a few buckets (:func:`_plan`).
   A bucket's params are concatenated in memory order into a flat workspace buffer ``P``
   (a tensor alone in its bucket is used in place), where each run of equal row length is
   one ``[rows, row length]`` matrix.
2. Row sums of every bucket, one reduction per run, go into vectors over all rows:
   ``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` (SGDP also ``p_i·b_i``, ``b`` the momentum before the
   step). The test of every tensor at once is ``adampx.algorithm.projection.test`` over
   the rows that :class:`~adampx.algorithm.segments.Segments` describes.
3. AdamP, per bucket: ``torch._fused_adamw_`` without weight decay on a zeroed flat buffer
   ``W`` (one view per tensor) updates ``m`` and ``v`` and leaves the step
   ``W = −(lr/bc1)·u`` there; ``p·w`` per row gives the projection coefficients ``c``, and
   ``P ← W + P·(1 − lr·λ·r − c)`` (``docs/algorithm.md`` rearranged, see
   :mod:`adampx.backends.torch_kernels`) is one ``addcmul`` per run; ``P`` is copied back
   with one ``torch._foreach_copy_``.
   SGDP: the direction's row dots follow by linearity from ``p·g`` and ``p·b``; each
   bucket's ``P`` is rescaled per row by ``1 − a·r + lr·c`` and copied back, and
   ``torch._fused_sgd_`` then steps all params at once.

Untested tensors take one ``torch._fused_adamw_`` (AdamW) or ``torch._fused_sgd_`` call.
Every operation stays on the device with sizes known on the host, so the step never syncs
and can be captured in a CUDA graph; the index tensors that describe the rows are built at
the first step and kept in the optimizer's workspace, which is why this path needs one.

Memory: flat buffers as long as the largest bucket, kept between steps: ``P`` (only for
buckets of several tensors), ``G`` then ``W``, and the products. A bucket holds at most a
quarter of the tested elements or 4M elements, whichever is more, or one larger tensor, so
the buffers are about 0.75x the model for models over 16M parameters whose tensors are each
under a quarter of it, and at least twice the largest tested tensor (GPT-2's embedding
alone: about 0.87x the model); ``torch.optim.AdamW(foreach=True)`` allocates about 1x. Half
params add their float32 copies (params and gradients) during the step, as on every path.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor

from adampx.algorithm.projection import Outcome, test
from adampx.algorithm.segments import Segments, cached_segments
from adampx.algorithm.spec import Step
from adampx.backends.torch_kernels import adam_step_into_, adamw_untested_, sgd_, supports
from adampx.util.tensors import Batch, flat_view, layout_refusal, row_shape, row_view
from adampx.util.workspace import Workspace, scratch

__all__ = ["NAME", "runs_here", "step_", "supports", "takes"]

NAME = "flat"

BUCKETS = 4  # the tested tensors are cut into about this many buckets ...
BUCKET_ELEMENTS = 1 << 22  # ... of at least this many elements


class _Run(NamedTuple):
    """Consecutive tensors of a bucket with the same row length."""

    elements: slice  # in the bucket's flat buffers
    rows: slice  # in the bucket's rows
    shape: tuple[int, int]  # [rows, row length]


def _runs(shapes: list[tuple[int, int]]) -> list[_Run]:
    """The runs of equal row length among tensors of these ``[n0, N/n0]`` shapes, in order."""
    runs: list[_Run] = []
    element, row = 0, 0
    for n0, k in shapes:
        if runs and runs[-1].shape[1] == k:
            last = runs[-1]
            runs[-1] = _Run(
                slice(last.elements.start, element + n0 * k),
                slice(last.rows.start, row + n0),
                (last.shape[0] + n0, k),
            )
        else:
            runs.append(_Run(slice(element, element + n0 * k), slice(row, row + n0), (n0, k)))
        element += n0 * k
        row += n0
    return runs


class _Bucket:
    """Consecutive tested tensors concatenated in flat buffers, and row-wise operations.

    With one tensor the flat buffers are the tensors' own (flat views), else copies in the
    workspace, which :meth:`write_back` copies back into the params.
    """

    def __init__(
        self,
        ps: list[Tensor],
        shapes: list[tuple[int, int]],
        bucket: list[int],
        rows: slice,
        tensors: slice,
        segs: Segments,
        workspace: Workspace | None,
    ) -> None:
        self.like = ps[bucket[0]]
        self.bucket = bucket
        self.shapes = shapes  # the tensors' [n0, N/n0]
        self.sizes = [ps[k].numel() for k in bucket]
        self.rows = rows  # its rows among the rows of all buckets
        self.tensors = tensors  # its tensors among all tested tensors
        self.segs = segs  # the bucket's own
        self.runs = _runs(shapes)
        self.copied = len(bucket) > 1
        self.workspace = workspace

    def buffer(self, name: str) -> Tensor:
        """A flat workspace buffer as long as the bucket."""
        n = sum(self.sizes)
        return scratch(self.workspace, f"flat_{name}", n, self.like.dtype, self.like.device)

    def gather(self, tensors: list[Tensor], name: str) -> Tensor:
        """The bucket's tensors among ``tensors`` flat: copied into buffer ``name``, or the one
        tensor's own flat view."""
        if not self.copied:
            return flat_view(tensors[self.bucket[0]])
        return torch.cat([flat_view(tensors[k]) for k in self.bucket], out=self.buffer(name))

    def matrices(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into the runs' ``[rows, row length]`` matrices."""
        return [flat[run.elements].view(run.shape) for run in self.runs]

    def row_norms(self, a: Tensor, out: Tensor) -> None:
        """``out_i = ‖a_i‖`` for every row of the bucket (``a`` flat)."""
        for run, m in zip(self.runs, self.matrices(a), strict=True):
            torch.linalg.vector_norm(m, dim=1, out=out[run.rows])

    def row_dots(self, a: Tensor, b: Tensor, out: Tensor) -> Tensor:
        """``out_i = Σ_j a_ij b_ij`` for every row of the bucket (``a``, ``b`` flat)."""
        products = self.matrices(torch.mul(a, b, out=self.buffer("x")))
        for run, m in zip(self.runs, products, strict=True):
            torch.sum(m, 1, out=out[run.rows])
        return out

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into the tensors' ``[n0, N/n0]`` row views."""
        parts = flat.split(self.sizes)
        return [part.view(shape) for part, shape in zip(parts, self.shapes, strict=True)]

    def row_views(self, tensors: list[Tensor]) -> list[Tensor]:
        """The ``[n0, N/n0]`` row views of the bucket's tensors among ``tensors``."""
        return [
            row_view(tensors[k], n0) for k, (n0, _) in zip(self.bucket, self.shapes, strict=True)
        ]

    def scale_rows_(self, p: Tensor, factors: Tensor, add: Tensor | None = None) -> None:
        """``p_i ← p_i·f_i`` (``+ add_i``) in place, for every row ``i`` (``p`` flat)."""
        for run, m in zip(self.runs, self.matrices(p), strict=True):
            f = factors[run.rows].unsqueeze(1)
            if add is None:
                m.mul_(f)
            else:
                torch.addcmul(add[run.elements].view(run.shape), m, f, out=m)

    def write_back(self, p: Tensor, ps: list[Tensor]) -> None:
        """Copy the flat ``p`` into the bucket's params among ``ps`` (if it is a copy)."""
        if self.copied:
            targets = [flat_view(ps[k]) for k in self.bucket]
            torch._foreach_copy_(targets, list(p.split(self.sizes)))


def _plan(
    ps: list[Tensor], tested: list[int], workspace: Workspace | None
) -> tuple[list[int], Segments, list[_Bucket]]:
    """The tested tensors sorted by row length, their :class:`Segments`, and their buckets.

    Sorted, the tensors of a bucket form a few runs of equal row length, and each run is one
    ``[rows, row length]`` matrix in the flat buffers: row sums are one reduction per run.
    A bucket holds at most a :data:`BUCKETS`-th of all the elements, or
    :data:`BUCKET_ELEMENTS` if that is more; a larger tensor is a bucket alone.
    """
    order = sorted(tested, key=lambda k: row_shape(ps[k])[1])
    shapes = [row_shape(ps[k]) for k in order]
    like = ps[order[0]]
    limit = max(BUCKET_ELEMENTS, -(-sum(ps[k].numel() for k in order) // BUCKETS))
    cuts = [0]
    size = 0
    for j, k in enumerate(order):
        if j > 0 and size + ps[k].numel() > limit:
            cuts.append(j)
            size = 0
        size += ps[k].numel()
    cuts.append(len(order))
    buckets = []
    row = 0
    for a, b in itertools.pairwise(cuts):
        rows = sum(n0 for n0, _ in shapes[a:b])
        buckets.append(
            _Bucket(
                ps, shapes[a:b], order[a:b], slice(row, row + rows), slice(a, b),
                cached_segments(workspace, shapes[a:b], like.device, padded=True),
                workspace,
            )
        )  # fmt: skip
        row += rows
    return order, cached_segments(workspace, shapes, like.device, padded=True), buckets


def runs_here() -> bool:
    """torch's fused AdamW and SGD kernels run on the CPU and on CUDA; the routing picks
    this backend for CUDA tensors (it runs on CPU tensors when forced, as the tests do)."""
    return True


def takes(
    param: Tensor, p: Tensor, g: Tensor, states: list[Tensor], counter: Tensor | None
) -> str | None:
    """Why this backend cannot step ``param`` (None if it can)."""
    if not (p.is_cpu or p.is_cuda):
        return f"torch's fused kernels run on the CPU and CUDA, the param is on {p.device.type}"
    return layout_refusal(param, p, g, states)


def step_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP's or SGDP's step of ``batch`` (tensors of one device and dtype), in place."""
    (adamp_ if step.optimizer == "adamp" else sgdp_)(step, batch, workspace)


def _test(
    step: Step,
    batch: Batch,
    tested: list[int],
    momentum_buffers: list[Tensor] | None,
    workspace: Workspace | None,
) -> tuple[list[_Bucket], Tensor, Outcome, Tensor]:
    """The row sums of every bucket of the tested tensors, then the test of all at once.

    Returns the buckets, the sums ``[3 or 4, rows]`` (``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` and,
    given SGDP's ``momentum_buffers`` before the step, ``p_i·b_i``), the outcome, and the
    last bucket's gathered params (all of them where there is one bucket).
    """
    ps, gs = batch.ps, batch.gs
    order, segs, buckets = _plan(ps, tested, workspace)
    sums = ps[order[0]].new_empty(3 if momentum_buffers is None else 4, segs.rows)
    for bucket in buckets:
        p, g = bucket.gather(ps, "p"), bucket.gather(gs, "gw")
        bucket.row_norms(p, out=sums[0, bucket.rows])
        bucket.row_norms(g, out=sums[1, bucket.rows])
        bucket.row_dots(p, g, out=sums[2, bucket.rows])
        if momentum_buffers is not None:
            b = bucket.gather(momentum_buffers, "gw")  # g is no longer needed
            bucket.row_dots(p, b, out=sums[3, bucket.rows])
    outcome = test(sums[:2], sums[2], segs, delta=step.delta, eps=step.eps)
    outcome.record(step.decisions, [batch.params[k] for k in order], step.delta)
    return buckets, sums, outcome, p


def adamp_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP (not nesterov): see the module doc."""
    ps, gs = batch.ps, batch.gs
    exp_avgs, exp_avg_sqs = batch.states
    torch._foreach_add_(batch.steps, 1)
    tested, untested = step.split(batch.params)
    adamw_untested_(step, batch, untested)
    if not tested:
        return
    buckets, _, outcome, p = _test(step, batch, tested, None, workspace)
    keep = outcome.keep(step.decay, step.wd_ratio)
    for bucket in buckets:
        part = outcome.part(bucket.segs, bucket.rows, bucket.tensors)
        if len(buckets) > 1:  # else p still holds the one bucket's params
            p = bucket.gather(ps, "p")
        w = bucket.buffer("gw").zero_()
        adam_step_into_(
            step, bucket.views(w), bucket.row_views(gs), bucket.row_views(exp_avgs),
            bucket.row_views(exp_avg_sqs), [batch.steps[k] for k in bucket.bucket],
        )  # fmt: skip
        # w_i − c_i p_i is the projected step; p ← w + p·(keep − c)
        coefficients = part.coefficients(bucket.row_dots(p, w, out=p.new_empty(bucket.segs.rows)))
        bucket.scale_rows_(p, bucket.segs.per_row(keep[bucket.tensors]) - coefficients, add=w)
        bucket.write_back(p, ps)


def sgdp_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """SGDP (momentum > 0): see the module doc."""
    ps, gs = batch.ps, batch.gs
    (momentum_buffers,) = batch.states
    decay = step.decay if step.weight_decay != 0 else 0.0
    tested, untested = step.split(batch.params)
    if untested and step.weight_decay != 0:
        torch._foreach_mul_([ps[k] for k in untested], step.keep(1, decay))
    if tested:
        buckets, sums, outcome, p = _test(step, batch, tested, momentum_buffers, workspace)
        direction = step.direction_dots(sums[3], sums[2])
        # p ← p·(keep + lr·c) − lr·d, the last part in torch's fused SGD below
        keep = outcome.keep(decay, step.wd_ratio)
        scales = outcome.rows.per_row(keep) + step.lr * outcome.coefficients(direction)
        for bucket in buckets:
            if len(buckets) > 1:  # else p still holds the one bucket's params
                p = bucket.gather(ps, "p")
            bucket.scale_rows_(p, scales[bucket.rows])
            bucket.write_back(p, ps)
    sgd_(step, ps, gs, momentum_buffers)
