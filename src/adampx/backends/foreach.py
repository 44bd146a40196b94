"""The ``foreach`` backend: the math of :mod:`adampx.algorithm.update` on all tensors at
once, in ``torch._foreach_*`` operations (fewer kernel launches on accelerators).

Runs anywhere torch runs, and under ``torch.compile``. FSDP2's sharded params (DTensors on a
1-D mesh) are tested together with two collectives per step in all
(:mod:`adampx.algorithm.sharded`), which is why the routing gives them this backend.
"""

from __future__ import annotations

from torch import Tensor

from adampx.algorithm import update
from adampx.algorithm.spec import Step
from adampx.util.tensors import Batch
from adampx.util.workspace import Workspace

__all__ = ["NAME", "runs_here", "step_", "supports", "takes"]

NAME = "foreach"


def runs_here() -> bool:
    return True


def supports(step: Step) -> str | None:
    return None


def takes(
    param: Tensor, p: Tensor, g: Tensor, states: list[Tensor], counter: Tensor | None
) -> str | None:
    return None


def step_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP's or SGDP's step of ``batch`` (tensors of one device and dtype)."""
    (update.adamp_ if step.optimizer == "adamp" else update.sgdp_)(step, batch)
