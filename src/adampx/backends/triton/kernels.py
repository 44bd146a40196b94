# mypy: ignore-errors
# (Triton kernels: their arguments are typed by the launch, not by annotations.)
"""The ``triton`` backend's kernels (``@triton.jit`` code only; launched by the package).

A group's tensors are reached through a table of their addresses (``ptrs``: one row per
array, p, g and the one or two state arrays, one column per tensor), never copied. The
work is cut into items: the rows of the tested tensors (``[n0, N/n0]`` views, one item per
row, so that a row's sums are one program's) and chunks of the untested tensors. A row's
sums and dot go to its *slot* (``row_slot``) in vectors that hold every row of every
tested tensor: the row's index for whole tensors; for the local shards of FSDP2 params,
the row's global index, so that one all-reduce of those vectors completes every row
(``whole_rows`` 0 where a shard holds part of each row: then no dot is taken in registers).

Scalars arrive as the bits of a double in an int64 (:func:`_f64`), so that an fp64 step
computes with the hyperparameters' exact values (Triton passes Python floats as fp32).
The math is ``docs/algorithm.md``'s, as in ``adampx.algorithm``: the cosine test, the
thresholds (computed on the host, ``δ/√n`` once per shape), the decay factor ``1 − a·r`` and
Adam's step size, each written once here for this language.

With ``AMP`` (a ``torch.amp.GradScaler`` step), the gradients are divided by ``*grad_scale``
as they are read, the update pass writes them back unscaled (``unscaled``: not when the
scaler has unscaled them already, its scale then 1), and the update pass does nothing where
``*found_inf`` is not 0 (the sums and dots before it write only scratch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _f64(bits):
    """A double passed as its bits in an int64 (see the module doc)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _pointer(ptrs, array, T, t, FP64: tl.constexpr):
    """Tensor ``t``'s data pointer for ``array`` (0 p, 1 g, 2 and 3 the state)."""
    address = tl.load(ptrs + array * T + t)
    return address.to(tl.pointer_type(tl.float64 if FP64 else tl.float32))


@triton.jit
def _arrays(ptrs, T, t, FP64: tl.constexpr):
    """Tensor ``t``'s four data pointers: p, g and the two state arrays."""
    return (
        _pointer(ptrs, 0, T, t, FP64),
        _pointer(ptrs, 1, T, t, FP64),
        _pointer(ptrs, 2, T, t, FP64),
        _pointer(ptrs, 3, T, t, FP64),
    )


@triton.jit
def _moments(beta1_bits, beta2_bits, c1_bits, eps_bits, FP64: tl.constexpr):
    """The direction's scalars (see :func:`_direction`) in the params' dtype."""
    beta1 = _f64(beta1_bits)
    beta2 = _f64(beta2_bits)
    c1 = _f64(c1_bits)
    eps = _f64(eps_bits)
    if not FP64:
        beta1 = beta1.to(tl.float32)
        beta2 = beta2.to(tl.float32)
        c1 = c1.to(tl.float32)
        eps = eps.to(tl.float32)
    return beta1, beta2, c1, eps


@triton.jit
def _grad_scale(grad_scale_ptr, FP64: tl.constexpr, AMP: tl.constexpr):
    """The GradScaler's scale the gradients are divided by (1 without ``AMP``)."""
    if AMP:
        scale = tl.load(grad_scale_ptr).to(tl.float64 if FP64 else tl.float32)
    else:
        scale = 1.0
    return scale


@triton.jit
def _load_grad(g_ptr, at, mask, scale, AMP: tl.constexpr):
    """A block of the gradient, unscaled with ``AMP``."""
    g = tl.load(g_ptr + at, mask=mask, other=0)
    if AMP:
        g = g / scale
    return g


@triton.jit
def _load_direction(
    p_ptr,
    g_ptr,
    s1_ptr,
    s2_ptr,
    at,
    mask,
    sign,
    scale,
    beta1,
    beta2,
    c1,
    sqrt_bc2,
    eps,
    ADAM: tl.constexpr,
    NESTEROV: tl.constexpr,
    AMP: tl.constexpr,
):
    """A block's ``p``, its (unscaled) gradient, new state and direction ``u``, from memory."""
    p = tl.load(p_ptr + at, mask=mask, other=0)
    g = _load_grad(g_ptr, at, mask, scale, AMP)
    s1 = tl.load(s1_ptr + at, mask=mask, other=0)
    s2 = tl.load(s2_ptr + at, mask=mask, other=0)
    s1, s2, u = _direction(sign * g, s1, s2, beta1, beta2, c1, sqrt_bc2, eps, ADAM, NESTEROV)
    return p, g, s1, s2, u


@triton.jit
def _store_step(
    p_ptr, g_ptr, s1_ptr, s2_ptr, at, mask, p, g, s1, s2, u, keep, step_size, coefficient,
    unscaled, ADAM: tl.constexpr, AMP: tl.constexpr,
):  # fmt: skip
    """The block's new state, ``p ← p·keep − s·(u − c·p)``, and with ``AMP`` and
    ``unscaled`` (a scale was given) its unscaled gradient."""
    if AMP:
        if unscaled != 0:
            tl.store(g_ptr + at, g, mask=mask)
    tl.store(s1_ptr + at, s1, mask=mask)
    if ADAM:
        tl.store(s2_ptr + at, s2, mask=mask)
    tl.store(p_ptr + at, p * keep - step_size * (u - coefficient * p), mask=mask)


@triton.jit
def _direction(
    g, s1, s2, beta1, beta2, c1, sqrt_bc2, eps, ADAM: tl.constexpr, NESTEROV: tl.constexpr
):
    """The new state and the update direction ``u`` of a block (``g`` already negated for
    maximize). AdamP: ``m, v`` and ``u = m̂/(√v/√bc2 + eps)`` (``c1``: ``1 − β1``);
    SGDP: ``b`` (``beta1``: μ, ``c1``: ``1 − τ``) and ``d``."""
    if ADAM:
        m = beta1 * s1 + c1 * g
        v = beta2 * s2 + (1 - beta2) * g * g
        denom = tl.sqrt(v) / sqrt_bc2 + eps
        if NESTEROV:
            u = (beta1 * m + c1 * g) / denom
        else:
            u = m / denom
        return m, v, u
    b = beta1 * s1 + c1 * g
    if NESTEROV:
        d = g + beta1 * b
    else:
        d = b
    return b, s2, d


@triton.jit
def _in_registers(view, n, whole_rows, BLOCK: tl.constexpr):
    """Whether a row's ``p·u`` is taken in registers by the update pass (a whole row of at
    most a block, projected per row) rather than by the dot pass: the one rule both follow."""
    return view == 1 and n <= BLOCK and whole_rows != 0


@triton.jit
def _corrections(step_ptrs, t, beta1, beta2, ADAM: tl.constexpr, FP64: tl.constexpr):
    """AdamP: ``1 − β1^t`` and ``√(1 − β2^t)`` for tensor ``t``'s step count (incremented
    before the launch); SGDP: ones."""
    if ADAM:
        count = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32)))
        if FP64:
            count = count.to(tl.float64)
        bc1 = 1 - tl.exp(count * tl.log(beta1))
        sqrt_bc2 = tl.sqrt(1 - tl.exp(count * tl.log(beta2)))
        return bc1, sqrt_bc2
    return beta1 * 0 + 1, beta2 * 0 + 1


@triton.jit
def row_sums_kernel(
    ptrs, T, row_tensor, row_start, row_len, row_slot, sums, S, grad_scale_ptr,
    BLOCK: tl.constexpr, FP64: tl.constexpr, AMP: tl.constexpr,
):  # fmt: skip
    """Per tested row: ``‖p_i‖²``, ``‖g_i‖²``, ``p_i·g_i`` into ``sums[0..2, slot]``."""
    r = tl.program_id(0)
    slot = tl.load(row_slot + r)
    t = tl.load(row_tensor + r)
    start = tl.load(row_start + r)
    n = tl.load(row_len + r)
    p_ptr = _pointer(ptrs, 0, T, t, FP64)
    g_ptr = _pointer(ptrs, 1, T, t, FP64)
    scale = _grad_scale(grad_scale_ptr, FP64, AMP)
    lanes = tl.arange(0, BLOCK)
    if FP64:
        pp = tl.zeros([BLOCK], tl.float64)
    else:
        pp = tl.zeros([BLOCK], tl.float32)
    gg = pp
    gp = pp
    for offset in range(0, n, BLOCK):
        mask = offset + lanes < n
        p = tl.load(p_ptr + start + offset + lanes, mask=mask, other=0)
        g = _load_grad(g_ptr, start + offset + lanes, mask, scale, AMP)
        pp += p * p
        gg += g * g
        gp += p * g
    tl.store(sums + slot, tl.sum(pp, 0))
    tl.store(sums + S + slot, tl.sum(gg, 0))
    tl.store(sums + 2 * S + slot, tl.sum(gp, 0))


@triton.jit
def test_kernel(
    sums,
    S,
    first_row,
    rows,
    thresholds,
    TT,
    eps_bits,
    mode,
    max_cosine,
    cosine_layer,
    p_whole,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    """The scale-invariance test of one tested tensor from its rows' sums: ``mode`` 1 where
    the channel view passes (``max_i |cos(g_i, p_i)| < δ/√(N/n0)``), 2 where only the
    layer view does (``|cos(g, p)| < δ/√N``), else 0; with the cosines and ``‖p‖``."""
    tt = tl.program_id(0)
    first = tl.load(first_row + tt)
    n = tl.load(rows + tt)
    eps = _f64(eps_bits)
    if not FP64:
        eps = eps.to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    worst = tl.zeros([BLOCK], eps.dtype)
    pp = tl.zeros([BLOCK], eps.dtype)
    gg = pp
    gp = pp
    for offset in range(0, n, BLOCK):
        mask = offset + lanes < n
        row_pp = tl.load(sums + first + offset + lanes, mask=mask, other=0)
        row_gg = tl.load(sums + S + first + offset + lanes, mask=mask, other=0)
        row_gp = tl.load(sums + 2 * S + first + offset + lanes, mask=mask, other=0)
        p_norm = tl.maximum(tl.sqrt(row_pp), eps)
        g_norm = tl.maximum(tl.sqrt(row_gg), eps)
        cosine = tl.abs(row_gp) / (p_norm * g_norm)
        # a NaN cosine must fail the test: keep it (max would drop it)
        worst = tl.where(mask & ((cosine > worst) | (cosine != cosine)), cosine, worst)
        pp += tl.where(mask, tl.sqrt(row_pp) * tl.sqrt(row_pp), 0)
        gg += tl.where(mask, tl.sqrt(row_gg) * tl.sqrt(row_gg), 0)
        gp += row_gp
    has_nan = tl.sum((worst != worst).to(tl.int32), 0) > 0
    channel_max = tl.max(tl.where(worst != worst, 0, worst), 0)
    channel_max = tl.where(has_nan, float("nan"), channel_max)
    whole_p = tl.sqrt(tl.sum(pp, 0))
    whole_g = tl.sqrt(tl.sum(gg, 0))
    layer_cos = tl.abs(tl.sum(gp, 0)) / (tl.maximum(whole_p, eps) * tl.maximum(whole_g, eps))
    channel = channel_max < tl.load(thresholds + tt)
    layer = (layer_cos < tl.load(thresholds + TT + tt)) & (not channel)
    tl.store(mode + tt, tl.where(channel, 1, tl.where(layer, 2, 0)))
    tl.store(max_cosine + tt, channel_max)
    tl.store(cosine_layer + tt, layer_cos)
    tl.store(p_whole + tt, whole_p)


@triton.jit
def dots_kernel(
    ptrs,
    T,
    step_ptrs,
    row_tensor,
    row_start,
    row_len,
    row_slot,
    row_tested,
    mode,
    dots,
    whole_rows,
    beta1_bits,
    beta2_bits,
    c1_bits,
    eps_bits,
    sign,
    grad_scale_ptr,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    ADAM: tl.constexpr,
    NESTEROV: tl.constexpr,
    AMP: tl.constexpr,
):
    """Per row of a projected tensor, ``p_i·u_i`` with ``u`` the direction the update pass
    will form (computed here from the state before the step, which stays unwritten), into
    ``dots[slot]``; not for whole rows projected per row that fit in a block (the update
    pass takes theirs)."""
    r = tl.program_id(0)
    tt = tl.load(row_tested + r)
    view = tl.load(mode + tt)
    n = tl.load(row_len + r)
    if view == 0:
        return
    if _in_registers(view, n, whole_rows, BLOCK):  # the update pass takes it
        return
    t = tl.load(row_tensor + r)
    start = tl.load(row_start + r)
    beta1, beta2, c1, eps = _moments(beta1_bits, beta2_bits, c1_bits, eps_bits, FP64)
    _bc1, sqrt_bc2 = _corrections(step_ptrs, t, beta1, beta2, ADAM, FP64)
    p_ptr, g_ptr, s1_ptr, s2_ptr = _arrays(ptrs, T, t, FP64)
    scale = _grad_scale(grad_scale_ptr, FP64, AMP)
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], eps.dtype)
    for offset in range(0, n, BLOCK):
        mask = offset + lanes < n
        p, _g, _s1, _s2, u = _load_direction(
            p_ptr, g_ptr, s1_ptr, s2_ptr, start + offset + lanes, mask, sign, scale, beta1,
            beta2, c1, sqrt_bc2, eps, ADAM, NESTEROV, AMP,
        )  # fmt: skip
        total += tl.where(mask, p * u, 0)
    tl.store(dots + tl.load(row_slot + r), tl.sum(total, 0))


@triton.jit
def layer_dots_kernel(first_row, rows, mode, dots, layer, BLOCK: tl.constexpr, FP64: tl.constexpr):
    """Per tensor projected as a whole, ``p·u``: the sum of its rows' dots (0 for the
    others, so that every output of the step is defined)."""
    tt = tl.program_id(0)
    if tl.load(mode + tt) != 2:
        if FP64:
            tl.store(layer + tt, tl.zeros([], tl.float64))
        else:
            tl.store(layer + tt, tl.zeros([], tl.float32))
        return
    first = tl.load(first_row + tt)
    n = tl.load(rows + tt)
    lanes = tl.arange(0, BLOCK)
    if FP64:
        total = tl.zeros([BLOCK], tl.float64)
    else:
        total = tl.zeros([BLOCK], tl.float32)
    for offset in range(0, n, BLOCK):
        mask = offset + lanes < n
        total += tl.load(dots + first + offset + lanes, mask=mask, other=0)
    tl.store(layer + tt, tl.sum(total, 0))


@triton.jit
def update_kernel(
    ptrs,
    T,
    step_ptrs,
    lr_ptr,
    decay_ptr,
    row_tensor,
    row_start,
    row_len,
    row_slot,
    row_tested,
    R,
    whole_rows,
    chunk_tensor,
    chunk_start,
    chunk_len,
    sums,
    mode,
    p_whole,
    dots,
    layer,
    lr_bits,
    decay_bits,
    beta1_bits,
    beta2_bits,
    c1_bits,
    eps_bits,
    ratio_bits,
    sign,
    grad_scale_ptr,
    found_inf_ptr,
    unscaled,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
    ADAM: tl.constexpr,
    NESTEROV: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    AMP: tl.constexpr,
):
    """The step of one item (a tested row, or a chunk of an untested tensor): the state,
    the direction ``u``, its radial part removed where the test passed (``u − c·p`` with
    ``c = p·u/(‖p‖ + eps)²`` per row or for the whole tensor), then
    ``p ← p·(1 − a·r) − s·(u − c·p)`` (``s``: AdamP's ``lr/(1 − β1^t)``, SGDP's ``lr``);
    nothing where ``AMP`` and ``*found_inf`` is not 0."""
    if AMP:
        if tl.load(found_inf_ptr) != 0:
            return
    item = tl.program_id(0)
    beta1, beta2, c1, eps = _moments(beta1_bits, beta2_bits, c1_bits, eps_bits, FP64)
    ratio = _f64(ratio_bits)
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
        decay = tl.load(decay_ptr).to(tl.float64)
    else:
        lr = _f64(lr_bits)
        decay = _f64(decay_bits)
    if not FP64:
        ratio = ratio.to(tl.float32)
        lr = lr.to(tl.float32)
    coefficient = eps * 0
    radial = eps * 0 + 1  # (‖p_i‖ + eps)² of a row projected per row
    if item < R:
        t = tl.load(row_tensor + item)
        start = tl.load(row_start + item)
        n = tl.load(row_len + item)
        slot = tl.load(row_slot + item)
        view = tl.load(mode + tl.load(row_tested + item))
        if view == 1:
            norm = tl.sqrt(tl.load(sums + slot)) + eps
            radial = norm * norm
            if not _in_registers(view, n, whole_rows, BLOCK):
                coefficient = tl.load(dots + slot) / radial
        elif view == 2:
            norm = tl.load(p_whole + tl.load(row_tested + item)) + eps
            coefficient = tl.load(layer + tl.load(row_tested + item)) / (norm * norm)
    else:
        t = tl.load(chunk_tensor + item - R)
        start = tl.load(chunk_start + item - R)
        n = tl.load(chunk_len + item - R)
        view = item * 0  # not tested
    projected = view != 0
    keep = 1 - decay * tl.where(projected, ratio.to(tl.float64), 1.0)
    if not FP64:
        keep = keep.to(tl.float32)
    bc1, sqrt_bc2 = _corrections(step_ptrs, t, beta1, beta2, ADAM, FP64)
    step_size = lr / bc1
    p_ptr, g_ptr, s1_ptr, s2_ptr = _arrays(ptrs, T, t, FP64)
    scale = _grad_scale(grad_scale_ptr, FP64, AMP)
    lanes = tl.arange(0, BLOCK)
    if _in_registers(view, n, whole_rows, BLOCK):  # p·u taken here, no second read
        mask = lanes < n
        at = start + lanes
        p, g, s1, s2, u = _load_direction(
            p_ptr, g_ptr, s1_ptr, s2_ptr, at, mask, sign, scale, beta1, beta2, c1, sqrt_bc2,
            eps, ADAM, NESTEROV, AMP,
        )  # fmt: skip
        coefficient = tl.sum(tl.where(mask, p * u, 0), 0) / radial
        _store_step(p_ptr, g_ptr, s1_ptr, s2_ptr, at, mask, p, g, s1, s2, u, keep, step_size,
                    coefficient, unscaled, ADAM, AMP)  # fmt: skip
    else:
        for offset in range(0, n, BLOCK):
            mask = offset + lanes < n
            at = start + offset + lanes
            p, g, s1, s2, u = _load_direction(
                p_ptr, g_ptr, s1_ptr, s2_ptr, at, mask, sign, scale, beta1, beta2, c1,
                sqrt_bc2, eps, ADAM, NESTEROV, AMP,
            )  # fmt: skip
            _store_step(p_ptr, g_ptr, s1_ptr, s2_ptr, at, mask, p, g, s1, s2, u, keep,
                        step_size, coefficient, unscaled, ADAM, AMP)  # fmt: skip
