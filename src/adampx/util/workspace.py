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

    # Constants are kept while recent steps use them, whatever their number, and beyond
    # this bound the least recently used ones that the last two steps did not use are
    # dropped (params that got no gradient, shapes that changed). A CUDA step uses two
    # small tables per device, dtype and param group (the ``triton`` backend's layout and
    # addresses); a CPU step two per chunk of small tensors and one diagonal pattern per
    # distinct row count (about 30 on ResNet-50). Without steps (a functional call's own
    # workspace, never told of a step) the bound is a plain LRU bound.
    CONSTANTS = 256

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, str], Tensor] = {}
        self._constants: dict[Hashable, Any] = {}
        self._used: dict[Hashable, int] = {}  # the step each constant was last used in
        self._step = 0
        # replaced or dropped device tensors stay alive: a CUDA graph captured earlier may
        # still use them
        self._retired: list[Tensor] = []

    def start_step(self) -> None:
        """Mark the start of an optimizer step (constants used in this step or the last one
        are never dropped)."""
        self._step += 1

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
        """``build()``, made once per ``key`` and kept while in use (see :data:`CONSTANTS`)."""
        if key in self._constants:
            self._constants[key] = self._constants.pop(key)  # now the most recent
        else:
            self._constants[key] = build()
        self._used[key] = self._step
        while len(self._constants) > self.CONSTANTS:
            oldest = next(iter(self._constants))
            if self._step and self._used[oldest] >= self._step - 1:
                break  # in use: the working set is larger than the bound
            dropped = self._constants.pop(oldest)
            del self._used[oldest]
            values = dropped if isinstance(dropped, tuple) else (dropped,)
            self._retired += [t for t in values if isinstance(t, Tensor) and not t.is_cpu]
        return cast(T, self._constants[key])


def scratch(
    workspace: Workspace | None, name: str, numel: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A buffer from ``workspace``, or a fresh one without (functional calls)."""
    if workspace is None:
        return torch.empty(numel, dtype=dtype, device=device)
    return workspace.get(name, numel, dtype, device)
