"""How the optimizer math sees a parameter: dtypes, state layout, real views, grouping.

- float16 / bfloat16 params keep their optimizer state in float32 and the math runs in
  float32 (a float32 copy of the param is updated, then copied back);
- complex params run on their real view (``torch.view_as_real``), state included;
- every tensor the math writes keeps the param's memory layout (channels_last included).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

T = TypeVar("T")

HALF_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
)


def check_param(p: Tensor, optimizer: str) -> None:
    """Raise a clear error for a parameter or gradient the optimizer cannot handle."""
    grad = p.grad
    if grad is not None and grad.is_sparse:
        raise RuntimeError(
            f"{optimizer} does not support sparse gradients (param of shape "
            f"{tuple(p.shape)}); use a dense optimizer or torch.optim.SparseAdam for it"
        )
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{optimizer} supports params of dtype float16, bfloat16, float32, float64, "
            f"complex64 and complex128, got {p.dtype}"
        )


def state_dtype(p: Tensor) -> torch.dtype:
    """dtype of the optimizer state of ``p``: float32 for half types, else ``p.dtype``."""
    return torch.float32 if p.dtype in HALF_DTYPES else p.dtype


def zeros_state(p: Tensor) -> Tensor:
    """A zero state tensor for ``p`` (same shape and memory layout, state dtype)."""
    return torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)


def real(t: Tensor) -> Tensor:
    """The real view of a complex tensor; a real tensor unchanged."""
    return torch.view_as_real(t) if t.is_complex() else t


def compute_view(t: Tensor) -> Tensor:
    """The tensor the math runs on: float32 copy of a half tensor, real view of a complex one.

    For a half param the caller must copy the result back (see :func:`write_back_`).
    """
    if t.dtype in HALF_DTYPES:
        return t.to(torch.float32, memory_format=torch.preserve_format)
    return real(t)


def write_back_(param: Tensor, computed: Tensor) -> None:
    """Copy the updated compute view into ``param`` when it was a copy (half params)."""
    if param.dtype in HALF_DTYPES:
        param.copy_(computed)


def row_view(t: Tensor, n0: int) -> Tensor:
    """``[n0, N/n0]`` view of a dense tensor whose dim 0 is outermost in memory.

    Inside a row the elements are in memory order, the same for param, gradient and state
    when they share their strides, which is all that row sums and elementwise updates need.
    """
    return t.as_strided((n0, t.numel() // n0), (t.numel() // n0, 1))


def row_shape(t: Tensor) -> tuple[int, int]:
    """``(n0, N/n0)``: the rows of ``t`` (dim 0) and their length, as :func:`row_view` cuts."""
    return t.shape[0], t.numel() // t.shape[0]


def flat_view(t: Tensor) -> Tensor:
    """A dense tensor whose dim 0 is outermost in memory, as a 1-d view in memory order."""
    return t.as_strided((t.numel(),), (1,))


def group_by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[str, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order."""
    groups: dict[tuple[str, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        # is_cpu is an attribute; t.device builds a device object (a few hundred ns, per
        # tensor and step)
        groups[("cpu" if t.is_cpu else str(t.device), t.dtype)].append(i)
    return groups


def replicated(t: Tensor) -> Tensor:
    """A plain tensor from a (possibly sharded) DTensor: its full value on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_rows(param: Tensor) -> tuple[int, int]:
    """First global row and row count of this rank's shard of a DTensor ``param``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
    )
    return offset[0], shape[0]


def like_param(t: Tensor, param: Tensor) -> Tensor:
    """``t`` (a plain tensor) made usable beside ``param``: a replicated DTensor for a DTensor."""
    if not hasattr(param, "device_mesh"):
        return t
    from torch.distributed.tensor import DTensor, Replicate

    mesh = param.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def step_tensor(p: Tensor, value: float = 0.0) -> Tensor:
    """The per-param step counter: a 0-d float32 tensor on the param's device.

    Kept on the device so that bias corrections never read a value back to the host.
    """
    return torch.full((), value, dtype=torch.float32, device=p.device)


class Workspace:
    """Scratch buffers that an optimizer keeps between steps.

    The CPU kernels need a few buffers as large as the largest tensor. Allocated afresh at
    every step, memory of that size comes from the operating system each time and is
    touched page by page (measured: the AdamP step on ResNet-50 shapes ran 2.6x slower, with
    the page faults of a 9 MiB buffer, once the allocator had started to return such blocks
    to the system). A :class:`Workspace` keeps the largest buffer asked for under each
    name (its size depends on the step: the largest tensor or the largest bucket of tensors,
    per name), for the optimizer's life.
    The contents are scratch: every user writes before it reads.

    It also keeps small constants that a step derives from the params' shapes (index and
    threshold tensors on the device, so that they are copied to the device once, not at
    every step: a copy from the host inside a captured CUDA graph would fail; the CPU
    kernels' diagonal patterns for their row dot products).
    """

    # The most recent constants kept. A CUDA step uses one set of index tensors per bucket
    # and one for all buckets (up to about ten per dtype and param group); a CPU step one
    # diagonal pattern per distinct row count of its tested tensors and of AdamP's row
    # blocks (about 30 on ResNet-50). So this bound only drops what the recent steps no
    # longer use (params that got no gradient, say); past it, a step rebuilds what it needs.
    CONSTANTS = 256

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, str], Tensor] = {}
        self._constants: dict[Hashable, Any] = {}
        # replaced device buffers stay alive: a CUDA graph captured earlier may still use them
        self._retired: list[Tensor] = []

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer of ``numel`` elements (a view of the kept one)."""
        key = (name, dtype, str(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            if buffer is not None and buffer.device.type != "cpu":
                self._retired.append(buffer)
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]

    def constant(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``, made once per ``key`` and kept (the most recent :data:`CONSTANTS`)."""
        if key in self._constants:
            self._constants[key] = self._constants.pop(key)  # now the most recent
        else:
            self._constants[key] = build()
            while len(self._constants) > self.CONSTANTS:
                del self._constants[next(iter(self._constants))]
        return cast(T, self._constants[key])


def scratch(
    workspace: Workspace | None, name: str, numel: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A buffer from ``workspace``, or a fresh one without (functional calls)."""
    if workspace is None:
        return torch.empty(numel, dtype=dtype, device=device)
    return workspace.get(name, numel, dtype, device)
