"""The ``flat`` backend (``adampx.backends.flat``), the step CUDA tensors take, run on the CPU.

Its numbers are checked against the reference package in ``test_parity_reference.py`` and
``test_parity_torch.py`` (their ``flat`` runs, through ``conftest.backend_run``). Here:
which tensors it is chosen for, that it never reads a value back to the host, that its number
of operations does not grow with the number of tensors, how it cuts tensors into buckets
and runs, what memory it keeps, and that the test of many tensors at once
(:class:`adampx.algorithm.segments.Segments`, padded or not) decides as the per-tensor test.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import adampx
from adampx import SGDP, AdamP
from adampx.algorithm import projection, segments
from adampx.algorithm.spec import Step
from adampx.backends import cpu, flat, plan
from adampx.util.tensors import Batch, step_tensor
from adampx.util.workspace import Workspace

OPTIMIZERS = {
    "adamp": lambda ps, **kw: AdamP(ps, lr=1e-2, weight_decay=1e-2, **kw),
    "sgdp": lambda ps, **kw: SGDP(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, **kw),
}
# ops that read a tensor's value on the host (a device sync on CUDA)
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "item"}
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


@contextlib.contextmanager
def flat_forced(monkeypatch: pytest.MonkeyPatch, bucket_elements: int) -> Iterator[None]:
    """Every step inside takes the ``flat`` backend (CPU tensors included), in buckets of
    about ``bucket_elements`` elements (``conftest.backend_run("flat", ...)`` with another
    bucket size)."""
    monkeypatch.setattr(flat, "BUCKET_ELEMENTS", bucket_elements)
    with adampx.backends.force("flat"):
        yield


def spy_flat(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the flat backend's AdamP and SGDP steps: the number of params of each."""
    calls: list[int] = []
    for name in ("adamp_", "sgdp_"):
        real = getattr(flat, name)

        def spy(step: Any, batch: Batch, workspace: Any, _real: Any = real) -> None:
            calls.append(len(batch.params))
            _real(step, batch, workspace)

        monkeypatch.setattr(flat, name, spy)
    return calls


def count_segment_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every :class:`~adampx.algorithm.segments.Segments` built (each copies its index tensors
    to the device) appends to the returned list."""
    built: list[int] = []
    real = segments.Segments
    monkeypatch.setattr(segments, "Segments", lambda *a, **k: built.append(1) or real(*a, **k))
    return built


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flat_step_never_reads_a_value_on_the_host(name: str, monkeypatch) -> None:
    """No ``.item()``, ``bool(tensor)`` or the like in a step: on CUDA each would be a sync."""
    calls = spy_flat(monkeypatch)
    params = model_params(6)
    opt = OPTIMIZERS[name](params)
    with flat_forced(monkeypatch, bucket_elements=200):
        opt.step()  # builds the index tensors it keeps (the CUDA check also skips this step)
        with Ops() as ops:
            opt.step()
            opt.step()
    assert calls, "the flat step did not run"
    assert not HOST_READS & set(ops.names), ops.names
    # nor a tensor built from host data (``torch.tensor``): a copy to the device per step
    assert not {"lift_fresh", "lift_fresh_copy"} & set(ops.names), ops.names
    # positive control: the counter does see a host read
    with Ops() as control:
        params[0].sum().item()
    assert "_local_scalar_dense" in control.names


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flat_step_operations_do_not_grow_with_the_tensor_count(name: str, monkeypatch) -> None:
    """10 or 100 tensors in one bucket: the same kernels (the point of the flat step on a GPU,
    where each kernel launch costs microseconds whatever its size)."""
    calls = spy_flat(monkeypatch)
    counts = []
    with flat_forced(monkeypatch, bucket_elements=1 << 20):
        for count in (10, 100):
            opt = OPTIMIZERS[name](model_params(count))
            opt.step()
            with Ops() as ops:
                opt.step()
            counts.append(ops.kernels())
    assert calls, "the flat step did not run"
    assert counts[0] == counts[1], counts
    # and far fewer than the eager multi-tensor math, which tests tensor by tensor
    opt = OPTIMIZERS[name](model_params(100), foreach=True)
    with adampx.backends.force("foreach"):
        opt.step()
        with Ops() as eager:
            opt.step()
    assert eager.kernels() > 10 * counts[1], (eager.kernels(), counts)


def test_buckets_and_runs_cover_every_tested_tensor_once() -> None:
    params = model_params(30)
    ps = [p.detach() for p in params]
    tested = [k for k, p in enumerate(params) if p.dim() > 1]
    limit = 200
    with pytest.MonkeyPatch.context() as m:
        m.setattr(flat, "BUCKET_ELEMENTS", limit)
        order, segs, buckets = flat._plan(ps, tested, None)
    assert sorted(order) == tested
    row_lengths = [ps[k].numel() // ps[k].shape[0] for k in order]
    assert row_lengths == sorted(row_lengths)
    assert [k for b in buckets for k in b.bucket] == order
    total = sum(ps[k].numel() for k in order)
    cap = max(limit, -(-total // flat.BUCKETS))
    assert len(buckets) > 1
    rows = 0
    for b in buckets:
        size = sum(ps[k].numel() for k in b.bucket)
        assert size <= cap or len(b.bucket) == 1
        assert b.rows == slice(rows, rows + sum(ps[k].shape[0] for k in b.bucket))
        rows = b.rows.stop
        # runs: consecutive, one row length each, covering the bucket
        assert b.runs[0].elements.start == 0 and b.runs[-1].elements.stop == size
        assert all(r.elements.stop == s.elements.start for r, s in itertools.pairwise(b.runs))
        assert len({r.shape[1] for r in b.runs}) == len(b.runs)
    assert rows == segs.rows


def test_runs_merge_equal_row_lengths() -> None:
    runs = flat._runs([(2, 3), (4, 3), (1, 5), (3, 5), (2, 3)])
    assert [(r.elements, r.rows, r.shape) for r in runs] == [
        (slice(0, 18), slice(0, 6), (6, 3)),
        (slice(18, 38), slice(6, 10), (4, 5)),
        (slice(38, 44), slice(10, 12), (2, 3)),
    ]


def test_padded_reductions_match_segment_reduce_and_direct_sums() -> None:
    """The padded reductions (what the flat backend uses, for GPUs) and
    ``torch.segment_reduce`` (``padded=False``) against each tensor's rows reduced on their
    own, over the last dim of a batch of row vectors and of a single one."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (1, 2), (5, 7), (2, 2)]
    lengths = [3, 1, 5, 2]
    x = torch.randn(2, 11, generator=gen, dtype=torch.float64)
    x[1, 4] = float("nan")  # a NaN stays in its tensor (the third)
    plain = segments.Segments(shapes, CPU, padded=False)
    padded = segments.Segments(shapes, CPU, padded=True)
    assert plain.padded is None and padded.padded is not None
    for how in ("sum", "max"):
        for v in (x, x[0]):
            parts = v.split(lengths, -1)
            direct = [c.sum(-1) if how == "sum" else c.amax(-1) for c in parts]
            expected = torch.stack(direct, -1)
            counts = torch.tensor(lengths).expand(*v.shape[:-1], -1)
            reduced = torch.segment_reduce(v, how, lengths=counts, axis=v.dim() - 1)
            torch.testing.assert_close(reduced, expected, equal_nan=True)
            for segs in (padded, plain):
                torch.testing.assert_close(getattr(segs, how)(v), expected, equal_nan=True)
        for segs in (padded, plain):
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


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "segment_reduce"])
def test_many_tensor_test_matches_a_direct_per_tensor_computation(padded: bool) -> None:
    """:func:`adampx.algorithm.projection.test` on the concatenated row sums of many tensors
    (their :class:`Segments`, padded as in the flat backend or with ``segment_reduce``)
    decides as the test of ``docs/algorithm.md`` computed directly, tensor by tensor, in
    float64 (and as the same function on one tensor, :class:`OneTensor`)."""
    shapes, ps, gs = _scale_invariance_cases()
    delta, eps = 0.1, 1e-8
    rows = [(p.view(p.shape[0], -1), g.view(g.shape[0], -1)) for p, g in zip(ps, gs, strict=True)]
    norms = torch.cat([torch.stack((p.norm(dim=1), g.norm(dim=1))) for p, g in rows], 1)
    gp = torch.cat([(p * g).sum(1) for p, g in rows])
    segs = segments.Segments(shapes, CPU, padded=padded)
    assert (segs.padded is not None) == padded
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
def test_index_tensors_are_built_once(name: str, monkeypatch) -> None:
    """The step's index tensors are copied to the device at the first step only: a copy
    from the host inside a captured CUDA graph would fail."""
    built = count_segment_builds(monkeypatch)
    opt = OPTIMIZERS[name](model_params(6))
    with flat_forced(monkeypatch, bucket_elements=200):
        opt.step()
        first = len(built)
        assert first > 0
        for _ in range(3):
            opt.step()
    assert len(built) == first


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_workspace_is_a_fraction_of_the_model(name: str, monkeypatch) -> None:
    """Three flat buffers of at most a quarter of the tested elements each (once that is more
    than the smallest bucket), where torch's AdamW(foreach=True) allocates about the model."""
    calls = spy_flat(monkeypatch)
    params = model_params(40)
    opt = OPTIMIZERS[name](params)
    with flat_forced(monkeypatch, bucket_elements=100):
        opt.step()
    assert calls, "the flat step did not run"
    kept = sum(b.numel() for b in opt._workspace._buffers.values())
    tested = sum(p.numel() for p in params if p.dim() > 1)
    assert kept <= 3 * -(-tested // flat.BUCKETS)


class _OnCuda(Tensor):
    """A CPU tensor that says it is on CUDA: how the routing sees a CUDA tensor's compute
    view (the backends' ``takes`` ask ``is_cpu`` / ``is_cuda``)."""

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
@pytest.mark.parametrize(
    ("foreach", "workspace", "takes_flat"),
    [(None, True, True), (True, True, True), (False, True, False), (None, False, False)],
)
def test_cuda_tensors_take_the_flat_step_unless_told_otherwise(
    name: str, foreach: bool | None, workspace: bool, takes_flat: bool
) -> None:
    """Which step each device gets: ``foreach=False`` and functional calls without a
    workspace (where the index tensors would be copied at every step) keep the eager math;
    CPU tensors take the ``cpu`` backend either way."""
    common = dict(lr=0.1, eps=1e-8, weight_decay=1e-2, delta=0.1, wd_ratio=0.1)
    common |= dict(maximize=False, projection=True)
    if name == "adamp":
        step = Step(optimizer="adamp", beta1=0.9, beta2=0.999, nesterov=False, **common)  # type: ignore[arg-type]
    else:
        step = Step(optimizer="sgdp", momentum=0.9, dampening=0.0, nesterov=False, **common)  # type: ignore[arg-type]
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(2)]
    ps = [params[0].detach(), params[1].detach().as_subclass(_OnCuda)]
    assert ps[0].is_cpu and not ps[1].is_cpu and ps[1].is_cuda
    gs = [torch.randn(4, 3, dtype=torch.float64) for _ in params]
    states = [[torch.zeros(4, 3, dtype=torch.float64) for _ in params]]
    states *= 2 if name == "adamp" else 1
    steps = [step_tensor(p) for p in params] if name == "adamp" else []
    batch = Batch(params, ps, gs, [list(s) for s in states], steps)
    kept = Workspace() if workspace else None
    candidates, imposed = plan.chain(step, foreach_flag=foreach, fused=False, workspace=kept)
    assert not imposed
    assert candidates == ([cpu, flat] if takes_flat else [cpu])
    routes = plan.route(step, batch, foreach_flag=foreach, fused=False, workspace=kept)
    chosen = {backend.NAME: indices for backend, indices in routes}
    eager = plan.eager_math(foreach, params).NAME
    assert eager in ("eager", "foreach")
    assert chosen == {"cpu": [0], ("flat" if takes_flat else eager): [1]}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_changing_delta_rebuilds_nothing_and_changes_the_decision(name: str, monkeypatch) -> None:
    """The thresholds follow ``delta`` on the device: a delta schedule copies nothing to the
    device, and the decisions match a fresh optimizer's with that delta."""
    built = count_segment_builds(monkeypatch)
    params = model_params(6)
    opt = OPTIMIZERS[name](params, track_statistics=True)
    fired = []
    with flat_forced(monkeypatch, bucket_elements=200):
        opt.step()
        first = len(built)
        for delta in (0.0, 10.0, 0.0):
            opt.param_groups[0]["delta"] = delta
            opt.step()
            fired.append(sum(r.view in ("channel", "layer") for r in opt.statistics()))
    assert len(built) == first
    assert fired[0] == 0 and fired[1] > 0 and fired[2] == 0, fired


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_index_tensors_are_built_once_with_many_buckets_and_groups(name: str, monkeypatch) -> None:
    """Four param groups of many buckets each: every set of index tensors a step uses stays
    cached (a cache that dropped them would copy to the device, a sync, at every step)."""
    built = count_segment_builds(monkeypatch)
    groups = [{"params": model_params(12 + 5 * seed, seed=seed)} for seed in range(4)]
    opt = OPTIMIZERS[name](groups)
    with flat_forced(monkeypatch, bucket_elements=100):
        opt.step()
        first = len(built)
        assert first > 8  # more sets than a small cache would keep
        for _ in range(3):
            opt.step()
    assert len(built) == first


def test_index_cache_is_bounded() -> None:
    workspace = Workspace()
    for n in range(3 * Workspace.CONSTANTS):
        segments.cached_segments(workspace, [(n + 1, 2)], CPU, padded=True)
    assert len(workspace._constants) == Workspace.CONSTANTS


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("path", ["kernels", "flat"])
def test_one_element_lr_tensor_of_any_shape(name: str, path: str, monkeypatch) -> None:
    """``lr=torch.tensor([0.1])`` steps as ``lr=0.1`` (it used to raise in SGDP's decay)."""
    lr = 1e-2 if name == "adamp" else 0.1
    cls = AdamP if name == "adamp" else SGDP
    extra: dict[str, Any] = {} if name == "adamp" else dict(momentum=0.9)
    a, b = model_params(4), model_params(4)
    opt_a = cls(a, lr=lr, weight_decay=1e-2, **extra)
    opt_b = cls(b, lr=torch.tensor([lr], dtype=torch.float64), weight_decay=1e-2, **extra)
    run = (
        flat_forced(monkeypatch, bucket_elements=200)
        if path == "flat"
        else contextlib.nullcontext()
    )
    with run:
        for _ in range(3):
            opt_a.step()
            opt_b.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


def test_unit_dims_may_carry_either_stride() -> None:
    """A 1x1 conv weight is contiguous and channels_last at once: its gradient in the other
    stride form still takes the kernel steps (the ``cpu`` and ``flat`` backends)."""
    p = torch.randn(8, 4, 1, 1, dtype=torch.float64)
    g = torch.empty_strided((8, 4, 1, 1), (4, 1, 4, 4), dtype=torch.float64).normal_()
    assert p.stride() != g.stride()
    transposed = torch.randn(4, 8, 1, 1).transpose(0, 1).double()
    for backend in (cpu, flat):
        assert backend.takes(p, p, g, [torch.zeros_like(p)], None) is None
        # but not a transposed layout
        assert backend.takes(p, p, transposed, [], None) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholds_are_the_per_tensor_tests_floats(dtype: torch.dtype) -> None:
    """Computed on the device, the thresholds are the doubles ``delta / math.sqrt(k)`` that
    the per-tensor test compares against, rounded once to the dtype."""
    shapes = [(n, k) for n in (1, 3, 7, 64, 1000) for k in (1, 2, 3, 9, 576, 4608, 12345)]
    for padded in (True, False):
        segs = segments.Segments(shapes, CPU, padded=padded)
        for delta in (0.1, 0.3, 1.7, 1e-3):
            expected = torch.tensor(
                [
                    [delta / math.sqrt(k) for _, k in shapes],
                    [delta / math.sqrt(n * k) for n, k in shapes],
                ],
                dtype=dtype,
            )
            assert torch.equal(torch.stack(segs.thresholds(delta, dtype)), expected)
