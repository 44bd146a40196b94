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
step can be captured in a CUDA graph. The work items' layout is kept in the optimizer's
workspace while the shapes, ``delta`` and the tested set stay the same; the table of the
tensors' addresses while their storage does (a gradient allocated elsewhere rebuilds only
that small table).

A ``torch.amp.GradScaler`` step (``Step.grad_scale`` / ``Step.found_inf``) is taken in the
kernels: the gradients are unscaled as they are read and written back unscaled, and the
update does nothing where the inf flag is set, with the step counters left as they were;
nothing is read on the host.

FSDP2's sharded params (DTensors on a 1-D mesh, ``Shard(d)``) are stepped on their local
shards: each row's sums and dot go to its global slot, and the two vectors are
all-reduced after the row-sum and the dot passes (two collectives per step, as
:mod:`adampx.algorithm.sharded`); a rank with an empty shard still takes part.

Takes float32/float64 tensors, contiguous or channels_last (either way each row is one
block of memory), whose gradient and state are laid out as the param (half params through
their float32 copies, complex ones through their real views, as every backend); every
AdamP and SGDP option but ``caution`` (the eager math takes cautious groups). The default
for CUDA tensors where Triton is installed (:mod:`adampx.backends.plan`); on CPU tensors
only through ``adampx.backends.force("triton")`` with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import struct
import warnings
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from adampx.algorithm import caution
from adampx.algorithm.projection import Decision, OneTensor
from adampx.algorithm.sharded import batched_projection_supported
from adampx.algorithm.spec import Step, lr_float
from adampx.util.tensors import KERNEL_DTYPES, Batch, dense_layout, local_rows, row_shape
from adampx.util.workspace import Workspace

__all__ = ["BLOCK", "CHUNK", "NAME", "runs_here", "step_", "supports", "takes"]

NAME = "triton"

BLOCK = 1024  # elements a program handles at once (the tests make it small)
CHUNK = 1 << 16  # an untested tensor is stepped in chunks of this many elements


INSTALLED = importlib.util.find_spec("triton") is not None
"""Whether Triton is importable (a constant, so that ``torch.compile`` can trace a test of it)."""

# Triton reads the variable when its kernels are defined, so it is read once here too
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``) on CPU tensors."""
    return INTERPRETING


def runs_here() -> bool:
    """Triton is importable, and there is a CUDA device or Triton's interpreter is on."""
    return INSTALLED and (torch.cuda.is_available() or INTERPRETING)


def default_on_cuda() -> bool:
    """Whether the routing gives CUDA tensors to these kernels by default (Triton is
    importable and CUDA is available; :func:`ready` then checks that they run)."""
    return INSTALLED and torch.cuda.is_available()


def _probe_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@functools.cache
def ready() -> bool:
    """Whether the kernels compile and run here: one AdamP step of a 2×2 tensor on the
    current CUDA device, once per process (its first step waits for it). A failure (no C
    compiler for Triton's launcher, a GPU Triton does not support) is one RuntimeWarning,
    and CUDA tensors then take the multi-tensor eager math."""
    try:
        device = _probe_device()
        p, g = torch.ones(2, 2, device=device), torch.full((2, 2), 0.5, device=device)
        state = [torch.zeros(2, 2, device=device) for _ in range(2)]
        counter = torch.ones((), device=device)
        scalars = Scalars(1e-3, 0.0, 0.9, 0.999, 0.1, 1e-8, 0.1, 1.0, 0.1)
        arrays = _Arrays([p], [g], [state[0]], [state[1]], [counter])
        launch(arrays, [0], scalars, True, False, None, None, None, None, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not bool(torch.isfinite(p).all()) or bool((p == 1).all()):
            raise RuntimeError("the probe step left the weights unchanged or not finite")
    except Exception as exc:  # any failure means: do not use the kernels here
        warnings.warn(
            f"adampx: the Triton kernels do not run here ({type(exc).__name__}: {exc}); "
            "CUDA tensors take the multi-tensor eager math instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def supports(step: Step) -> str | None:
    """The kernels run every AdamP and SGDP option but the cautious mask."""
    return caution.REFUSAL if step.caution else None


def takes(
    param: Tensor, p: Tensor, g: Tensor, states: list[Tensor], counter: Tensor | None
) -> str | None:
    """Why the kernels cannot step ``param`` (None if they can): plain tensors, and FSDP2's
    sharded params on their local shards (which may be empty)."""
    if not (p.is_cuda or (p.is_cpu and interpreting())):
        return f"it runs on CUDA (or on the CPU in Triton's interpreter), not {p.device.type}"
    sharded = _is_sharded(p)
    if sharded:
        if torch.compiler.is_compiling():
            return "under torch.compile it steps whole tensors (shards take the eager math)"
        if not all(_is_sharded(t) and t.placements == p.placements for t in (g, *states)):  # type: ignore[attr-defined]
            return "it steps a sharded param whose gradient and state are sharded alike"
        p, g, states = p.to_local(), g.to_local(), _local(states)  # type: ignore[attr-defined]
        if p.dtype not in KERNEL_DTYPES:
            return "it steps float32/float64 tensors (half ones through float32 copies)"
        for t in (p, g, *states):
            if not t.is_contiguous() or t.dtype != p.dtype or t.device != p.device:
                return "it steps shards whose gradient and state are contiguous and alike"
    elif not dense_layout(param, p, g, *states) or any(t.device != p.device for t in (g, *states)):
        # contiguous or channels_last: either way each row (dim 0) is one block of memory
        return (
            "it steps non-empty float32/float64 tensors (half ones through float32 copies) "
            "whose gradient and state have the param's layout, contiguous or channels_last"
        )
    if counter is not None and not (
        counter.dtype == torch.float32 and counter.dim() == 0 and counter.device == p.device
    ):
        return "it reads AdamP's step counter as a 0-d float32 tensor on the param's device"
    return None


def _bits(x: float) -> int:
    """A double as the int64 of its bits (the kernels' :func:`kernels._f64`)."""
    return int(struct.unpack("<q", struct.pack("<d", float(x)))[0])


class _Layout(NamedTuple):
    """The work items of a batch's tensors (device int64 tensors), from their shapes and
    the tested set: the same while the shapes are, whatever the tensors' addresses."""

    row_tensor: Tensor  # [R]: per tested row (of this rank's shard), its tensor
    row_start: Tensor  # [R]: its first element in that tensor
    row_len: Tensor  # [R]
    row_slot: Tensor  # [R]: where its sums and dot go among all the tested rows' (S)
    row_tested: Tensor  # [R]: its tensor's index among the tested ones
    chunk_tensor: Tensor  # [C]: per chunk of an untested tensor, the tensor
    chunk_start: Tensor  # [C]
    chunk_len: Tensor  # [C]
    first_row: Tensor  # [TT]: per tested tensor, its first slot
    rows: Tensor  # [TT]: its rows (all ranks')
    slots: int  # S: the rows of all tested tensors (all ranks')
    items: int  # R: the rows this rank steps
    chunks: int  # C
    thresholds: Tensor  # [2, TT]: δ/√(N/n0) and δ/√N, in the params' dtype


class _Addresses(NamedTuple):
    """Where the kernels find a batch's tensors (device int64 tensors)."""

    ptrs: Tensor  # [4, T]: addresses of p, g and the two state arrays (SGDP: b twice)
    step_ptrs: Tensor  # [T]: AdamP's step counters (SGDP: unused)


class _Arrays(NamedTuple):
    """The tensors of a step: params, gradients, the state (SGDP: ``second`` is empty) and
    AdamP's step counters (SGDP: empty)."""

    ps: list[Tensor]
    gs: list[Tensor]
    first: list[Tensor]
    second: list[Tensor]
    steps: list[Tensor]


class Scalars(NamedTuple):
    """A step's hyperparameters as the kernels take them (see :func:`step_`)."""

    lr: float  # 0 where ``lr_tensor``
    decay: float  # the decay amount a; 0 where ``lr_tensor``
    beta1: float  # AdamP's β1; SGDP's momentum
    beta2: float  # AdamP's β2; SGDP: 0
    c1: float  # AdamP's 1 − β1; SGDP's 1 − dampening
    eps: float
    wd_ratio: float
    sign: float  # −1 with maximize
    delta: float


def _longs(values: list[Any], device: torch.device) -> Tensor:
    return torch.tensor(values or [0], dtype=torch.int64).to(device, non_blocking=True)


class Window(NamedTuple):
    """A tested tensor's rows as this process holds them: all of them for a whole tensor;
    for an FSDP2 shard, ``held`` rows from global row ``first``, each of ``length``
    elements here out of ``full_length`` (fewer where the shard splits the rows)."""

    rows: int  # n0 of the whole tensor
    first: int
    held: int  # rows held here
    length: int
    full_length: int


def window(param: Tensor, local: Tensor) -> Window:
    """The :class:`Window` of ``param`` (a whole tensor or a DTensor) whose elements here
    are ``local``."""
    n0, full_length = row_shape(param)
    if local is param:  # a whole tensor
        return Window(n0, 0, n0, full_length, full_length)
    if param.placements[0].dim == 0:  # type: ignore[attr-defined]
        first, count = local_rows(param)
        return Window(n0, first, count, full_length, full_length)
    return Window(n0, 0, n0, local.numel() // n0, full_length)  # Shard(d > 0)


def _layout(delta: float, ps: list[Tensor], tested: list[int], windows: list[Window]) -> _Layout:
    like = ps[0]
    row_tensor: list[int] = []
    row_start: list[int] = []
    row_len: list[int] = []
    row_slot: list[int] = []
    row_tested: list[int] = []
    first_row: list[int] = []
    rows: list[int] = []
    thresholds: list[tuple[float, float]] = []
    slots = 0
    for tt, (k, w) in enumerate(zip(tested, windows, strict=True)):
        first_row.append(slots)
        rows.append(w.rows)
        thresholds.append(OneTensor(w.rows, w.full_length).threshold_values(delta, 0))
        if w.length:
            row_tensor += [k] * w.held
            row_start += [i * w.length for i in range(w.held)]
            row_len += [w.length] * w.held
            row_slot += [slots + w.first + i for i in range(w.held)]
            row_tested += [tt] * w.held
        slots += w.rows
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
    device = like.device
    return _Layout(
        row_tensor=_longs(row_tensor, device),
        row_start=_longs(row_start, device),
        row_len=_longs(row_len, device),
        row_slot=_longs(row_slot, device),
        row_tested=_longs(row_tested, device),
        chunk_tensor=_longs(chunk_tensor, device),
        chunk_start=_longs(chunk_start, device),
        chunk_len=_longs(chunk_len, device),
        first_row=_longs(first_row, device),
        rows=_longs(rows, device),
        slots=slots,
        items=len(row_tensor),
        chunks=len(chunk_tensor),
        thresholds=torch.tensor(
            [[c for c, _ in thresholds] or [0.0], [lay for _, lay in thresholds] or [0.0]],
            dtype=like.dtype,
        ).to(device, non_blocking=True),
    )


def _addresses(arrays: _Arrays) -> _Addresses:
    states = [arrays.first, arrays.second or arrays.first]  # SGDP: its buffer twice
    ptrs = [[t.data_ptr() for t in ts] for ts in (arrays.ps, arrays.gs, *states)]
    step_ptrs = [t.data_ptr() for t in arrays.steps] or [0]
    device = arrays.ps[0].device
    return _Addresses(
        ptrs=_longs(ptrs, device).view(4, len(arrays.ps)), step_ptrs=_longs(step_ptrs, device)
    )


def _kept_tables(
    arrays: _Arrays,
    tested: list[int],
    windows: list[Window],
    delta: float,
    workspace: Workspace | None,
) -> tuple[_Layout, _Addresses]:
    """The layout and addresses of the tensors, kept in ``workspace``: the layout while the
    shapes, ``delta`` and the tested set stay the same, the addresses while the tensors'
    storage does (a new gradient at another address rebuilds only the small address table)."""
    ps = arrays.ps
    if workspace is None:
        return _layout(delta, ps, tested, windows), _addresses(arrays)
    shapes = tuple((tuple(p.shape), p.dtype) for p in ps)
    layout = workspace.constant(
        (NAME, "layout", delta, tuple(tested), tuple(windows), shapes, str(ps[0].device)),
        lambda: _layout(delta, ps, tested, windows),
    )
    key = (NAME, "addresses", tuple(t.data_ptr() for ts in arrays for t in ts))
    return layout, workspace.constant(key, lambda: _addresses(arrays))


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A GradScaler's scale or inf flag as float32 on ``device`` (where the kernels read
    it, so that nothing waits for the device)."""
    return None if t is None else t.to(device, torch.float32, non_blocking=True)


def step_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP's or SGDP's step of ``batch`` (tensors of one device and dtype), in place.

    FSDP2's sharded params (DTensors on a 1-D mesh) are stepped on their local shards, the
    rows' sums and dots all-reduced between the passes (two collectives per mesh); whole
    tensors of the same batch, and each mesh's shards, in launches of their own. While
    ``torch.compile`` traces the step, the kernels are called through the custom op
    ``torch.ops.adampx.triton_step`` (:mod:`adampx.backends.triton.op`), which the compiled
    graph calls as it is; eagerly, directly."""
    sharded = [k for k, p in enumerate(batch.ps) if _is_sharded(p)]
    meshes: dict[int, list[int]] = {}  # in the params' order: the same on every rank
    for k in sharded:
        meshes.setdefault(id(batch.ps[k].device_mesh), []).append(k)  # type: ignore[attr-defined]
    if sharded and (len(sharded) < len(batch.ps) or len(meshes) > 1):
        whole = [k for k in range(len(batch.ps)) if k not in set(sharded)]
        if whole:
            step_(step, batch.select(whole), workspace)
        for indices in meshes.values():  # each mesh's rows reduced over its own group
            step_(step, batch.select(indices), workspace)
        return
    like = batch.ps[0]
    adam = step.optimizer == "adamp"
    grad_scale, found_inf = _on(step.grad_scale, like.device), _on(step.found_inf, like.device)
    if adam:
        if found_inf is not None:  # a skipped step does not count
            counted = 1 - (found_inf != 0).float()  # (a tensor list: no read on the host)
            torch._foreach_add_(batch.steps, [counted] * len(batch.steps))
        else:
            torch._foreach_add_(batch.steps, 1)
    lr_tensor = isinstance(step.lr, Tensor) and step.lr.device == like.device
    beta1, beta2, c1 = (
        (step.beta1, step.beta2, 1 - step.beta1)
        if adam
        else (step.momentum, 0.0, 1 - step.dampening)
    )
    scalars = Scalars(
        lr=0.0 if lr_tensor else lr_float(step.lr),
        decay=0.0 if lr_tensor or step.weight_decay == 0 else step.decay_value(),
        beta1=beta1,
        beta2=beta2,
        c1=c1,
        eps=step.eps,
        wd_ratio=step.wd_ratio,
        sign=-1.0 if step.maximize else 1.0,
        delta=step.delta,
    )
    tested, _ = step.split(batch.params)
    local = _local if sharded else list
    arrays = _Arrays(
        local(batch.ps), local(batch.gs), local(batch.states[0]),
        local(batch.states[1]) if adam else [], list(batch.steps),
    )  # fmt: skip
    lr_t = step.lr if lr_tensor and isinstance(step.lr, Tensor) else None
    decay_t = step.decay if lr_tensor and isinstance(step.decay, Tensor) else None
    if torch.compiler.is_compiling():
        from adampx.backends.triton import op

        mode, statistics = op.triton_step(
            *arrays, tested, list(scalars), [adam, step.nesterov], lr_t, decay_t,
            grad_scale, found_inf,
        )  # fmt: skip
    else:
        windows = [window(batch.ps[k], arrays.ps[k]) for k in tested]
        group = like.device_mesh.get_group() if sharded else None  # type: ignore[attr-defined]
        mode, statistics = launch(
            arrays, tested, scalars, adam, step.nesterov, lr_t, decay_t, grad_scale,
            found_inf, workspace, windows, group,
        )  # fmt: skip
    if step.decisions is not None:
        for tt, k in enumerate(tested):
            n0, length = row_shape(batch.ps[k])
            channel_threshold, layer_threshold = OneTensor(n0, length).threshold_values(
                step.delta, 0
            )
            step.decisions[batch.params[k]] = Decision(
                channel=mode[tt] == 1,
                layer=mode[tt] == 2,
                max_cosine_channel=statistics[0, tt],
                cosine_layer=statistics[1, tt],
                channel_threshold=channel_threshold,
                layer_threshold=layer_threshold,
            )


def _is_sharded(t: Tensor) -> bool:
    return batched_projection_supported([t])


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards of DTensors."""
    return [t.to_local() for t in tensors]  # type: ignore[attr-defined]


def launch(
    arrays: _Arrays,
    tested: list[int],
    scalars: Scalars,
    adam: bool,
    nesterov: bool,
    lr_t: Tensor | None,
    decay_t: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    workspace: Workspace | None,
    windows: list[Window] | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """The kernels' launches for one step (the counters already incremented); returns
    ``mode`` (per tested tensor: 1 channel view, 2 layer view, 0 none) and the statistics
    ``[max cosine, layer cosine, ‖p‖, p·u]`` per tested tensor.

    ``windows``: the rows each tested tensor has here (None: whole tensors); ``group``:
    where the rows' sums and dots are all-reduced (FSDP2's shards; None: nowhere)."""
    from adampx.backends.triton import kernels

    like = arrays.ps[0]
    if windows is None:
        windows = [window(arrays.ps[k], arrays.ps[k]) for k in tested]
    whole_rows = int(all(w.length == w.full_length for w in windows))
    layout, addresses = _kept_tables(arrays, tested, windows, scalars.delta, workspace)
    n_tensors, n_tested = len(arrays.ps), len(tested)
    n_rows, n_chunks, n_slots = layout.items, layout.chunks, layout.slots
    amp = grad_scale is not None or found_inf is not None
    unscaled = int(grad_scale is not None)  # (after the scaler's unscale_(): only the flag)
    if amp:
        if grad_scale is None:
            grad_scale = torch.ones((), dtype=torch.float32, device=like.device)
        if found_inf is None:
            found_inf = torch.zeros((), dtype=torch.float32, device=like.device)
    else:
        grad_scale = found_inf = like  # placeholders: read by the kernels only with AMP
    lr_ptr = lr_t if lr_t is not None else like
    decay_ptr = decay_t if decay_t is not None else like
    s = scalars
    options: dict[str, Any] = dict(BLOCK=BLOCK, FP64=like.dtype == torch.float64)
    scaled: dict[str, Any] = dict(AMP=amp)
    direction = dict(ADAM=adam, NESTEROV=nesterov)
    # per tested tensor: max cosine, layer cosine, ‖p‖, p·u (every entry written below)
    statistics = like.new_empty(4, n_tested) if n_tested else like.new_zeros(4, 1)
    mode = (
        torch.empty(n_tested, dtype=torch.int32, device=like.device)
        if n_tested
        else (torch.zeros(1, dtype=torch.int32, device=like.device))
    )
    # the rows' sums and dots, at their slots (zeros where another rank writes them)
    blank = like.new_empty if group is None else like.new_zeros
    sums = blank(3 * max(n_slots, 1))
    dots = blank(max(n_slots, 1))
    if n_tested:
        if n_rows:
            kernels.row_sums_kernel[(n_rows,)](
                addresses.ptrs, n_tensors, layout.row_tensor, layout.row_start, layout.row_len,
                layout.row_slot, sums, n_slots, grad_scale, **options, **scaled,
            )  # fmt: skip
        if group is not None:
            dist.all_reduce(sums, group=group)
        kernels.test_kernel[(n_tested,)](
            sums, n_slots, layout.first_row, layout.rows, layout.thresholds, n_tested,
            _bits(s.eps), mode, statistics[0], statistics[1], statistics[2], **options,
        )  # fmt: skip
        if n_rows:
            kernels.dots_kernel[(n_rows,)](
                addresses.ptrs, n_tensors, addresses.step_ptrs, layout.row_tensor,
                layout.row_start, layout.row_len, layout.row_slot, layout.row_tested, mode,
                dots, whole_rows, _bits(s.beta1), _bits(s.beta2), _bits(s.c1), _bits(s.eps),
                s.sign, grad_scale, **options, **direction, **scaled,
            )  # fmt: skip
        if group is not None:
            dist.all_reduce(dots, group=group)
        kernels.layer_dots_kernel[(n_tested,)](
            layout.first_row, layout.rows, mode, dots, statistics[3], **options
        )
    if n_rows + n_chunks == 0:  # a shard with nothing here
        return mode, statistics
    kernels.update_kernel[(n_rows + n_chunks,)](
        addresses.ptrs, n_tensors, addresses.step_ptrs, lr_ptr, decay_ptr,
        layout.row_tensor, layout.row_start, layout.row_len, layout.row_slot,
        layout.row_tested, n_rows, whole_rows,
        layout.chunk_tensor, layout.chunk_start, layout.chunk_len,
        sums, mode, statistics[2], dots, statistics[3],
        _bits(s.lr), _bits(s.decay), _bits(s.beta1), _bits(s.beta2), _bits(s.c1),
        _bits(s.eps), _bits(s.wd_ratio), s.sign, grad_scale, found_inf, unscaled,
        LR_TENSOR=lr_t is not None, **options, **direction, **scaled,
    )  # fmt: skip
    return mode, statistics
