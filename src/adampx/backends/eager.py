"""The ``eager`` backend: the math of :mod:`adampx.algorithm.update`, one tensor at a time.

Runs anywhere torch runs: tensor subclasses (DTensors on any mesh), any layout, any device,
and under ``torch.compile``. Memory: one tensor's temporaries at a time.
"""

from __future__ import annotations

from torch import Tensor

from adampx.algorithm import update
from adampx.algorithm.spec import Step
from adampx.util.tensors import Batch
from adampx.util.workspace import Workspace

__all__ = ["NAME", "runs_here", "step_", "supports", "takes"]

NAME = "eager"


def runs_here() -> bool:
    return True


def supports(step: Step) -> str | None:
    return None


def takes(
    param: Tensor, p: Tensor, g: Tensor, states: list[Tensor], counter: Tensor | None
) -> str | None:
    return None


def step_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP's or SGDP's step of ``batch``, tensor by tensor."""
    apply = update.adamp_ if step.optimizer == "adamp" else update.sgdp_
    for k in range(len(batch.params)):
        apply(step, batch.select([k]))
