"""SGDP: SGD with momentum and the radial projection for scale-invariant weights.

Heo et al., "Slowing Down the Weight Norm Increase in Momentum-based Optimizers", ICLR 2021.
Per tensor ``p`` with gradient ``g``, momentum ``μ``, dampening ``τ``::

    b ← μ·b + (1−τ)·g                  (b starts at zero)
    d = g + μ·b  if nesterov  else  a copy of b
    d, r = test-and-project(p, g, d)   (docs/algorithm.md; r = wd_ratio or 1)
    p ← p · (1 − lr·λ·r / (1 − μ))
    p ← p − lr·d

The momentum buffer ``b`` itself is never projected (the paper's algorithm; the reference
package projects it by accident when nesterov is off, see ``docs/migrating.md``).

As in :mod:`adampx.adamp`, ``SGDP.step`` makes one call per group to :func:`sgdp`, which
describes the step once (:class:`adampx.algorithm.spec.Step`) and hands the tensors to
the backends that :mod:`adampx.backends.plan` routes them to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim.optimizer import required

from adampx.algorithm.projection import Decisions
from adampx.algorithm.spec import Step
from adampx.backends import plan
from adampx.optim.base import ProjectedOptimizer
from adampx.optim.validation import check_flag, check_range, check_shared
from adampx.util.tensors import zeros_state
from adampx.util.workspace import Workspace

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
        caution: the cautious variant (timm's ``caution=True``): the update is kept only
            where its sign agrees with the gradient's (on projected tensors, with the
            gradient's tangential part) and rescaled by the fraction kept; see
            :mod:`adampx.algorithm.caution`. On the CPU in the C kernel, elsewhere in the
            eager math; not under FSDP2.
        foreach: multi-tensor (True) or per-tensor (False) implementation; None chooses.
        maximize: maximise the objective instead of minimising it.
        projection: set False in a param group to never project its tensors.
        track_statistics: record per-tensor statistics of each step, read with
            :meth:`statistics` (see :mod:`adampx.tools.statistics`); off by default.
        fused: True runs the whole step in one compiled CPU kernel (the ``cpu-kernel`` backend,
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
        caution: bool = False,
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
            caution=caution,
            foreach=foreach,
            maximize=maximize,
            projection=projection,
            track_statistics=track_statistics,
            fused=fused,
            capturable=capturable,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_shared(group)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("dampening", group["dampening"], 0.0, 1.0, high_open=False)
        check_flag("nesterov", group["nesterov"])
        check_flag("caution", group["caution"])
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
            caution=group["caution"],
            maximize=group["maximize"],
            projection=group["projection"],
            decisions=decisions,
            workspace=self._workspace,
            **self._grad_scaler(),
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
    caution: bool = False,
    decisions: Decisions | None = None,
    workspace: Workspace | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Functional SGDP step, in place on ``params`` and ``momentum_buffers`` (see module doc).

    ``params``, ``grads`` and ``momentum_buffers`` are the tensors of one param group, aligned
    by index; ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ``eps``,
    ``delta``, ``wd_ratio``, ``maximize`` and ``projection`` are as in :class:`SGDP`.

    Args:
        foreach: multi-tensor (True) or per-tensor (False) eager math; None chooses.
        fused: True runs the compiled CPU kernel (the ``cpu-kernel`` backend); False
            never runs the C or Triton kernels; None lets the routing choose.
        decisions: if given, receives the scale-invariance decision of every tested param.
        workspace: scratch buffers kept between calls (the optimizer passes its own);
            without, the backends allocate theirs at every call (and CUDA tensors take the
            eager math instead of the ``triton`` kernels, whose tables are kept there).
        grad_scale: a ``torch.amp.GradScaler``'s scale: the gradients are divided by it
            (in place) before the step.
        found_inf: the GradScaler's inf flag: where it is not 0 nothing changes (no
            host sync in the ``triton`` kernels; one elsewhere).
    """
    step = Step(
        optimizer="sgdp", lr=lr, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio,
        maximize=maximize, projection=projection, caution=caution, decisions=decisions,
        grad_scale=grad_scale, found_inf=found_inf,
    )  # fmt: skip
    plan.run(
        step, params, grads, [momentum_buffers], [],
        foreach_flag=foreach, fused=fused, workspace=workspace,
    )  # fmt: skip
