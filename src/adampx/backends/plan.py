"""The routing rule: which backend steps which tensor of a param group.

:func:`run` is what the functional :func:`adampx.adamp` / :func:`adampx.sgdp` call: it
makes the compute views of a group's tensors (float32 copies of half params, real views of
complex ones), asks :func:`route` for each tensor's backend, calls each backend once per
device and dtype, and copies half params back.

The rule (:func:`chain`): each tensor goes to the first backend of a chain that runs the
group's options (``supports``) and takes the tensor (``takes``), else to the eager math
(:func:`eager_math`):

=============================  ===========================================================
while ``torch.compile`` traces ``triton`` (its custom op) for CUDA tensors where it is the
                               default below, else the eager math, traced (torch's fused
                               kernels and the C kernel cannot be)
inside ``backends.force(n)``   ``n`` alone; a tensor it cannot take is an error
``fused=True``                 ``cpu-kernel`` (a non-CPU tensor is an error), then the eager
                               math
otherwise                      ``cpu``; for options torch's fused kernels lack (AdamP's
                               nesterov, SGDP without momentum, caution) ``cpu-kernel``
                               where a CPU tensor is stepped, ``fused`` is None and the
                               kernel builds; for CUDA tensors ``triton`` (not with
                               ``foreach=False`` or ``fused=False``, nor without a
                               workspace; without Triton installed, one warning); then the
                               eager math
=============================  ===========================================================

The eager math is ``foreach`` where the ``foreach`` flag says so or, for ``foreach=None``,
on accelerators and for FSDP2's sharded params; ``eager`` otherwise (as torch chooses).
A new backend is a module in this package and one entry in :func:`chain`.

A ``torch.amp.GradScaler`` step (:attr:`Step.amp <adampx.algorithm.spec.Step.amp>`):
``triton`` unscales and skips in its kernels, with nothing read on the host; the tensors of
any other backend are skipped after one read of the inf flag, or unscaled in place and
stepped (:func:`_unscale_or_skip`). :func:`takes_grad_scaler` tells the optimizer whether to
ask the scaler for its scale and flag (torch's protocol for fused optimizers) or to let it
unscale and skip as it does for any optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from adampx import backends
from adampx.algorithm.caution import check_unsharded
from adampx.algorithm.sharded import batched_projection_supported
from adampx.algorithm.spec import Step
from adampx.backends import cpu, cpu_kernel, eager, foreach, triton
from adampx.util.tensors import Batch, compute_view, group_by_device_and_dtype, real, write_back_
from adampx.util.workspace import Workspace

__all__ = ["chain", "default_foreach", "eager_math", "route", "run", "takes_grad_scaler"]


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
        return _traced_chain(step, foreach_flag, fused, workspace, tensors)
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
    if _cuda_default(foreach_flag, fused, workspace, tensors):
        if not triton.default_on_cuda():
            if tensors is not None:
                _warn_no_triton()
        elif tensors is None or triton.ready():  # (ready warns where they do not run)
            tried.append(triton)  # CUDA tensors only (see route)
    return tried, False


def _cuda_default(
    foreach_flag: bool | None,
    fused: bool | None,
    workspace: Workspace | None,
    tensors: list[Tensor] | None,
) -> bool:
    """Whether CUDA tensors of the group would take the Triton kernels were they installed
    (no scan of the group where CUDA is not available: the CPU's steps pay nothing)."""
    if fused is not None or foreach_flag is False or workspace is None:
        return False
    if not torch.cuda.is_available():
        return False
    return tensors is None or any(t.is_cuda for t in tensors)


def _traced_chain(
    step: Step,
    foreach_flag: bool | None,
    fused: bool | None,
    workspace: Workspace | None,
    tensors: list[Tensor] | None,
) -> tuple[list[ModuleType], bool]:
    """The chain while ``torch.compile`` traces the step: ``triton``, through its custom op,
    where it takes CUDA tensors by default (not for a step that records decisions: the op
    returns its statistics as tensors, which the recorder would read in the graph); else
    none (the eager math is traced; torch's fused kernels and the C kernel cannot be)."""
    cuda = _cuda_default(foreach_flag, fused, workspace, tensors)
    if cuda and step.decisions is None and triton.default_on_cuda():
        return [triton], False
    return [], False


@functools.cache
def _warn_no_triton() -> None:
    """Once per process: CUDA tensors take the eager math because Triton is missing."""
    warnings.warn(
        "adampx: Triton is not installed, so AdamP/SGDP step CUDA tensors in the multi-tensor "
        "eager math, several times slower than the Triton kernels (pip install triton)",
        RuntimeWarning,
        stacklevel=4,
    )


def takes_grad_scaler(groups: Iterable[dict[str, Any]]) -> bool:
    """Whether an optimizer with these param groups unscales and skips a GradScaler step
    on the device (``triton`` steps its tensors: forced, or the default for CUDA tensors),
    so that the scaler should hand it its scale and inf flag instead of reading the flag
    on the host."""
    if torch.compiler.is_compiling():
        return False
    imposed = backends.forced()
    if imposed is not None:
        return imposed is triton
    if not triton.default_on_cuda():
        return False
    uses_triton = any(
        group.get("fused") is None
        and group.get("foreach") is not False
        and any(isinstance(p, Tensor) and p.is_cuda for p in group["params"])
        for group in groups
    )
    return uses_triton and triton.ready()


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
            if backend is triton and not (imposed or p.is_cuda):
                continue  # by default Triton steps CUDA tensors only (not interpreted ones)
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
    routes = route(step, batch, foreach_flag=foreach_flag, fused=fused, workspace=workspace)
    unscaled = step
    if step.amp and any(backend is not triton for backend, _ in routes):
        unscaled = dataclasses.replace(step, grad_scale=None, found_inf=None)
        others = [k for backend, ks in routes if backend is not triton for k in ks]
        if not _unscale_or_skip(step, batch, others):
            routes = [(backend, ks) for backend, ks in routes if backend is triton]
    for backend, indices in routes:
        for same in group_by_device_and_dtype([batch.ps[k] for k in indices]).values():
            selected = batch.select([indices[i] for i in same])
            backend.step_(step if backend is triton else unscaled, selected, workspace)
    for param, p in zip(params, batch.ps, strict=True):
        write_back_(param, p)
    if step.grad_scale is not None:  # the unscaled gradients, as torch's fused steps leave them
        for grad, g in zip(grads, batch.gs, strict=True):
            write_back_(grad, g)


def _unscale_or_skip(step: Step, batch: Batch, indices: list[int]) -> bool:
    """For backends without GradScaler support: False (skip them) where ``found_inf`` is
    not 0, read on the host as the scaler itself would; else divide their gradients by
    ``grad_scale`` in place and return True."""
    if step.found_inf is not None and step.found_inf.item() != 0:
        return False
    if step.grad_scale is not None:
        gs = [batch.gs[k] for k in indices]
        for same in group_by_device_and_dtype(gs).values():
            chosen = [gs[i] for i in same]
            torch._foreach_div_(chosen, step.grad_scale.to(chosen[0].device, chosen[0].dtype))
    return True
