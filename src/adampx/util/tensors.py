"""How the optimizer math sees a parameter: dtypes, state layout, real views, grouping.

- float16 / bfloat16 params keep their optimizer state in float32 and the math runs in
  float32 (a float32 copy of the param is updated, then copied back);
- complex params run on their real view (``torch.view_as_real``), state included;
- every tensor the math writes keeps the param's memory layout (channels_last included).
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import Tensor

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


KERNEL_DTYPES = (torch.float32, torch.float64)


def dense_layout(param: Tensor, p: Tensor, g: Tensor, *states: Tensor) -> bool:
    """Whether ``param`` (compute views ``p``, ``g``, ``states``) suits the backends that
    step raw memory (torch's fused kernels, the C kernel): a plain tensor with float32 or
    float64 compute views, non-empty, and one dense layout (contiguous or channels_last)
    for all of them: the same strides, but on dims of size 1."""
    if type(param) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
        return False
    dtype = p.dtype
    if dtype not in KERNEL_DTYPES or p.numel() == 0:
        return False
    if p.is_contiguous():  # the common case: tensors of one shape, all contiguous
        for t in (g, *states):
            if not t.is_contiguous() or t.dtype != dtype:
                break
        else:
            return True
    elif not p.is_contiguous(memory_format=torch.channels_last):
        return False
    stride = p.stride()
    for t in (g, *states):
        if t.dtype != dtype or (t.stride() != stride and not _same_strides(t, p)):
            return False
    return True


def layout_refusal(param: Tensor, p: Tensor, g: Tensor, states: list[Tensor]) -> str | None:
    """Why ``param`` does not suit the backends that step raw memory (see
    :func:`dense_layout`), or None."""
    if dense_layout(param, p, g, *states):
        return None
    return (
        "it steps plain float32/float64 tensors (or half ones through float32 copies) that "
        "share one dense layout with their gradient and state"
    )


def _same_strides(t: Tensor, p: Tensor) -> bool:
    """Same element order in memory: equal strides except on dims of size 1 (a 1x1 conv
    weight is both contiguous and channels_last, and its gradient may carry either)."""
    return t.stride() == p.stride() or all(
        a == b or n == 1 for a, b, n in zip(t.stride(), p.stride(), p.shape, strict=True)
    )


def row_view(t: Tensor, n0: int) -> Tensor:
    """``[n0, N/n0]`` view of a dense tensor whose dim 0 is outermost in memory.

    Inside a row the elements are in memory order, the same for param, gradient and state
    when they share their strides, which is all that row sums and elementwise updates need.
    """
    return t.as_strided((n0, t.numel() // n0), (t.numel() // n0, 1))


def row_shape(t: Tensor) -> tuple[int, int]:
    """``(n0, N/n0)``: the rows of ``t`` (dim 0) and their length, as :func:`row_view` cuts."""
    return t.shape[0], t.numel() // t.shape[0]


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


class Batch(NamedTuple):
    """The tensors of one backend call, aligned by index.

    ``params`` are the parameters as the user holds them (their shapes decide which are
    tested; they key the decisions); the rest are compute views (:func:`compute_view`,
    :func:`real`): ``ps`` the weights, ``gs`` the gradients, ``states`` one list per state
    tensor of the optimizer (AdamP: ``exp_avg``, ``exp_avg_sq``; SGDP: ``momentum``), and
    ``steps`` AdamP's step counters (empty for SGDP).
    """

    params: list[Tensor]
    ps: list[Tensor]
    gs: list[Tensor]
    states: list[list[Tensor]]
    steps: list[Tensor]

    def select(self, indices: list[int]) -> Batch:
        """The batch of the tensors at ``indices``."""
        steps = [self.steps[k] for k in indices] if self.steps else []
        return Batch(
            [self.params[k] for k in indices],
            [self.ps[k] for k in indices],
            [self.gs[k] for k in indices],
            [[state[k] for k in indices] for state in self.states],
            steps,
        )
