"""The tail of the step that AdamP and SGDP share: test-and-project, then weight decay.

Given the update direction ``u`` of each tensor, this removes its radial part where the
scale-invariance test passes (``adampx.projection``) and applies decoupled weight decay
``p ← p · (1 − a·r)``, where ``a`` is the optimizer's decay amount (``lr·λ`` for AdamP,
``lr·λ/(1−μ)`` for SGDP) and ``r`` is ``wd_ratio`` for projected tensors, else 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adampx.projection import Decision, is_projectable, project_
from adampx.sharded import batched_projection_supported, project_sharded_

# Where a caller wants them (optimizer statistics), the decisions of the scale-invariance test,
# keyed by the parameter as the user holds it.
Decisions = dict[Tensor, Decision]


def project_and_decay_(
    param: Tensor,
    p: Tensor,
    g: Tensor,
    u: Tensor,
    *,
    projection: bool,
    delta: float,
    wd_ratio: float,
    eps: float,
    decay: float | Tensor,
    weight_decay: float,
    decisions: Decisions | None = None,
) -> None:
    """One tensor: project ``u`` in place if ``param`` is tested, then decay ``p`` in place.

    Args:
        param: the parameter as the user holds it (its shape decides whether it is tested).
        p, g, u: its compute views: weight, raw gradient, update direction.
        projection: the group's switch; False never projects.
        delta, wd_ratio, eps: as in ALGORITHM.md.
        decay: the decay amount ``a`` (float or 0-d tensor).
        weight_decay: the group's ``λ``; zero skips the decay.
        decisions: if given, receives the test's :class:`Decision` under ``param``.
    """
    if projection and is_projectable(param):
        r, decision = project_(p, g, u, delta=delta, wd_ratio=wd_ratio, eps=eps)
        if decisions is not None:
            decisions[param] = decision
        if weight_decay != 0:
            p.mul_(1 - decay * r)
    elif weight_decay != 0:
        p.mul_(1 - decay)


def foreach_project_and_decay_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    us: Sequence[Tensor],
    *,
    projection: bool,
    delta: float,
    wd_ratio: float,
    eps: float,
    decay: float | Tensor,
    weight_decay: float,
    decisions: Decisions | None = None,
) -> None:
    """:func:`project_and_decay_` for lists of tensors of one device and dtype."""
    tested = [k for k, param in enumerate(params) if projection and is_projectable(param)]
    tested_ps = [ps[k] for k in tested]
    if batched_projection_supported(tested_ps) and not tested_ps[0].is_complex():
        # sharded (FSDP2): all tensors at once, two collectives in all
        results = project_sharded_(
            tested_ps, [gs[k] for k in tested], [us[k] for k in tested],
            delta=delta, wd_ratio=wd_ratio, eps=eps,
        )  # fmt: skip
    else:
        results = [
            project_(ps[k], gs[k], us[k], delta=delta, wd_ratio=wd_ratio, eps=eps) for k in tested
        ]
    ratios = [r for r, _ in results]
    if decisions is not None:
        for k, (_, decision) in zip(tested, results, strict=True):
            decisions[params[k]] = decision
    if weight_decay == 0:
        return
    untested = sorted(set(range(len(ps))) - set(tested))
    if untested:
        torch._foreach_mul_([ps[k] for k in untested], 1 - decay)
    if tested:
        factors = torch._foreach_mul(ratios, -decay)
        torch._foreach_add_(factors, 1)
        torch._foreach_mul_([ps[k] for k in tested], factors)


def sgdp_direction_dots(
    pb: Tensor, gp: Tensor, *, momentum: float, dampening: float, nesterov: bool, maximize: bool
) -> Tensor:
    """SGDP's ``p·d`` (per row, or summed) from ``p·b`` (``b`` the momentum before the step;
    overwritten) and ``p·g``, by linearity, without touching ``d``: ``p·b_new = μ·(p·b) +
    (1−τ)·(p·g)``, and with nesterov ``p·d = p·g + μ·(p·b_new)``, ``g`` being the gradient
    the step descends along (negated with ``maximize``). The row-sum steps (the CPU default
    path, its small tensors, the CUDA flat step) use it to project before the fused SGD
    kernel computes ``d``."""
    if maximize:
        gp = -gp
    d = pb.mul_(momentum).add_(gp, alpha=1 - dampening)
    return torch.add(gp, d, alpha=momentum) if nesterov else d
