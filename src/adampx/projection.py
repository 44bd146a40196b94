"""The scale-invariance test and the radial projection of AdamP / SGDP.

Pure functions, no optimizer state. The math (``../shared/ALGORITHM.md``, Heo et al., ICLR 2021):

For a weight ``p`` with ``p.dim() > 1`` (``n0`` rows of length ``N / n0``), its raw gradient
``g`` and an update direction ``u``, try two views in order, the channel view (one row per
output channel, dim 0) and then the layer view (the whole tensor as one row):

1. ``c_i = |cos(g_i, p_i)|`` per row, with ``cos(a, b) = a·b / (max(‖a‖, eps) max(‖b‖, eps))``;
2. the view passes when ``max_i c_i < delta / sqrt(row_length)``;
3. in the first view that passes, ``u_i ← u_i − p̂_i (p̂_i · u_i)`` with
   ``p̂_i = p_i / (‖p_i‖ + eps)``, and the weight-decay multiplier is ``wd_ratio``;
   if no view passes, ``u`` is unchanged and the multiplier is 1.

Everything is computed with tensor operations only: the decision is a 0-d boolean tensor and
the projection is applied with a coefficient that is zero where it does not fire, so no value
ever travels from the device to the host (no synchronisation, no graph break under
``torch.compile``). Rows are reduced over dims ``1..`` in place, so any memory layout
(channels_last, transposed views) works without copies.

The computation is split so that a sharded caller can reduce the per-row statistics
globally: :func:`row_statistics` → :func:`decide` → :func:`projection_coefficients` →
:func:`apply_projection_`.

Sharded params (FSDP2's DTensors) work as they are: the per-row statistics (vectors of
``n0`` numbers) are gathered in full on every rank, so every rank takes the decision of
the whole tensor, exactly as one process would, also for ranks whose shard is empty. The
gathers are per tensor today (a few small collectives per tested tensor and step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from adampx._tensors import like_param, local_rows, replicated

__all__ = [
    "Decision",
    "RowStatistics",
    "apply_projection_",
    "decide",
    "is_projectable",
    "project_",
    "projection_coefficients",
    "row_statistics",
]


class RowStatistics(NamedTuple):
    """Per-row sums that the scale-invariance test needs, each of shape ``[n0]``.

    Attributes:
        gp: ``Σ_j g_ij p_ij`` (row dot product of gradient and weight).
        g_norm: ``‖g_i‖`` (row norm of the gradient).
        p_norm: ``‖p_i‖`` (row norm of the weight).
        row_length: number of elements in one row (``N / n0``).
    """

    gp: Tensor
    g_norm: Tensor
    p_norm: Tensor
    row_length: int


class Decision(NamedTuple):
    """Outcome of the scale-invariance test for one tensor (0-d boolean tensors).

    Attributes:
        channel: the channel view passed (it wins over the layer view).
        layer: the channel view failed and the layer view passed.
        max_cosine_channel: ``max_i |cos(g_i, p_i)|`` over rows.
        cosine_layer: ``|cos(g, p)|`` of the whole tensor.
        channel_threshold: ``delta / sqrt(N / n0)`` (a Python float).
        layer_threshold: ``delta / sqrt(N)`` (a Python float).
    """

    channel: Tensor
    layer: Tensor
    max_cosine_channel: Tensor
    cosine_layer: Tensor
    channel_threshold: float
    layer_threshold: float

    @property
    def fired(self) -> Tensor:
        """0-d boolean tensor: the projection applies in one of the views."""
        return self.channel | self.layer


def is_projectable(p: Tensor) -> bool:
    """Whether ``p`` is ever tested: more than one dimension and at least one element.

    For complex tensors this is decided on the complex shape, so a 1-d complex bias is never
    projected even though its real view has two dimensions.
    """
    return p.dim() > 1 and p.numel() > 0


def _row_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_j a_ij b_ij`` for every row ``i`` (dim 0), for any layout."""
    return (a * b).sum(dim=_row_dims(a))


def row_statistics(p: Tensor, g: Tensor) -> RowStatistics:
    """Row dot product and squared row norms of a weight ``p`` and its gradient ``g``.

    Args:
        p: real weight tensor with ``p.dim() > 1`` (use ``torch.view_as_real`` for complex).
        g: its gradient, same shape.

    Returns:
        :class:`RowStatistics` with tensors of shape ``[p.shape[0]]``.
    """
    dims = _row_dims(p)
    return RowStatistics(
        gp=replicated(_row_dot(g, p)),
        # norms reduce in one pass without a temporary (faster than a product and a sum)
        g_norm=replicated(torch.linalg.vector_norm(g, dim=dims)),
        p_norm=replicated(torch.linalg.vector_norm(p, dim=dims)),
        row_length=p.numel() // p.shape[0],
    )


def _abs_cosine(dot: Tensor, norm_a: Tensor, norm_b: Tensor, eps: float) -> Tensor:
    """``|a·b| / (max(‖a‖, eps) · max(‖b‖, eps))`` from a precomputed dot and norms."""
    return dot.abs() / (norm_a.clamp_min(eps) * norm_b.clamp_min(eps))


def _whole_norm(row_norms: Tensor) -> Tensor:
    """The norm of the whole tensor from its row norms."""
    return torch.linalg.vector_norm(row_norms)


def decide(stats: RowStatistics, delta: float, eps: float) -> Decision:
    """The scale-invariance test of ALGORITHM.md, channel view first, then layer view.

    Args:
        stats: per-row statistics of the whole tensor (a sharded caller passes globally
            gathered rows, or sums reduced across shards).
        delta: threshold ``δ``; a view passes when every ``|cos| < δ / sqrt(row_length)``.
        eps: the ``eps`` of the cosine's norm clamp.

    Returns:
        :class:`Decision`; ``channel`` and ``layer`` are mutually exclusive.
    """
    n_rows = stats.gp.shape[0]
    channel_threshold = delta / math.sqrt(stats.row_length)
    layer_threshold = delta / math.sqrt(stats.row_length * n_rows)
    max_cos_channel = _abs_cosine(stats.gp, stats.g_norm, stats.p_norm, eps).amax()
    cos_layer = _abs_cosine(
        stats.gp.sum(), _whole_norm(stats.g_norm), _whole_norm(stats.p_norm), eps
    )
    channel = max_cos_channel < channel_threshold
    layer = (cos_layer < layer_threshold) & ~channel
    return Decision(channel, layer, max_cos_channel, cos_layer, channel_threshold, layer_threshold)


def projection_coefficients(
    p: Tensor, u: Tensor, stats: RowStatistics, decision: Decision, eps: float
) -> Tensor:
    """Per-row coefficients ``c_i`` such that the projected update is ``u − c_i p_i``.

    Channel view: ``c_i = (p_i·u_i) / (‖p_i‖ + eps)²``; layer view: ``c = (p·u) / (‖p‖ + eps)²``
    for every row; zero where the projection does not fire. ``p̂ = p / (‖p‖ + eps)`` (note
    ``+ eps``), so a zero weight gives a zero coefficient, never NaN.

    Returns:
        Tensor of shape ``[n0]`` in ``u``'s dtype.
    """
    return coefficients_from_row_dots(replicated(_row_dot(p, u)), stats, decision, eps)


def coefficients_from_row_dots(
    pu: Tensor, stats: RowStatistics, decision: Decision, eps: float
) -> Tensor:
    """:func:`projection_coefficients` from the row dot products ``pu_i = p_i·u_i``."""
    zero = torch.zeros_like(pu)
    channel_coef = pu / (stats.p_norm + eps).square()
    layer_coef = pu.sum() / (_whole_norm(stats.p_norm) + eps).square()
    layer_coef = torch.where(decision.layer, layer_coef.expand_as(pu), zero)
    return torch.where(decision.channel, channel_coef, layer_coef)


def decay_ratio(decision: Decision, wd_ratio: float, like: Tensor) -> Tensor:
    """The weight-decay multiplier ``r``: ``wd_ratio`` where the projection fired, else 1.

    A 0-d tensor of ``like``'s dtype and device (no host sync).
    """
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return torch.where(decision.fired, torch.full_like(one, wd_ratio), one)


def apply_projection_(p: Tensor, u: Tensor, coefficients: Tensor) -> Tensor:
    """In place ``u_i ← u_i − c_i p_i`` for every row ``i``; returns ``u``."""
    shape = (-1,) + (1,) * (p.dim() - 1)
    if hasattr(p, "to_local"):  # a DTensor: each rank updates its own rows
        start, count = local_rows(p)
        rows = coefficients[start : start + count].view(shape)
        u.to_local().addcmul_(p.to_local(), rows, value=-1)  # type: ignore[attr-defined]
        return u
    return u.addcmul_(p, coefficients.view(shape), value=-1)


def project_(
    p: Tensor, g: Tensor, u: Tensor, *, delta: float, wd_ratio: float, eps: float
) -> tuple[Tensor, Decision]:
    """Test ``p`` for scale invariance and remove the radial part of ``u`` in place.

    Args:
        p: real weight, ``p.dim() > 1`` and non-empty (see :func:`is_projectable`).
        g: its raw gradient (not the momentum).
        u: the update direction; modified in place.
        delta: threshold ``δ`` of the cosine test.
        wd_ratio: weight-decay multiplier where the projection fires.
        eps: the ``eps`` of the cosine clamp and of ``p̂ = p / (‖p‖ + eps)``.

    Returns:
        ``(r, decision)``: ``r`` is the weight-decay multiplier as a 0-d tensor of ``u``'s dtype
        (``wd_ratio`` where the projection fired, else 1), and the :class:`Decision`.
    """
    stats = row_statistics(p, g)
    decision = decide(stats, delta, eps)
    apply_projection_(p, u, projection_coefficients(p, u, stats, decision, eps))
    return like_param(decay_ratio(decision, wd_ratio, u), p), decision
