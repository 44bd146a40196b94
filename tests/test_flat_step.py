"""The flat multi-tensor step that CUDA tensors take (``adampx._flat_step``), run on the CPU.

Its numbers are checked against the reference package in ``test_parity_reference.py`` and
``test_parity_torch.py`` (their ``flat`` runs, through ``conftest.force_flat_step``). Here:
which tensors it is chosen for, that it never reads a value back to the host, that its number
of operations does not grow with the number of tensors, how it cuts tensors into buckets
and runs, and what memory it keeps.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from adampx import SGDP, AdamP
from adampx import _flat_step as flat_step
from adampx import _segments as segments
from adampx import _torch_fused as torch_fused
from conftest import force_flat_step

adamp_module = importlib.import_module("adampx.adamp")
sgdp_module = importlib.import_module("adampx.sgdp")

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


def spy_flat(monkeypatch) -> list[int]:
    """Calls of the flat step's AdamP and SGDP functions (a list that grows per call)."""
    calls: list[int] = []
    for name in ("adamp_", "sgdp_"):
        real = getattr(flat_step, name)

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> None:
            calls.append(len(args[0]))
            _real(*args, **kwargs)

        monkeypatch.setattr(torch_fused, name, spy)
    return calls


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flat_step_never_reads_a_value_on_the_host(name: str, monkeypatch) -> None:
    """No ``.item()``, ``bool(tensor)`` or the like in a step: on CUDA each would be a sync."""
    force_flat_step(monkeypatch, bucket_elements=200)
    calls = spy_flat(monkeypatch)
    params = model_params(6)
    opt = OPTIMIZERS[name](params)
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
    force_flat_step(monkeypatch, bucket_elements=1 << 20)
    counts = []
    for count in (10, 100):
        opt = OPTIMIZERS[name](model_params(count))
        opt.step()
        with Ops() as ops:
            opt.step()
        counts.append(ops.kernels())
    assert counts[0] == counts[1], counts
    # and far fewer than the eager multi-tensor math, which tests tensor by tensor
    monkeypatch.setattr(torch_fused, "supported", lambda *args, **kwargs: False)
    opt = OPTIMIZERS[name](model_params(100), foreach=True)
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
        m.setattr(flat_step, "BUCKET_ELEMENTS", limit)
        order, segs, buckets = flat_step._plan(ps, tested, None)
    assert sorted(order) == tested
    row_lengths = [ps[k].numel() // ps[k].shape[0] for k in order]
    assert row_lengths == sorted(row_lengths)
    assert [k for b in buckets for k in b.bucket] == order
    total = sum(ps[k].numel() for k in order)
    cap = max(limit, -(-total // flat_step.BUCKETS))
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
    runs = flat_step._runs([(2, 3), (4, 3), (1, 5), (3, 5), (2, 3)])
    assert [(r.elements, r.rows, r.shape) for r in runs] == [
        (slice(0, 18), slice(0, 6), (6, 3)),
        (slice(18, 38), slice(6, 10), (4, 5)),
        (slice(38, 44), slice(10, 12), (2, 3)),
    ]


def test_padded_reductions_match_segment_reduce() -> None:
    """The reductions used off the CPU against ``torch.segment_reduce`` (the CPU's)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (1, 2), (5, 7), (2, 2)]
    x = torch.randn(11, 2, generator=gen, dtype=torch.float64)
    x[4, 1] = float("nan")  # a NaN stays in its tensor
    cpu = segments.segments(shapes, torch.device("cpu"))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(segments, "SEGMENT_REDUCE_DEVICES", ())
        padded = segments.segments(shapes, torch.device("cpu"))
    assert cpu.padded is None and padded.padded is not None
    for how in ("sum", "max"):
        expected = torch.segment_reduce(x, how, lengths=torch.tensor([3, 1, 5, 2]))
        torch.testing.assert_close(segments._reduce(x, padded, how), expected, equal_nan=True)
        torch.testing.assert_close(segments._reduce(x, cpu, how), expected, equal_nan=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_index_tensors_are_built_once(name: str, monkeypatch) -> None:
    """The step's index tensors are copied to the device at the first step only: a copy
    from the host inside a captured CUDA graph would fail."""
    force_flat_step(monkeypatch, bucket_elements=200)
    built = []
    real = segments.segments
    monkeypatch.setattr(segments, "segments", lambda *a: built.append(1) or real(*a))
    opt = OPTIMIZERS[name](model_params(6))
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
    force_flat_step(monkeypatch, bucket_elements=100)
    params = model_params(40)
    opt = OPTIMIZERS[name](params)
    opt.step()
    kept = sum(b.numel() for b in opt._workspace._buffers.values())
    tested = sum(p.numel() for p in params if p.dim() > 1)
    assert kept <= 3 * -(-tested // flat_step.BUCKETS)


@pytest.mark.parametrize("module", [adamp_module, sgdp_module], ids=["adamp", "sgdp"])
@pytest.mark.parametrize(
    ("foreach", "workspace", "flat"),
    [(None, True, True), (True, True, True), (False, True, False), (None, False, False)],
)
def test_cuda_tensors_take_the_flat_step_unless_told_otherwise(
    module: Any, foreach: bool | None, workspace: bool, flat: bool, monkeypatch
) -> None:
    """Which step each device gets: ``foreach=False`` and functional calls without a
    workspace (where the index tensors would be copied at every step) keep the eager math."""
    chosen: list[dict[str, Any]] = []
    monkeypatch.setattr(
        torch_fused, "kernel_step", lambda impls, params, *a, **k: chosen.append(impls) or []
    )
    hyper = dict(nesterov=False) if module is adamp_module else dict(momentum=0.9)
    states = [[], [], [], []] if module is adamp_module else [[], []]
    module._kernel_step(
        [], *states, fused=False, foreach=foreach,
        workspace=object() if workspace else None, **hyper,
    )  # fmt: skip
    (impls,) = chosen
    expected = flat_step.adamp_ if module is adamp_module else flat_step.sgdp_
    assert ("cuda" in impls) == flat
    if flat:
        assert impls["cuda"] is expected
    assert impls["cpu"] is (torch_fused.adamp_ if module is adamp_module else torch_fused.sgdp_)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_changing_delta_rebuilds_nothing_and_changes_the_decision(name: str, monkeypatch) -> None:
    """The thresholds follow ``delta`` on the device: a delta schedule copies nothing to the
    device, and the decisions match a fresh optimizer's with that delta."""
    force_flat_step(monkeypatch, bucket_elements=200)
    built = []
    real = segments.segments
    monkeypatch.setattr(segments, "segments", lambda *a: built.append(1) or real(*a))
    params = model_params(6)
    opt = OPTIMIZERS[name](params, track_statistics=True)
    opt.step()
    first = len(built)
    fired = []
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
    force_flat_step(monkeypatch, bucket_elements=100)
    built = []
    real = segments.segments
    monkeypatch.setattr(segments, "segments", lambda *a: built.append(1) or real(*a))
    groups = [{"params": model_params(12 + 5 * seed, seed=seed)} for seed in range(4)]
    opt = OPTIMIZERS[name](groups)
    opt.step()
    first = len(built)
    assert first > 8  # more sets than a small cache would keep
    for _ in range(3):
        opt.step()
    assert len(built) == first


def test_index_cache_is_bounded() -> None:
    from adampx._tensors import Workspace

    workspace = Workspace()
    for n in range(3 * Workspace.CONSTANTS):
        segments.cached_segments(workspace, [(n + 1, 2)], torch.device("cpu"))
    assert len(workspace._constants) == Workspace.CONSTANTS


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("path", ["kernels", "flat"])
def test_one_element_lr_tensor_of_any_shape(name: str, path: str, monkeypatch) -> None:
    """``lr=torch.tensor([0.1])`` steps as ``lr=0.1`` (it used to raise in SGDP's decay)."""
    if path == "flat":
        force_flat_step(monkeypatch, bucket_elements=200)
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
    stride form still takes the kernel step."""
    p = torch.randn(8, 4, 1, 1, dtype=torch.float64)
    g = torch.empty_strided((8, 4, 1, 1), (4, 1, 4, 4), dtype=torch.float64).normal_()
    assert p.stride() != g.stride()
    assert torch_fused.supported(p, p, g, torch.zeros_like(p))
    # but not a transposed layout
    assert not torch_fused.supported(p, p, torch.randn(4, 8, 1, 1).transpose(0, 1).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholds_are_the_per_tensor_tests_floats(dtype: torch.dtype) -> None:
    """Computed on the device, the thresholds are the doubles ``delta / math.sqrt(k)`` that
    the per-tensor test compares against, rounded once to the dtype."""
    shapes = [(n, k) for n in (1, 3, 7, 64, 1000) for k in (1, 2, 3, 9, 576, 4608, 12345)]
    segs = segments.segments(shapes, torch.device("cpu"))
    for delta in (0.1, 0.3, 1.7, 1e-3):
        expected = torch.tensor(
            [
                [delta / math.sqrt(k) for _, k in shapes],
                [delta / math.sqrt(n * k) for n, k in shapes],
            ],
            dtype=dtype,
        )
        assert torch.equal(segs.thresholds(delta, dtype), expected)
