"""torch's own fused optimizer kernels, as the ``cpu`` backend calls them.

Not a backend: the steps that :mod:`adampx.backends.cpu` (its small and its large tested
tensors) builds on.

- Untested tensors (and every tensor where the test does not project) take AdamW's or SGD's
  step as it is: ``torch._fused_adamw_`` / ``torch._fused_sgd_``.
- A projected AdamP tensor runs ``torch._fused_adamw_`` without weight decay on a zeroed
  scratch ``w`` as its "param": that updates ``m`` and ``v`` and leaves Adam's step
  ``w = −(lr/bc1)·u`` there (:func:`adam_step_into_`); the projected step is then
  ``p ← w + p·(keep − c)`` with ``c = p·w / (‖p‖ + eps)²`` per row or for the whole tensor
  (:func:`add_step_`), ``docs/algorithm.md``'s ``p·(1 − a·r) − (lr/bc1)·(u − c'·p)``
  rearranged.
- SGDP's projected tensors are rescaled by ``keep + lr·c`` first (the direction's row dots
  follow by linearity, :meth:`adampx.algorithm.spec.Step.direction_dots`), then take the
  plain SGD step (:func:`sgd_`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adampx.algorithm import caution
from adampx.algorithm.spec import Step
from adampx.util.tensors import Batch


def _adam_options(step: Step) -> dict[str, Any]:
    return dict(
        beta1=step.beta1, beta2=step.beta2, eps=step.eps, amsgrad=False, maximize=step.maximize
    )  # fmt: skip


def adamw_untested_(step: Step, batch: Batch, untested: list[int]) -> None:
    """AdamW's step (AdamP where the test does not apply) of the tensors ``untested``, their
    step counters already incremented."""
    if not untested:
        return
    exp_avgs, exp_avg_sqs = batch.states
    torch._fused_adamw_(
        [batch.ps[k] for k in untested],
        [batch.gs[k] for k in untested],
        [exp_avgs[k] for k in untested],
        [exp_avg_sqs[k] for k in untested],
        [],
        [batch.steps[k] for k in untested],
        lr=step.lr,
        weight_decay=step.weight_decay,
        **_adam_options(step),
    )


def adam_step_into_(
    step: Step,
    ws: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
) -> None:
    """``w ← −(lr/bc1)·u`` into scratch tensors ``ws`` that the caller zeroed, and ``m``,
    ``v`` updated (step counters already incremented)."""
    torch._fused_adamw_(
        ws, gs, exp_avgs, exp_avg_sqs, [], steps, lr=step.lr, weight_decay=0.0,
        **_adam_options(step),
    )  # fmt: skip


def add_step_(p: Tensor, w: Tensor, factor: Tensor) -> None:
    """``p ← w + p·factor`` in one pass (``factor`` per row as a column, or 0-d)."""
    torch.addcmul(w, p, factor, out=p)


def sgd_(step: Step, ps: list[Tensor], gs: list[Tensor], bs: list[Tensor]) -> None:
    """``b ← μ·b + (1−τ)·g; p ← p − lr·d`` in torch's fused SGD kernel (b starts at zero, so
    its first step is not special)."""
    torch._fused_sgd_(
        ps, gs, bs, weight_decay=0.0, momentum=step.momentum, lr=step.lr,
        dampening=step.dampening, nesterov=step.nesterov, maximize=step.maximize,
        is_first_step=False,
    )  # fmt: skip


def supports(step: Step) -> str | None:
    """Why torch's fused kernels cannot run ``step`` (None if they can): they have no
    Nesterov variant of Adam and no cautious mask, and SGD without momentum keeps no
    buffer."""
    if step.caution:
        return caution.REFUSAL
    if step.optimizer == "adamp" and step.nesterov:
        return "AdamP with nesterov=True"
    if step.optimizer == "sgdp" and step.momentum == 0:
        return "SGDP with momentum=0"
    return None
