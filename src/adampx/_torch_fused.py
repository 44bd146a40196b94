"""The per-tensor step on CPU, built on torch's own fused optimizer kernels.

No compile step: the moment updates run in ``torch._fused_adamw_`` / ``torch._fused_sgd_``
(one vectorised pass each), and only the row statistics and the per-row rescaling of the
projection are separate passes. The numbers are those of ``../shared/ALGORITHM.md``; only
the order of floating-point operations differs from the plain per-tensor code.

Each tested tensor (rows = the channel view ``[n0, N/n0]``) is finished before the next one
starts, so that what its second pass reads again is still in cache (the test needs all rows
of a tensor, so a tensor cannot be finished in one pass). Row dot products run in
``torch.sparse.sampled_addmm`` (:func:`_row_dots`): one pass over both operands that writes
nothing param-sized, about twice as fast as a product into scratch and a row sum.

1. Row sums ``‖p_i‖``, ``‖g_i‖``, ``p_i·g_i`` (three passes over ``p`` and ``g``), and the
   scale-invariance test on them with the arithmetic of :func:`adampx.projection.decide`
   (:class:`_Tester`); its outcome is read as Python values (these are CPU tensors, there
   is no device to wait for), so that the tensor takes only the work its outcome needs.
2. AdamP, not projected: ``keep = 1 − lr·λ`` makes the step AdamW's, ``torch._fused_adamw_``.
   Projected per row, in blocks of whole rows of about :data:`BLOCK_ELEMENTS` elements (so
   that a block's scratch stays in cache between its passes, and the scratch is one block):
   ``torch._fused_adamw_`` without weight decay on a zeroed scratch ``w`` as its "param"
   updates ``m`` and ``v`` and leaves the step ``w = −(lr/bc1)·u`` there; then
   ``pw_i = p_i·w_i``, ``c_i = pw_i / (‖p_i‖ + eps)²`` and ``p ← p·(keep − c) + w`` in one
   ``addcmul``, which is ALGORITHM.md's ``p·(1 − lr·λ·r) − (lr/bc1)·(u − c'p)`` rearranged.
   Projected as a whole (rare): the same with ``w`` as large as the tensor, since ``c``
   needs all its rows.
3. SGDP, projected: ``p·b`` (``b`` the momentum before the step), then the direction's row
   dots by linearity, without touching it: ``p·b_new = μ·(p·b) + (1−τ)·(p·g)`` and, with
   nesterov, ``p·d = p·g + μ·(p·b_new)``; the rows (or the whole tensor) rescaled by
   ``keep + lr·c`` and then ``torch._fused_sgd_`` (``b ← μ·b + (1−τ)·g; p ← p − lr·d``).
   Not projected: the rescale by ``keep`` and the same SGD step. SGDP keeps no scratch.

Untested tensors (biases, norm gains) take one ``torch._fused_adamw_`` (AdamW) or
``torch._fused_sgd_`` call together. Tested tensors of up to
``adampx._small_tensors.SMALL_ELEMENTS`` elements, whose cost is the 20 to 30 operations
above rather than their bytes, are tested and stepped together in chunks instead
(:mod:`adampx._small_tensors`); the steps here take the larger ones.

The functions take the compute views of ``adampx._tensors`` (float32 copies of half params,
real views of complex ones) beside the params as the user holds them, which decide whether a
tensor is tested. Which tensors qualify (:func:`supported`): plain CPU tensors whose compute
views are float32/float64 and share one dense layout with their gradient and state
(contiguous, or channels_last for all of them). Others (other layouts, tensor subclasses)
take the plain per-tensor code, and so does a step under ``torch.compile``, since torch's
fused kernels have no fake implementation to trace.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from adampx import _small_tensors as small_tensors
from adampx._shared_step import Decisions, sgdp_direction_dots
from adampx._tensors import (
    Workspace,
    compute_view,
    group_by_device_and_dtype,
    real,
    row_shape,
    row_view,
    scratch,
    write_back_,
)
from adampx.projection import RowStatistics, _whole_norm, decide, is_projectable

_DTYPES = (torch.float32, torch.float64)


def supported(
    param: Tensor, p: Tensor, g: Tensor, *states: Tensor, devices: tuple[str, ...] = ("cpu",)
) -> bool:
    """Whether ``param`` (compute views ``p``, ``g``, ``states``) can take a kernel step.

    Plain tensors on one of ``devices`` (device types), float32/float64 compute views, and
    one dense layout (contiguous or channels_last): the same strides for all of them, but
    on dims of size 1.
    """
    if type(param) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
        return False
    dtype = p.dtype
    if dtype not in _DTYPES or p.numel() == 0:
        return False
    if not ("cpu" in devices if p.is_cpu else p.device.type in devices):
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


def _same_strides(t: Tensor, p: Tensor) -> bool:
    """Same element order in memory: equal strides except on dims of size 1 (a 1x1 conv
    weight is both contiguous and channels_last, and its gradient may carry either)."""
    return t.stride() == p.stride() or all(
        a == b or n == 1 for a, b, n in zip(t.stride(), p.stride(), p.shape, strict=True)
    )


def kernel_step(
    impls: dict[str, Callable[..., None]],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
    *,
    steps: list[Tensor] | None = None,
    step_ok: Callable[[Tensor], bool] | None = None,
    **hyper: Any,
) -> list[int]:
    """Step the params that :func:`supported` admits; return the others' indices.

    ``impls`` maps a device type to the step for it (AdamP's or SGDP's, here, in
    :mod:`adampx.fused` or in :mod:`adampx._flat_step`); each gets, per device and dtype,
    the params, their compute views, the gradients' and the state lists' (then ``steps``),
    and ``hyper``. ``step_ok`` further restricts which step counters it can take. Half
    params are written back from their float32 copies.
    """
    ps = [compute_view(p) for p in params]
    gs = [compute_view(g) for g in grads]
    ss = [[real(t) for t in state] for state in states]
    devices = tuple(impls)
    fast = [
        k
        for k, (param, p, g, *state) in enumerate(zip(params, ps, gs, *ss, strict=True))
        if supported(param, p, g, *state, devices=devices)
        and (step_ok is None or steps is None or step_ok(steps[k]))
    ]
    extra = [] if steps is None else [steps]
    for (device, _), same_dtype in group_by_device_and_dtype([ps[k] for k in fast]).items():
        chosen = [fast[i] for i in same_dtype]
        impl = impls[torch.device(device).type]
        impl(*([x[k] for k in chosen] for x in (params, ps, gs, *ss, *extra)), **hyper)
    for k in fast:
        write_back_(params[k], ps[k])
    return sorted(set(range(len(params))) - set(fast))


# a tensor is worked on in blocks of whole rows of about this many elements, so that a
# block's scratch stays in cache between the passes over it; and the scratch is that small
BLOCK_ELEMENTS = 1 << 19


def _in_blocks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """``tensors`` (matrices and per-row vectors, all with the same rows) cut alike into
    blocks of whole rows of about :data:`BLOCK_ELEMENTS` elements of the first; the
    tensors themselves where that is one block."""
    rows, length = tensors[0].shape
    per = max(1, BLOCK_ELEMENTS // length)
    if per >= rows:
        yield tensors
        return
    for start in range(0, rows, per):
        yield tuple(t[start : start + per] for t in tensors)


def _block_size(ps: list[Tensor], tested: list[int]) -> int:
    """Elements of the largest block of a tested tensor: the size of a block's scratch."""
    size = 0
    for k in tested:
        rows, length = row_shape(ps[k])
        size = max(size, min(rows, max(1, BLOCK_ELEMENTS // length)) * length)
    return size


def _matrix(buffer: Tensor, shape: torch.Size) -> Tensor:
    """The first elements of a flat buffer as a dense matrix of ``shape``."""
    return buffer.as_strided(shape, (shape[1], 1))


class _Diagonal(NamedTuple):
    """Where the row sums of an ``[n, ·]`` matrix go, kept per row count ``n``: the sparsity
    pattern of an ``[n, n]`` diagonal and two outputs of that pattern (:func:`_row_dots`),
    the two row norms of the test, and a column for ``(‖p_i‖ + eps)²``. Views of them are
    kept too, so that a step makes none."""

    pattern: Tensor
    outputs: tuple[Tensor, Tensor]
    dots: tuple[Tensor, Tensor]  # [n]: the outputs' values
    columns: tuple[Tensor, Tensor]  # [n, 1] views of ``dots``
    norms: Tensor  # [2, n]: ‖p_i‖, ‖g_i‖
    p_norm: Tensor  # [n] view of norms[0]
    g_norm: Tensor  # [n] view of norms[1]
    scale: Tensor  # [n]
    scale_column: Tensor  # [n, 1] view of ``scale``


def _diagonal(rows: int, dtype: torch.dtype, workspace: Workspace | None) -> _Diagonal:
    """:class:`_Diagonal` of ``rows`` rows (kept in the workspace, once per size)."""

    def build() -> _Diagonal:
        index = torch.arange(rows + 1)
        values = torch.zeros(3, rows, dtype=dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": not the user's
            warnings.simplefilter("ignore")
            pattern, *outputs = (
                torch.sparse_csr_tensor(index, index[:rows], v, (rows, rows),
                                        check_invariants=False)
                for v in values
            )  # fmt: skip
        # the dots are read from ``values``: the outputs must hold them, not copies, and
        # sampled_addmm must write there (true of torch 2.13; checked once per row count)
        zeros = torch.zeros(rows, 1, dtype=dtype)
        for output, v in zip(outputs, values[1:], strict=True):
            torch.sparse.sampled_addmm(pattern, zeros, zeros.t(), beta=0.0, out=output)
            if output.values().data_ptr() != v.data_ptr():
                raise RuntimeError(
                    "adampx's default CPU step needs torch.sparse.sampled_addmm(out=...) to "
                    f"write into the values it was given, which torch {torch.__version__} "
                    "does not; use fused=True"
                )
        norms, scale = torch.empty(2, rows, dtype=dtype), torch.empty(rows, dtype=dtype)
        return _Diagonal(
            pattern=pattern,
            outputs=(outputs[0], outputs[1]),
            dots=(values[1], values[2]),
            columns=(values[1].unsqueeze(1), values[2].unsqueeze(1)),
            norms=norms,
            p_norm=norms[0],
            g_norm=norms[1],
            scale=scale,
            scale_column=scale.unsqueeze(1),
        )

    if workspace is None:
        return build()
    return workspace.constant(("diagonal", rows, dtype), build)


def _row_dots(
    a: Tensor,
    b: Tensor,
    workspace: Workspace | None,
    slot: int = 0,
    *,
    column: bool = False,
    kept: _Diagonal | None = None,
) -> Tensor:
    """``a_i·b_i`` of every row of two ``[rows, length]`` matrices, as a ``[rows]`` vector
    (or a ``[rows, 1]`` column), written into ``kept`` (by default the workspace's
    :class:`_Diagonal` of this row count).

    One pass over ``a`` and ``b`` that writes nothing param-sized: ``torch.sparse.
    sampled_addmm`` computes the product ``a @ b.T`` at the diagonal only. (A product into
    scratch and a row sum, as this path did before, takes two passes and a write, and was
    about twice as slow on large tensors.) The result is a view of a kept output (``slot``
    0 or 1), valid until the next call with the same slot and row count.
    """
    diagonal = _diagonal(a.shape[0], a.dtype, workspace) if kept is None else kept
    torch.sparse.sampled_addmm(diagonal.pattern, a, b.t(), beta=0.0, out=diagonal.outputs[slot])
    return diagonal.columns[slot] if column else diagonal.dots[slot]


class _Outcome(NamedTuple):
    """One tensor's outcome of the test, as Python values where the work depends on them."""

    channel: bool
    layer: bool
    keep: float  # the decay factor 1 − a·r
    gp: Tensor  # [rows, 1]: p_i·g_i
    row_scale: Tensor | None  # channel view: [rows, 1] (‖p_i‖ + eps)²
    layer_scale: Tensor | None  # layer view: 0-d (‖p‖ + eps)²

    @property
    def projected(self) -> bool:
        return self.channel or self.layer


def _value(x: float | Tensor) -> float:
    """A number given as a Python float or a one-element CPU tensor (no device to wait for),
    as a Python float: the decay is then computed in double, as torch's fused kernels do."""
    return x.item() if isinstance(x, Tensor) else x


def _rounded(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype`` (float32 or float64), as a tensor comparison rounds it."""
    return struct.unpack("f", struct.pack("f", x))[0] if dtype == torch.float32 else x


class _Tester:
    """The scale-invariance test of one tensor at a time, from its row sums.

    The arithmetic of :func:`adampx.projection.decide` (which runs as is where
    ``decisions`` are kept); its outcome is read as Python values (these are CPU tensors:
    there is no device to wait for), and the layer view is tested only where the channel
    view fails.
    """

    def __init__(
        self,
        *,
        delta: float,
        eps: float,
        wd_ratio: float,
        decay: float,
        decisions: Decisions | None,
        workspace: Workspace | None,
    ) -> None:
        self.delta, self.eps, self.decisions = delta, eps, decisions
        self.keep = (1 - decay * wd_ratio, 1 - decay)  # projected, not projected
        self.workspace = workspace
        self._projected_keep: Tensor | None = None

    def projected_keep(self, dtype: torch.dtype) -> Tensor:
        """The decay factor of a projected tensor as a 0-d tensor of ``dtype`` (made once)."""
        if self._projected_keep is None or self._projected_keep.dtype != dtype:
            self._projected_keep = torch.tensor(self.keep[0], dtype=dtype)
        return self._projected_keep

    def __call__(self, param: Tensor, p: Tensor, g: Tensor) -> _Outcome:
        """The row sums of ``p`` and ``g`` (``[n0, N/n0]`` views), three passes that write
        nothing param-sized, and the test on them. The tensors of the outcome are views of
        the kept :class:`_Diagonal` of this row count, valid until its next test."""
        rows, length = p.shape
        kept = _diagonal(rows, p.dtype, self.workspace)
        torch.linalg.vector_norm(p, dim=1, out=kept.p_norm)
        torch.linalg.vector_norm(g, dim=1, out=kept.g_norm)
        gp = _row_dots(p, g, self.workspace, slot=0, kept=kept)
        delta, eps = self.delta, self.eps
        if self.decisions is not None:
            decision = decide(RowStatistics(gp, kept.g_norm, kept.p_norm, length), delta, eps)
            self.decisions[param] = decision
            channel, layer = bool(decision.channel), bool(decision.layer)
        else:
            # decide's |p_i·g_i| / (max(‖g_i‖, eps)·max(‖p_i‖, eps)), its roundings included
            # (the product of the two clamped norms is one multiplication), in fewer calls
            cosines = gp.abs().div_(kept.norms.clamp_min(eps).prod(0))
            channel = cosines.amax().item() < _rounded(delta / math.sqrt(length), p.dtype)
            layer = not channel and (
                gp.sum().abs_().div_(
                    torch.linalg.vector_norm(kept.norms, dim=1).clamp_min_(eps).prod()
                ).item()
                < _rounded(delta / math.sqrt(length * rows), p.dtype)
            )  # fmt: skip
        if channel:
            torch.add(kept.p_norm, eps, out=kept.scale).square_()
        return _Outcome(
            channel=channel,
            layer=layer,
            keep=self.keep[0] if channel or layer else self.keep[1],
            gp=kept.columns[0],
            row_scale=kept.scale_column if channel else None,
            layer_scale=(_whole_norm(kept.p_norm) + eps).square() if layer else None,
        )


def split_tested(params: list[Tensor], projection: bool) -> tuple[list[int], list[int]]:
    """Indices of the params the scale-invariance test applies to, and of the others."""
    tested = [k for k, p in enumerate(params) if projection and is_projectable(p)]
    return tested, sorted(set(range(len(params))) - set(tested))


def start_adamp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    projection: bool,
    **kernel: Any,
) -> list[int]:
    """What every fused AdamP step starts with: the step counters incremented, and AdamW in
    one ``torch._fused_adamw_`` call (``kernel``: its options) for the untested tensors.
    Returns the indices of the tested ones."""
    torch._foreach_add_(state_steps, 1)
    tested, untested = split_tested(params, projection)
    if untested:
        torch._fused_adamw_(
            [ps[k] for k in untested],
            [gs[k] for k in untested],
            [exp_avgs[k] for k in untested],
            [exp_avg_sqs[k] for k in untested],
            [],
            [state_steps[k] for k in untested],
            **kernel,
        )
    return tested


def adamp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None,
    workspace: Workspace | None = None,
) -> None:
    """AdamP (not nesterov) for compute views that pass :func:`supported`, of one dtype."""
    kernel: dict[str, Any] = dict(
        beta1=beta1, beta2=beta2, eps=eps, amsgrad=False, maximize=maximize
    )  # fmt: skip
    tested = start_adamp_(
        params, ps, gs, exp_avgs, exp_avg_sqs, state_steps,
        projection=projection, lr=lr, weight_decay=weight_decay, **kernel,
    )  # fmt: skip
    chunks, large = small_tensors.split_small(ps, tested)
    for chunk in chunks:
        small_tensors.adamp_step_(
            chunk, params, ps, gs, exp_avgs, exp_avg_sqs, state_steps,
            lr=lr, decay=_value(lr) * weight_decay, kernel=kernel, eps=eps, delta=delta,
            wd_ratio=wd_ratio, decisions=decisions, workspace=workspace,
        )  # fmt: skip
    if not large:
        return
    like, size = ps[large[0]], _block_size(ps, large)
    tester = _Tester(
        delta=delta, eps=eps, wd_ratio=wd_ratio, decay=_value(lr) * weight_decay,
        decisions=decisions, workspace=workspace,
    )  # fmt: skip
    for k in large:  # each tensor finished while it is in cache
        n0 = params[k].shape[0]
        p, g = row_view(ps[k], n0), row_view(gs[k], n0)
        m, v, step = row_view(exp_avgs[k], n0), row_view(exp_avg_sqs[k], n0), state_steps[k]
        outcome = tester(params[k], p, g)
        if not outcome.projected:  # keep = 1 − lr·λ: AdamW
            torch._fused_adamw_(
                [p], [g], [m], [v], [], [step], lr=lr, weight_decay=weight_decay, **kernel
            )  # fmt: skip
        elif outcome.layer:  # c for the whole tensor: the step of all its rows first
            assert outcome.layer_scale is not None
            w = scratch(workspace, "whole", p.numel(), p.dtype, p.device).view(p.shape)
            _adam_direction(w.zero_(), g, m, v, step, lr, kernel)
            pw = _row_dots(p, w, workspace, slot=1).sum()
            torch.addcmul(w, p, outcome.keep - pw / outcome.layer_scale, out=p)
        else:  # c per row: block by block
            assert outcome.row_scale is not None
            work = scratch(workspace, "work", size, like.dtype, like.device)
            for p_b, g_b, m_b, v_b, row_scale in _in_blocks(p, g, m, v, outcome.row_scale):
                w = _matrix(work, p_b.shape).zero_()
                _adam_direction(w, g_b, m_b, v_b, step, lr, kernel)
                pw = _row_dots(p_b, w, workspace, slot=1, column=True)
                # w − c·p is the projected step: p ← p·(keep − c) + w, c = p·w/(‖p‖ + eps)²
                factor = torch.addcdiv(tester.projected_keep(p.dtype), pw, row_scale, value=-1)
                torch.addcmul(w, p_b, factor, out=p_b)


def _adam_direction(
    w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float | Tensor,
    kernel: dict[str, Any],
) -> None:  # fmt: skip
    """``w ← w − lr·u/bc1`` on a zeroed ``w`` (Adam's step), ``m`` and ``v`` updated, in
    ``torch._fused_adamw_`` without weight decay."""
    torch._fused_adamw_([w], [g], [m], [v], [], [step], lr=lr, weight_decay=0.0, **kernel)


def sgdp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None,
    workspace: Workspace | None = None,
) -> None:
    """SGDP (momentum > 0) for compute views that pass :func:`supported`, of one dtype."""
    lr_value = _value(lr)
    decay = lr_value * weight_decay / (1 - momentum) if weight_decay != 0 else 0.0
    tested, untested = split_tested(params, projection)
    kernel: dict[str, Any] = dict(
        momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize
    )  # fmt: skip
    if untested and weight_decay != 0:
        torch._foreach_mul_([ps[k] for k in untested], 1 - decay)
    chunks, large = small_tensors.split_small(ps, tested)
    for chunk in chunks:
        small_tensors.sgdp_rescale_(
            chunk, params, ps, gs, momentum_buffers,
            lr=lr_value, momentum=momentum, dampening=dampening, nesterov=nesterov,
            maximize=maximize, decay=decay, eps=eps, delta=delta, wd_ratio=wd_ratio,
            decisions=decisions, workspace=workspace,
        )  # fmt: skip
        _sgd_step(*([x[k] for k in chunk] for x in (ps, gs, momentum_buffers)), **kernel)
    if large:
        tester = _Tester(
            delta=delta, eps=eps, wd_ratio=wd_ratio, decay=decay, decisions=decisions,
            workspace=workspace,
        )  # fmt: skip
        for k in large:  # each tensor finished while it is in cache
            n0 = params[k].shape[0]
            p, g = row_view(ps[k], n0), row_view(gs[k], n0)
            b = row_view(momentum_buffers[k], n0)
            outcome = tester(params[k], p, g)
            if outcome.projected:
                p.mul_(_sgdp_scale(p, b, outcome, tester, lr_value, kernel))
            elif outcome.keep != 1.0:
                p.mul_(outcome.keep)
            _sgd_step([p], [g], [b], **kernel)
    if untested:
        _sgd_step(
            [ps[k] for k in untested],
            [gs[k] for k in untested],
            [momentum_buffers[k] for k in untested],
            **kernel,
        )


# SGDP's projected step is p ← p·(keep + lr·c) − lr·d with c = p·d / (‖p‖ + eps)² per row or
# for the whole tensor: the rescale here, the rest in torch's fused SGD. The direction's row
# dots follow by linearity (adampx._shared_step.sgdp_direction_dots).


def _sgdp_scale(
    p: Tensor,
    b: Tensor,
    outcome: _Outcome,
    tester: _Tester,
    lr: float,
    kernel: dict[str, Any],
) -> Tensor:
    """``keep + lr·c`` of a projected tensor (``[n0, N/n0]`` views): a ``[rows, 1]`` column
    per row, or one 0-d factor for a tensor projected as a whole. The tensor is then stepped
    whole (cutting it into row blocks was no faster)."""
    pb = _row_dots(p, b, tester.workspace, slot=1, column=True)
    dots = sgdp_direction_dots(
        pb, outcome.gp, momentum=kernel["momentum"], dampening=kernel["dampening"],
        nesterov=kernel["nesterov"], maximize=kernel["maximize"],
    )  # fmt: skip
    if outcome.channel:
        assert outcome.row_scale is not None
        return torch.addcdiv(tester.projected_keep(p.dtype), dots, outcome.row_scale, value=lr)
    assert outcome.layer_scale is not None
    return outcome.keep + lr * (dots.sum() / outcome.layer_scale)


def _sgd_step(ps: list[Tensor], gs: list[Tensor], bs: list[Tensor], **kernel: Any) -> None:
    """``b ← μ·b + (1−τ)·g; p ← p − lr·d`` in torch's fused SGD kernel (b starts at zero)."""
    torch._fused_sgd_(ps, gs, bs, weight_decay=0.0, is_first_step=False, **kernel)
