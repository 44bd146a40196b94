"""AdamP: Adam with decoupled weight decay and the radial projection for scale-invariant weights.

Heo et al., "Slowing Down the Weight Norm Increase in Momentum-based Optimizers", ICLR 2021.
Per tensor ``p`` with gradient ``g`` at step ``t`` (from 1)::

    m ← β1·m + (1−β1)·g
    v ← β2·v + (1−β2)·g²
    denom = sqrt(v) / sqrt(1 − β2^t) + eps
    u = m / denom                      (nesterov: u = (β1·m + (1−β1)·g) / denom)
    u, r = test-and-project(p, g, u)   (see adampx.projection; r = wd_ratio or 1)
    p ← p · (1 − lr·λ·r)
    p ← p − lr / (1 − β1^t) · u

``AdamP.step`` gathers the tensors of each param group and makes one call to :func:`adamp`.
That steps the CPU tensors a fused kernel can take (torch's own, :mod:`adampx._torch_fused`,
or with ``fused=True`` the C kernel of :mod:`adampx.fused`) and runs the rest through a
per-tensor or a multi-tensor (``torch._foreach_*``) implementation of the math above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from adampx import _flat_step as flat_step
from adampx import _torch_fused as torch_fused
from adampx import fused as fused_kernel
from adampx._optimizer import ProjectedOptimizer, check_flag, check_range
from adampx._shared_step import Decisions, foreach_project_and_decay_, project_and_decay_
from adampx._tensors import (
    Workspace,
    compute_view,
    group_by_device_and_dtype,
    real,
    step_tensor,
    write_back_,
    zeros_state,
)
from adampx.sharded import batched_projection_supported

__all__ = ["AdamP", "adamp"]


class AdamP(ProjectedOptimizer):
    """AdamP, a drop-in replacement for ``adamp.AdamP`` (same arguments, order and defaults).

    Args:
        params: iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: learning rate (float or 1-element tensor), default 1e-3.
        betas: ``(β1, β2)``, each in [0, 1), default (0.9, 0.999).
        eps: added to the denominator and used by the projection, > 0, default 1e-8.
        weight_decay: decoupled weight decay ``λ`` (AdamW-style), default 0 (AdamW's is 0.01).
        delta: threshold ``δ`` of the scale-invariance test, >= 0, default 0.1.
        wd_ratio: weight-decay multiplier for projected tensors, in [0, 1], default 0.1.
        nesterov: Nesterov momentum in the update direction, default False.
        foreach: multi-tensor (True) or per-tensor (False) implementation; None chooses.
        maximize: maximise the objective instead of minimising it.
        projection: set False in a param group to never project its tensors (for example
            embeddings); they then behave as in AdamW.
        track_statistics: record per-tensor statistics of each step (which view fired, the
            cosines, norms, effective step sizes), read with :meth:`statistics`; see
            :mod:`adampx.statistics`. Off by default, and free when off.
        fused: True runs the whole step in one compiled CPU kernel (:mod:`adampx.fused`,
            built with the system C compiler on first use, then cached); CPU params only.
        capturable: promise that the step can be captured in a CUDA graph. Every path
            already keeps its state on the params' device and never syncs with the host,
            so this only forbids what would break a capture (``track_statistics``,
            ``fused``); on the CPU it changes nothing.

    Every hyperparameter may differ per param group. State per param: ``step`` (0-d float32
    tensor on the param's device), ``exp_avg`` and ``exp_avg_sq`` (float32 for float16 and
    bfloat16 params) — the keys of the reference package and of ``torch.optim.AdamW``.
    """

    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        projection: bool = True,
        track_statistics: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            foreach=foreach,
            maximize=maximize,
            projection=projection,
            track_statistics=track_statistics,
            fused=fused,
            capturable=capturable,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        self._check_shared(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
        check_range("beta1 (betas[0])", betas[0], 0.0, 1.0, high_open=True)
        check_range("beta2 (betas[1])", betas[1], 0.0, 1.0, high_open=True)
        check_flag("nesterov", group["nesterov"])

    @staticmethod
    def _init_state(p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = step_tensor(p)
        state["exp_avg"] = zeros_state(p)
        state["exp_avg_sq"] = zeros_state(p)

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        decisions: Decisions | None,
    ) -> None:
        beta1, beta2 = group["betas"]
        adamp(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            foreach=group["foreach"],
            fused=group["fused"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            delta=group["delta"],
            wd_ratio=group["wd_ratio"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            projection=group["projection"],
            decisions=decisions,
            workspace=self._workspace,
        )


def default_foreach(params: list[Tensor]) -> bool:
    """The implementation chosen for ``foreach=None``, as torch chooses.

    Multi-tensor on accelerators (CUDA, XPU), where it saves kernel launches; per-tensor on
    the CPU, where torch's foreach kernels are per-tensor loops and the extra temporaries
    make the multi-tensor path slower. FSDP2's sharded params (DTensors on a 1-D mesh) get the
    multi-tensor path, which gathers the row statistics of all tensors in two collectives
    (``adampx.sharded``); other tensor subclasses get the per-tensor path.
    """
    if batched_projection_supported(params):
        return True  # FSDP2 shards: the multi-tensor path batches the collectives
    return all(
        type(p) in (Tensor, torch.nn.Parameter) and p.device.type in ("cuda", "xpu") for p in params
    )


def adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None = None,
    workspace: Workspace | None = None,
) -> None:
    """Functional AdamP step, in place on ``params`` and the state lists (see module doc).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: tensors of one param group, aligned by index.
        state_steps: 0-d float32 step counters on the params' devices (incremented here).
        foreach: multi-tensor (True) or per-tensor (False); None chooses.
        fused: True runs the compiled CPU kernel of :mod:`adampx.fused`.
        lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov, maximize, projection:
            as in :class:`AdamP`.
        decisions: if given, receives the scale-invariance decision of every tested param.
        workspace: scratch buffers kept between calls (the optimizer passes its own);
            without, the CPU kernels allocate theirs at every call.
    """
    if isinstance(lr, Tensor):  # a one-element lr of any shape, as a 0-d tensor
        lr = lr.reshape(())
    hyper: dict[str, Any] = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, delta=delta,
        wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize, projection=projection,
        decisions=decisions,
    )  # fmt: skip
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    rest = _kernel_step(*tensors, fused=bool(fused), foreach=foreach, workspace=workspace, **hyper)
    if not rest:
        return
    if foreach is None:
        foreach = default_foreach(params)
    impl = _multi_tensor_adamp if foreach else _single_tensor_adamp
    impl(*([x[k] for k in rest] for x in tensors), **hyper)


def _kernel_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    fused: bool,
    foreach: bool | None,
    workspace: Workspace | None,
    nesterov: bool,
    **hyper: Any,
) -> list[int]:
    """Step the params that a fused step can take; return the indices of the others.

    ``fused=True``: the compiled CPU kernel of :mod:`adampx.fused`. Otherwise, not with
    nesterov: torch's own fused kernels on the CPU (:mod:`adampx._torch_fused`), and on CUDA,
    unless ``foreach=False`` or without a workspace, the flat multi-tensor step of
    :mod:`adampx._flat_step`. Under ``torch.compile`` none of them (torch's kernels have no
    fake implementation): the eager math is compiled instead.
    """
    if torch.compiler.is_compiling() or (nesterov and not fused):
        return list(range(len(params)))
    impls: dict[str, Callable[..., None]] = {"cpu": torch_fused.adamp_}
    step_ok: Callable[[Tensor], bool] | None = None
    if fused:  # the C kernel also takes nesterov, and increments float32 step counters itself
        impls = {"cpu": partial(fused_kernel.adamp_, nesterov=nesterov)}
        step_ok = fused_kernel.step_supported
    elif foreach is not False and workspace is not None:
        impls["cuda"] = flat_step.adamp_
    return torch_fused.kernel_step(
        impls,
        params,
        grads,
        [exp_avgs, exp_avg_sqs],
        steps=state_steps,
        step_ok=step_ok,
        workspace=workspace,
        **hyper,
    )


def _single_tensor_adamp(
    params: list[Tensor],
    grads: list[Tensor],
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
    nesterov: bool,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None = None,
) -> None:
    for param, grad, m_state, v_state, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        p = compute_view(param)
        g = compute_view(grad)
        m, v = real(m_state), real(v_state)
        if maximize:
            g = -g

        step.add_(1)
        t = step.to(p.dtype)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t

        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # one param-sized buffer: denominator, then the update direction in place of it
        denom = v.sqrt().div_(bias_correction2.sqrt()).add_(eps)
        if nesterov:
            u = m.mul(beta1).add_(g, alpha=1 - beta1).div_(denom)
        else:
            u = torch.div(m, denom, out=denom)

        project_and_decay_(
            param,
            p,
            g,
            u,
            projection=projection,
            delta=delta,
            wd_ratio=wd_ratio,
            eps=eps,
            decay=lr * weight_decay,
            weight_decay=weight_decay,
            decisions=decisions,
        )
        p.sub_(u.mul_(lr / bias_correction1))
        write_back_(param, p)


def _multi_tensor_adamp(
    params: list[Tensor],
    grads: list[Tensor],
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
    nesterov: bool,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None = None,
) -> None:
    for indices in group_by_device_and_dtype(params).values():
        originals = [params[i] for i in indices]
        ps = [compute_view(params[i]) for i in indices]
        gs = [compute_view(grads[i]) for i in indices]
        ms = [real(exp_avgs[i]) for i in indices]
        vs = [real(exp_avg_sqs[i]) for i in indices]
        steps = [state_steps[i] for i in indices]
        if maximize:
            gs = list(torch._foreach_neg(gs))

        torch._foreach_add_(steps, 1)
        compute_dtype = ps[0].dtype
        ts = steps if compute_dtype == torch.float32 else [s.to(compute_dtype) for s in steps]
        bias_correction1 = torch._foreach_pow(beta1, ts)
        torch._foreach_neg_(bias_correction1)
        torch._foreach_add_(bias_correction1, 1)
        sqrt_bias_correction2 = torch._foreach_pow(beta2, ts)
        torch._foreach_neg_(sqrt_bias_correction2)
        torch._foreach_add_(sqrt_bias_correction2, 1)
        torch._foreach_sqrt_(sqrt_bias_correction2)

        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, sqrt_bias_correction2)
        torch._foreach_add_(denoms, eps)
        if nesterov:
            us = torch._foreach_mul(ms, beta1)
            torch._foreach_add_(us, gs, alpha=1 - beta1)
            torch._foreach_div_(us, denoms)
        else:
            us = torch._foreach_div(ms, denoms)
        del denoms

        foreach_project_and_decay_(
            originals,
            ps,
            gs,
            us,
            projection=projection,
            delta=delta,
            wd_ratio=wd_ratio,
            eps=eps,
            decay=lr * weight_decay,
            weight_decay=weight_decay,
            decisions=decisions,
        )
        step_sizes = torch._foreach_reciprocal(bias_correction1)
        torch._foreach_mul_(step_sizes, lr)
        torch._foreach_mul_(us, step_sizes)
        torch._foreach_sub_(ps, us)
        for param, p in zip(originals, ps, strict=True):
            write_back_(param, p)
