"""The cautious variants (``caution=True``): the update masked where it disagrees with the
gradient.

Cautious optimizers (Liang et al., 2024, arXiv:2411.16085) keep the elements of an update
``u`` that point the same way as the gradient ``g`` and renormalise by the fraction kept::

    m = [u ⊙ g > 0]                       (1 where the signs agree, else 0)
    u ← u ⊙ m / max(mean(m), 1e-3)        (the mean over the whole tensor)

On a tensor the scale-invariance test projects, the spherical variant compares ``u`` with
the tangential part of the gradient and projects again after masking, so that the masked
update stays tangent to the sphere::

    g⊥ = g − c_g·p                        (c_g: the projection's coefficient of g)
    m = [u ⊙ g⊥ > 0];  u ← u ⊙ m / max(mean(m), 1e-3)
    u ← u − c_u·p                         (the same view's projection of the masked u)

These are timm's ``caution=True`` for AdamP and SGDP (timm 1.0.31), number for number; on
tensors the test does not project, on 0-d/1-d tensors and with ``projection=False`` the
standard mask applies. ``g`` is the gradient the step descends along (negated with
``maximize``); a complex tensor is masked on its real view (real and imaginary parts each).
The weight decay, the moments and the test are not changed.

The mean runs over the whole tensor, which a shard of FSDP2 does not hold: a sharded param
is refused (:func:`check_unsharded`, when the optimizer is built and before a step changes
anything).
"""

from __future__ import annotations

from torch import Tensor

from adampx.algorithm.projection import (
    Decision,
    apply_projection_,
    outcome_of,
    row_statistics,
)

__all__ = ["MIN_KEPT", "REFUSAL", "cautious_project_", "check_unsharded", "mask_"]

MIN_KEPT = 1e-3
"""The floor of the kept fraction ``mean(m)`` that the mask is divided by."""

REFUSAL = "caution=True (the cautious mask runs in the eager math and in the cpu-kernel backend)"
"""What the backends without the mask say of a cautious step (torch's fused kernels, Triton):
its tensors take the C kernel on the CPU, else the eager math."""


def mask_(u: Tensor, g: Tensor) -> Tensor:
    """In place ``u ← u ⊙ m / max(mean(m), 1e-3)`` with ``m = [u ⊙ g > 0]``; returns ``u``."""
    mask = (u * g > 0).to(u.dtype)
    mask.div_(mask.mean().clamp_(min=MIN_KEPT))
    return u.mul_(mask)


def cautious_project_(
    p: Tensor, g: Tensor, u: Tensor, *, delta: float, wd_ratio: float, eps: float
) -> tuple[Tensor, Decision]:
    """:func:`adampx.algorithm.projection.project_` followed by the cautious mask: the
    spherical one where the test projects ``p``, the standard one where it does not.

    Returns ``(r, decision)`` as ``project_`` does.
    """
    stats = row_statistics(p, g)
    outcome = outcome_of(stats, delta, eps)
    outcome.project_(p, u)
    # g⊥: the coefficients are zero where the test does not project, so g⊥ is g there and
    # the second projection leaves u as it is: one path for both outcomes, no host sync
    g_perp = apply_projection_(p, g.clone(), outcome.coefficients(stats.gp))
    mask_(u, g_perp)
    outcome.project_(p, u)
    return outcome.result(p, u, delta=delta, wd_ratio=wd_ratio)


def check_unsharded(params: list[Tensor]) -> None:
    """Refuse FSDP2's sharded params (DTensors): the mask's mean needs the whole tensor."""
    for param in params:
        if hasattr(param, "to_local"):
            raise ValueError(
                "caution=True cannot step a sharded param (a DTensor of shape "
                f"{tuple(param.shape)}): the cautious mask is normalised by its mean over the "
                "whole tensor, which a shard does not hold; use caution=False under FSDP2"
            )
