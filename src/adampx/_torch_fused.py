"""The per-tensor step on CPU, built on torch's own fused optimizer kernels.

No compile step: the moment updates run in ``torch._fused_adamw_`` / ``torch._fused_sgd_``
(one vectorised pass each), and only the row statistics and the per-row rescaling of the
projection are separate passes. The numbers are those of ``../shared/ALGORITHM.md``; only
the order of floating-point operations differs from the plain per-tensor code.

AdamP, per tested tensor (rows = the channel view ``[n0, N/n0]``):

1. ``gp_i = p_i·g_i`` (the product is written into a workspace ``w``), ``‖p_i‖``, ``‖g_i‖``;
2. ``torch._fused_adamw_`` with ``lr = 1`` and ``weight_decay = 1`` on ``w`` as its "param":
   it updates ``m`` and ``v`` and leaves ``w·(1 − 1·1) − u/bc1 = −u/bc1`` in the workspace
   (the factor ``1 − 1·1`` is exactly zero, so the old contents vanish exactly);
3. ``pw_i = p_i·w_i``, the test (:func:`adampx.projection.decide`) and the coefficients
   ``c_i`` with ``w_i − c_i p_i`` the projected direction;
4. ``p ← p·(1 − lr·λ·r − lr·c) + lr·w``, which is ALGORITHM.md's
   ``p·(1 − lr·λ·r) − (lr/bc1)·(u − c'p)`` rearranged.

Untested tensors (biases, norm gains) take one ``torch._fused_adamw_`` call: that is AdamW.

SGDP, per tested tensor: ``p·g``, ``p·b`` (the momentum before the step), ``‖p‖``, ``‖g‖``.
The direction's row dots follow without touching it, by linearity:
``p·b_new = μ·(p·b) + (1−τ)·(p·g)`` and, with nesterov, ``p·d = p·g + μ·(p·b_new)``.
Each param is rescaled row by row by ``1 − a·r + lr·c`` (``a`` the decoupled decay), then
one ``torch._fused_sgd_`` call does ``b ← μ·b + (1−τ)·g; p ← p − lr·d`` for all params.

The functions take the compute views of ``adampx._tensors`` (float32 copies of half params,
real views of complex ones) beside the params as the user holds them, which decide whether a
tensor is tested. Which tensors qualify (:func:`supported`): plain CPU tensors whose compute
views are float32/float64 and share one dense layout with their gradient and state
(contiguous, or channels_last for all of them). Others (other layouts, tensor subclasses)
take the plain per-tensor code, and so does a step under ``torch.compile``, since torch's
fused kernels have no fake implementation to trace.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adampx._shared_step import Decisions
from adampx.projection import (
    RowStatistics,
    coefficients_from_row_dots,
    decay_ratio,
    decide,
    is_projectable,
)

_DTYPES = (torch.float32, torch.float64)


def _layout(t: Tensor) -> str | None:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def supported(param: Tensor, p: Tensor, g: Tensor, *states: Tensor) -> bool:
    """Whether ``param`` (compute views ``p``, ``g``, ``states``) can take this step."""
    if type(param) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
        return False
    if p.device.type != "cpu" or p.dtype not in _DTYPES or p.numel() == 0:
        return False
    if any(t.dtype != p.dtype for t in (g, *states)):
        return False
    layout = _layout(p)
    return layout is not None and all(
        _layout(t) == layout and t.stride() == p.stride() for t in (g, *states)
    )


def _rows(t: Tensor, n0: int) -> Tensor:
    """``[n0, N/n0]`` view of a dense tensor whose dim 0 is outermost in memory.

    Inside a row the elements are in memory order, the same for param, gradient and state
    (they share their strides), which is all that row sums and elementwise updates need.
    """
    return t.as_strided((n0, t.numel() // n0), (t.numel() // n0, 1))


def _workspace(ps: list[Tensor], tested: list[int], count: int) -> list[Tensor]:
    """``count`` flat buffers as large as the largest tested tensor."""
    size = max(ps[i].numel() for i in tested)
    return list(torch.empty(count, size, dtype=ps[tested[0]].dtype, device=ps[tested[0]].device))


def _scaled_rows(
    param: Tensor,
    stats: RowStatistics,
    direction_dots: Tensor,
    *,
    delta: float,
    eps: float,
    wd_ratio: float,
    decay: float | Tensor,
    decisions: Decisions | None,
) -> tuple[Tensor, Tensor]:
    """The test, and per row ``(c_i, 1 − decay·r)``: ``d_i − c_i p_i`` is the projected row."""
    decision = decide(stats, delta, eps)
    if decisions is not None:
        decisions[param] = decision
    coefficients = coefficients_from_row_dots(direction_dots, stats, decision, eps)
    return coefficients, 1 - decay * decay_ratio(decision, wd_ratio, coefficients)


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
) -> None:
    """AdamP (not nesterov) for params that pass :func:`supported`; see the module doc."""
    torch._foreach_add_(state_steps, 1)
    tested = [k for k, p in enumerate(params) if projection and is_projectable(p)]
    untested = sorted(set(range(len(params))) - set(tested))
    kernel: dict[str, Any] = dict(
        beta1=beta1, beta2=beta2, eps=eps, amsgrad=False, maximize=maximize
    )  # fmt: skip
    if untested:
        torch._fused_adamw_(
            [ps[k] for k in untested],
            [gs[k] for k in untested],
            [exp_avgs[k] for k in untested],
            [exp_avg_sqs[k] for k in untested],
            [],
            [state_steps[k] for k in untested],
            lr=lr,
            weight_decay=weight_decay,
            **kernel,
        )
    if not tested:
        return
    work, product = _workspace(ps, tested, 2)
    for k in tested:
        n0 = params[k].shape[0]
        p, g = _rows(ps[k], n0), _rows(gs[k], n0)
        w = work[: p.numel()].view(p.shape)
        x = product[: p.numel()].view(p.shape)
        stats = RowStatistics(
            gp=torch.mul(p, g, out=w).sum(1),
            g_norm=torch.linalg.vector_norm(g, dim=1),
            p_norm=torch.linalg.vector_norm(p, dim=1),
            row_length=p.shape[1],
        )
        # w ← w·(1 − 1·1) − u/bc1 = −u/bc1, and m, v updated
        torch._fused_adamw_(
            [w],
            [g],
            [_rows(exp_avgs[k], n0)],
            [_rows(exp_avg_sqs[k], n0)],
            [],
            [state_steps[k]],
            lr=1.0,
            weight_decay=1.0,
            **kernel,
        )
        coefficients, keep = _scaled_rows(
            params[k],
            stats,
            torch.mul(p, w, out=x).sum(1),
            delta=delta,
            eps=eps,
            wd_ratio=wd_ratio,
            decay=lr * weight_decay,
            decisions=decisions,
        )
        p.mul_((keep - lr * coefficients).unsqueeze(1))
        if isinstance(lr, Tensor):
            p.addcmul_(w, lr)
        else:
            p.add_(w, alpha=lr)


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
) -> None:
    """SGDP with ``momentum > 0`` for params that pass :func:`supported`; see the module doc."""
    decay = lr * weight_decay / (1 - momentum)
    tested = [k for k, p in enumerate(params) if projection and is_projectable(p)]
    untested = sorted(set(range(len(params))) - set(tested))
    if untested and weight_decay != 0:
        torch._foreach_mul_([ps[k] for k in untested], 1 - decay)
    if tested:
        (product,) = _workspace(ps, tested, 1)
    sign = -1.0 if maximize else 1.0
    for k in tested:
        n0 = params[k].shape[0]
        p, g = _rows(ps[k], n0), _rows(gs[k], n0)
        b = _rows(momentum_buffers[k], n0)
        x = product[: p.numel()].view(p.shape)
        stats = RowStatistics(
            gp=torch.mul(p, g, out=x).sum(1),
            g_norm=torch.linalg.vector_norm(g, dim=1),
            p_norm=torch.linalg.vector_norm(p, dim=1),
            row_length=p.shape[1],
        )
        gp = stats.gp * sign  # the row dots of the gradient the step descends along
        pb = torch.mul(p, b, out=x).sum(1).mul_(momentum).add_(gp, alpha=1 - dampening)
        direction_dots = gp.add_(pb, alpha=momentum) if nesterov else pb
        coefficients, keep = _scaled_rows(
            params[k],
            stats,
            direction_dots,
            delta=delta,
            eps=eps,
            wd_ratio=wd_ratio,
            decay=decay if weight_decay != 0 else 0.0,
            decisions=decisions,
        )
        p.mul_((keep + lr * coefficients).unsqueeze(1))
    torch._fused_sgd_(
        ps,
        gs,
        momentum_buffers,
        weight_decay=0.0,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=False,
    )
