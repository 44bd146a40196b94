"""The scale-invariance test and the radial projection of AdamP / SGDP, in Python.

Pure functions, no optimizer state; the math is stated in ``docs/algorithm.md``. For a
weight ``p`` with ``p.dim() > 1`` (``n0`` rows of length ``N / n0``), its raw gradient ``g``
and an update direction ``u``, try two views in order, the channel view (one row per output
channel, dim 0) and then the layer view (the whole tensor as one row):

1. ``c_i = |cos(g_i, p_i)|`` per row, with ``cos(a, b) = a·b / (max(‖a‖, eps) max(‖b‖, eps))``;
2. the view passes when ``max_i c_i < delta / sqrt(row_length)``;
3. in the first view that passes, ``u_i ← u_i − p̂_i (p̂_i · u_i)`` with
   ``p̂_i = p_i / (‖p_i‖ + eps)``, and the weight-decay multiplier is ``wd_ratio``;
   if no view passes, ``u`` is unchanged and the multiplier is 1.

The test needs three sums per row, ``‖p_i‖``, ``‖g_i‖`` and ``p_i·g_i``; the layer view's
follow from the rows'. :func:`test` is the one place that turns those sums into the
decision, for one tensor (:class:`OneTensor`) or for many tensors whose rows are
concatenated (:class:`adampx.algorithm.segments.Segments`): every Python backend calls it.
The formulas it is made of (:func:`abs_cosine`, :func:`threshold`, :func:`radial_scale`,
:func:`keep_factor`) are written once here.

Everything is computed with tensor operations only: the decision is a boolean tensor and
the projection is applied with a coefficient chosen by ``where``, so no value ever travels
from the device to the host (no synchronisation, no graph break under ``torch.compile``).
Rows are reduced over dims ``1..`` in place, so any memory layout works without copies.

The per-tensor API (:func:`row_statistics` → :func:`decide` → :func:`projection_coefficients`
→ :func:`apply_projection_`, or :func:`project_` for all of it) works on FSDP2's sharded
params as they are: the per-row statistics are gathered in full on every rank, so every rank
takes the decision of the whole tensor, exactly as one process would.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from adampx.util.tensors import like_param, local_rows, replicated

__all__ = [
    "Decision",
    "Decisions",
    "OneTensor",
    "Outcome",
    "RowStatistics",
    "abs_cosine",
    "apply_projection_",
    "channel_view",
    "decide",
    "is_projectable",
    "keep_factor",
    "layer_view",
    "project_",
    "project_with_",
    "projection_coefficients",
    "radial_scale",
    "row_statistics",
    "test",
    "threshold",
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


Decisions = dict[Tensor, Decision]
"""Where a caller wants them (optimizer statistics), the decisions of the scale-invariance
test, keyed by the parameter as the user holds it."""


def is_projectable(p: Tensor) -> bool:
    """Whether ``p`` is ever tested: more than one dimension and at least one element.

    For complex tensors this is decided on the complex shape, so a 1-d complex bias is never
    projected even though its real view has two dimensions.
    """
    return p.dim() > 1 and p.numel() > 0


# ---------------------------------------------------------------- the formulas, once each


def threshold(delta: float | Tensor, root: float | Tensor) -> float | Tensor:
    """``δ / √n``, the test's threshold for rows of ``n`` elements, from ``root = √n``.

    The roots are computed on the host with ``math.sqrt`` (correctly rounded; torch's
    vectorised float64 square root is not, on every CPU) once per shape, so that every
    backend compares against the same doubles: a Python float here, or a float64 tensor of
    roots on the device (correctly rounded division either way; ``torch.div``, since
    ``delta / tensor`` is a reciprocal and a product, two roundings).
    """
    if isinstance(root, Tensor):
        return torch.div(root.new_full((), delta) if not isinstance(delta, Tensor) else delta, root)
    return delta / root


def abs_cosine(dots: Tensor, norms: Tensor, eps: float) -> Tensor:
    """``|a·b| / (max(‖a‖, eps) · max(‖b‖, eps))`` from the dot products ``dots`` (shape
    ``[k]``) and the two norms stacked as ``norms`` (shape ``[2, k]``)."""
    return dots.abs().div_(norms.clamp_min(eps).prod(0))


def radial_scale(norm: Tensor, eps: float) -> Tensor:
    """``(‖p‖ + eps)²``: the projection's coefficient is ``c = p·u / (‖p‖ + eps)²``, so that
    ``u − c·p`` is ``u`` less its radial part along ``p̂ = p / (‖p‖ + eps)``."""
    return (norm + eps).square()


def keep_factor(decay: float | Tensor, ratio: float | Tensor) -> float | Tensor:
    """The decoupled weight decay's factor ``1 − a·r``: ``p ← p·(1 − a·r)`` before the step,
    with ``a`` the optimizer's decay amount (``lr·λ``, or ``lr·λ/(1−μ)`` for SGDP) and ``r``
    the multiplier of the test (``wd_ratio`` where it projects, else 1)."""
    return 1 - decay * ratio


# ---------------------------------------------------------------- the test


class Rows(Protocol):
    """How the rows that :func:`test` sees split into tensors: one tensor
    (:class:`OneTensor`) or many concatenated (``adampx.algorithm.segments.Segments``)."""

    def max(self, x: Tensor) -> Tensor:
        """Per tensor, the largest of its rows' values of ``x``."""
        ...

    def sum(self, x: Tensor) -> Tensor:
        """Per tensor, the sum of its rows' values of ``x`` (the last dim runs over rows)."""
        ...

    def whole_norms(self, norms: Tensor) -> Tensor:
        """``[2, rows]`` row norms to ``[2, tensors]`` norms of the whole tensors."""
        ...

    def thresholds(self, delta: float, dtype: torch.dtype) -> tuple[float | Tensor, ...]:
        """The channel view's and the layer view's thresholds, per tensor."""
        ...

    def per_row(self, x: Tensor) -> Tensor:
        """A per-tensor value for each of the tensor's rows."""
        ...

    def threshold_values(self, delta: float, index: int) -> tuple[float, float]:
        """Tensor ``index``'s two thresholds as Python floats (for its :class:`Decision`)."""
        ...


class OneTensor:
    """The rows of one tensor: ``rows`` rows of ``row_length`` elements."""

    def __init__(self, rows: int, row_length: int) -> None:
        self.rows = rows
        self.row_length = row_length
        self.roots = (math.sqrt(row_length), math.sqrt(row_length * rows))

    def max(self, x: Tensor) -> Tensor:
        return x.amax(-1)

    def sum(self, x: Tensor) -> Tensor:
        return x.sum(-1)

    def whole_norms(self, norms: Tensor) -> Tensor:
        return torch.linalg.vector_norm(norms, dim=-1)

    def thresholds(self, delta: float, dtype: torch.dtype) -> tuple[float, float]:
        # a Python float compared with a tensor is rounded to the tensor's dtype
        return self.threshold_values(delta, 0)

    def per_row(self, x: Tensor) -> Tensor:
        return x  # 0-d: broadcasts over the rows

    def threshold_values(self, delta: float, index: int) -> tuple[float, float]:
        return threshold(delta, self.roots[0]), threshold(delta, self.roots[1])  # type: ignore[return-value]


class Outcome(NamedTuple):
    """The test of one or many tensors, and what the projection and the decay need.

    Per tensor (0-d for :class:`OneTensor`): ``channel``, ``layer``, ``max_cosine``,
    ``cosine_layer``, ``p_whole`` (``‖p‖``); per row: ``p_norm`` (``‖p_i‖``).
    """

    rows: Rows
    channel: Tensor
    layer: Tensor
    max_cosine: Tensor
    cosine_layer: Tensor
    p_norm: Tensor
    p_whole: Tensor
    eps: float

    @property
    def fired(self) -> Tensor:
        """Per tensor: the projection applies in one of the views."""
        return self.channel | self.layer

    def ratio(self, wd_ratio: float) -> Tensor:
        """Per tensor the weight-decay multiplier ``r``: ``wd_ratio`` where the projection
        fired, else 1 (in the statistics' dtype)."""
        one = self.max_cosine.new_ones(())
        return torch.where(self.fired, torch.full_like(one, wd_ratio), one)

    def keep(self, decay: float | Tensor, wd_ratio: float) -> Tensor:
        """Per tensor the decay factor ``1 − a·r`` (:func:`keep_factor`)."""
        return keep_factor(decay, self.ratio(wd_ratio))  # type: ignore[return-value]

    def coefficients(self, dots: Tensor) -> Tensor:
        """Per row ``c_i``, with ``u_i − c_i p_i`` the projected row, from ``dots_i = p_i·u_i``.

        Channel view ``c_i = p_i·u_i / (‖p_i‖ + eps)²``, layer view ``c = p·u / (‖p‖ + eps)²``
        for every row, zero where the projection does not fire. Chosen with ``where``, never
        by multiplying with zero: a NaN in a row of a tensor that is not projected stays
        there. A zero weight gives a zero coefficient, never NaN.
        """
        rows = self.rows
        zero = dots.new_zeros(())
        layer = torch.where(self.layer, rows.sum(dots) / radial_scale(self.p_whole, self.eps), zero)
        channel = rows.per_row(self.channel)
        return torch.where(channel, dots / radial_scale(self.p_norm, self.eps), rows.per_row(layer))

    def project_(self, p: Tensor, u: Tensor) -> Tensor:
        """One tensor's ``u ← u − c_i p_i`` in place, ``c_i`` the coefficients of ``u``
        (:meth:`coefficients` of its row dots with ``p``); returns ``u``."""
        return apply_projection_(p, u, self.coefficients(replicated(row_dot(p, u))))

    def result(
        self, p: Tensor, u: Tensor, *, delta: float, wd_ratio: float
    ) -> tuple[Tensor, Decision]:
        """One tensor's ``(r, decision)`` as :func:`project_` returns them: the weight-decay
        multiplier as a 0-d tensor of ``u``'s dtype, and the :class:`Decision`."""
        return like_param(self.ratio(wd_ratio).to(u.dtype), p), self.decision(delta)

    def decision(self, delta: float, index: int | None = None) -> Decision:
        """The :class:`Decision` of one tensor (``index`` among many; None for one)."""
        pick = (lambda x: x) if index is None else (lambda x: x[index])
        channel_threshold, layer_threshold = self.rows.threshold_values(delta, index or 0)
        return Decision(
            pick(self.channel),
            pick(self.layer),
            pick(self.max_cosine),
            pick(self.cosine_layer),
            channel_threshold,
            layer_threshold,
        )

    def record(self, decisions: Decisions | None, params: list[Tensor], delta: float) -> None:
        """Each tensor's :class:`Decision` into ``decisions`` (if given), under its param."""
        if decisions is None:
            return
        if isinstance(self.rows, OneTensor):
            decisions[params[0]] = self.decision(delta)
            return
        for t, param in enumerate(params):
            decisions[param] = self.decision(delta, t)


def test(norms: Tensor, gp: Tensor, rows: Rows, *, delta: float, eps: float) -> Outcome:
    """The scale-invariance test, channel view first, then layer view, from row sums.

    Args:
        norms: ``[2, rows]``: ``‖p_i‖`` and ``‖g_i‖`` of every row.
        gp: ``[rows]``: ``p_i·g_i``.
        rows: how the rows split into tensors.
        delta: threshold ``δ``; a view passes when every ``|cos| < δ / sqrt(row_length)``.
        eps: the ``eps`` of the cosine's norm clamp and of ``(‖p‖ + eps)²``.

    Returns:
        :class:`Outcome`; ``channel`` and ``layer`` are mutually exclusive.
    """
    max_cosine, channel = channel_view(norms, gp, rows, delta=delta, eps=eps)
    whole, cosine_layer, layer = layer_view(norms, gp, rows, delta=delta, eps=eps)
    layer = layer & ~channel
    return Outcome(rows, channel, layer, max_cosine, cosine_layer, norms[0], whole[0], eps)


def channel_view(
    norms: Tensor, gp: Tensor, rows: Rows, *, delta: float, eps: float
) -> tuple[Tensor, Tensor]:
    """The first half of :func:`test`: per tensor the largest row cosine and whether the
    channel view passes (``max_i |cos(g_i, p_i)| < δ / √(row length)``)."""
    max_cosine = rows.max(abs_cosine(gp, norms, eps))
    return max_cosine, max_cosine < rows.thresholds(delta, gp.dtype)[0]


def layer_view(
    norms: Tensor, gp: Tensor, rows: Rows, *, delta: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The second half of :func:`test`: per tensor its norms ``[2, tensors]`` (``‖p‖``,
    ``‖g‖``), the whole tensor's cosine, and whether the layer view passes (whether or not
    the channel view did: :func:`test` gives the channel view precedence). A caller that
    reads the channel view on the host can skip this where it passed."""
    whole = rows.whole_norms(norms)
    cosine_layer = abs_cosine(rows.sum(gp), whole, eps)
    return whole, cosine_layer, cosine_layer < rows.thresholds(delta, gp.dtype)[1]


# ---------------------------------------------------------------- one tensor at a time


def _row_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_j a_ij b_ij`` for every row ``i`` (dim 0), for any layout."""
    return (a * b).sum(dim=_row_dims(a))


def row_statistics(p: Tensor, g: Tensor) -> RowStatistics:
    """Row dot product and row norms of a weight ``p`` and its gradient ``g``.

    Args:
        p: real weight tensor with ``p.dim() > 1`` (use ``torch.view_as_real`` for complex).
        g: its gradient, same shape.

    Returns:
        :class:`RowStatistics` with tensors of shape ``[p.shape[0]]``.
    """
    dims = _row_dims(p)
    return RowStatistics(
        gp=replicated(row_dot(g, p)),
        # norms reduce in one pass without a temporary (faster than a product and a sum)
        g_norm=replicated(torch.linalg.vector_norm(g, dim=dims)),
        p_norm=replicated(torch.linalg.vector_norm(p, dim=dims)),
        row_length=p.numel() // p.shape[0],
    )


def outcome_of(stats: RowStatistics, delta: float, eps: float) -> Outcome:
    """:func:`test` of one tensor from its :class:`RowStatistics`."""
    rows = OneTensor(stats.gp.shape[0], stats.row_length)
    return test(torch.stack((stats.p_norm, stats.g_norm)), stats.gp, rows, delta=delta, eps=eps)


def decide(stats: RowStatistics, delta: float, eps: float) -> Decision:
    """The scale-invariance test of one tensor, channel view first, then layer view.

    Args:
        stats: per-row statistics of the whole tensor (a sharded caller passes globally
            gathered rows, or sums reduced across shards).
        delta: threshold ``δ``; a view passes when every ``|cos| < δ / sqrt(row_length)``.
        eps: the ``eps`` of the cosine's norm clamp.

    Returns:
        :class:`Decision`; ``channel`` and ``layer`` are mutually exclusive.
    """
    return outcome_of(stats, delta, eps).decision(delta)


def projection_coefficients(
    p: Tensor, u: Tensor, stats: RowStatistics, decision: Decision, eps: float
) -> Tensor:
    """Per-row coefficients ``c_i`` such that the projected update is ``u − c_i p_i``.

    Channel view: ``c_i = (p_i·u_i) / (‖p_i‖ + eps)²``; layer view: ``c = (p·u) / (‖p‖ + eps)²``
    for every row; zero where the projection does not fire (see :meth:`Outcome.coefficients`).

    Returns:
        Tensor of shape ``[n0]`` in ``u``'s dtype.
    """
    rows = OneTensor(stats.gp.shape[0], stats.row_length)
    whole = rows.whole_norms(torch.stack((stats.p_norm, stats.g_norm)))
    outcome = Outcome(
        rows, decision.channel, decision.layer, decision.max_cosine_channel,
        decision.cosine_layer, stats.p_norm, whole[0], eps,
    )  # fmt: skip
    return outcome.coefficients(replicated(row_dot(p, u)))


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
    return project_with_(p, u, row_statistics(p, g), delta=delta, wd_ratio=wd_ratio, eps=eps)


def project_with_(
    p: Tensor, u: Tensor, stats: RowStatistics, *, delta: float, wd_ratio: float, eps: float
) -> tuple[Tensor, Decision]:
    """:func:`project_` from row statistics taken earlier (``row_statistics(p, g)``), for a
    caller whose gradient may have changed since (``adampx.Projected``)."""
    outcome = outcome_of(stats, delta, eps)
    outcome.project_(p, u)
    return outcome.result(p, u, delta=delta, wd_ratio=wd_ratio)
