"""The ``triton`` backend's step as a ``torch.library`` custom op, for ``torch.compile``.

``torch.compile`` cannot trace a Triton launch that reads tensors through their addresses,
so while it traces a step, :func:`adampx.backends.triton.step_` calls
``torch.ops.adampx.triton_step`` instead of launching: the compiled graph calls the op as
it is, and its fake implementation tells the compiler what it returns (the test's
``mode`` and statistics, as :func:`adampx.backends.triton.launch` does) and that it writes
the params, gradients and state in place. The tables the kernels read are kept in this
module's workspace (the op has no optimizer to keep them in).

(No ``from __future__ import annotations`` here: ``custom_op`` reads the annotations as
types to make the op's schema.)
"""

from typing import Optional

import torch
from torch import Tensor

from adampx.util.workspace import Workspace

__all__ = ["triton_step"]

_WORKSPACE = Workspace()


@torch.library.custom_op("adampx::triton_step", mutates_args=("ps", "gs", "first", "second"))
def triton_step(
    ps: list[Tensor],
    gs: list[Tensor],
    first: list[Tensor],
    second: list[Tensor],
    steps: list[Tensor],
    tested: list[int],
    scalars: list[float],
    flags: list[bool],
    lr_t: Optional[Tensor],  # noqa: UP045 (the schema is read from these annotations)
    decay_t: Optional[Tensor],  # noqa: UP045
    grad_scale: Optional[Tensor],  # noqa: UP045
    found_inf: Optional[Tensor],  # noqa: UP045
) -> tuple[Tensor, Tensor]:
    """One step's launches (:func:`adampx.backends.triton.launch`): ``scalars`` are a
    :class:`~adampx.backends.triton.Scalars` as a list, ``flags`` ``[adam, nesterov]``."""
    from adampx.backends import triton

    adam, nesterov = flags
    return triton.launch(
        triton._Arrays(ps, gs, first, second, steps), tested, triton.Scalars(*scalars), adam,
        nesterov, lr_t, decay_t, grad_scale, found_inf, _WORKSPACE,
    )  # fmt: skip


@triton_step.register_fake
def _(ps: list[Tensor], gs: list[Tensor], *rest: object) -> tuple[Tensor, Tensor]:
    """What :func:`triton_step` returns: ``mode`` and the statistics, per tested tensor."""
    tested = rest[3]
    assert isinstance(tested, list)
    like = ps[0]
    n = max(len(tested), 1)
    return torch.empty(n, dtype=torch.int32, device=like.device), like.new_empty(4, n)
