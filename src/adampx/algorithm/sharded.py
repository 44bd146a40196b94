"""The projection for sharded params (FSDP2's DTensors): two collectives per step in all.

Under FSDP2 each rank holds a shard of every parameter: ``Shard(0)`` (some whole rows, maybe
none) or ``Shard(d)`` for ``d > 0`` (every row, some columns). The scale-invariance test needs
whole rows and the whole tensor. Instead of gathering per tensor, every rank writes the
partial row sums of its shard (``g·p``, ``‖g‖²``, ``‖p‖²`` per row) into one vector that
holds the rows of *all* tested tensors at fixed offsets, zeros elsewhere; one ``all_reduce``
(sum) then gives every rank every row's full sums, and every rank decides for every tensor
exactly as one process would. The projection coefficients need ``p·u`` per row: a second
``all_reduce`` of the same kind. Each rank then updates its own rows.

Only 1-D device meshes with ``Shard`` placements take this path; anything else (HSDP's
2-D meshes, replicated DTensors) falls back to the per-tensor path, where DTensor's own
collectives give the same numbers with more, smaller messages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from adampx.algorithm.projection import Decision, RowStatistics, outcome_of, row_dot
from adampx.util.tensors import like_param, local_rows

__all__ = ["batched_projection_supported", "project_sharded_"]


def batched_projection_supported(params: list[Tensor]) -> bool:
    """Whether every param is a DTensor on a 1-D mesh with a ``Shard`` placement."""
    if not params:
        return False
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return all(
        isinstance(p, DTensor)
        and p.device_mesh.ndim == 1
        and isinstance(p.placements[0], Shard)
        and p.device_mesh is params[0].device_mesh  # type: ignore[attr-defined]
        for p in params
    )


def _row_window(p: Tensor) -> tuple[int, int]:
    """Global first row and count of the rows this rank holds (all rows unless Shard(0))."""
    if p.placements[0].dim == 0:  # type: ignore[attr-defined]
        return local_rows(p)
    return 0, p.shape[0]


def _all_rows(
    params: list[Tensor], pieces: list[list[Tensor]], width: int, group: dist.ProcessGroup
) -> list[list[Tensor]]:
    """All-reduce (sum) the per-row pieces of every tensor; one collective for them all.

    ``pieces[k]`` holds ``width`` vectors of this rank's rows of tensor ``k``; returns, per
    tensor, ``width`` vectors over all its rows.
    """
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.shape[0]
    local = pieces[0][0] if pieces else params[0].to_local()  # type: ignore[attr-defined]
    buffer = torch.zeros(width, total, dtype=local.dtype, device=local.device)
    for p, offset, rows in zip(params, offsets, pieces, strict=True):
        start, count = _row_window(p)
        for w, vector in enumerate(rows):
            buffer[w, offset + start : offset + start + count] = vector
    dist.all_reduce(buffer, group=group)
    return [
        [buffer[w, offset : offset + p.shape[0]] for w in range(width)]
        for p, offset in zip(params, offsets, strict=True)
    ]


def project_sharded_(
    params: list[Tensor],
    grads: list[Tensor],
    updates: list[Tensor],
    *,
    delta: float,
    wd_ratio: float,
    eps: float,
) -> list[tuple[Tensor, Decision]]:
    """Test-and-project every sharded tensor at once; returns ``(r, decision)`` per tensor.

    Args:
        params, grads, updates: DTensors of the same shape and placement, per tested tensor
            (real dtypes, ``dim() > 1``); ``updates`` are projected in place.
        delta, wd_ratio, eps: as in docs/algorithm.md.

    Returns:
        Per tensor the weight-decay multiplier (a replicated 0-d DTensor) and the decision.
    """
    group = params[0].device_mesh.get_group()  # type: ignore[attr-defined]
    p_loc = [p.to_local() for p in params]  # type: ignore[attr-defined]
    g_loc = [g.to_local() for g in grads]  # type: ignore[attr-defined]
    u_loc = [u.to_local() for u in updates]  # type: ignore[attr-defined]
    sums = _all_rows(
        params,
        [[row_dot(g, p), row_dot(g, g), row_dot(p, p)] for p, g in zip(p_loc, g_loc, strict=True)],
        3,
        group,
    )
    outcomes = [
        outcome_of(RowStatistics(gp, gg.sqrt(), pp.sqrt(), p.numel() // p.shape[0]), delta, eps)
        for p, (gp, gg, pp) in zip(params, sums, strict=True)
    ]
    pu_rows = _all_rows(
        params, [[row_dot(p, u)] for p, u in zip(p_loc, u_loc, strict=True)], 1, group
    )
    out = []
    for p, pl, ul, (pu,), outcome in zip(params, p_loc, u_loc, pu_rows, outcomes, strict=True):
        coef = outcome.coefficients(pu)
        start, count = _row_window(p)
        if pl.numel():
            shape = (-1,) + (1,) * (pl.dim() - 1)
            ul.addcmul_(pl, coef[start : start + count].view(shape), value=-1)
        ratio = outcome.ratio(wd_ratio).to(pu.dtype)
        out.append((like_param(ratio, p), outcome.decision(delta)))
    return out
