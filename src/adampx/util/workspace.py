"""Scratch buffers and derived constants that an optimizer keeps between steps."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

T = TypeVar("T")


class Workspace:
    """Scratch buffers that an optimizer keeps between steps.

    The CPU kernels need a few buffers as large as the largest tensor. Allocated afresh at
    every step, memory of that size comes from the operating system each time and is
    touched page by page, a page fault at a time, once the allocator returns such blocks to
    the system. A :class:`Workspace` keeps the largest buffer asked for under each
    name (its size depends on the step: the largest tensor or the largest chunk of tensors,
    per name), for the optimizer's life.
    The contents are scratch: every user writes before it reads.

    It also keeps small constants that a step derives from the params' shapes (index and
    threshold tensors on the device, so that they are copied to the device once, not at
    every step: a copy from the host inside a captured CUDA graph would fail; the CPU
    kernels' diagonal patterns for their row dot products).
    """

    # The most recent constants kept. A CUDA step uses two small tables per device, dtype
    # and param group (the ``triton`` backend's layout and addresses); a CPU step two per
    # chunk of small tensors (its row sums and index tensors) and one diagonal pattern per
    # distinct row count of its tested tensors and of AdamP's row blocks (about 30 on
    # ResNet-50). So this bound only drops what the recent steps no longer use (params that
    # got no gradient, say); past it, a step rebuilds what it needs.
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
