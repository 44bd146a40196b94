"""The test of many tensors at once (:class:`adampx.algorithm.segments.Segments`, which the
``cpu`` backend's small tensors take) and the layouts and lr the kernel steps accept.

The segment reductions and :func:`adampx.algorithm.projection.test` over concatenated rows
decide as the per-tensor test; their index tensors are built once and kept in the
optimizer's workspace; the thresholds are the per-tensor test's floats.

Also the helpers that other tests count operations with (:class:`Ops`, :data:`OPTIMIZERS`,
:func:`model_params`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from adampx import SGDP, AdamP
from adampx.algorithm import projection, segments
from adampx.backends import cpu
from adampx.backends.cpu import small
from adampx.util.workspace import Workspace

OPTIMIZERS = {
    "adamp": lambda ps, **kw: AdamP(ps, lr=1e-2, weight_decay=1e-2, **kw),
    "sgdp": lambda ps, **kw: SGDP(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, **kw),
}
# ops that only make views (no kernel on a GPU)
VIEWS = {
    "view", "as_strided", "slice", "select", "unsqueeze", "t", "transpose", "split",
    "split_with_sizes", "alias", "expand", "detach", "unbind", "_unsafe_view", "permute",
}  # fmt: skip
CPU = torch.device("cpu")


class Ops(TorchDispatchMode):
    """Counts the operations dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(n for name, n in self.names.items() if name not in VIEWS)


def model_params(count: int, seed: int = 0) -> list[Tensor]:
    """``count`` conv-like weights (two row lengths), norm gains and a channels_last weight."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3) if i % 2 else (16, 8) for i in range(count)] + [(8,), (4, 2, 3, 3)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    params[-1].data = params[-1].data.contiguous(memory_format=torch.channels_last)
    for p in params:
        grad = 1e-2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = grad.contiguous(memory_format=torch.channels_last) if p is params[-1] else grad
    return params


def count_segment_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every :class:`~adampx.algorithm.segments.Segments` built (each copies its index tensors
    to the device) appends to the returned list."""
    built: list[int] = []
    real = segments.Segments
    monkeypatch.setattr(segments, "Segments", lambda *a, **k: built.append(1) or real(*a, **k))
    return built


def test_segment_reductions_match_direct_sums() -> None:
    """:class:`Segments`' reductions (``torch.segment_reduce``) against each tensor's rows
    reduced on their own, over the last dim of a batch of row vectors and of a single one."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (1, 2), (5, 7), (2, 2)]
    lengths = [3, 1, 5, 2]
    x = torch.randn(2, 11, generator=gen, dtype=torch.float64)
    x[1, 4] = float("nan")  # a NaN stays in its tensor (the third)
    segs = segments.Segments(shapes, CPU)
    for how in ("sum", "max"):
        for v in (x, x[0]):
            parts = v.split(lengths, -1)
            direct = [c.sum(-1) if how == "sum" else c.amax(-1) for c in parts]
            expected = torch.stack(direct, -1)
            torch.testing.assert_close(getattr(segs, how)(v), expected, equal_nan=True)
        assert getattr(segs, how)(x)[1].isnan().tolist() == [False, False, True, False]


def _scale_invariance_cases() -> tuple[list[tuple[int, ...]], list[Tensor], list[Tensor]]:
    """Weights and gradients for which the channel view fires (gradient orthogonal to each
    row, or zero), the layer view fires (orthogonal to the whole tensor only), or neither."""
    gen = torch.Generator().manual_seed(1)
    shapes: list[tuple[int, ...]] = [(4, 3, 3, 3), (16, 8), (2, 5), (6, 4), (3, 12), (8, 2, 3)]
    ps, gs = [], []
    for t, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        rows_p, rows_g = p.view(shape[0], -1), g.view(shape[0], -1)
        if t % 3 == 0:  # channel: orthogonal to every row
            rows_g -= (rows_g * rows_p).sum(1, keepdim=True) / rows_p.square().sum(1, True) * rows_p
        elif t % 3 == 1:  # layer: orthogonal to the tensor as a whole
            g -= (g * p).sum() / p.square().sum() * p
        ps.append(p)
        gs.append(g)
    gs[-1].zero_()  # a zero gradient: the eps clamp, and the channel view fires
    return shapes, ps, gs


def test_many_tensor_test_matches_a_direct_per_tensor_computation() -> None:
    """:func:`adampx.algorithm.projection.test` on the concatenated row sums of many tensors
    (their :class:`Segments`) decides as the test of ``docs/algorithm.md`` computed directly,
    tensor by tensor, in float64 (and as the same function on one tensor,
    :class:`OneTensor`)."""
    shapes, ps, gs = _scale_invariance_cases()
    delta, eps = 0.1, 1e-8
    rows = [(p.view(p.shape[0], -1), g.view(g.shape[0], -1)) for p, g in zip(ps, gs, strict=True)]
    norms = torch.cat([torch.stack((p.norm(dim=1), g.norm(dim=1))) for p, g in rows], 1)
    gp = torch.cat([(p * g).sum(1) for p, g in rows])
    segs = segments.Segments(shapes, CPU)
    outcome = projection.test(norms, gp, segs, delta=delta, eps=eps)
    seen = set()
    for t, (p, g) in enumerate(rows):
        n0, k = p.shape
        # the direct computation, from the tensors themselves
        cosines = (p * g).sum(1).abs() / (
            p.norm(dim=1).clamp_min(eps) * g.norm(dim=1).clamp_min(eps)
        )
        max_cosine = cosines.max()
        cosine_layer = (p * g).sum().abs() / (p.norm().clamp_min(eps) * g.norm().clamp_min(eps))
        channel = bool(max_cosine < delta / math.sqrt(k))
        layer = not channel and bool(cosine_layer < delta / math.sqrt(n0 * k))
        seen.add((channel, layer))
        assert (bool(outcome.channel[t]), bool(outcome.layer[t])) == (channel, layer), t
        torch.testing.assert_close(outcome.max_cosine[t], max_cosine, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(outcome.cosine_layer[t], cosine_layer, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(outcome.p_whole[t], p.norm(), rtol=1e-14, atol=0)
        # the same function on this tensor alone
        one = projection.test(
            torch.stack((p.norm(dim=1), g.norm(dim=1))), (p * g).sum(1),
            projection.OneTensor(n0, k), delta=delta, eps=eps,
        )  # fmt: skip
        assert (bool(one.channel), bool(one.layer)) == (channel, layer), t
    # every outcome occurs: the channel view, the layer view, and neither
    assert seen == {(True, False), (False, True), (False, False)}, seen


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_index_tensors_are_built_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``cpu`` backend's small tensors, in chunks of a few tensors: the index tensors of
    each chunk are built at the first step only (on a device, each build is a copy from the
    host)."""
    monkeypatch.setattr(small, "CHUNK_ELEMENTS", 500)
    built = count_segment_builds(monkeypatch)
    opt = OPTIMIZERS[name](model_params(6))
    opt.step()
    first = len(built)
    assert first > 1  # several chunks
    for _ in range(3):
        opt.step()
    assert len(built) == first


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_changing_delta_rebuilds_nothing_and_changes_the_decision(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thresholds follow ``delta`` on the device: a delta schedule rebuilds no index
    tensors, and the decisions follow the new delta."""
    monkeypatch.setattr(small, "CHUNK_ELEMENTS", 500)
    built = count_segment_builds(monkeypatch)
    params = model_params(6)
    opt = OPTIMIZERS[name](params, track_statistics=True)
    fired = []
    opt.step()
    first = len(built)
    assert first > 0
    for delta in (0.0, 10.0, 0.0):
        opt.param_groups[0]["delta"] = delta
        opt.step()
        fired.append(sum(r.view in ("channel", "layer") for r in opt.statistics()))
    assert len(built) == first
    assert fired[0] == 0 and fired[1] > 0 and fired[2] == 0, fired


def test_index_cache_is_bounded() -> None:
    workspace = Workspace()
    for n in range(3 * Workspace.CONSTANTS):
        segments.cached_segments(workspace, [(n + 1, 2)], CPU)
    assert len(workspace._constants) == Workspace.CONSTANTS


def test_constants_in_use_are_kept_whatever_their_number() -> None:
    """Steps that each use more constants than the bound (a model of many param groups)
    build them once; once they are no longer used, the bound drops the oldest."""
    workspace = Workspace()
    built: list[int] = []
    many = Workspace.CONSTANTS + 50
    for _ in range(3):
        workspace.start_step()
        for n in range(many):
            workspace.constant(("table", n), lambda n=n: built.append(n) or n)  # type: ignore[func-returns-value]
    assert len(built) == many  # the first step only
    for _ in range(2):  # two steps that use other constants
        workspace.start_step()
        for n in range(10):
            workspace.constant(("other", n), lambda: 0)
    assert len(workspace._constants) == Workspace.CONSTANTS
    assert ("other", 9) in workspace._constants and ("table", 0) not in workspace._constants


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_one_element_lr_tensor_of_any_shape(name: str) -> None:
    """``lr=torch.tensor([0.1])`` steps as ``lr=0.1`` (the ``cpu`` backend, SGDP's decay
    included)."""
    lr = 1e-2 if name == "adamp" else 0.1
    cls = AdamP if name == "adamp" else SGDP
    extra: dict[str, Any] = {} if name == "adamp" else dict(momentum=0.9)
    a, b = model_params(4), model_params(4)
    opt_a = cls(a, lr=lr, weight_decay=1e-2, **extra)
    opt_b = cls(b, lr=torch.tensor([lr], dtype=torch.float64), weight_decay=1e-2, **extra)
    for _ in range(3):
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


def test_unit_dims_may_carry_either_stride() -> None:
    """A 1x1 conv weight is contiguous and channels_last at once: its gradient in the other
    stride form still takes the ``cpu`` backend."""
    p = torch.randn(8, 4, 1, 1, dtype=torch.float64)
    g = torch.empty_strided((8, 4, 1, 1), (4, 1, 4, 4), dtype=torch.float64).normal_()
    assert p.stride() != g.stride()
    transposed = torch.randn(4, 8, 1, 1).transpose(0, 1).double()
    assert cpu.takes(p, p, g, [torch.zeros_like(p)], None) is None
    # but not a transposed layout
    assert cpu.takes(p, p, transposed, [], None) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholds_are_the_per_tensor_tests_floats(dtype: torch.dtype) -> None:
    """Computed on the device, the thresholds are the doubles ``delta / math.sqrt(k)`` that
    the per-tensor test compares against, rounded once to the dtype."""
    shapes = [(n, k) for n in (1, 3, 7, 64, 1000) for k in (1, 2, 3, 9, 576, 4608, 12345)]
    segs = segments.Segments(shapes, CPU)
    for delta in (0.1, 0.3, 1.7, 1e-3):
        expected = torch.tensor(
            [
                [delta / math.sqrt(k) for _, k in shapes],
                [delta / math.sqrt(n * k) for n, k in shapes],
            ],
            dtype=dtype,
        )
        assert torch.equal(torch.stack(segs.thresholds(delta, dtype)), expected)
