"""The CPU backends against the eager math: ``cpu`` (the default) and ``cpu-kernel``.

Three backend runs of the step are compared here (:mod:`adampx.backends`):

- ``plain``: the ``eager`` backend, the math of :mod:`adampx.algorithm.update` one tensor at
  a time, forced with ``adampx.backends.force("eager")`` during the step;
- ``default``: ``foreach=None`` on the CPU, which routes the tensors it takes to the ``cpu``
  backend: torch's ``torch._fused_adamw_`` / ``torch._fused_sgd_`` plus the projection, small
  tested tensors in chunks (:mod:`adampx.backends.cpu.small`), larger ones one at a time
  (:mod:`adampx.backends.cpu.large`);
- ``fused``: ``fused=True``, the compiled C kernel of the ``cpu-kernel`` backend
  (:mod:`adampx.backends.cpu_kernel`).

Independent references: the reference package ``adamp==0.3.0`` (with the buffer-aliasing
fix of ``test_parity_reference.spy`` for SGDP without nesterov), and the plain path where the
reference has no counterpart (maximize, complex, channels_last, tensor lr). The parities are
in float64 (float32 and half params get rounding tolerances) with the projection firing, and
:class:`PathSpy` checks which backend actually stepped the params, so no parity here is
vacuous.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import math
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import adamp as ref
import pytest
import torch
from torch import Tensor, nn

import adampx
import test_checkpoint as ckpt
import test_statistics as stats_model
from adampx import SGDP, AdamP
from adampx.algorithm.projection import RowStatistics, decide, row_statistics
from adampx.algorithm.spec import Step
from adampx.backends import cpu, cpu_kernel, eager, foreach, plan, triton
from adampx.backends.cpu import large, small
from adampx.util.tensors import Batch, step_tensor
from adampx.util.workspace import Workspace
from norm_mlp import make_model as make_norm_mlp
from test_dtypes_shapes import leaf, make_grad
from test_parity_reference import MODELS, check_fired, check_parity, spy
from test_segments import OPTIMIZERS as OPTIMIZERS_SMALL
from test_segments import Ops, model_params

F64 = dict(rtol=1e-10, atol=1e-12)
STEPS = 6
PATHS = ("plain", "default", "fused")
ADAMP_STATE = ("step", "exp_avg", "exp_avg_sq")

adamp_module = importlib.import_module("adampx.adamp")
sgdp_module = importlib.import_module("adampx.sgdp")


@pytest.fixture(autouse=True, params=["small", "per-tensor"])
def default_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the ``cpu`` backend's tested tensors (all small here) stepped
    together in chunks of a few tensors (:mod:`adampx.backends.cpu.small`, what small tensors
    get), and each on its own (:mod:`adampx.backends.cpu.large`, what large ones get)."""
    if request.param == "per-tensor":
        monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)
    else:
        monkeypatch.setattr(small, "CHUNK_ELEMENTS", 2500)
    return str(request.param)


# ------------------------------------------------------------------------ path helpers


def forced_plain() -> contextlib.AbstractContextManager[None]:
    """Every tensor of the steps inside takes the ``eager`` backend (the plain math)."""
    return adampx.backends.force(eager.NAME)


def _plain_class(cls: type) -> type:
    class Plain(cls):  # type: ignore[misc, valid-type]
        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            with forced_plain():
                return super().step(closure)

    Plain.__name__ = f"Plain{cls.__name__}"
    return Plain


PLAIN = {AdamP: _plain_class(AdamP), SGDP: _plain_class(SGDP)}


def make_opt(cls: type, path: str, params: Any, **hyper: Any) -> torch.optim.Optimizer:
    """``cls`` on ``params`` running ``path``; a tensor lr is copied (each run its own)."""
    hyper = {k: v.clone() if isinstance(v, Tensor) else v for k, v in hyper.items()}
    if path == "plain":
        return PLAIN[cls](params, foreach=False, **hyper)
    if path == "fused":
        return cls(params, fused=True, **hyper)
    assert path == "default"
    return cls(params, **hyper)


def expected_impl(path: str, cls: type, hyper: dict[str, Any]) -> str:
    """The backend that ``path`` must route plain contiguous float CPU tensors to
    (:func:`adampx.backends.plan.chain`)."""
    if path == "fused":
        return cpu_kernel.NAME
    if path == "plain":
        return eager.NAME
    # the default path: ``cpu`` where torch's fused kernels run the options, else the C
    # kernel (a compiler is on CI's path), else the eager math, per tensor on the CPU
    fallback = cpu_kernel.NAME if cpu_kernel.runs_here() else eager.NAME
    if cls is AdamP and hyper.get("nesterov"):
        return fallback  # torch's fused AdamW has no nesterov
    if cls is SGDP and hyper.get("momentum", 0) == 0:
        return fallback  # nor does torch's fused SGD without a buffer
    return cpu.NAME


class PathSpy:
    """Records which backend stepped which params: each backend's ``step_`` (which
    :func:`adampx.backends.plan.run` calls through the module) is wrapped to record the
    ``params`` of every batch it is given."""

    BACKENDS = (eager, foreach, cpu, cpu_kernel, triton)

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: dict[str, list[Tensor]] = {b.NAME: [] for b in self.BACKENDS}
        for backend in self.BACKENDS:
            monkeypatch.setattr(backend, "step_", self._wrap(backend.step_, backend.NAME))

    def _wrap(self, fn: Callable[..., None], name: str) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(step: Step, batch: Batch, workspace: Workspace | None) -> None:
            self.seen[name].extend(batch.params)
            fn(step, batch, workspace)

        return wrapper

    def impls_of(self, p: Tensor) -> set[str]:
        return {name for name, ps in self.seen.items() if any(q is p for q in ps)}

    def assert_only(self, params: Any, impl: str) -> None:
        """Every param in ``params`` was stepped by backend ``impl`` and by no other."""
        for p in params:
            assert self.impls_of(p) == {impl}, (tuple(p.shape), self.impls_of(p))

    def clear(self) -> None:
        for ps in self.seen.values():
            ps.clear()


@pytest.fixture
def path_spy(monkeypatch: pytest.MonkeyPatch) -> PathSpy:
    return PathSpy(monkeypatch)


def all_params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, **tol: float) -> None:
    """Same params and state (the step exactly, moments within ``tol``), same layouts."""
    for pa, pb in zip(all_params(a), all_params(b), strict=True):
        where = f"param {tuple(pa.shape)}"
        torch.testing.assert_close(pb, pa, **tol, msg=lambda m, w=where: f"{w}: {m}")
        sa, sb = a.state[pa], b.state[pb]
        assert sa.keys() == sb.keys(), where
        for key in sa:
            if key == "step":
                assert torch.equal(sb[key], sa[key]), where
                continue
            assert sb[key].stride() == pb.stride(), f"state {key!r} of {where} lost the layout"
            torch.testing.assert_close(
                sb[key], sa[key], **tol, msg=lambda m, w=f"{key} of {where}": f"{w}: {m}"
            )


# ----------------------------------------------------- (a) float64 parity with the reference


ADAMP_REFERENCE_CASES = {
    "plain": dict(lr=1e-2, betas=(0.9, 0.99)),
    "weight-decay": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, wd_ratio=0.2),
    "nesterov": dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, nesterov=True),
}
SGDP_REFERENCE_CASES = {
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.05, wd_ratio=0.3),
    "no-momentum": dict(lr=0.1, weight_decay=0.05),
}


def check_reference_parity(
    path_spy: PathSpy,
    path: str,
    cls: type,
    hyper: dict[str, Any],
    reference: type,
    state_keys: tuple[str, ...],
) -> None:
    """``path`` equals ``reference`` on every model, the projection fired, ``path`` ran."""
    for model_cls in MODELS:
        opts: list[torch.optim.Optimizer] = []

        def make_new(params: Any, opts: list = opts) -> torch.optim.Optimizer:
            opts.append(make_opt(cls, path, params, **hyper))
            return opts[-1]

        opt_ref = check_parity(model_cls, lambda ps: reference(ps, **hyper), make_new, state_keys)
        check_fired(opt_ref, 0.1, model_cls)
        path_spy.assert_only(all_params(opts[0]), expected_impl(path, cls, hyper))


@pytest.mark.parametrize("path", ["default", "fused"])
@pytest.mark.parametrize("case", list(ADAMP_REFERENCE_CASES))
def test_adamp_matches_reference(path: str, case: str, path_spy: PathSpy) -> None:
    hyper = ADAMP_REFERENCE_CASES[case]
    check_reference_parity(path_spy, path, AdamP, hyper, spy(ref.AdamP), ADAMP_STATE)


@pytest.mark.parametrize("path", ["default", "fused"])
@pytest.mark.parametrize("case", list(SGDP_REFERENCE_CASES))
def test_sgdp_matches_reference(path: str, case: str, path_spy: PathSpy) -> None:
    hyper = SGDP_REFERENCE_CASES[case]
    # the reference projects its buffer through an alias unless nesterov: fix that one bug
    reference = spy(ref.SGDP, fixed=not hyper.get("nesterov", False))
    check_reference_parity(path_spy, path, SGDP, hyper, reference, ("momentum",))


def check_parity_steps(
    model_cls: type,
    make_a: Callable[[Any], torch.optim.Optimizer],
    make_b: Callable[[Any], torch.optim.Optimizer],
    steps: int = STEPS,
) -> Iterator[torch.optim.Optimizer]:
    """Train two copies of ``model_cls`` side by side; after every step params and state
    are equal within F64; yields ``opt_a`` after each step."""
    torch.manual_seed(0)
    model_a = model_cls().double()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = make_a(model_a.parameters()), make_b(model_b.parameters())
    gen = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        batch = model_cls.batch(gen)
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
        assert_same_state(opt_a, opt_b, **F64)
        yield opt_a


MAXIMIZE_CASES = {
    "adamp": (AdamP, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)),
    "adamp-nesterov": (AdamP, dict(lr=1e-2, weight_decay=0.05, nesterov=True)),
    "sgdp": (SGDP, dict(lr=0.05, momentum=0.9, weight_decay=0.05)),
    "sgdp-nesterov": (SGDP, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgdp-dampening": (SGDP, dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.05)),
}


@pytest.mark.parametrize("path", ["default", "fused"])
@pytest.mark.parametrize("case", list(MAXIMIZE_CASES))
def test_maximize_matches_plain_path(path: str, case: str, path_spy: PathSpy) -> None:
    """The reference has no maximize: the plain path (checked against torch.optim with
    maximize in test_parity_torch) is the reference here, on the same models and batches."""
    cls, hyper = MAXIMIZE_CASES[case]
    hyper = dict(hyper, maximize=True)
    for model_cls in MODELS:
        opts: list[torch.optim.Optimizer] = []

        def make_new(params: Any, opts: list = opts) -> torch.optim.Optimizer:
            opts.append(make_opt(cls, path, params, **hyper))
            return opts[-1]

        fired = 0
        pairs = check_parity_steps(
            model_cls,
            lambda ps: make_opt(cls, "plain", ps, **hyper, track_statistics=True),
            make_new,
        )
        for opt_plain in pairs:
            fired += sum(s.view in ("channel", "layer") for s in opt_plain.statistics())
        assert fired >= STEPS, model_cls.__name__  # the scale-invariant weight, every step
        path_spy.assert_only(all_params(opts[0]), expected_impl(path, cls, hyper))


# --------------------------------------- (b) the three paths agree: layouts, complex, lr


def _random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _complex(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.complex(_random(shape, seed), _random(shape, seed + 100))


def _flat_buffer_views() -> list[Tensor]:
    """Contiguous params with storage offsets into one flat buffer (as flattening wrappers
    make them)."""
    buffer = _random((60,), 7)
    return [
        nn.Parameter(buffer[5:17].view(3, 4)),
        nn.Parameter(buffer[20:44].view(2, 3, 2, 2)),
        nn.Parameter(buffer[50:56]),
    ]


# Each case builds fresh param groups; "lr" marks the case with a tensor learning rate.
CASES: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "channels_last": lambda: [
        {
            "params": [
                leaf(_channels_last(_random((4, 3, 3, 2), 0))),
                leaf(_channels_last(_random((3, 2, 2, 2), 1))),
                leaf(_random((4,), 2)),
            ]
        }
    ],
    "complex": lambda: [
        {
            "params": [
                leaf(_complex((4, 3), 0)),
                leaf(_complex((2, 3, 2, 2), 1)),
                leaf(_complex((3,), 2)),
                leaf(_random((3, 4), 3)),
            ]
        }
    ],
    "mixed": lambda: [
        {
            "params": [
                leaf(_random(shape, i))
                for i, shape in enumerate([(4, 6), (6,), (), (1, 5), (5, 1), (3, 2, 3), (0, 3)])
            ]
        },
        {
            "params": [leaf(_random((4, 5), 10)), leaf(_random((3, 2, 2, 2), 11))],
            "projection": False,
        },
    ],
    "flat-buffer": lambda: [{"params": _flat_buffer_views()}],
    "tensor-lr": lambda: [
        {
            "params": [
                leaf(_random((4, 6), 0)),
                leaf(_random((6,), 1)),
                leaf(_channels_last(_random((3, 2, 2, 2), 2))),
            ]
        }
    ],
}

CONFIGS = {
    "adamp": (AdamP, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "adamp-max": (AdamP, dict(lr=1e-2, weight_decay=0.1, wd_ratio=0.5, maximize=True)),
    "adamp-nesterov": (
        AdamP,
        dict(lr=2e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05, delta=0.2, nesterov=True),
    ),
    "sgdp-nesterov": (SGDP, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgdp-damp-max": (
        SGDP,
        dict(lr=0.05, momentum=0.8, dampening=0.2, weight_decay=0.1, maximize=True),
    ),
    "sgdp-no-momentum": (SGDP, dict(lr=0.05, weight_decay=0.1)),
}


def run_path(
    cls: type,
    path: str,
    case: str,
    hyper: dict[str, Any],
    steps: int = STEPS,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.optim.Optimizer, set[str]]:
    """``steps`` steps of ``path`` on the params of ``case`` (gradients of make_grad: on even
    steps orthogonal per row to the weight, so the projection fires); returns the optimizer
    and the views in which the projection fired."""
    groups = CASES[case]()
    if dtype is not None:
        groups = [{**g, "params": [leaf(p.to(dtype)) for p in g["params"]]} for g in groups]
    if case == "tensor-lr":
        hyper = dict(hyper, lr=torch.tensor(hyper["lr"], dtype=torch.float64))
    # statistics only where needed: the fast paths are also checked without them
    opt = make_opt(cls, path, groups, **hyper, track_statistics=path == "plain")
    fired = set()
    for k in range(steps):
        for j, p in enumerate(all_params(opt)):
            p.grad = make_grad(p, k, j)
        opt.step()
        fired |= {s.view for s in opt.statistics()}
        if case == "tensor-lr" and k == steps // 2:
            opt.param_groups[0]["lr"].mul_(0.5)  # as a scheduler does, in place
    return opt, fired - {"none", "skipped"}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_paths_agree_float64(case: str, config: str, path_spy: PathSpy) -> None:
    cls, hyper = CONFIGS[config]
    plain, fired = run_path(cls, "plain", case, hyper)
    assert fired, "the projection must fire"
    path_spy.assert_only(all_params(plain), "eager")
    for path in ("default", "fused"):
        opt, _ = run_path(cls, path, case, hyper)
        assert_same_state(plain, opt, **F64)
        if case == "tensor-lr":
            assert float(opt.param_groups[0]["lr"]) == hyper["lr"] / 2
        for p in all_params(opt):
            impl = "eager" if p.numel() == 0 else expected_impl(path, cls, hyper)
            path_spy.assert_only([p], impl)


@pytest.mark.parametrize("config", ["adamp", "adamp-nesterov", "sgdp-damp-max"])
def test_paths_agree_float32(config: str, path_spy: PathSpy) -> None:
    """The common case, float32: the three paths agree up to float32 rounding."""
    cls, hyper = CONFIGS[config]
    plain, fired = run_path(cls, "plain", "mixed", hyper, dtype=torch.float32)
    assert fired
    for path in ("default", "fused"):
        opt, _ = run_path(cls, path, "mixed", hyper, dtype=torch.float32)
        assert_same_state(plain, opt, rtol=1e-5, atol=1e-6)
        nonempty = [p for p in all_params(opt) if p.numel()]
        path_spy.assert_only(nonempty, expected_impl(path, cls, hyper))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov"])
def test_fused_half_params_match_plain_path(dtype: torch.dtype, config: str, path_spy: PathSpy):
    """Half params run through float32 copies with float32 state, like the plain path."""
    cls, hyper = CONFIGS[config]
    plain, _ = run_path(cls, "plain", "channels_last", hyper, dtype=dtype)
    opt, _ = run_path(cls, "fused", "channels_last", hyper, dtype=dtype)
    path_spy.assert_only(all_params(opt), "cpu-kernel")
    for pa, pb in zip(all_params(plain), all_params(opt), strict=True):
        assert pb.dtype == dtype and pb.stride() == pa.stride()
        torch.testing.assert_close(pb, pa)  # half tolerances
        for key, value in opt.state[pb].items():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, plain.state[pa][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["adamp", "adamp-nesterov", "sgdp-nesterov"])
def test_large_tensors_on_two_threads(config: str, path_spy: PathSpy) -> None:
    """Tensors above the kernel's threading threshold (65536 elements), on two threads: the
    OpenMP branches of the kernel (the other tests use one thread and small tensors)."""

    def params() -> list[Tensor]:
        return [
            leaf(_random((64, 1100), 0)),
            leaf(_random((70000,), 1)),
            leaf(_channels_last(_random((16, 8, 24, 24), 2))),
        ]

    cls, hyper = CONFIGS[config]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opts = {path: make_opt(cls, path, params(), **hyper) for path in PATHS}
        for k in range(3):
            for opt in opts.values():
                for j, p in enumerate(all_params(opt)):
                    p.grad = make_grad(p, k, j)
                opt.step()
    finally:
        torch.set_num_threads(threads)
    path_spy.assert_only(all_params(opts["fused"]), "cpu-kernel")
    for path in ("default", "fused"):
        assert_same_state(opts["plain"], opts[path], **F64)


def _outcome_grads(params: list[Tensor], k: int) -> list[Tensor]:
    """Gradients that give the three outcomes of the test: orthogonal to every row of the
    first param (channel view), to the second as a whole only (layer view), random for the
    third (not projected)."""
    grads = [make_grad(p, k, j, orthogonal=lambda step: False) for j, p in enumerate(params)]
    rows, grad_rows = params[0].detach().flatten(1), grads[0].flatten(1)
    along = (rows * grad_rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True)
    grads[0] = (grad_rows - along * rows).view_as(grads[0])
    whole, grad = params[1].detach(), grads[1]
    grads[1] = grad - (whole * grad).sum() / (whole * whole).sum() * whole
    return grads


@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov", "sgdp-damp-max"])
def test_small_and_large_tensors_in_one_step(
    config: str, monkeypatch: pytest.MonkeyPatch, path_spy: PathSpy
) -> None:
    """Small tested tensors go to :mod:`adampx.backends.cpu.small` in chunks of consecutive
    tensors, larger ones one at a time to :mod:`adampx.backends.cpu.large`, in the same step;
    each of the three outcomes of the test (the small tensors: per row and not projected;
    the large one: as a whole) and the untested bias match the plain path; the decisions
    recorded are the plain path's."""
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 1100)
    monkeypatch.setattr(small, "CHUNK_ELEMENTS", 1500)
    # 1080, 1200, 1008 and 216 elements, and a bias
    shapes = [(24, 5, 3, 3), (20, 60), (16, 7, 3, 3), (4, 6, 3, 3), (16,)]
    chunks: list[list[tuple[int, ...]]] = []
    tested_alone: list[tuple[int, ...]] = []
    for name in ("adamp_step_", "sgdp_rescale_"):
        real = getattr(small, name)

        def spy_chunk(step: Step, batch: Batch, chunk: list[int], workspace: Any,
                      _real: Any = real) -> None:  # fmt: skip
            chunks.append([tuple(batch.params[k].shape) for k in chunk])
            _real(step, batch, chunk, workspace)

        monkeypatch.setattr(small, name, spy_chunk)
    real_test = large._test

    def spy_large(step: Step, param: Tensor, *args: Any) -> Any:
        tested_alone.append(tuple(param.shape))
        return real_test(step, param, *args)

    monkeypatch.setattr(large, "_test", spy_large)
    cls, hyper = CONFIGS[config]

    def fresh() -> list[Tensor]:
        return [leaf(_random(s, j)) for j, s in enumerate(shapes)]

    opts = {
        path: make_opt(cls, path, fresh(), track_statistics=True, **hyper)
        for path in ("plain", "default")
    }
    for k in range(4):
        for opt in opts.values():
            params = all_params(opt)
            for p, g in zip(params[:3], _outcome_grads(params[:3], k), strict=True):
                p.grad = g
            for j in (3, 4):
                params[j].grad = _random(shapes[j], 100 + 10 * k + j)
            opt.step()
        plain, default = ([s.view for s in opt.statistics()] for opt in opts.values())
        assert plain == default and default[:4] == ["channel", "layer", "none", "none"], default
    assert chunks == [[shapes[0]], [shapes[2], shapes[3]]] * 4, chunks
    assert tested_alone == [shapes[1]] * 4, tested_alone
    path_spy.assert_only(all_params(opts["default"]), "cpu")
    assert_same_state(opts["plain"], opts["default"], **F64)


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_small_tensors_cost_a_few_operations_each(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of :mod:`adampx.backends.cpu.small`: a small tested tensor costs the step
    its row sums (six operations: two norms and two dot products of two operations each)
    and no more, where the per-tensor step (:mod:`adampx.backends.cpu.large`) makes more
    than fifteen."""
    monkeypatch.setattr(small, "CHUNK_ELEMENTS", 1 << 20)

    def per_tensor_cost(small_elements: int) -> float:
        monkeypatch.setattr(small, "SMALL_ELEMENTS", small_elements)
        counts = []
        for count in (10, 40):
            opt = OPTIMIZERS_SMALL[name](model_params(count))
            opt.step()
            with Ops() as ops:
                opt.step()
            counts.append(ops.kernels())
        return (counts[1] - counts[0]) / 30

    assert per_tensor_cost(1 << 16) == 6
    assert per_tensor_cost(0) > 15


@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov", "sgdp-damp-max"])
def test_default_path_works_in_row_blocks(
    config: str, monkeypatch: pytest.MonkeyPatch, path_spy: PathSpy
) -> None:
    """Tensors larger than a row block, one per outcome of the test, match the plain path;
    AdamP's scratch is one block, but for the tensor projected as a whole, SGDP's none."""
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)  # each tested tensor on its own
    monkeypatch.setattr(large, "BLOCK_ELEMENTS", 300)
    shapes = [(24, 5, 3, 3), (20, 60), (16, 7, 3, 3)]  # 1080, 1200 and 1008 elements
    cls, hyper = CONFIGS[config]
    opts = {
        path: make_opt(cls, path, [leaf(_random(s, j)) for j, s in enumerate(shapes)], **hyper)
        for path in ("plain", "default")
    }
    for k in range(4):
        for opt in opts.values():
            params = all_params(opt)
            for p, g in zip(params, _outcome_grads(params, k), strict=True):
                p.grad = g
            outcomes = [decide(row_statistics(p.detach(), p.grad), 0.1, 1e-8) for p in params]
            assert [(bool(d.channel), bool(d.layer)) for d in outcomes] == [
                (True, False),
                (False, True),
                (False, False),
            ]
            opt.step()
    path_spy.assert_only(all_params(opts["default"]), "cpu")
    assert_same_state(opts["plain"], opts["default"], **F64)
    buffers = opts["default"]._workspace._buffers
    sizes = {name: b.numel() for (name, _, _), b in buffers.items()}
    if cls is AdamP:
        # Adam's step of a block, the largest of any tested tensor: 300 // 45 = 6 rows of
        # 45, 5 rows of 60, 300 // 63 = 4 rows of 63; and of the tensor projected as a whole
        assert sizes == {"work": max(6 * 45, 5 * 60, 4 * 63), "whole": 1200}, sizes
    else:  # SGDP writes nothing param-sized
        assert sizes == {}, sizes


@pytest.mark.parametrize("blocks", [None, 720], ids=["whole", "blocks"])
@pytest.mark.parametrize("kept", [True, False], ids=["workspace", "no-workspace"])
@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov", "sgdp-damp-max"])
def test_functional_default_step(
    config: str, kept: bool, blocks: int | None, monkeypatch: pytest.MonkeyPatch,
    path_spy: PathSpy,
) -> None:  # fmt: skip
    """The functional step, with a workspace or without (its row sums then go to buffers
    made at every call), takes the ``cpu`` backend and matches the plain path's optimizer,
    for tensors projected per row, one projected as a whole and one not. The gradients
    keep a radial part of half the threshold, so that ``p·g`` matters. Two projected
    tensors share a row count (and so the kept buffers of their row sums), and with
    ``blocks`` AdamP's first tensor is cut into blocks of 16 and 8 rows, 16 being the row
    count of another tensor."""
    if blocks is not None:
        monkeypatch.setattr(large, "BLOCK_ELEMENTS", blocks)
    cls, hyper = CONFIGS[config]
    # per row, as a whole, not projected, untested, per row with the first one's row count
    shapes = [(24, 5, 3, 3), (20, 60), (16, 7, 3, 3), (16,), (24, 30)]
    plain = make_opt(cls, "plain", [leaf(_random(s, j)) for j, s in enumerate(shapes)], **hyper)
    params = [leaf(_random(s, j)) for j, s in enumerate(shapes)]
    defaults = cls([leaf(torch.zeros(1, 1))], **hyper).defaults  # 2-d: no flattening warning
    if cls is AdamP:
        state: list[list[Tensor]] = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        state.append([torch.zeros(()) for _ in params])
        step: Callable[..., None] = functools.partial(
            adamp_module.adamp, beta1=defaults["betas"][0], beta2=defaults["betas"][1],
            nesterov=defaults["nesterov"],
        )  # fmt: skip
    else:
        state = [[torch.zeros_like(p) for p in params]]
        step = functools.partial(
            sgdp_module.sgdp, momentum=defaults["momentum"], dampening=defaults["dampening"],
            nesterov=defaults["nesterov"],
        )  # fmt: skip
    workspace = Workspace() if kept else None
    norm = functools.partial(torch.linalg.vector_norm, dim=-1, keepdim=True)
    for k in range(3):
        for opt_params in (all_params(plain), params):
            grads = _outcome_grads(opt_params, k)
            for j, rows in ((0, True), (1, False), (4, True)):  # half the threshold along p
                w, g = opt_params[j].detach().flatten(int(rows)), grads[j].flatten(int(rows))
                if j == 4:  # orthogonal per row first
                    g -= (w * g).sum(-1, keepdim=True) / (w * w).sum(-1, keepdim=True) * w
                g += 0.5 * defaults["delta"] / w.shape[-1] ** 0.5 * norm(g) / norm(w) * w
            for p, g in zip(opt_params, grads, strict=True):
                p.grad = g
            outcomes = [
                decide(row_statistics(p.detach(), p.grad), defaults["delta"], defaults["eps"])
                for p in opt_params
                if p.dim() > 1
            ]  # fmt: skip
            fired = [(bool(d.channel), bool(d.layer)) for d in outcomes]
            assert fired == [(True, False), (False, True), (False, False), (True, False)], fired
        plain.step()
        with torch.no_grad():
            step(
                params, [p.grad for p in params], *state, lr=defaults["lr"], eps=defaults["eps"],
                weight_decay=defaults["weight_decay"], delta=defaults["delta"],
                wd_ratio=defaults["wd_ratio"], maximize=defaults["maximize"], projection=True,
                workspace=workspace,
            )  # fmt: skip
    path_spy.assert_only(params, "cpu")
    for a, b in zip(all_params(plain), params, strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("row_limit", [cpu_kernel.ROW_LIMIT, 8], ids=["rows-in-cache", "long-rows"])
@pytest.mark.parametrize("config", ["adamp", "adamp-nesterov", "sgdp-nesterov", "sgdp-damp-max"])
def test_fused_kernel_takes_each_outcome(
    config: str, row_limit: int, monkeypatch: pytest.MonkeyPatch, path_spy: PathSpy
) -> None:
    """One tensor per outcome of the test, each above the kernel's threading threshold
    (65536 elements), on two threads, matches the plain path: projected per row (AdamP row
    by row with its row buffer, or with ``row_limit`` 8 the second pass that recomputes the
    direction), projected as a whole, not projected. AdamP's scratch is one row per thread."""
    monkeypatch.setattr(cpu_kernel, "ROW_LIMIT", row_limit)
    shapes = [(96, 8, 9, 10), (300, 230), (80, 900)]  # 69120, 69000 and 72000 elements
    cls, hyper = CONFIGS[config]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opts = {
            path: make_opt(cls, path, [leaf(_random(s, j)) for j, s in enumerate(shapes)], **hyper)
            for path in ("plain", "fused")
        }
        for k in range(4):
            for opt in opts.values():
                params = all_params(opt)
                for p, g in zip(params, _outcome_grads(params, k), strict=True):
                    p.grad = g
                outcomes = [decide(row_statistics(p.detach(), p.grad), 0.1, 1e-8) for p in params]
                assert [(bool(d.channel), bool(d.layer)) for d in outcomes] == [
                    (True, False),
                    (False, True),
                    (False, False),
                ]
                opt.step()
    finally:
        torch.set_num_threads(threads)
    path_spy.assert_only(all_params(opts["fused"]), "cpu-kernel")
    assert_same_state(opts["plain"], opts["fused"], **F64)
    sizes = {name: b.numel() for (name, _, _), b in opts["fused"]._workspace._buffers.items()}
    assert sizes == ({"row": 2 * min(row_limit, 900)} if cls is AdamP else {}), sizes


def _default_path_statistics(p: Tensor, g: Tensor) -> RowStatistics:
    """The row statistics of ``[rows, length]`` matrices as the ``cpu`` backend's larger
    tensors compute them (:func:`adampx.backends.cpu.large.row_dots`: its row dot products
    may differ from ``decide``'s in the last bit)."""
    return RowStatistics(
        gp=large.row_dots(p, g, None).clone(),
        g_norm=torch.linalg.vector_norm(g, dim=1),
        p_norm=torch.linalg.vector_norm(p, dim=1),
        row_length=p.shape[1],
    )


def _default_path_test(
    p: Tensor, g: Tensor, delta: float, workspace: Workspace | None
) -> tuple[bool, bool]:
    """``(channel, layer)`` of the ``cpu`` backend's test of one larger tensor
    (:func:`adampx.backends.cpu.large._test`, whose outcome the step reads as Python values)
    on ``[rows, length]`` matrices."""
    step = Step(
        optimizer="adamp", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, delta=delta,
        wd_ratio=0.1, nesterov=False, maximize=False, projection=True,
    )  # fmt: skip
    tested = large._test(step, p, p, g, 0.0, workspace)
    assert isinstance(tested.channel, bool) and isinstance(tested.layer, bool)
    return tested.channel, tested.layer


def test_default_path_test_compares_in_the_tensor_dtype() -> None:
    """A float32 cosine that equals the threshold rounded to float32 fails the test (``cos <
    threshold`` is false in float32), in the ``cpu`` backend's test as in ``decide``, though
    the threshold in double is a little above it. The cosine is the one the ``cpu`` backend
    computes (its row dot products may differ from ``decide``'s in the last bit)."""
    p, g = _random((1, 50), 0, torch.float32), _random((1, 50), 1, torch.float32)
    stats = _default_path_statistics(p, g)
    cos = decide(stats, 1.0, 1e-8).max_cosine_channel
    spacing = (torch.nextafter(cos, torch.tensor(math.inf)) - cos).item()
    threshold = cos.item() + spacing / 4  # rounds to cos in float32
    delta = threshold * math.sqrt(50)
    assert cos.item() < delta / math.sqrt(50)
    reference = decide(stats, delta, 1e-8)
    assert not bool(reference.channel) and not bool(reference.layer)
    assert _default_path_test(p, g, delta, None) == (False, False)
    # a hair above the tie, both pass
    above = (cos.item() + spacing) * math.sqrt(50)
    assert bool(decide(stats, above, 1e-8).channel)
    assert _default_path_test(p, g, above, None)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [2, 7, 300])
def test_default_path_layer_view_is_decides(rows: int, dtype: torch.dtype) -> None:
    """The ``cpu`` backend's layer view (its whole-tensor norms from the row norms in one
    call) has ``decide``'s roundings: with the threshold at ``decide``'s layer cosine
    rounded to the dtype, both fail; a spacing above it, both pass. The channel view fails
    here (one row's gradient is almost along its weights)."""
    p, g = _random((rows, 40), 2, dtype), _random((rows, 40), 3, dtype)
    g[0] = p[0] + 1e-3 * g[0]
    workspace = Workspace()
    stats = _default_path_statistics(p, g)
    cos = decide(stats, 1.0, 1e-8).cosine_layer
    spacing = (torch.nextafter(cos, torch.tensor(math.inf, dtype=dtype)) - cos).item()
    size = math.sqrt(40 * rows)
    for above, expected in ((spacing / 4, False), (spacing, True)):
        delta = (cos.item() + above) * size
        reference = decide(stats, delta, 1e-8)
        assert not bool(reference.channel) and bool(reference.layer) is expected
        assert _default_path_test(p, g, delta, workspace) == (False, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 70000), (7, 130), (300, 9)])
def test_row_dots_are_the_row_sums_of_the_product(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    """The ``cpu`` backend's row dot products (:func:`adampx.backends.cpu.large.row_dots`,
    ``torch.sparse.sampled_addmm`` at the diagonal) against ``(a·b).sum(1)`` in float64, for
    whole matrices and row blocks (slices); the two slots are separate results; a zero row
    and an infinity stay in their rows."""
    a, b = _random(shape, 0, dtype), _random(shape, 1, dtype)
    workspace = Workspace()
    truth = (a.double() * b.double()).sum(1)
    tol = dict(rtol=1e-5, atol=1e-5 * shape[1] ** 0.5) if dtype == torch.float32 else F64
    first = large.row_dots(a, b, workspace, slot=0)
    second = large.row_dots(a, a, workspace, slot=1)
    torch.testing.assert_close(first.double(), truth, **tol)
    torch.testing.assert_close(second.double(), (a.double() ** 2).sum(1), **tol)
    if shape[0] > 1:  # a block of rows, as the default path cuts large tensors
        block = large.row_dots(a[1:], b[1:], workspace, slot=1)
        torch.testing.assert_close(block.double(), truth[1:], **tol)
    a[0].zero_()
    b[-1, 0] = math.inf if shape[0] > 1 else 0.0
    special = large.row_dots(a, b, workspace).double()
    assert special[0] == 0
    if shape[0] > 1:
        assert not special[-1].isfinite()
        torch.testing.assert_close(special[1:-1], truth[1:-1], **tol)


def test_row_dots_need_their_outputs_written_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row dots are read from the buffers their CSR outputs were built on: a torch
    whose CSR tensors copied their values would leave them at zero (every tensor would look
    scale invariant), so building them says so instead."""
    real_csr = torch.sparse_csr_tensor
    monkeypatch.setattr(
        torch, "sparse_csr_tensor", lambda c, i, v, *a, **k: real_csr(c, i, v.clone(), *a, **k)
    )
    with pytest.raises(RuntimeError, match="write into the values it was given"):
        large.diagonal(5, torch.float32, None)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_default_path_low_precision_lr_tensor_matches_reference(cls: type) -> None:
    """A float16 lr tensor with float64 params: the decay is computed from lr's value in
    double for every tensor, projected or not, as the reference does with lr = float(lr)."""
    lr = torch.tensor(0.01, dtype=torch.float16)  # 0.010002..., not 0.01
    hyper = dict(weight_decay=0.3, wd_ratio=0.7)
    if cls is SGDP:
        hyper["momentum"] = 0.9
    # projected per row, as a whole, not; and an untested bias
    shapes = [(24, 5, 3, 3), (20, 60), (16, 7, 3, 3), (16,)]

    def params() -> list[Tensor]:
        return [leaf(_random(s, j)) for j, s in enumerate(shapes)]

    ours = make_opt(cls, "default", params(), lr=lr, **hyper)
    # SGDP: the reference with its buffer aliasing fixed (the known difference, see
    # test_parity_reference)
    reference_cls = ref.AdamP if cls is AdamP else spy(ref.SGDP, fixed=True)
    reference = reference_cls(params(), lr=lr.item(), **hyper)
    for k in range(3):
        for opt in (ours, reference):
            ps = all_params(opt)
            for p, g in zip(ps, _outcome_grads(ps, k), strict=True):
                p.grad = g
            opt.step()
    for a, b in zip(all_params(ours), all_params(reference), strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("path", ["plain", "default"])
def test_lr_tensor_of_any_one_element_shape(cls: type, path: str) -> None:
    """``lr=torch.tensor([[0.01]])`` steps as ``lr=0.01`` on every path, also for a param no
    kernel takes (a strided view)."""
    hyper = dict(momentum=0.9) if cls is SGDP else {}

    def run(lr: float | Tensor) -> list[Tensor]:
        params = [leaf(_random((20,), 0)[::2]), leaf(_random((6, 5), 1))]
        opt = make_opt(cls, path, params, lr=lr, **hyper)
        for k in range(2):
            for j, p in enumerate(params):
                p.grad = make_grad(p, k, j)
            opt.step()
        return params

    lr = torch.tensor([[0.01]], dtype=torch.float64)
    for a, b in zip(run(lr), run(lr.item()), strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_workspace_contents_never_reach_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` memory may hold anything: filled with NaN, every path stays exact."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(factory: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def make(*args: Any, **kwargs: Any) -> Tensor:
            t = factory(*args, **kwargs)
            if t.is_floating_point() or t.is_complex():
                t.fill_(math.nan)
            return t

        return make

    for config in ("adamp", "sgdp-nesterov"):
        cls, hyper = CONFIGS[config]
        plain, _ = run_path(cls, "plain", "mixed", hyper)
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", poisoned(real_empty))
            m.setattr(torch, "empty_like", poisoned(real_empty_like))
            opts = [run_path(cls, path, "mixed", hyper)[0] for path in ("default", "fused")]
        for opt in opts:
            assert_same_state(plain, opt, **F64)


NAN_CASES = [
    pytest.param(config, path, id=f"{config}-{path}")
    for config in ("adamp", "adamp-nesterov", "sgdp-nesterov", "sgdp-damp-max")
    for path in ("default", "fused")
]


@pytest.mark.parametrize(("config", "path"), NAN_CASES)
def test_nan_gradient_element_stays_in_its_element(config: str, path: str) -> None:
    """Without a GradScaler a NaN gradient element makes only its own param element NaN, as
    in the plain path and torch.optim: the test sees a NaN cosine (no view passes), so the
    coefficients are zero, and a zero coefficient must not spread the NaN over its row or
    tensor (``0 * NaN`` is NaN)."""
    cls, hyper = CONFIGS[config]
    opts = {}
    for name in ("plain", path):
        opt = make_opt(cls, name, [leaf(_random((4, 6), 0)), leaf(_random((6,), 1))], **hyper)
        for k in range(2):
            for j, p in enumerate(all_params(opt)):
                p.grad = make_grad(p, k, j)
            if k == 1:
                all_params(opt)[0].grad[2, 3] = math.nan
            opt.step()
        opts[name] = opt
    weight = all_params(opts["plain"])[0]
    assert torch.isnan(weight).sum() == 1 and torch.isnan(weight[2, 3])
    for pa, pb in zip(all_params(opts["plain"]), all_params(opts[path]), strict=True):
        assert torch.equal(torch.isnan(pb), torch.isnan(pa)), tuple(pa.shape)
        torch.testing.assert_close(pb, pa, equal_nan=True, **F64)


# ------------------------------------------------------------- (c) which path ran (spies)


def _float32_params(seed: int = 0) -> list[Tensor]:
    return [
        leaf(_random((4, 6), seed, torch.float32)),
        leaf(_random((6,), seed + 1, torch.float32)),
        leaf(_channels_last(_random((3, 2, 2, 2), seed + 2, torch.float32))),
    ]


def _step_once(opt: torch.optim.Optimizer) -> None:
    for j, p in enumerate(all_params(opt)):
        p.grad = make_grad(p, 0, j)
    opt.step()


@pytest.mark.parametrize(
    ("cls", "hyper", "impl"),
    [
        (AdamP, dict(lr=1e-2), "cpu"),
        (AdamP, dict(lr=1e-2, foreach=False), "cpu"),
        (AdamP, dict(lr=1e-2, foreach=True), "cpu"),
        (AdamP, dict(lr=1e-2, nesterov=True), "cpu-kernel"),
        (AdamP, dict(lr=1e-2, nesterov=True, foreach=True), "cpu-kernel"),
        (AdamP, dict(lr=1e-2, nesterov=True, fused=False), "eager"),
        (AdamP, dict(lr=1e-2, nesterov=True, fused=False, foreach=True), "foreach"),
        (AdamP, dict(lr=1e-2, fused=True), "cpu-kernel"),
        (AdamP, dict(lr=1e-2, nesterov=True, fused=True), "cpu-kernel"),
        (AdamP, dict(lr=1e-2, caution=True), "cpu-kernel"),
        (AdamP, dict(lr=1e-2, caution=True, foreach=True), "cpu-kernel"),
        (AdamP, dict(lr=1e-2, caution=True, fused=True), "cpu-kernel"),
        (AdamP, dict(lr=1e-2, caution=True, fused=False), "eager"),
        (AdamP, dict(lr=1e-2, caution=True, fused=False, foreach=True), "foreach"),
        (SGDP, dict(lr=0.1, momentum=0.9), "cpu"),
        (SGDP, dict(lr=0.1), "cpu-kernel"),
        (SGDP, dict(lr=0.1, fused=False), "eager"),
        (SGDP, dict(lr=0.1, fused=False, foreach=True), "foreach"),
        (SGDP, dict(lr=0.1, fused=True), "cpu-kernel"),
        (SGDP, dict(lr=0.1, momentum=0.9, nesterov=True, fused=True), "cpu-kernel"),
        (SGDP, dict(lr=0.1, momentum=0.9, caution=True), "cpu-kernel"),
    ],
    ids=[
        "adamp-default",
        "adamp-foreach-false",
        "adamp-foreach-true",
        "adamp-nesterov-default",
        "adamp-nesterov-foreach",
        "adamp-nesterov-not-fused",
        "adamp-nesterov-not-fused-foreach",
        "adamp-fused",
        "adamp-nesterov-fused",
        "adamp-caution",
        "adamp-caution-foreach",
        "adamp-caution-fused",
        "adamp-caution-not-fused",
        "adamp-caution-not-fused-foreach",
        "sgdp-default",
        "sgdp-no-momentum-default",
        "sgdp-no-momentum-not-fused",
        "sgdp-no-momentum-not-fused-foreach",
        "sgdp-no-momentum-fused",
        "sgdp-nesterov-fused",
        "sgdp-caution",
    ],
)
def test_which_path_runs_on_cpu(cls: type, hyper: dict, impl: str, path_spy: PathSpy) -> None:
    """The routing of :mod:`adampx.backends.plan` on CPU tensors: ``cpu`` where torch's fused
    kernels run the options (whatever the ``foreach`` flag); for the options they lack
    (AdamP's nesterov, SGDP without momentum, caution) the C kernel unless ``fused=False``;
    else the eager math (``eager`` on the CPU, ``foreach`` where the flag asks);
    ``fused=True``: ``cpu-kernel``, every option."""
    opt = cls(_float32_params(), **hyper)
    _step_once(opt)
    path_spy.assert_only(all_params(opt), impl)


@pytest.mark.parametrize("fused", [None, False, True], ids=["default", "not-fused", "fused"])
@pytest.mark.parametrize("kept", [True, False], ids=["workspace", "no-workspace"])
@pytest.mark.parametrize("foreach_flag", [None, False, True], ids=str)
def test_route_of_cpu_tensors(foreach_flag: bool | None, kept: bool, fused: bool | None) -> None:
    """:func:`adampx.backends.plan.route` directly: the chain of CPU tensors (``cpu``;
    ``cpu-kernel`` for ``fused=True``) takes the plain tensors; a transposed one and an empty
    one fall to the eager math. Options that torch's fused kernels lack go to ``cpu-kernel``
    unless ``fused=False``, which sends every tensor to the eager math."""
    params = [*_float32_params(), _random((5, 7), 3, torch.float32).t(), torch.zeros(0, 3)]
    batch = Batch(
        params, params, [torch.zeros_like(p) for p in params],
        [[torch.zeros_like(p) for p in params] for _ in range(2)],
        [torch.zeros(()) for _ in params],
    )  # fmt: skip
    workspace = Workspace() if kept else None
    defaults = dict(
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
        maximize=False, projection=True,
    )  # fmt: skip
    fast = "cpu-kernel" if fused else "cpu"
    math_name = "foreach" if foreach_flag else "eager"
    chain, imposed = plan.chain(
        Step(optimizer="adamp", nesterov=False, **defaults),
        foreach_flag=foreach_flag,
        fused=fused,
        workspace=workspace,
        tensors=params,
    )
    expected_chain = ["cpu-kernel"] if fused else ["cpu"]
    assert ([b.NAME for b in chain], imposed) == (expected_chain, False)
    taken = [(fast, [0, 1, 2]), (math_name, [3, 4])]
    # torch's fused kernels have no Nesterov Adam: the C kernel takes the tensors instead,
    # unless fused=False
    in_kernel = [("cpu-kernel", [0, 1, 2]), (math_name, [3, 4])]
    refused = [(math_name, [0, 1, 2, 3, 4])] if fused is False else in_kernel
    for nesterov, expected in ((False, taken), (True, refused)):
        routes = plan.route(
            Step(optimizer="adamp", nesterov=nesterov, **defaults),
            batch,
            foreach_flag=foreach_flag,
            fused=fused,
            workspace=workspace,
        )
        assert [(b.NAME, indices) for b, indices in routes] == expected, nesterov


class _OnCuda(Tensor):
    """A CPU tensor that says it is on CUDA: how the routing sees a CUDA tensor's compute
    view (the chain and the backends' ``takes`` ask ``is_cpu`` / ``is_cuda``)."""

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _cpu_and_cuda_batch(name: str) -> tuple[Step, Batch]:
    """AdamP's or SGDP's step, and a batch of two plain float64 tensors: one on the CPU,
    one that says it is on CUDA (:class:`_OnCuda`)."""
    common: dict[str, Any] = dict(lr=0.1, eps=1e-8, weight_decay=1e-2, delta=0.1, wd_ratio=0.1)
    common |= dict(maximize=False, projection=True)
    if name == "adamp":
        step = Step(optimizer="adamp", beta1=0.9, beta2=0.999, nesterov=False, **common)
    else:
        step = Step(optimizer="sgdp", momentum=0.9, dampening=0.0, nesterov=False, **common)
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(2)]
    ps = [params[0].detach(), params[1].detach().as_subclass(_OnCuda)]
    assert ps[0].is_cpu and not ps[1].is_cpu and ps[1].is_cuda
    gs = [torch.randn(4, 3, dtype=torch.float64) for _ in params]
    count = 2 if name == "adamp" else 1
    states = [[torch.zeros(4, 3, dtype=torch.float64) for _ in params] for _ in range(count)]
    steps = [step_tensor(p) for p in params] if name == "adamp" else []
    return step, Batch(params, ps, gs, states, steps)


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
@pytest.mark.parametrize(
    ("foreach_flag", "fused", "kept", "takes_triton"),
    [
        (None, None, True, True),
        (True, None, True, True),
        (False, None, True, False),
        (None, False, True, False),
        (None, None, False, False),
    ],
    ids=["default", "foreach", "no-foreach", "not-fused", "no-workspace"],
)
def test_route_of_cuda_tensors(
    name: str,
    foreach_flag: bool | None,
    fused: bool | None,
    kept: bool,
    takes_triton: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where Triton runs, CUDA tensors take ``triton``; ``foreach=False``, ``fused=False``
    and functional calls without a workspace keep the eager math. CPU tensors take ``cpu``
    either way."""
    monkeypatch.setattr(triton, "INSTALLED", True)
    monkeypatch.setattr(triton, "ready", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    step, batch = _cpu_and_cuda_batch(name)
    workspace = Workspace() if kept else None
    options: dict[str, Any] = dict(foreach_flag=foreach_flag, fused=fused, workspace=workspace)
    chain, imposed = plan.chain(step, tensors=batch.ps, **options)
    assert not imposed
    assert [b.NAME for b in chain] == (["cpu", "triton"] if takes_triton else ["cpu"])
    routes = plan.route(step, batch, **options)
    eager_math = plan.eager_math(foreach_flag, batch.params).NAME
    assert eager_math in ("eager", "foreach")
    chosen = {backend.NAME: indices for backend, indices in routes}
    assert chosen == {"cpu": [0], ("triton" if takes_triton else eager_math): [1]}


@pytest.mark.parametrize("layout", ["transposed", "gradient-strides"])
def test_cuda_tensors_triton_cannot_take_get_the_eager_math(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transposed CUDA weight (its rows not blocks of memory), or one whose gradient's
    strides differ from its own: the Triton kernels take contiguous and channels_last
    tensors laid out alike only, so the routing gives these the eager math (which steps
    any layout), not an error."""
    monkeypatch.setattr(triton, "INSTALLED", True)
    monkeypatch.setattr(triton, "ready", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    step, _ = _cpu_and_cuda_batch("adamp")
    param = nn.Parameter(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    p = param.detach()
    g = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    if layout == "transposed":
        p, g = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (p, g))
    else:
        g = g.transpose(2, 3).contiguous().transpose(2, 3)
    states = [[torch.zeros_like(p)], [torch.zeros_like(p)]]
    batch = Batch([param], [p.as_subclass(_OnCuda)], [g], states, [step_tensor(param)])
    assert triton.takes(param, batch.ps[0], g, [s[0] for s in states], None) is not None
    routes = plan.route(step, batch, foreach_flag=None, fused=None, workspace=Workspace())
    eager_math = plan.eager_math(None, batch.params).NAME
    assert [(backend.NAME, indices) for backend, indices in routes] == [(eager_math, [0])]


@pytest.mark.parametrize(
    ("installed", "on_cuda", "group", "expected"),
    [
        (True, True, {}, True),
        (True, True, {"foreach": False}, False),
        (True, True, {"fused": False}, False),
        (True, False, {}, False),
        (False, True, {}, False),
    ],
    ids=["default", "no-foreach", "not-fused", "cpu", "no-triton"],
)
def test_grad_scaler_is_handed_to_the_step_where_triton_steps(
    installed: bool,
    on_cuda: bool,
    group: dict[str, Any],
    expected: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_step_supports_amp_scaling`` (torch's protocol for fused optimizers) is True where
    a group's CUDA tensors take ``triton`` by default, and under ``force("triton")``; else
    False, so that GradScaler unscales and skips as for any optimizer."""
    monkeypatch.setattr(triton, "INSTALLED", installed)
    monkeypatch.setattr(triton, "ready", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: installed or on_cuda)
    weight = nn.Parameter(torch.randn(4, 3))
    params = [weight.detach().as_subclass(_OnCuda)] if on_cuda else [weight]
    opt = AdamP([{"params": [weight], **group}], lr=1e-2)
    opt.param_groups[0]["params"] = params  # as the routing sees a CUDA param
    assert opt._step_supports_amp_scaling is expected
    with adampx.backends.force("eager"):
        assert opt._step_supports_amp_scaling is False


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_without_triton_cuda_tensors_take_the_eager_math_with_one_warning(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Triton, CUDA tensors take the multi-tensor eager math, and the process is
    warned once (not at every step); CPU tensors still take ``cpu``."""
    monkeypatch.setattr(triton, "INSTALLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    step, batch = _cpu_and_cuda_batch(name)
    plan._warn_no_triton.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                routes = plan.route(
                    step, batch, foreach_flag=None, fused=None, workspace=Workspace()
                )
                chosen = {backend.NAME: indices for backend, indices in routes}
                eager_math = plan.eager_math(None, batch.params).NAME
                assert chosen == {"cpu": [0], eager_math: [1]}
    finally:
        plan._warn_no_triton.cache_clear()
    assert [type(w.message) for w in caught] == [RuntimeWarning], [str(w) for w in caught]
    assert "Triton is not installed" in str(caught[0].message)


def test_forced_backend_takes_every_tensor_or_refuses(path_spy: PathSpy) -> None:
    """Inside ``adampx.backends.force(name)`` every tensor takes backend ``name`` (the chain
    is that backend alone, imposed); a tensor it cannot take, or options it does not run,
    are a ``ValueError`` instead of another backend."""
    step = Step(
        optimizer="adamp", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
        delta=0.1, wd_ratio=0.1, nesterov=False, maximize=False, projection=True,
    )  # fmt: skip
    for name in ("eager", "foreach", "cpu", "cpu-kernel"):
        with adampx.backends.force(name):
            chain, imposed = plan.chain(step, foreach_flag=None, fused=False, workspace=None)
            assert ([b.NAME for b in chain], imposed) == ([name], True)
            opt = AdamP(_float32_params(), lr=1e-2)
            _step_once(opt)
        path_spy.assert_only(all_params(opt), name)
        path_spy.clear()
    transposed = _random((5, 7), 0, torch.float32).t().requires_grad_()
    opt = AdamP([transposed], lr=1e-2)
    with adampx.backends.force("cpu"), pytest.raises(ValueError, match=r"'cpu' cannot step"):
        _step_once(opt)
    opt = AdamP(_float32_params(), lr=1e-2, nesterov=True)
    with adampx.backends.force("cpu"), pytest.raises(ValueError, match="AdamP with nesterov"):
        _step_once(opt)
    assert not any(path_spy.seen.values())


def test_forced_plain_path_is_plain(path_spy: PathSpy) -> None:
    """The harness: ``make_opt(..., "plain", ...)`` really takes the ``eager`` backend."""
    for cls, hyper in ((AdamP, dict(lr=1e-2)), (SGDP, dict(lr=0.1, momentum=0.9))):
        opt = make_opt(cls, "plain", _float32_params(), **hyper)
        _step_once(opt)
        path_spy.assert_only(all_params(opt), "eager")


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_transposed_param_falls_back_with_fused(cls: type, path_spy: PathSpy) -> None:
    """A transposed view is no dense layout the kernel takes: that param alone takes the
    eager math (``eager``), the others the kernel (``cpu-kernel``), and the numbers are the
    plain path's."""
    hyper = dict(lr=1e-2, weight_decay=0.1) if cls is AdamP else dict(lr=0.05, momentum=0.9)

    def params() -> list[Tensor]:
        transposed = _random((5, 7), 0).t().detach().requires_grad_()  # shape (7, 5)
        assert transposed.stride() == (1, 7) and transposed.is_leaf
        return [transposed, leaf(_random((4, 6), 1)), leaf(_random((6,), 2))]

    opts = {path: make_opt(cls, path, params(), **hyper) for path in ("plain", "fused")}
    for k in range(STEPS):
        for opt in opts.values():
            for j, p in enumerate(all_params(opt)):
                p.grad = make_grad(p, k, j)
            opt.step()
    transposed, *others = all_params(opts["fused"])
    path_spy.assert_only([transposed], "eager")
    path_spy.assert_only(others, "cpu-kernel")
    assert transposed.stride() == (1, 7)
    assert_same_state(opts["plain"], opts["fused"], **F64)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_tensor_subclasses_fall_back(cls: type, path_spy: PathSpy) -> None:
    """A subclass param (with a plain gradient) and a plain param with a subclass gradient
    take the eager math (``eager``); a plain param beside them takes the ``cpu`` backend
    (``cpu-kernel`` with ``fused=True``)."""

    class Marked(Tensor):
        pass

    hyper = dict(lr=1e-2) if cls is AdamP else dict(lr=0.1, momentum=0.9)
    for fused in (None, True):
        path_spy.clear()
        marked = _random((4, 3), 0, torch.float32).as_subclass(Marked).requires_grad_()
        marked_grad, plain = (leaf(_random((4, 3), i, torch.float32)) for i in (1, 2))
        opt = cls([marked, marked_grad, plain], **hyper, fused=fused)
        for k in range(2):
            marked.grad = make_grad(marked, k, 0).as_subclass(Tensor)
            marked_grad.grad = make_grad(marked_grad, k, 1).as_subclass(Marked)
            plain.grad = make_grad(plain, k, 2)
            assert type(marked.grad) is Tensor and type(marked_grad.grad) is Marked
            opt.step()
        assert type(marked) is Marked
        path_spy.assert_only([marked, marked_grad], "eager")
        path_spy.assert_only([plain], "cpu-kernel" if fused else "cpu")


def test_compiled_step_takes_the_eager_math(
    monkeypatch: pytest.MonkeyPatch, path_spy: PathSpy
) -> None:
    """Under torch.compile (simulated: ``torch.compiler.is_compiling()`` answers True) torch's
    fused kernels and the C kernel cannot be traced, so every step runs the eager math:
    ``eager`` on the CPU, ``foreach`` where the flag asks, with ``fused=True`` too, and
    whatever ``adampx.backends.force`` says."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for cls, hyper in ((AdamP, dict(lr=1e-2)), (SGDP, dict(lr=0.1, momentum=0.9))):
        for flags, forced, impl in (
            ({}, None, "eager"),
            (dict(fused=True), None, "eager"),
            (dict(foreach=True), None, "foreach"),
            ({}, "cpu", "eager"),
        ):
            path_spy.clear()
            opt = cls(_float32_params(), **hyper, **flags)
            with adampx.backends.force(forced) if forced else contextlib.nullcontext():
                _step_once(opt)
            path_spy.assert_only(all_params(opt), impl)


# ----------------------------------------------------------------------- (d) statistics


@pytest.mark.parametrize("path", ["default", "fused"])
@pytest.mark.parametrize("name", list(stats_model.OPTIMIZERS))
def test_statistics_match_plain_path(name: str, path: str) -> None:
    factory = stats_model.OPTIMIZERS[name]
    models = {p: stats_model.make_model() for p in ("plain", path)}
    opts = {
        p: factory(model.named_parameters(), track_statistics=True, fused=(p == "fused") or None)
        for p, model in models.items()
    }
    views = {}
    for i in range(3):
        records = {}
        for p, model in models.items():
            stats_model.backward(model, i)
            with forced_plain() if p == "plain" else contextlib.nullcontext():
                opts[p].step()
            records[p] = opts[p].statistics()
        plain, fast = records["plain"], records[path]
        assert [r.name for r in fast] == [r.name for r in plain]
        for a, b in zip(plain, fast, strict=True):
            assert b.view == a.view, (a.name, i)
            assert b.step == a.step == i + 1
            for key in ("channel_threshold", "layer_threshold"):
                value = getattr(a, key)
                if math.isnan(value):
                    assert math.isnan(getattr(b, key)), (a.name, key)
                else:
                    assert getattr(b, key) == pytest.approx(value, rel=1e-12), (a.name, key)
            for key in ("max_cosine", "layer_cosine"):
                value = getattr(a, key)
                if math.isnan(value):
                    assert math.isnan(getattr(b, key)), (a.name, key)
                else:
                    assert getattr(b, key) == pytest.approx(value, rel=1e-9, abs=1e-14), key
            for key in ("norm", "update_norm", "lr", "effective_step", "relative_update"):
                assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-9), (a.name, key)
        views = {r.name: r.view for r in fast}
    # the model exercises every outcome of the test
    assert views[stats_model.CHANNEL_WEIGHT] == "channel"
    assert views[stats_model.LAYER_WEIGHT] == "layer"
    assert views[stats_model.PLAIN_WEIGHT] == "none"
    assert "skipped" in views.values()


# ----------------------------------------------------------------------- (e) checkpoints


@pytest.mark.parametrize(
    ("before", "after"),
    [("fused", "fused"), ("fused", "default"), ("default", "fused")],
    ids=["fused-to-fused", "fused-to-default", "default-to-fused"],
)
@pytest.mark.parametrize("name", list(ckpt.OPTIMIZERS))
def test_checkpoint_resumes_across_paths(name: str, before: str, after: str) -> None:
    cls, hyper = ckpt.OPTIMIZERS[name]
    flag = {"fused": dict(fused=True), "default": {}}
    steps_before, steps_after = 3, 3

    model_a = make_norm_mlp()
    model_b = copy.deepcopy(model_a)
    opt_a = cls(ckpt.two_groups(model_a, True, hyper), **flag[before])
    ckpt.train(model_a, opt_a, 0, steps_before + steps_after)  # uninterrupted

    opt_b = cls(ckpt.two_groups(model_b, True, hyper), **flag[before])
    ckpt.train(model_b, opt_b, 0, steps_before)
    checkpoint = ckpt.save_load(opt_b.state_dict())
    model_c = copy.deepcopy(model_b)
    opt_c = cls(ckpt.two_groups(model_c, True, [{"lr": 0.5}, {"lr": 0.5}]), **flag[after])
    opt_c.load_state_dict(checkpoint)
    for group, h in zip(opt_c.param_groups, hyper, strict=True):
        assert group["fused"] is (True if after == "fused" else None)  # as constructed
        assert all(group[key] == value for key, value in h.items())
    ckpt.train(model_c, opt_c, steps_before, steps_after)

    if before == after:  # the same code on the same numbers: bit for bit
        ckpt.assert_params_equal(model_a, model_c)
        for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
            ckpt.assert_state_equal(opt_a.state[pa], opt_c.state[pc])
    else:
        assert_same_state(opt_a, opt_c, **F64)
    for pb, pc in zip(model_b.parameters(), model_c.parameters(), strict=True):
        assert not torch.equal(pb, pc), "the resumed run must have moved every param"


# ------------------------------------------------------------------------ (f) validation


def _meta_params() -> list[Tensor]:
    return [nn.Parameter(torch.empty(4, 3, device="meta"))]


def _cpu_params() -> list[Tensor]:
    return [nn.Parameter(torch.zeros(4, 3))]


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize(
    ("kwargs", "params", "message"),
    [
        (dict(fused=True, foreach=True), _cpu_params, r"fused=True with foreach=True"),
        (dict(fused=True, capturable=True), _cpu_params, r"fused=True with capturable=True"),
        (
            dict(capturable=True, track_statistics=True),
            _cpu_params,
            r"capturable=True cannot record statistics",
        ),
        (dict(fused="yes"), _cpu_params, r"Invalid fused: expected True, False or None, got 'yes'"),
        (dict(fused=1), _cpu_params, r"Invalid fused: expected True, False or None, got 1"),
        (dict(capturable=None), _cpu_params, r"Invalid capturable: expected True or False"),
        (dict(capturable=1), _cpu_params, r"Invalid capturable: expected True or False, got 1"),
    ],
    ids=[
        "fused+foreach",
        "fused+capturable",
        "capturable+statistics",
        "fused-str",
        "fused-int",
        "capturable-none",
        "capturable-int",
    ],
)
def test_invalid_flags(
    cls: type, kwargs: dict, params: Callable[[], list[Tensor]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cls(params(), lr=0.1, **kwargs)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_valid_flags(cls: type) -> None:
    for kwargs in (
        dict(fused=True),
        dict(fused=True, foreach=False),
        dict(fused=False, foreach=True),
        dict(fused=None),
        dict(capturable=True),
        dict(capturable=True, foreach=True),
    ):
        opt = cls(_cpu_params(), lr=0.1, **kwargs)
        assert all(opt.param_groups[0][key] == value for key, value in kwargs.items())
    cls(_meta_params(), lr=0.1, fused=False)
    # fused=True needs CPU params only when it steps (see test_fused_meta_params_fail_at_step)
    cls(_meta_params(), lr=0.1, fused=True)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_fused_meta_params_fail_at_step(cls: type, path_spy: PathSpy) -> None:
    """``fused=True`` on params of another device than the CPU (the meta device here)
    constructs, as torch's optimizers do (a model built on the meta device may get its
    optimizer before it is materialised), builds no kernel, and its step is a ``ValueError``
    that names the device and says the kernel is for CPU params; nothing was stepped."""
    params = _meta_params()
    with mock.patch.object(cpu_kernel, "load", side_effect=AssertionError("built a kernel")):
        opt = cls(params, lr=0.1, fused=True)
        opt.add_param_group({"params": _meta_params(), "fused": True, "lr": 0.2})
    assert [group["fused"] for group in opt.param_groups] == [True, True]
    for p in all_params(opt):
        p.grad = torch.empty_like(p)
    with pytest.raises(ValueError, match=r"'cpu-kernel' cannot step .* on meta.*CPU") as error:
        opt.step()
    assert "fused=True is for CPU params" in str(error.value)
    assert not any(path_spy.seen.values())


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_rejected_fused_group_is_not_added(cls: type) -> None:
    opt = cls(_cpu_params(), lr=0.1)
    with pytest.raises(ValueError, match="fused=True with foreach=True"):
        opt.add_param_group({"params": _cpu_params(), "fused": True, "foreach": True})
    with pytest.raises(ValueError, match="fused=True with capturable=True"):
        opt.add_param_group({"params": _cpu_params(), "fused": True, "capturable": True})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------ (g) building the kernel


def test_missing_compiler_raises_kernel_build_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setenv("CC", str(tmp_path / "no-such-cc"))
        m.setenv("ADAMPX_KERNEL_CACHE", str(cache))
        with pytest.raises(cpu_kernel.KernelBuildError, match=r"C compiler.*no-such-cc"):
            cpu_kernel.load()
        # the constructor builds the kernel, so the error surfaces there, not in a step
        assert adampx.KernelBuildError is cpu_kernel.KernelBuildError
        with pytest.raises(adampx.KernelBuildError, match="no-such-cc"):
            AdamP(_cpu_params(), fused=True)
        assert not list(cache.glob("**/*.so"))
    path = cpu_kernel.load()  # back to the usual cache, for the tests that follow
    assert path.exists() and path.parent == cpu_kernel.cache_dir()


def test_failing_compiler_raises_kernel_build_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program")
    with monkeypatch.context() as m:
        m.setenv("CC", false)
        m.setenv("ADAMPX_KERNEL_CACHE", str(tmp_path))
        with pytest.raises(cpu_kernel.KernelBuildError, match="building the kernel failed"):
            cpu_kernel.load()
        assert not list(tmp_path.glob("**/*.so"))
    cpu_kernel.load()


def test_kernel_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    with monkeypatch.context() as m:
        m.setenv("ADAMPX_KERNEL_CACHE", str(tmp_path))
        path = cpu_kernel.load()
        assert path.parent == tmp_path and path.suffix == ".so" and path.exists()
        assert list(tmp_path.iterdir()) == [path]  # no build leftovers
        mtime = path.stat().st_mtime_ns

        def no_build(*args: Any) -> None:
            raise AssertionError("the cached kernel was rebuilt")

        m.setattr(cpu_kernel, "_compile", no_build)
        assert cpu_kernel.load() == path
        assert path.stat().st_mtime_ns == mtime
        # and the freshly built kernel steps like the plain path
        plain, _ = run_path(AdamP, "plain", "channels_last", CONFIGS["adamp"][1], steps=2)
        fused, _ = run_path(AdamP, "fused", "channels_last", CONFIGS["adamp"][1], steps=2)
        assert_same_state(plain, fused, **F64)
    restored = cpu_kernel.load()
    assert restored.parent == cpu_kernel.cache_dir() != tmp_path


def test_fused_step_counter_of_another_dtype_takes_the_eager_math(path_spy: PathSpy) -> None:
    """The C kernel increments a float32 step in place; a float64 step (edited state) must not
    be read as float32: that tensor takes the eager math and still steps like AdamW."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    ours = torch.nn.Parameter(x.clone())
    ref = torch.nn.Parameter(x.clone())
    opt = AdamP([ours], lr=1e-2, delta=0.0, fused=True)
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    for k in range(3):
        g = torch.randn(4, 3, dtype=torch.float64)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        assert path_spy.impls_of(ours) == {"cpu-kernel" if k == 0 else "eager"}, k
        path_spy.clear()
        if k == 0:
            opt.state[ours]["step"] = opt.state[ours]["step"].double()
    assert opt.state[ours]["step"].dtype == torch.float64
    assert float(opt.state[ours]["step"]) == 3.0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_unwritable_kernel_cache_is_a_build_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A cache directory that cannot be created names the variable that moves it."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with monkeypatch.context() as m:
        m.setenv("ADAMPX_KERNEL_CACHE", str(blocker / "cache"))
        with pytest.raises(cpu_kernel.KernelBuildError, match="ADAMPX_KERNEL_CACHE"):
            cpu_kernel.load()
    cpu_kernel.load()


def test_fused_module_is_a_deprecated_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    """``adampx.fused``, where the kernel's driver was, still imports, with a
    ``DeprecationWarning``, and gives the ``cpu-kernel`` backend's build functions."""
    monkeypatch.delitem(sys.modules, "adampx.fused", raising=False)
    with pytest.warns(DeprecationWarning, match=r"adampx\.fused is deprecated"):
        alias = importlib.import_module("adampx.fused")
    assert alias.load is cpu_kernel.load and alias.cache_dir is cpu_kernel.cache_dir
    assert alias.KernelBuildError is adampx.KernelBuildError is cpu_kernel.KernelBuildError


def test_default_path_warns_nothing() -> None:
    """The ``cpu`` backend's row dot products use a sparse CSR pattern, whose first use makes
    torch warn that sparse CSR support is in beta: the user, who asked for none, must not
    see it (a fresh process, where torch has not warned yet, with warnings as errors)."""
    script = (
        "import torch, adampx\n"
        "for cls in (adampx.AdamP, adampx.SGDP):\n"
        "    p = torch.nn.Parameter(torch.randn(4, 3))\n"
        "    p.grad = torch.randn(4, 3)\n"
        "    opt = cls([p], lr=0.1, momentum=0.9) if cls is adampx.SGDP else cls([p])\n"
        "    opt.step()\n"
        "    assert opt._workspace._constants, 'no diagonal pattern: the test tests nothing'\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
