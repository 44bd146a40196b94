"""SGDP: SGD with momentum and the radial projection for scale-invariant weights.

Heo et al., "Slowing Down the Weight Norm Increase in Momentum-based Optimizers", ICLR 2021.
Per tensor ``p`` with gradient ``g``, momentum ``μ``, dampening ``τ``::

    b ← μ·b + (1−τ)·g                  (b starts at zero)
    d = g + μ·b  if nesterov  else  a copy of b
    d, r = test-and-project(p, g, d)   (see adampx.projection; r = wd_ratio or 1)
    p ← p · (1 − lr·λ·r / (1 − μ))
    p ← p − lr·d

The momentum buffer ``b`` itself is never projected (the paper's algorithm; the reference
package projects it by accident when nesterov is off, see the README's migration notes).

As in :mod:`adampx.adamp`, the functional :func:`sgdp` steps the CPU tensors a fused kernel
can take first (:mod:`adampx._torch_fused` with momentum, or ``fused=True``) and runs the
rest through the per-tensor or multi-tensor implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

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
    write_back_,
    zeros_state,
)
from adampx.adamp import default_foreach

__all__ = ["SGDP", "sgdp"]


class SGDP(ProjectedOptimizer):
    """SGDP, a drop-in replacement for ``adamp.SGDP`` (same arguments, order and defaults).

    Args:
        params: iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: learning rate (float or 1-element tensor); required, here or in every group.
        momentum: momentum factor ``μ`` in [0, 1), default 0.
        dampening: dampening ``τ`` in [0, 1], default 0.
        weight_decay: decoupled weight decay ``λ``, scaled by ``1/(1−μ)``, default 0.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0), default False.
        eps: used by the projection's cosine and normalisation, > 0, default 1e-8.
        delta: threshold ``δ`` of the scale-invariance test, >= 0, default 0.1.
        wd_ratio: weight-decay multiplier for projected tensors, in [0, 1], default 0.1.
        foreach: multi-tensor (True) or per-tensor (False) implementation; None chooses.
        maximize: maximise the objective instead of minimising it.
        projection: set False in a param group to never project its tensors.
        track_statistics: record per-tensor statistics of each step, read with
            :meth:`statistics` (see :mod:`adampx.statistics`); off by default.
        fused: True runs the whole step in one compiled CPU kernel (:mod:`adampx.fused`,
            built with the system C compiler on first use, then cached); CPU params only.
        capturable: promise that the step can be captured in a CUDA graph. Every path
            already keeps its state on the params' device and never syncs with the host,
            so this only forbids what would break a capture (``track_statistics``,
            ``fused``); on the CPU it changes nothing.

    State per param: ``momentum`` (the buffer ``b``, float32 for float16/bfloat16 params), the
    key of the reference package.
    """

    _state_keys = ("momentum",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = required,  # type: ignore[assignment]
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
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
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
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
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("dampening", group["dampening"], 0.0, 1.0, high_open=False)
        check_flag("nesterov", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "Invalid nesterov: Nesterov momentum requires momentum > 0 and dampening = 0 "
                f"(got momentum={group['momentum']}, dampening={group['dampening']})"
            )

    @staticmethod
    def _init_state(p: Tensor, state: dict[str, Any]) -> None:
        state["momentum"] = zeros_state(p)

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        decisions: Decisions | None,
    ) -> None:
        sgdp(
            params,
            grads,
            [s["momentum"] for s in states],
            foreach=group["foreach"],
            fused=group["fused"],
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            eps=group["eps"],
            delta=group["delta"],
            wd_ratio=group["wd_ratio"],
            maximize=group["maximize"],
            projection=group["projection"],
            decisions=decisions,
            workspace=self._workspace,
        )


def sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
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
    decisions: Decisions | None = None,
    workspace: Workspace | None = None,
) -> None:
    """Functional SGDP step, in place on ``params`` and ``momentum_buffers`` (see module doc).

    Args:
        params, grads, momentum_buffers: tensors of one param group, aligned by index.
        foreach: multi-tensor (True) or per-tensor (False); None chooses.
        fused: True runs the compiled CPU kernel of :mod:`adampx.fused`.
        lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio, maximize,
        projection: as in :class:`SGDP`.
        decisions: if given, receives the scale-invariance decision of every tested param.
        workspace: scratch buffers kept between calls (the optimizer passes its own);
            without, the CPU kernels allocate theirs at every call.
    """
    if isinstance(lr, Tensor):  # a one-element lr of any shape, as a 0-d tensor
        lr = lr.reshape(())
    hyper: dict[str, Any] = dict(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio, maximize=maximize,
        projection=projection, decisions=decisions,
    )  # fmt: skip
    tensors = (params, grads, momentum_buffers)
    rest = _kernel_step(*tensors, fused=bool(fused), foreach=foreach, workspace=workspace, **hyper)
    if not rest:
        return
    if foreach is None:
        foreach = default_foreach(params)
    impl = _multi_tensor_sgdp if foreach else _single_tensor_sgdp
    impl(*([x[k] for k in rest] for x in tensors), **hyper)


def _kernel_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    fused: bool,
    foreach: bool | None,
    workspace: Workspace | None,
    **hyper: Any,
) -> list[int]:
    """Step the params that a fused step can take; return the indices of the others.

    ``fused=True``: the compiled CPU kernel of :mod:`adampx.fused`. Otherwise, only with
    momentum: torch's own fused kernels on the CPU (:mod:`adampx._torch_fused`), and on CUDA,
    unless ``foreach=False`` or without a workspace, the flat multi-tensor step of
    :mod:`adampx._flat_step`. Under ``torch.compile`` none of them (torch's kernels have no
    fake implementation): the eager math is compiled.
    """
    if torch.compiler.is_compiling() or (hyper["momentum"] == 0 and not fused):
        return list(range(len(params)))
    impls: dict[str, Callable[..., None]] = {"cpu": torch_fused.sgdp_}
    if fused:
        impls = {"cpu": fused_kernel.sgdp_}
    elif foreach is not False and workspace is not None:
        impls["cuda"] = flat_step.sgdp_
    return torch_fused.kernel_step(
        impls, params, grads, [momentum_buffers], workspace=workspace, **hyper
    )


def _single_tensor_sgdp(
    params: list[Tensor],
    grads: list[Tensor],
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
    decisions: Decisions | None = None,
) -> None:
    for param, grad, b_state in zip(params, grads, momentum_buffers, strict=True):
        p = compute_view(param)
        g = compute_view(grad)
        b = real(b_state)
        if maximize:
            g = -g

        b.mul_(momentum).add_(g, alpha=1 - dampening)
        d = g.add(b, alpha=momentum) if nesterov else b.clone()

        project_and_decay_(
            param,
            p,
            g,
            d,
            projection=projection,
            delta=delta,
            wd_ratio=wd_ratio,
            eps=eps,
            decay=lr * weight_decay / (1 - momentum),
            weight_decay=weight_decay,
            decisions=decisions,
        )
        p.sub_(d.mul_(lr))
        write_back_(param, p)


def _multi_tensor_sgdp(
    params: list[Tensor],
    grads: list[Tensor],
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
    decisions: Decisions | None = None,
) -> None:
    for indices in group_by_device_and_dtype(params).values():
        originals = [params[i] for i in indices]
        ps = [compute_view(params[i]) for i in indices]
        gs = [compute_view(grads[i]) for i in indices]
        bs = [real(momentum_buffers[i]) for i in indices]
        if maximize:
            gs = list(torch._foreach_neg(gs))

        torch._foreach_mul_(bs, momentum)
        torch._foreach_add_(bs, gs, alpha=1 - dampening)
        ds = torch._foreach_add(gs, bs, alpha=momentum) if nesterov else [b.clone() for b in bs]

        foreach_project_and_decay_(
            originals,
            ps,
            gs,
            ds,
            projection=projection,
            delta=delta,
            wd_ratio=wd_ratio,
            eps=eps,
            decay=lr * weight_decay / (1 - momentum),
            weight_decay=weight_decay,
            decisions=decisions,
        )
        torch._foreach_mul_(ds, lr)
        torch._foreach_sub_(ps, ds)
        for param, p in zip(originals, ps, strict=True):
            write_back_(param, p)
