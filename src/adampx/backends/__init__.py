"""The implementations of the step, and the two public controls over them.

Every backend is one module (or package) with the same five names:

- ``NAME``: its stable name;
- ``runs_here()``: whether it can run on this machine (it builds nothing to find out);
- ``supports(step)``: why it cannot run a group's options (None if it can);
- ``takes(param, p, g, states, counter)``: why it cannot step one tensor (None if it can);
- ``step_(step, batch, workspace)``: AdamP's or SGDP's step of a batch of tensors of one
  device and dtype, in place.

Which backend steps which tensor is decided in one place, :mod:`adampx.backends.plan`.

=============  ==========================================================================
``eager``      the math of :mod:`adampx.algorithm.update`, one tensor at a time; any
               tensor, any device, ``torch.compile``
``foreach``    the same math on all tensors at once (``torch._foreach_*``); FSDP2's
               sharded params test all tensors with two collectives
``cpu``        the CPU default: torch's fused AdamW/SGD kernels plus the projection, small
               tensors in chunks, larger ones each finished in cache
``cpu-kernel`` ``fused=True``: one C kernel per group, built by the system compiler
``triton``     CUDA's default where Triton is installed: five Triton kernels per group,
               the tensors reached in place (on CPU tensors in Triton's interpreter with
               ``TRITON_INTERPRET=1``)
=============  ==========================================================================

:func:`available` lists the backends that can run here; :func:`force` makes every step in
its scope take one backend, for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType

from adampx.backends import cpu, cpu_kernel, eager, foreach, triton

__all__ = ["NAMES", "available", "force", "forced", "get"]

_BACKENDS: dict[str, ModuleType] = {m.NAME: m for m in (eager, foreach, cpu, cpu_kernel, triton)}

NAMES: tuple[str, ...] = tuple(_BACKENDS)
"""The names of all the backends (:func:`available` lists those that can run here)."""

_FORCED: ContextVar[ModuleType | None] = ContextVar("adampx_forced_backend", default=None)


def get(name: str) -> ModuleType:
    """The backend module called ``name``; ``ValueError`` for an unknown name."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown adampx backend {name!r}; the backends are {', '.join(NAMES)}"
        ) from None


def available() -> list[str]:
    """The names of the backends that can run on this machine, in :data:`NAMES` order.

    Nothing is built or run to find out: ``cpu-kernel`` is listed when a C compiler
    (``$CC``, else ``cc``) is on the path; a compiler that then fails to build raises
    :class:`~adampx.backends.cpu_kernel.KernelBuildError` at the first step that needs it.
    ``triton`` is listed where Triton is importable and a CUDA device is present (or
    Triton's interpreter is on, ``TRITON_INTERPRET=1``).
    """
    return [name for name, backend in _BACKENDS.items() if backend.runs_here()]


@contextmanager
def force(name: str) -> Iterator[None]:
    """Make every AdamP / SGDP step inside the ``with`` block take backend ``name``.

    For tests and benchmarks. A step with a tensor the backend cannot take (or options it
    does not run) raises ``ValueError`` saying why, instead of choosing another backend.
    Blocks nest (the innermost wins, the outer one is back on exit); the setting is per
    thread (and per ``asyncio`` task: a :class:`contextvars.ContextVar`). A step that
    ``torch.compile`` traces always runs the eager math (``eager`` or ``foreach``, as the
    ``foreach`` flag chooses): torch's fused kernels and the C kernel cannot be traced, so
    ``force`` does not apply there.

    Raises:
        ValueError: ``name`` is not a backend, or it cannot run on this machine.
    """
    backend = get(name)
    if not backend.runs_here():
        raise ValueError(
            f"adampx backend {name!r} cannot run here; available: {', '.join(available())}"
        )
    token = _FORCED.set(backend)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced() -> ModuleType | None:
    """The backend that :func:`force` imposes here, or None."""
    return _FORCED.get()
