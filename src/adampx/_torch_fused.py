"""The per-tensor step on CPU, built on torch's own fused optimizer kernels.

No compile step: the moment updates run in ``torch._fused_adamw_`` / ``torch._fused_sgd_``
(one vectorised pass each), and only the row statistics and the per-row rescaling of the
projection are separate passes. The numbers are those of ``../shared/ALGORITHM.md``; only
the order of floating-point operations differs from the plain per-tensor code.

Every tested tensor (rows = the channel view ``[n0, N/n0]``) is worked on in blocks of
whole rows of about :data:`BLOCK_ELEMENTS` elements, so that a block's scratch (and what
the next pass reads again) stays in cache, and the scratch is one block, not one tensor.

1. Row sums ``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` of every tested tensor, with ``out=`` writes
   into one vector per sum for all tensors (:class:`_Rows`); the test of every tested
   tensor at once on them (``adampx._segments``); its outcome read back as Python values
   (:class:`_Outcome`: these are CPU tensors, there is no device to wait for).
2. AdamP, tensors that are not projected: ``keep = 1 − lr·λ`` makes their step AdamW's, one
   ``torch._fused_adamw_`` call for all of them. Projected per row, block by block:
   ``torch._fused_adamw_`` without weight decay on a zeroed scratch ``w`` as its "param"
   updates ``m`` and ``v`` and leaves the step ``w = −(lr/bc1)·u`` there; then
   ``pw_i = p_i·w_i``, ``c_i = pw_i / (‖p_i‖ + eps)²`` and ``p ← p·(keep − c) + w`` in one
   ``addcmul``, which is ALGORITHM.md's ``p·(1 − lr·λ·r) − (lr/bc1)·(u − c'p)`` rearranged.
   Projected as a whole (rare): the same with ``w`` as large as the tensor, since ``c``
   needs all its rows.
3. SGDP, projected tensors: ``p·b`` (``b`` the momentum before the step), then the
   direction's row dots by linearity, without touching it: ``p·b_new = μ·(p·b) +
   (1−τ)·(p·g)`` and, with nesterov, ``p·d = p·g + μ·(p·b_new)``; each row rescaled by
   ``keep + lr·c`` and at once ``torch._fused_sgd_`` (``b ← μ·b + (1−τ)·g; p ← p − lr·d``),
   block by block (per row) or tensor by tensor (as a whole). The others are rescaled by
   their ``keep`` and take one ``torch._fused_sgd_`` call together.

Untested tensors (biases, norm gains) take one ``torch._fused_adamw_`` (AdamW) or
``torch._fused_sgd_`` call. The second passes run over the tensors in reverse order: the
last ones read by the row sums are still in cache.

The functions take the compute views of ``adampx._tensors`` (float32 copies of half params,
real views of complex ones) beside the params as the user holds them, which decide whether a
tensor is tested. Which tensors qualify (:func:`supported`): plain CPU tensors whose compute
views are float32/float64 and share one dense layout with their gradient and state
(contiguous, or channels_last for all of them). Others (other layouts, tensor subclasses)
take the plain per-tensor code, and so does a step under ``torch.compile``, since torch's
fused kernels have no fake implementation to trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from adampx._segments import Segments, Test, cached_segments
from adampx._segments import test as segment_test
from adampx._shared_step import Decisions
from adampx._tensors import (
    Workspace,
    compute_view,
    group_by_device_and_dtype,
    real,
    row_shape,
    row_view,
    scratch,
    write_back_,
)
from adampx.projection import is_projectable

_DTYPES = (torch.float32, torch.float64)


def supported(
    param: Tensor, p: Tensor, g: Tensor, *states: Tensor, devices: tuple[str, ...] = ("cpu",)
) -> bool:
    """Whether ``param`` (compute views ``p``, ``g``, ``states``) can take a kernel step.

    Plain tensors on one of ``devices`` (device types), float32/float64 compute views, and
    one dense layout (contiguous or channels_last): the same strides for all of them, but
    on dims of size 1.
    """
    if type(param) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
        return False
    dtype = p.dtype
    if dtype not in _DTYPES or p.device.type not in devices or p.numel() == 0:
        return False
    if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
        return False
    stride = p.stride()
    for t in (g, *states):
        if t.dtype != dtype or (t.stride() != stride and not _same_strides(t, p)):
            return False
    return True


def _same_strides(t: Tensor, p: Tensor) -> bool:
    """Same element order in memory: equal strides except on dims of size 1 (a 1x1 conv
    weight is both contiguous and channels_last, and its gradient may carry either)."""
    return t.stride() == p.stride() or all(
        a == b or n == 1 for a, b, n in zip(t.stride(), p.stride(), p.shape, strict=True)
    )


def kernel_step(
    impls: dict[str, Callable[..., None]],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
    *,
    steps: list[Tensor] | None = None,
    step_ok: Callable[[Tensor], bool] | None = None,
    **hyper: Any,
) -> list[int]:
    """Step the params that :func:`supported` admits; return the others' indices.

    ``impls`` maps a device type to the step for it (AdamP's or SGDP's, here, in
    :mod:`adampx.fused` or in :mod:`adampx._flat_step`); each gets, per device and dtype,
    the params, their compute views, the gradients' and the state lists' (then ``steps``),
    and ``hyper``. ``step_ok`` further restricts which step counters it can take. Half
    params are written back from their float32 copies.
    """
    ps = [compute_view(p) for p in params]
    gs = [compute_view(g) for g in grads]
    ss = [[real(t) for t in state] for state in states]
    devices = tuple(impls)
    fast = [
        k
        for k in range(len(params))
        if supported(params[k], ps[k], gs[k], *(state[k] for state in ss), devices=devices)
        and (step_ok is None or steps is None or step_ok(steps[k]))
    ]
    extra = [] if steps is None else [steps]
    if isinstance(hyper.get("lr"), Tensor):  # a one-element lr of any shape, as a 0-d tensor
        hyper["lr"] = hyper["lr"].reshape(())
    for (device, _), same_dtype in group_by_device_and_dtype([ps[k] for k in fast]).items():
        chosen = [fast[i] for i in same_dtype]
        impl = impls[torch.device(device).type]
        impl(*([x[k] for k in chosen] for x in (params, ps, gs, *ss, *extra)), **hyper)
    for k in fast:
        write_back_(params[k], ps[k])
    return sorted(set(range(len(params))) - set(fast))


# a tensor is worked on in blocks of whole rows of about this many elements, so that a
# block's scratch stays in cache between the passes over it; and the scratch is that small
BLOCK_ELEMENTS = 1 << 19


def _in_blocks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """``tensors`` (matrices and per-row columns, all with the same rows) cut alike into
    blocks of whole rows of about :data:`BLOCK_ELEMENTS` elements of the first; the
    tensors themselves where that is one block."""
    rows, length = tensors[0].shape
    per = max(1, BLOCK_ELEMENTS // length)
    if per >= rows:
        yield tensors
        return
    for start in range(0, rows, per):
        yield tuple(t[start : start + per] for t in tensors)


def _block_scratch(
    ps: list[Tensor], tested: list[int], name: str, workspace: Workspace | None
) -> Tensor:
    """A flat buffer as large as the largest block of a tested tensor."""
    size = 0
    for k in tested:
        rows, length = row_shape(ps[k])
        size = max(size, min(rows, max(1, BLOCK_ELEMENTS // length)) * length)
    like = ps[tested[0]]
    return scratch(workspace, name, size, like.dtype, like.device)


def _matrix(buffer: Tensor, shape: torch.Size) -> Tensor:
    """The first elements of a flat buffer as a dense matrix of ``shape``."""
    return buffer.as_strided(shape, (shape[1], 1))


class _Rows:
    """The row sums of all tested tensors of one dtype, concatenated (``adampx._segments``).

    :meth:`add` fills tensor ``j``'s rows (``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i``) with ``out=``
    writes into its parts; :meth:`test` then runs the scale-invariance test of every tensor
    at once.
    """

    def __init__(self, segs: Segments, dtype: torch.dtype) -> None:
        self.segments = segs
        self.sums = torch.empty(3, segs.rows, dtype=dtype)
        self.p_norm, self.g_norm, self.gp = self.sums.unbind()
        # per tensor, its rows of the three sums (three splits per step, not per tensor)
        self.parts = list(
            zip(*(x.split(segs.lengths) for x in (self.p_norm, self.g_norm, self.gp)), strict=True)
        )

    def add(self, j: int, p: Tensor, g: Tensor, x: Tensor) -> None:
        """Row sums of the ``j``-th tested tensor (``[n0, N/n0]`` views; ``x`` a flat
        workspace), block by block: each block is read from memory once."""
        for p_b, g_b, p_norm, g_norm, gp in _in_blocks(p, g, *self.parts[j]):
            torch.linalg.vector_norm(p_b, dim=1, out=p_norm)
            torch.linalg.vector_norm(g_b, dim=1, out=g_norm)
            torch.sum(torch.mul(p_b, g_b, out=_matrix(x, p_b.shape)), 1, out=gp)

    def test(self, params: list[Tensor], **options: Any) -> Test:
        """:func:`adampx._segments.test` on these sums (``params``: the tested ones)."""
        return segment_test(self.segments, self.p_norm, self.g_norm, self.gp, params, **options)


class _Outcome:
    """A :class:`Test`'s per-tensor outcome as Python values, read once per step (these
    are CPU tensors: no device to wait for), so that each tensor takes only the work its
    outcome needs; and, for the channel-wise projection, per tensor its rows' keep factor
    and ``(‖p_i‖ + eps)²`` as ``[rows, 1]`` columns."""

    def __init__(self, test: Test) -> None:
        self.channel: list[bool] = test.tensor_channel.tolist()
        self.layer: list[bool] = test.layer.tolist()
        self.keep: list[float] = test.keep.tolist()
        self.keep_rows: tuple[Tensor, ...] = ()
        self.row_scale: tuple[Tensor, ...] = ()
        if any(self.channel):
            lengths = test.segments.lengths
            self.keep_rows = test.per_row(test.keep).unsqueeze(1).split(lengths)
            self.row_scale = test.row_scale.unsqueeze(1).split(lengths)

    def projected(self, j: int) -> bool:
        return self.channel[j] or self.layer[j]


def _test_rows(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    tested: list[int],
    product: Tensor,
    workspace: Workspace | None,
    **options: Any,
) -> tuple[_Rows, Test, _Outcome]:
    """The row sums of the tested tensors, and the test of all of them (``options``: those
    of :func:`adampx._segments.test`)."""
    like = ps[tested[0]]
    segs = cached_segments(workspace, [row_shape(ps[k]) for k in tested], like.device)
    rows = _Rows(segs, like.dtype)
    for j, k in enumerate(tested):
        n0 = params[k].shape[0]
        rows.add(j, row_view(ps[k], n0), row_view(gs[k], n0), product)
    test = rows.test([params[k] for k in tested], **options)
    return rows, test, _Outcome(test)


def split_tested(params: list[Tensor], projection: bool) -> tuple[list[int], list[int]]:
    """Indices of the params the scale-invariance test applies to, and of the others."""
    tested = [k for k, p in enumerate(params) if projection and is_projectable(p)]
    return tested, sorted(set(range(len(params))) - set(tested))


def start_adamp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    projection: bool,
    **kernel: Any,
) -> list[int]:
    """What every fused AdamP step starts with: the step counters incremented, and AdamW in
    one ``torch._fused_adamw_`` call (``kernel``: its options) for the untested tensors.
    Returns the indices of the tested ones."""
    torch._foreach_add_(state_steps, 1)
    tested, untested = split_tested(params, projection)
    if untested:
        torch._fused_adamw_(
            [ps[k] for k in untested],
            [gs[k] for k in untested],
            [exp_avgs[k] for k in untested],
            [exp_avg_sqs[k] for k in untested],
            [],
            [state_steps[k] for k in untested],
            **kernel,
        )
    return tested


def adamp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None,
    workspace: Workspace | None = None,
) -> None:
    """AdamP (not nesterov) for compute views that pass :func:`supported`, of one dtype."""
    kernel: dict[str, Any] = dict(
        beta1=beta1, beta2=beta2, eps=eps, amsgrad=False, maximize=maximize
    )  # fmt: skip
    tested = start_adamp_(
        params, ps, gs, exp_avgs, exp_avg_sqs, state_steps,
        projection=projection, lr=lr, weight_decay=weight_decay, **kernel,
    )  # fmt: skip
    if not tested:
        return
    product = _block_scratch(ps, tested, "product", workspace)
    _, test, outcome = _test_rows(
        params, ps, gs, tested, product, workspace,
        delta=delta, eps=eps, wd_ratio=wd_ratio, decay=lr * weight_decay, decisions=decisions,
    )  # fmt: skip
    # not projected: keep = 1 − lr·λ, which is AdamW
    plain = [k for j, k in enumerate(tested) if not outcome.projected(j)]
    if plain:
        torch._fused_adamw_(
            [ps[k] for k in plain],
            [gs[k] for k in plain],
            [exp_avgs[k] for k in plain],
            [exp_avg_sqs[k] for k in plain],
            [],
            [state_steps[k] for k in plain],
            lr=lr,
            weight_decay=weight_decay,
            **kernel,
        )
    if len(plain) == len(tested):
        return
    work = _block_scratch(ps, tested, "work", workspace)
    for j, k in reversed(list(enumerate(tested))):  # the last ones read are in cache
        if not outcome.projected(j):
            continue
        n0 = params[k].shape[0]
        p, g = row_view(ps[k], n0), row_view(gs[k], n0)
        m, v = row_view(exp_avgs[k], n0), row_view(exp_avg_sqs[k], n0)
        step = state_steps[k]
        if outcome.layer[j]:  # c for the whole tensor: the step of all its rows first
            w = scratch(workspace, "whole", p.numel(), p.dtype, p.device).view(p.shape)
            _adam_direction(w.zero_(), g, m, v, step, lr, kernel)
            dots = p.new_empty(n0, 1)
            for p_b, w_b, dots_b in _in_blocks(p, w, dots):
                x = _matrix(product, p_b.shape)
                torch.sum(torch.mul(p_b, w_b, out=x), 1, keepdim=True, out=dots_b)
            torch.addcmul(w, p, outcome.keep[j] - dots.sum() / test.layer_scale[j], out=p)
            continue
        blocks = _in_blocks(p, g, m, v, outcome.keep_rows[j], outcome.row_scale[j])
        for p_b, g_b, m_b, v_b, keep, row_scale in blocks:  # c per row: block by block
            w = _matrix(work, p_b.shape).zero_()
            _adam_direction(w, g_b, m_b, v_b, step, lr, kernel)
            pw = torch.sum(torch.mul(p_b, w, out=_matrix(product, p_b.shape)), 1, keepdim=True)
            # w − c·p is the projected step: p ← p·(keep − c) + w, c = p·w / (‖p‖ + eps)²
            torch.addcmul(w, p_b, torch.addcdiv(keep, pw, row_scale, value=-1), out=p_b)


def _adam_direction(
    w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float | Tensor,
    kernel: dict[str, Any],
) -> None:  # fmt: skip
    """``w ← w − lr·u/bc1`` on a zeroed ``w`` (Adam's step), ``m`` and ``v`` updated, in
    ``torch._fused_adamw_`` without weight decay."""
    torch._fused_adamw_([w], [g], [m], [v], [], [step], lr=lr, weight_decay=0.0, **kernel)


def sgdp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None,
    workspace: Workspace | None = None,
) -> None:
    """SGDP (momentum > 0) for compute views that pass :func:`supported`, of one dtype."""
    decay = lr * weight_decay / (1 - momentum) if weight_decay != 0 else 0.0
    tested, untested = split_tested(params, projection)
    kernel: dict[str, Any] = dict(
        momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize
    )  # fmt: skip
    if untested and weight_decay != 0:
        torch._foreach_mul_([ps[k] for k in untested], 1 - decay)
    plain = untested
    if tested:
        plain = plain + _sgdp_tested(
            params, ps, gs, momentum_buffers, tested, lr=lr, decay=decay, eps=eps,
            delta=delta, wd_ratio=wd_ratio, decisions=decisions, workspace=workspace,
            kernel=kernel,
        )  # fmt: skip
    if plain:
        _sgd_step(
            [ps[k] for k in plain],
            [gs[k] for k in plain],
            [momentum_buffers[k] for k in plain],
            **kernel,
        )


def _sgdp_tested(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    momentum_buffers: list[Tensor],
    tested: list[int],
    *,
    lr: float | Tensor,
    decay: float | Tensor,
    eps: float,
    delta: float,
    wd_ratio: float,
    decisions: Decisions | None,
    workspace: Workspace | None,
    kernel: dict[str, Any],
) -> list[int]:
    """SGDP's step of the projected tensors among the tested ones: the test of all at once,
    then tensor by tensor (block by block where the projection is per row, so that the
    block is in cache) the rescale and torch's fused SGD. Returns the tested tensors that
    are not projected, rescaled by their decay and left for one SGD call with the others."""
    product = _block_scratch(ps, tested, "product", workspace)
    rows, test, outcome = _test_rows(
        params, ps, gs, tested, product, workspace,
        delta=delta, eps=eps, wd_ratio=wd_ratio, decay=decay, decisions=decisions,
    )  # fmt: skip
    plain = [j for j in range(len(tested)) if not outcome.projected(j)]
    decayed = [j for j in plain if outcome.keep[j] != 1.0]
    if decayed:
        torch._foreach_mul_([ps[tested[j]] for j in decayed], [outcome.keep[j] for j in decayed])
    # p·g of the gradient the step descends along, per tensor as a [rows, 1] column
    gp_all = rows.gp.neg() if kernel["maximize"] else rows.gp
    gps = gp_all.unsqueeze(1).split(rows.segments.lengths)
    momentum, dampening, nesterov = kernel["momentum"], kernel["dampening"], kernel["nesterov"]
    lr_value = lr.item() if isinstance(lr, Tensor) else lr  # a CPU tensor: no device sync

    def direction(pb: Tensor, gp: Tensor) -> Tensor:
        """The direction's row dots by linearity, without touching it: ``p·b_new =
        μ·(p·b) + (1−τ)·(p·g)``, and with nesterov ``p·d = p·g + μ·(p·b_new)``."""
        d = pb.mul_(momentum).add_(gp, alpha=1 - dampening)
        return torch.add(gp, d, alpha=momentum) if nesterov else d

    # p ← p·(keep + lr·c) − lr·d, the last part in torch's fused SGD
    for j, k in reversed(list(enumerate(tested))):  # the last ones read are in cache
        if not outcome.projected(j):
            continue
        n0 = params[k].shape[0]
        p, g = row_view(ps[k], n0), row_view(gs[k], n0)
        b = row_view(momentum_buffers[k], n0)
        if outcome.layer[j]:  # c for the whole tensor
            dots = p.new_empty(n0, 1)
            for p_b, b_b, dots_b in _in_blocks(p, b, dots):
                x = _matrix(product, p_b.shape)
                torch.sum(torch.mul(p_b, b_b, out=x), 1, keepdim=True, out=dots_b)
            c = direction(dots, gps[j]).sum() / test.layer_scale[j]
            p.mul_(outcome.keep[j] + lr_value * c)
            _sgd_step([ps[k]], [gs[k]], [momentum_buffers[k]], **kernel)
            continue
        blocks = _in_blocks(p, g, b, gps[j], outcome.keep_rows[j], outcome.row_scale[j])
        for p_b, g_b, b_b, gp, keep, row_scale in blocks:  # c per row: block by block
            pb = torch.sum(torch.mul(p_b, b_b, out=_matrix(product, p_b.shape)), 1, keepdim=True)
            p_b.mul_(torch.addcdiv(keep, direction(pb, gp), row_scale, value=lr_value))
            _sgd_step([p_b], [g_b], [b_b], **kernel)
    return [tested[j] for j in plain]


def _sgd_step(ps: list[Tensor], gs: list[Tensor], bs: list[Tensor], **kernel: Any) -> None:
    """``b ← μ·b + (1−τ)·g; p ← p − lr·d`` in torch's fused SGD kernel (b starts at zero)."""
    torch._fused_sgd_(ps, gs, bs, weight_decay=0.0, is_first_step=False, **kernel)
