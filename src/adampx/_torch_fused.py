"""The per-tensor step on CPU, built on torch's own fused optimizer kernels.

No compile step: the moment updates run in ``torch._fused_adamw_`` / ``torch._fused_sgd_``
(one vectorised pass each), and only the row statistics and the per-row rescaling of the
projection are separate passes. The numbers are those of ``../shared/ALGORITHM.md``; only
the order of floating-point operations differs from the plain per-tensor code.

AdamP, per tested tensor (rows = the channel view ``[n0, N/n0]``):

1. ``gp_i = p_i·g_i`` (the product is written into a workspace), ``‖p_i‖``, ``‖g_i‖``;
2. the test of every tested tensor at once on the concatenated row sums (:class:`_Rows`);
3. ``torch._fused_adamw_`` without weight decay on a zeroed workspace ``w`` as its "param":
   it updates ``m`` and ``v`` and leaves the step ``w = −(lr/bc1)·u`` in the workspace;
4. ``pw_i = p_i·w_i``, the coefficients ``c_i`` with ``w_i − c_i p_i`` the projected step,
   and ``p ← p·(1 − lr·λ·r − c) + w`` in one ``addcmul``, which is ALGORITHM.md's
   ``p·(1 − lr·λ·r) − (lr/bc1)·(u − c'p)`` rearranged.

Untested tensors (biases, norm gains) take one ``torch._fused_adamw_`` call: that is AdamW.

SGDP, per tested tensor: ``p·g``, ``p·b`` (the momentum before the step), ``‖p‖``, ``‖g‖``;
then the test of all tensors at once.
The direction's row dots follow without touching it, by linearity:
``p·b_new = μ·(p·b) + (1−τ)·(p·g)`` and, with nesterov, ``p·d = p·g + μ·(p·b_new)``.
Each tested param is rescaled row by row by ``1 − a·r + lr·c`` (``a`` the decoupled decay)
and at once takes ``torch._fused_sgd_`` (``b ← μ·b + (1−τ)·g; p ← p − lr·d``) while it is
still in cache (about 8 % faster than one call for all params at the end); the untested
params take one call together.

The functions take the compute views of ``adampx._tensors`` (float32 copies of half params,
real views of complex ones) beside the params as the user holds them, which decide whether a
tensor is tested. Which tensors qualify (:func:`supported`): plain CPU tensors whose compute
views are float32/float64 and share one dense layout with their gradient and state
(contiguous, or channels_last for all of them). Others (other layouts, tensor subclasses)
take the plain per-tensor code, and so does a step under ``torch.compile``, since torch's
fused kernels have no fake implementation to trace.
"""

from __future__ import annotations

from collections.abc import Callable
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
    return all(t.dtype == dtype and _same_strides(t, p) for t in (g, *states))


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


def _buffers(
    ps: list[Tensor], tested: list[int], names: tuple[str, ...], workspace: Workspace | None
) -> list[Tensor]:
    """Flat buffers as large as the largest tested tensor, one per name."""
    size = max(ps[i].numel() for i in tested)
    like = ps[tested[0]]
    return [scratch(workspace, name, size, like.dtype, like.device) for name in names]


class _Rows:
    """The row sums of all tested tensors of one dtype, concatenated (``adampx._segments``).

    ``add`` fills tensor ``k``'s rows (``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` and optionally one
    more row dot) with ``out=`` writes into slices; :meth:`test` then runs the
    scale-invariance test of every tensor at once.
    """

    def __init__(self, segs: Segments, dtype: torch.dtype, extra: bool) -> None:
        self.segments = segs
        self.starts = [sum(segs.lengths[:j]) for j in range(len(segs.lengths))]
        self.sums = torch.empty(4 if extra else 3, segs.rows, dtype=dtype)
        self.p_norm, self.g_norm, self.gp = self.sums[0], self.sums[1], self.sums[2]
        self.extra = self.sums[3] if extra else None

    def slice(self, j: int) -> slice:
        return slice(self.starts[j], self.starts[j] + self.segments.lengths[j])

    def add(self, j: int, p: Tensor, g: Tensor, x: Tensor, other: Tensor | None = None) -> None:
        """Row sums of the ``j``-th tested tensor (``[n0, N/n0]`` views; ``x`` a workspace)."""
        rows = self.slice(j)
        torch.linalg.vector_norm(p, dim=1, out=self.p_norm[rows])
        torch.linalg.vector_norm(g, dim=1, out=self.g_norm[rows])
        torch.sum(torch.mul(p, g, out=x), 1, out=self.gp[rows])
        if other is not None and self.extra is not None:
            torch.sum(torch.mul(p, other, out=x), 1, out=self.extra[rows])

    def test(self, params: list[Tensor], **options: Any) -> Test:
        """:func:`adampx._segments.test` on these sums (``params``: the tested ones)."""
        return segment_test(self.segments, self.p_norm, self.g_norm, self.gp, params, **options)


def _rows_of(
    ps: list[Tensor], tested: list[int], workspace: Workspace | None, extra: bool
) -> _Rows:
    """Empty :class:`_Rows` for the tested tensors among ``ps``."""
    like = ps[tested[0]]
    shapes = [row_shape(ps[k]) for k in tested]
    segs = cached_segments(workspace, shapes, like.device)
    return _Rows(segs, like.dtype, extra)


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
    work, product = _buffers(ps, tested, ("work", "product"), workspace)
    rows = _rows_of(ps, tested, workspace, extra=False)
    views = []
    for j, k in enumerate(tested):
        n0 = params[k].shape[0]
        p, g = row_view(ps[k], n0), row_view(gs[k], n0)
        rows.add(j, p, g, product[: p.numel()].view(p.shape))
        views.append((p, g))
    test = rows.test(
        [params[k] for k in tested],
        delta=delta,
        eps=eps,
        wd_ratio=wd_ratio,
        decay=lr * weight_decay,
        decisions=decisions,
    )
    for j, k in enumerate(tested):
        p, g = views[j]
        n0 = p.shape[0]
        w = work[: p.numel()].view(p.shape).zero_()
        # w ← −lr·u/bc1, and m, v updated
        torch._fused_adamw_(
            [w],
            [g],
            [row_view(exp_avgs[k], n0)],
            [row_view(exp_avg_sqs[k], n0)],
            [],
            [state_steps[k]],
            lr=lr,
            weight_decay=0.0,
            **kernel,
        )
        pw = torch.sum(torch.mul(p, w, out=product[: p.numel()].view(p.shape)), 1)
        # w_i − c_i p_i is the projected step; p ← p·(keep − c) + w
        coefficients = test.coefficients(pw, rows.slice(j), j)
        torch.addcmul(w, p, (test.keep[j] - coefficients).unsqueeze(1), out=p)


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
    if tested:
        (product,) = _buffers(ps, tested, ("product",), workspace)
        rows = _rows_of(ps, tested, workspace, extra=True)
        views = []
        for j, k in enumerate(tested):
            n0 = params[k].shape[0]
            p, g = row_view(ps[k], n0), row_view(gs[k], n0)
            b = row_view(momentum_buffers[k], n0)
            rows.add(j, p, g, product[: p.numel()].view(p.shape), other=b)
            views.append(p)
        test = rows.test(
            [params[k] for k in tested],
            delta=delta,
            eps=eps,
            wd_ratio=wd_ratio,
            decay=decay,
            decisions=decisions,
        )
        # row dots of the direction d by linearity: p·b_new = μ·(p·b) + (1−τ)·(p·g)
        assert rows.extra is not None
        gp = rows.gp * (-1.0 if maximize else 1.0)  # of the gradient the step descends along
        direction = rows.extra.mul(momentum).add_(gp, alpha=1 - dampening)
        if nesterov:
            direction = gp.add_(direction, alpha=momentum)
        # p ← p·(keep + lr·c) − lr·d, the last part in torch's fused SGD below
        coefficients = test.coefficients(direction)
        scales = test.per_row(test.keep) + lr * coefficients
        for j, p in enumerate(views):
            p.mul_(scales[rows.slice(j)].unsqueeze(1))
            k = tested[j]  # its SGD step right away, while the tensor is still in cache
            _sgd_step([ps[k]], [gs[k]], [momentum_buffers[k]], **kernel)
    else:
        tested = []
    rest = [k for k in range(len(ps)) if k not in set(tested)]
    if rest:
        _sgd_step(
            [ps[k] for k in rest], [gs[k] for k in rest], [momentum_buffers[k] for k in rest],
            **kernel,
        )  # fmt: skip


def _sgd_step(ps: list[Tensor], gs: list[Tensor], bs: list[Tensor], **kernel: Any) -> None:
    """``b ← μ·b + (1−τ)·g; p ← p − lr·d`` in torch's fused SGD kernel (b starts at zero)."""
    torch._fused_sgd_(ps, gs, bs, weight_decay=0.0, is_first_step=False, **kernel)
