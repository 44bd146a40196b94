"""Param groups for AdamP / SGDP (and any torch optimizer): the usual recipe, made explicit.

- biases and normalization gains (0-d and 1-d tensors) go to a group with
  ``weight_decay = 0`` (they are never projected anyway);
- with a report of :func:`adampx.inspect`, weights that the probe found *not* scale
  invariant go to a group with ``projection = False`` (they get plain AdamW / SGD updates);
- every other weight goes to a group with no options of its own, so it takes the optimizer's
  defaults.

Nothing else is set: learning rates, betas and the weight decay of the main group stay
the user's. Groups hold ``(name, tensor)`` pairs, so the optimizer keeps the names in its
state dict; empty groups are left out; parameters with ``requires_grad=False`` are skipped.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from adampx.tools.inspection import Report

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    *,
    report: Report | None = None,
    decay_1d: bool = False,
    projected: bool = False,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer param groups.

    Args:
        model: the model.
        report: optional result of ``adampx.inspect(model, ...)``; weights it finds with
            ``invariance == "none"`` get ``projection=False`` (all-zero weights, which the
            probe cannot measure, keep the projection).
        decay_1d: keep weight decay on 0-d/1-d tensors (default False: no decay there).
        projected: groups for an optimizer that :class:`adampx.Projected` wraps: the keys
            are ``projected`` and ``projected_weight_decay`` (the wrapper's), not
            ``projection`` and ``weight_decay`` (the wrapped optimizer's, which must not
            decay).

    Returns:
        A list of param-group dicts for ``AdamP(groups, lr=..., weight_decay=...)``, or,
        with ``projected=True``, for ``Projected(AdamW(groups, ..., weight_decay=0), ...)``.
    """
    not_invariant = set()
    if report is not None:
        known = {r.name for r in report}
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if not names <= known:
            missing = sorted(names - known)[:5]
            raise ValueError(f"the report does not cover these parameters of the model: {missing}")
        # "none" as measured; an all-zero tensor (noted, not probed) keeps the projection
        not_invariant = {r.name for r in report if r.invariance == "none" and not r.note}
    weights, plain, small = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() <= 1:
            small.append((name, p))
        elif name in not_invariant:
            plain.append((name, p))
        else:
            weights.append((name, p))
    projection_key, decay_key = (
        ("projected", "projected_weight_decay") if projected else ("projection", "weight_decay")
    )
    groups: list[dict[str, Any]] = [
        {"params": weights},
        {"params": plain, projection_key: False},
        {"params": small} if decay_1d else {"params": small, decay_key: 0.0},
    ]
    return [g for g in groups if g["params"]]
