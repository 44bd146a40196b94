"""The ``cpu`` backend: the default on the CPU, built on torch's own fused optimizer kernels.

No compile step. Untested tensors (biases, norm gains) take one ``torch._fused_adamw_``
(AdamW) or ``torch._fused_sgd_`` call together. Tested tensors of up to
:data:`adampx.backends.cpu.small.SMALL_ELEMENTS` elements, whose cost is the number of
operations rather than their bytes, are tested and stepped together in chunks
(:mod:`.small`); larger ones one at a time, each finished while it is in cache
(:mod:`.large`).

Takes plain CPU tensors whose compute views are float32/float64 and share one dense layout
with their gradient and state (contiguous, or channels_last for all of them); AdamP without
nesterov and SGDP with momentum (torch's fused kernels have no Nesterov Adam, and SGD
without momentum keeps no buffer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adampx.algorithm.spec import Step
from adampx.backends.cpu import large, small
from adampx.backends.torch_kernels import adamw_untested_, sgd_, supports
from adampx.util.tensors import Batch, layout_refusal
from adampx.util.workspace import Workspace

__all__ = ["NAME", "runs_here", "step_", "supports", "takes"]

NAME = "cpu"


def runs_here() -> bool:
    """torch's fused AdamW and SGD kernels for the CPU are part of every supported torch."""
    return True


def takes(
    param: Tensor, p: Tensor, g: Tensor, states: list[Tensor], counter: Tensor | None
) -> str | None:
    """Why this backend cannot step ``param`` (None if it can)."""
    if not p.is_cpu:
        return f"it runs on the CPU, the param is on {p.device.type}"
    return layout_refusal(param, p, g, states)


def step_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP's or SGDP's step of ``batch`` (CPU tensors of one dtype), in place."""
    tested, untested = step.split(batch.params)
    chunks, larger = small.split_small(batch.ps, tested)
    if step.optimizer == "adamp":
        torch._foreach_add_(batch.steps, 1)
        adamw_untested_(step, batch, untested)
        for chunk in chunks:
            small.adamp_step_(step, batch, chunk, workspace)
        if larger:
            large.adamp_(step, batch, larger, workspace)
        return
    (momentum_buffers,) = batch.states
    if untested and step.weight_decay != 0:
        torch._foreach_mul_([batch.ps[k] for k in untested], step.keep(1, step.decay_value()))
    for chunk in chunks:
        small.sgdp_rescale_(step, batch, chunk, workspace)
        sgd_(step, *([x[k] for k in chunk] for x in (batch.ps, batch.gs, momentum_buffers)))
    if larger:
        large.sgdp_(step, batch, larger, workspace)
    if untested:
        sgd_(step, *([x[k] for k in untested] for x in (batch.ps, batch.gs, momentum_buffers)))
