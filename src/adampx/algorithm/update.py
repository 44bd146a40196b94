"""AdamP's and SGDP's update as plain torch operations on lists of tensors.

The math of ``docs/algorithm.md`` written with ``torch._foreach_*`` operations over the
tensors of a :class:`~adampx.util.tensors.Batch` (one device and dtype), in place. It is the
readable form of the step, what ``torch.compile`` traces, and what the ``eager`` (one tensor
at a time) and ``foreach`` (all at once) backends run::

    AdamP: m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
           u = m / (sqrt(v)/sqrt(1−β2^t) + eps)    (nesterov: β1·m + (1−β1)·g for m)
    SGDP:  b ← μ·b + (1−τ)·g;  d = b, or g + μ·b with nesterov
    then   u, r = test-and-project(p, g, u);  p ← p·(1 − a·r);  p ← p − step·u
    (caution=True masks u after the projection: adampx.algorithm.caution)

FSDP2's sharded params (DTensors on a 1-D mesh) are tested together, with two collectives
in all (:mod:`adampx.algorithm.sharded`); other tensors one at a time with
:func:`adampx.algorithm.projection.project_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adampx.algorithm.caution import cautious_project_, mask_
from adampx.algorithm.projection import project_
from adampx.algorithm.sharded import batched_projection_supported, project_sharded_
from adampx.algorithm.spec import Step
from adampx.util.tensors import Batch

__all__ = ["adamp_", "sgdp_"]


def adamp_(step: Step, batch: Batch) -> None:
    """AdamP's step of ``batch`` (compute views of one device and dtype), in place."""
    ps, gs, steps = batch.ps, batch.gs, batch.steps
    ms, vs = batch.states
    if step.maximize:
        gs = list(torch._foreach_neg(gs))

    torch._foreach_add_(steps, 1)
    step_sizes, sqrt_bias_correction2 = step.adam_corrections(steps, ps[0].dtype)

    torch._foreach_mul_(ms, step.beta1)
    torch._foreach_add_(ms, gs, alpha=1 - step.beta1)
    torch._foreach_mul_(vs, step.beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - step.beta2)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, sqrt_bias_correction2)
    torch._foreach_add_(denoms, step.eps)
    if step.nesterov:
        us = torch._foreach_mul(ms, step.beta1)
        torch._foreach_add_(us, gs, alpha=1 - step.beta1)
        torch._foreach_div_(us, denoms)
    else:
        us = torch._foreach_div(ms, denoms)
    del denoms

    project_and_decay_(step, batch, gs, us)
    torch._foreach_mul_(us, step_sizes)
    torch._foreach_sub_(ps, us)


def sgdp_(step: Step, batch: Batch) -> None:
    """SGDP's step of ``batch`` (compute views of one device and dtype), in place. The
    momentum buffer itself is never projected."""
    ps, gs = batch.ps, batch.gs
    (bs,) = batch.states
    if step.maximize:
        gs = list(torch._foreach_neg(gs))

    torch._foreach_mul_(bs, step.momentum)
    torch._foreach_add_(bs, gs, alpha=1 - step.dampening)
    if step.nesterov:
        ds = list(torch._foreach_add(gs, bs, alpha=step.momentum))
    else:
        ds = [b.clone() for b in bs]

    project_and_decay_(step, batch, gs, ds)
    torch._foreach_mul_(ds, step.lr)
    torch._foreach_sub_(ps, ds)


def project_and_decay_(step: Step, batch: Batch, gs: list[Tensor], us: Sequence[Tensor]) -> None:
    """Remove the radial part of each tested tensor's update ``us`` in place where the test
    passes (and with ``caution``, mask ``us``), then apply the decoupled weight decay
    ``p ← p·(1 − a·r)`` to ``batch.ps``.

    ``gs`` are the gradients the step descends along (negated with ``maximize``).
    """
    params, ps = batch.params, batch.ps
    tested, untested = step.split(params)
    tested_ps = [ps[k] for k in tested]
    hyper = dict(delta=step.delta, wd_ratio=step.wd_ratio, eps=step.eps)
    if step.caution:  # the cautious variant (adampx.algorithm.caution)
        results = [cautious_project_(ps[k], gs[k], us[k], **hyper) for k in tested]
        for k in untested:
            mask_(us[k], gs[k])
    elif batched_projection_supported(tested_ps) and not tested_ps[0].is_complex():
        # sharded (FSDP2): all tensors at once, two collectives in all
        results = project_sharded_(
            tested_ps, [gs[k] for k in tested], [us[k] for k in tested], **hyper
        )
    else:
        results = [project_(ps[k], gs[k], us[k], **hyper) for k in tested]
    if step.decisions is not None:
        for k, (_, decision) in zip(tested, results, strict=True):
            step.decisions[params[k]] = decision
    if step.weight_decay == 0:
        return
    if untested:
        torch._foreach_mul_([ps[k] for k in untested], step.keep(1))
    if tested:
        factors = [step.keep(r) for r, _ in results]
        torch._foreach_mul_([ps[k] for k in tested], factors)  # type: ignore[arg-type]
