"""The routing rule: which backend steps which tensor of a param group.

:func:`run` is what the functional :func:`adampx.adamp` / :func:`adampx.sgdp` call: it
makes the compute views of a group's tensors (float32 copies of half params, real views of
complex ones), asks :func:`route` for each tensor's backend, calls each backend once per
device and dtype, and copies half params back.

The rule (:func:`chain`): each tensor goes to the first backend of a chain that runs the
group's options (``supports``) and takes the tensor (``takes``), else to the eager math
(:func:`eager_math`):

=============================  ===========================================================
while ``torch.compile`` traces the eager math: ``foreach`` or ``eager`` (torch's fused
                               kernels and the C kernel cannot be traced)
inside ``backends.force(n)``   ``n`` alone; a tensor it cannot take is an error
``fused=True``                 ``cpu-kernel`` (a non-CPU tensor is an error), then the eager
                               math
otherwise                      ``cpu``; for options torch's fused kernels lack (AdamP's
                               nesterov, SGDP without momentum, caution) ``cpu-kernel``
                               where a CPU tensor is stepped, ``fused`` is None and the
                               kernel builds; ``flat`` (not with ``foreach=False`` or
                               without a workspace); then the eager math
=============================  ===========================================================

The eager math is ``foreach`` where the ``foreach`` flag says so or, for ``foreach=None``,
on accelerators and for FSDP2's sharded params; ``eager`` otherwise (as torch chooses).
A new backend is a module in this package and one entry in :func:`chain`.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from adampx import backends
from adampx.algorithm.caution import check_unsharded
from adampx.algorithm.sharded import batched_projection_supported
from adampx.algorithm.spec import Step
from adampx.backends import cpu, cpu_kernel, eager, flat, foreach
from adampx.util.tensors import Batch, compute_view, group_by_device_and_dtype, real, write_back_
from adampx.util.workspace import Workspace

__all__ = ["chain", "default_foreach", "eager_math", "route", "run"]


def default_foreach(params: list[Tensor]) -> bool:
    """The eager math chosen for ``foreach=None``, as torch chooses.

    Multi-tensor on accelerators (CUDA, XPU), where it saves kernel launches; per-tensor on
    the CPU, where torch's foreach kernels are per-tensor loops and the extra temporaries
    make the multi-tensor math slower. FSDP2's sharded params (DTensors on a 1-D mesh) get
    the multi-tensor math, which gathers the row statistics of all tensors in two
    collectives; other tensor subclasses get the per-tensor math.
    """
    if batched_projection_supported(params):
        return True
    return all(
        type(p) in (Tensor, torch.nn.Parameter) and p.device.type in ("cuda", "xpu") for p in params
    )


def chain(
    step: Step,
    *,
    foreach_flag: bool | None,
    fused: bool | None,
    workspace: Workspace | None,
    tensors: list[Tensor] | None = None,
) -> tuple[list[ModuleType], bool]:
    """The backends to try for a group's tensors, in order, before the eager math (see
    :func:`eager_math`), and whether the first one is imposed (no tensor may fall through).

    ``tensors``: the group's compute views; the C kernel is built for the options that
    torch's fused kernels lack only where one of them is on the CPU (None: assume one is)."""
    if torch.compiler.is_compiling():
        return [], False
    imposed = backends.forced()
    if imposed is not None:
        return [imposed], True
    if fused:
        return [cpu_kernel], False
    tried = [cpu]
    refused = fused is None and cpu.supports(step) is not None
    if refused and (tensors is None or any(t.is_cpu for t in tensors)):
        # AdamP's nesterov, SGDP without momentum, caution: in the C kernel where it builds
        if cpu_kernel.supports(step) is None and cpu_kernel.ready():
            tried.append(cpu_kernel)
    if foreach_flag is not False and workspace is not None:
        tried.append(flat)
    return tried, False


def eager_math(foreach_flag: bool | None, params: list[Tensor]) -> ModuleType:
    """The backend for the tensors no backend of the chain takes: ``foreach`` where the flag
    says so (for None, :func:`default_foreach`), else ``eager``."""
    use_foreach = foreach_flag if foreach_flag is not None else default_foreach(params)
    return foreach if use_foreach else eager


def route(
    step: Step,
    batch: Batch,
    *,
    foreach_flag: bool | None,
    fused: bool | None,
    workspace: Workspace | None,
) -> list[tuple[ModuleType, list[int]]]:
    """Which backend steps which tensors of ``batch``: ``(backend, indices)`` pairs."""
    candidates, imposed = chain(
        step, foreach_flag=foreach_flag, fused=fused, workspace=workspace, tensors=batch.ps
    )
    usable = []
    for backend in candidates:
        reason = backend.supports(step)
        if reason is None:
            usable.append(backend)
        elif imposed:
            raise ValueError(f"adampx backend {backend.NAME!r} cannot run {reason}")
    chosen: dict[str, list[int]] = {}
    rest: list[int] = []
    counters: list[Tensor | None] = list(batch.steps) or [None] * len(batch.params)
    for k, (param, p, g, counter) in enumerate(
        zip(batch.params, batch.ps, batch.gs, counters, strict=True)
    ):
        states = [state[k] for state in batch.states]
        for backend in usable:
            reason = backend.takes(param, p, g, states, counter)
            if reason is None:
                chosen.setdefault(backend.NAME, []).append(k)
                break
            if imposed or (fused and backend is cpu_kernel and not p.is_cpu):
                raise ValueError(
                    f"adampx backend {backend.NAME!r} cannot step a param of shape "
                    f"{tuple(param.shape)}, dtype {param.dtype}, on {param.device}: {reason}"
                    + ("" if imposed else "; fused=True is for CPU params")
                )
        else:
            if imposed:
                raise ValueError(f"adampx backend {candidates[0].NAME!r} cannot run this step")
            rest.append(k)
    routes = [(backends.get(name), indices) for name, indices in chosen.items()]
    if rest:
        routes.append((eager_math(foreach_flag, batch.params), rest))
    return routes


def run(
    step: Step,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
    steps: list[Tensor],
    *,
    foreach_flag: bool | None,
    fused: bool | None,
    workspace: Workspace | None,
) -> None:
    """One group's step: route its tensors, call each backend once per device and dtype."""
    if step.caution:
        check_unsharded(params)  # before anything changes
    batch = Batch(
        params,
        [compute_view(p) for p in params],
        [compute_view(g) for g in grads],
        [[real(t) for t in state] for state in states],
        steps,
    )
    for backend, indices in route(
        step, batch, foreach_flag=foreach_flag, fused=fused, workspace=workspace
    ):
        for same in group_by_device_and_dtype([batch.ps[k] for k in indices]).values():
            backend.step_(step, batch.select([indices[i] for i in same]), workspace)
    for param, p in zip(params, batch.ps, strict=True):
        write_back_(param, p)
