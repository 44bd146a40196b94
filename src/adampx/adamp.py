"""AdamP: Adam with decoupled weight decay and the radial projection for scale-invariant weights.

Heo et al., "Slowing Down the Weight Norm Increase in Momentum-based Optimizers", ICLR 2021.
Per tensor ``p`` with gradient ``g`` at step ``t`` (from 1)::

    m ← β1·m + (1−β1)·g
    v ← β2·v + (1−β2)·g²
    denom = sqrt(v) / sqrt(1 − β2^t) + eps
    u = m / denom                      (nesterov: u = (β1·m + (1−β1)·g) / denom)
    u, r = test-and-project(p, g, u)   (docs/algorithm.md; r = wd_ratio or 1)
    p ← p · (1 − lr·λ·r)
    p ← p − lr / (1 − β1^t) · u

``AdamP.step`` gathers the tensors of each param group and makes one call to :func:`adamp`,
which describes the step once (:class:`adampx.algorithm.spec.Step`) and hands the
tensors to the backends that :mod:`adampx.backends.plan` routes them to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from adampx.algorithm.projection import Decisions
from adampx.algorithm.spec import Step
from adampx.backends import plan
from adampx.optim.base import ProjectedOptimizer
from adampx.optim.validation import check_flag, check_range, check_shared
from adampx.util.tensors import step_tensor, zeros_state
from adampx.util.workspace import Workspace

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
        caution: the cautious variant (timm's ``caution=True``): the update is kept only
            where its sign agrees with the gradient's (on projected tensors, with the
            gradient's tangential part) and rescaled by the fraction kept; see
            :mod:`adampx.algorithm.caution`. On the CPU in the C kernel, elsewhere in the
            eager math; not under FSDP2.
        foreach: multi-tensor (True) or per-tensor (False) implementation; None chooses.
        maximize: maximise the objective instead of minimising it.
        projection: set False in a param group to never project its tensors (for example
            embeddings); they then behave as in AdamW.
        track_statistics: record per-tensor statistics of each step (which view fired, the
            cosines, norms, effective step sizes), read with :meth:`statistics`; see
            :mod:`adampx.tools.statistics`. Off by default, and free when off.
        fused: True runs the whole step in one compiled CPU kernel (the ``cpu-kernel`` backend,
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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
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
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
        check_range("beta1 (betas[0])", betas[0], 0.0, 1.0, high_open=True)
        check_range("beta2 (betas[1])", betas[1], 0.0, 1.0, high_open=True)
        check_flag("nesterov", group["nesterov"])
        check_flag("caution", group["caution"])

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
            caution=group["caution"],
            maximize=group["maximize"],
            projection=group["projection"],
            decisions=decisions,
            workspace=self._workspace,
            **self._grad_scaler(),
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
    caution: bool = False,
    decisions: Decisions | None = None,
    workspace: Workspace | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Functional AdamP step, in place on ``params`` and the state lists (see module doc).

    ``params``, ``grads``, ``exp_avgs`` and ``exp_avg_sqs`` are the tensors of one param group,
    aligned by index; ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``delta``,
    ``wd_ratio``, ``nesterov``, ``maximize`` and ``projection`` are as in :class:`AdamP`.

    Args:
        state_steps: 0-d float32 step counters on the params' devices (incremented here).
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
        optimizer="adamp", lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        delta=delta, wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize,
        projection=projection, caution=caution, decisions=decisions,
        grad_scale=grad_scale, found_inf=found_inf,
    )  # fmt: skip
    plan.run(
        step, params, grads, [exp_avgs, exp_avg_sqs], state_steps,
        foreach_flag=foreach, fused=fused, workspace=workspace,
    )  # fmt: skip
