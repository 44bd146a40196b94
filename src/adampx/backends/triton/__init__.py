"""The ``triton`` backend: a group's step in five Triton kernels, whatever its size.

For CUDA tensors (and, with ``TRITON_INTERPRET=1``, CPU tensors run by Triton's
interpreter, for tests on machines without a GPU). The tensors are reached through a table
of their addresses, never copied, and the step is five launches (six for AdamP, whose step
counters are incremented first), whatever the number of tensors:

1. the row sums ``‖p_i‖²``, ``‖g_i‖²``, ``p_i·g_i`` of every tested tensor (one program per
   row; the rows of ``[n0, N/n0]`` views);
2. the scale-invariance test of every tested tensor (one program per tensor);
3. ``p_i·u_i`` of the rows of the projected tensors that the update cannot take in
   registers (rows longer than :data:`BLOCK`, and tensors projected as a whole), with ``u``
   the direction the update will form (from the state before the step, which this pass does
   not write);
4. ``p·u`` of each tensor projected as a whole (the sum of its rows');
5. the update of every row of the tested tensors and every chunk of the untested ones: the
   state, the direction, its radial part removed where the test passed (a row of up to
   :data:`BLOCK` elements projected per row is held in registers, its ``p_i·u_i`` taken
   there), the decay and the step.

The kernels (:mod:`adampx.backends.triton.kernels`) hold the math once in Triton; the
thresholds ``δ/√n`` are the host's (:func:`adampx.algorithm.projection.threshold`), and
AdamP's step counters are read on the device, so that nothing is synchronised and the
step can be captured in a CUDA graph. The address tables are kept in the optimizer's
workspace and rebuilt when the tensors' storage, shapes or the set of tested tensors
change.

Takes contiguous float32/float64 tensors (half params through their float32 copies,
complex ones through their real views, as every backend); every AdamP and SGDP option.
Chosen only by ``adampx.backends.force("triton")`` for now: CUDA's default remains the
``flat`` backend until the kernels have been timed on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from typing import Any, NamedTuple

import torch
from torch import Tensor

from adampx.algorithm import caution
from adampx.algorithm.projection import Decision, OneTensor
from adampx.algorithm.spec import Step, lr_float
from adampx.util.tensors import KERNEL_DTYPES, Batch, row_shape
from adampx.util.workspace import Workspace

__all__ = ["BLOCK", "CHUNK", "NAME", "runs_here", "step_", "supports", "takes"]

NAME = "triton"

BLOCK = 1024  # elements a program handles at once (the tests make it small)
CHUNK = 1 << 16  # an untested tensor is stepped in chunks of this many elements


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_here() -> bool:
    """Triton is importable, and there is a CUDA device or Triton's interpreter is on."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or interpreting()


def supports(step: Step) -> str | None:
    """The kernels run every AdamP and SGDP option but the cautious mask."""
    return caution.REFUSAL if step.caution else None


def takes(
    param: Tensor, p: Tensor, g: Tensor, states: list[Tensor], counter: Tensor | None
) -> str | None:
    """Why the kernels cannot step ``param`` (None if they can)."""
    if not (p.is_cuda or (p.is_cpu and interpreting())):
        return f"it runs on CUDA (or on the CPU in Triton's interpreter), not {p.device.type}"
    if type(param) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
        return "it steps plain tensors"
    if p.dtype not in KERNEL_DTYPES or p.numel() == 0:
        return "it steps non-empty float32/float64 tensors (half ones through float32 copies)"
    for t in (p, g, *states):
        if not t.is_contiguous() or t.dtype != p.dtype or t.device != p.device:
            return "it steps contiguous tensors whose gradient and state are alike"
    if counter is not None and not (
        counter.dtype == torch.float32 and counter.dim() == 0 and counter.device == p.device
    ):
        return "it reads AdamP's step counter as a 0-d float32 tensor on the param's device"
    return None


def _bits(x: float) -> int:
    """A double as the int64 of its bits (the kernels' :func:`kernels._f64`)."""
    return int(struct.unpack("<q", struct.pack("<d", float(x)))[0])


class _Tables(NamedTuple):
    """Where the kernels find a batch's tensors and work items (device int64 tensors)."""

    ptrs: Tensor  # [4, T]: addresses of p, g and the two state arrays (SGDP: b twice)
    step_ptrs: Tensor  # [T]: AdamP's step counters (SGDP: unused)
    row_tensor: Tensor  # [R]: per tested row, its tensor
    row_start: Tensor  # [R]: its first element in that tensor
    row_len: Tensor  # [R]
    row_tested: Tensor  # [R]: its tensor's index among the tested ones
    chunk_tensor: Tensor  # [C]: per chunk of an untested tensor, the tensor
    chunk_start: Tensor  # [C]
    chunk_len: Tensor  # [C]
    first_row: Tensor  # [TT]: per tested tensor, its first row
    rows: Tensor  # [TT]
    thresholds: Tensor  # [2, TT]: δ/√(N/n0) and δ/√N, in the params' dtype
    tested: list[int]  # the tested tensors' indices in the batch
    threshold_values: list[tuple[float, float]]  # the same, as Python floats


def _tables(step: Step, batch: Batch, tested: list[int]) -> _Tables:
    ps = batch.ps
    like = ps[0]
    states = list(batch.states) if len(batch.states) == 2 else [batch.states[0]] * 2
    ptrs = [[t.data_ptr() for t in arrays] for arrays in (ps, batch.gs, *states)]
    step_ptrs = [t.data_ptr() for t in batch.steps] or [0]
    row_tensor: list[int] = []
    row_start: list[int] = []
    row_len: list[int] = []
    row_tested: list[int] = []
    first_row: list[int] = []
    rows: list[int] = []
    thresholds: list[tuple[float, float]] = []
    for tt, k in enumerate(tested):
        n0, length = row_shape(ps[k])
        first_row.append(len(row_tensor))
        rows.append(n0)
        thresholds.append(OneTensor(n0, length).threshold_values(step.delta, 0))
        row_tensor += [k] * n0
        row_start += [i * length for i in range(n0)]
        row_len += [length] * n0
        row_tested += [tt] * n0
    is_tested = set(tested)
    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    chunk_len: list[int] = []
    for k, p in enumerate(ps):
        if k in is_tested:
            continue
        for start in range(0, p.numel(), CHUNK):
            chunk_tensor.append(k)
            chunk_start.append(start)
            chunk_len.append(min(CHUNK, p.numel() - start))

    def longs(values: list[Any]) -> Tensor:
        return torch.tensor(values or [0], dtype=torch.int64).to(like.device, non_blocking=True)

    return _Tables(
        ptrs=longs(ptrs).view(4, len(ps)),
        step_ptrs=longs(step_ptrs),
        row_tensor=longs(row_tensor),
        row_start=longs(row_start),
        row_len=longs(row_len),
        row_tested=longs(row_tested),
        chunk_tensor=longs(chunk_tensor),
        chunk_start=longs(chunk_start),
        chunk_len=longs(chunk_len),
        first_row=longs(first_row),
        rows=longs(rows),
        thresholds=torch.tensor(
            [[c for c, _ in thresholds] or [0.0], [lay for _, lay in thresholds] or [0.0]],
            dtype=like.dtype,
        ).to(like.device, non_blocking=True),
        tested=tested,
        threshold_values=thresholds,
    )


def _kept_tables(step: Step, batch: Batch, workspace: Workspace | None) -> _Tables:
    """The tables of ``batch``, kept in ``workspace`` while the tensors' storage, shapes and
    the tested set stay the same."""
    tested, _ = step.split(batch.params)
    key = (
        NAME,
        step.optimizer,
        step.delta,
        tuple(tested),
        tuple((p.data_ptr(), tuple(p.shape)) for p in batch.ps),
        tuple(t.data_ptr() for arrays in (batch.gs, *batch.states, batch.steps) for t in arrays),
    )
    if workspace is None:
        return _tables(step, batch, tested)
    return workspace.constant(key, lambda: _tables(step, batch, tested))


def step_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP's or SGDP's step of ``batch`` (tensors of one device and dtype), in place."""
    from adampx.backends.triton import kernels

    like = batch.ps[0]
    adam = step.optimizer == "adamp"
    if adam:
        torch._foreach_add_(batch.steps, 1)
    tables = _kept_tables(step, batch, workspace)
    fp64 = like.dtype == torch.float64
    n_tensors, n_tested = len(batch.ps), len(tables.tested)
    n_rows = int(tables.row_tensor.numel()) if n_tested else 0
    n_chunks = int(tables.chunk_tensor.numel()) if n_tested < n_tensors else 0
    beta1, beta2, c1 = (
        (step.beta1, step.beta2, 1 - step.beta1)
        if adam
        else (step.momentum, 0.0, 1 - step.dampening)
    )
    lr_tensor = isinstance(step.lr, Tensor) and step.lr.device == like.device
    lr = 0.0 if lr_tensor else lr_float(step.lr)
    decay = 0.0 if lr_tensor else (step.decay_value() if step.weight_decay != 0 else 0.0)
    lr_ptr = step.lr if lr_tensor else like
    decay_ptr = step.decay if lr_tensor else like
    sign = -1.0 if step.maximize else 1.0
    options: dict[str, Any] = dict(BLOCK=BLOCK, FP64=fp64)
    direction = dict(ADAM=adam, NESTEROV=step.nesterov)
    statistics = like.new_empty(4, max(n_tested, 1))  # max cosine, layer cosine, ‖p‖, p·u
    mode = torch.empty(max(n_tested, 1), dtype=torch.int32, device=like.device)
    sums = like.new_empty(3 * max(n_rows, 1))
    dots = like.new_empty(max(n_rows, 1))
    if n_tested:
        kernels.row_sums_kernel[(n_rows,)](
            tables.ptrs, n_tensors, tables.row_tensor, tables.row_start, tables.row_len,
            sums, n_rows, **options,
        )  # fmt: skip
        kernels.test_kernel[(n_tested,)](
            sums, n_rows, tables.first_row, tables.rows, tables.thresholds, n_tested,
            _bits(step.eps), mode, statistics[0], statistics[1], statistics[2], **options,
        )  # fmt: skip
        kernels.dots_kernel[(n_rows,)](
            tables.ptrs, n_tensors, tables.step_ptrs, tables.row_tensor, tables.row_start,
            tables.row_len, tables.row_tested, mode, dots, _bits(beta1), _bits(beta2),
            _bits(c1), _bits(step.eps), sign, **options, **direction,
        )  # fmt: skip
        kernels.layer_dots_kernel[(n_tested,)](
            tables.first_row, tables.rows, mode, dots, statistics[3], **options
        )
    kernels.update_kernel[(n_rows + n_chunks,)](
        tables.ptrs, n_tensors, tables.step_ptrs, lr_ptr, decay_ptr,
        tables.row_tensor, tables.row_start, tables.row_len, tables.row_tested, n_rows,
        tables.chunk_tensor, tables.chunk_start, tables.chunk_len,
        sums, mode, statistics[2], dots, statistics[3],
        _bits(lr), _bits(decay), _bits(beta1), _bits(beta2), _bits(c1), _bits(step.eps),
        _bits(step.wd_ratio), sign, LR_TENSOR=lr_tensor, **options, **direction,
    )  # fmt: skip
    if step.decisions is not None:
        for tt, k in enumerate(tables.tested):
            channel_threshold, layer_threshold = tables.threshold_values[tt]
            step.decisions[batch.params[k]] = Decision(
                channel=mode[tt] == 1,
                layer=mode[tt] == 2,
                max_cosine_channel=statistics[0, tt],
                cosine_layer=statistics[1, tt],
                channel_threshold=channel_threshold,
                layer_threshold=layer_threshold,
            )
