"""The ``triton`` backend's kernels against the eager math and the reference package.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``conftest.py`` turns
it on), one program after another, a few milliseconds each: the models here are small, and
the block and chunk sizes are made small (16 and 40 elements) so that rows of length 1,
below, at and above a block, and untested tensors of several chunks all occur. Every
comparison has the projection firing: the gradients are made so that each tested tensor
takes the outcome its name says (channel view, layer view, none), and the test checks the
decisions. What the interpreter cannot check, whether the kernels compile for a GPU, is
checked by compiling every kernel variant for sm_80 and sm_90 (no GPU needed).
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import adamp as ref
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import adampx
from adampx import SGDP, AdamP, backends
from adampx.util.workspace import Workspace
from test_fast_paths import _OnCuda
from test_parity_reference import spy

if not backends.get("triton").runs_here():
    # the test extra installs triton on Linux x86_64: there it must run
    assert platform.system() != "Linux" or platform.machine() != "x86_64", (
        "the triton backend cannot run: install the test extra (pip install -e '.[test]')"
    )
    pytest.skip("the test extra installs triton on Linux x86_64 only", allow_module_level=True)

triton_backend = backends.get("triton")

# The shapes and the outcome each tested one is given (see ``gradients``): rows of length
# 1, 12 (below the block of 16), 16 (at it) and 40 (above it), a tensor projected as a
# whole, one not projected, and untested ones of 1, 7 and 100 elements (3 chunks of 40).
SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "rows-of-1": ((5, 1), "channel"),
    "below-block": ((4, 3, 2, 2), "channel"),
    "at-block": ((3, 16), "channel"),
    "above-block": ((2, 40), "channel"),
    "whole": ((4, 10), "layer"),
    "whole-long-rows": ((2, 24), "layer"),
    "not-invariant": ((3, 5), "none"),
    "bias": ((7,), "untested"),
    "one": ((1,), "untested"),
    "long-bias": ((100,), "untested"),
}

CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "adamp": (AdamP, dict(lr=1e-2, weight_decay=0.1, wd_ratio=0.2)),
    "adamp-nesterov-max": (
        AdamP,
        dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, nesterov=True, maximize=True),
    ),
    "adamp-tensor-lr": (AdamP, dict(lr=torch.tensor(1e-2), weight_decay=0.1)),
    "sgdp": (SGDP, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
    "sgdp-nesterov": (SGDP, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgdp-damp-max": (
        SGDP,
        dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1, maximize=True),
    ),
    "sgdp-no-momentum": (SGDP, dict(lr=0.1, weight_decay=0.1)),
}
DELTA = 0.5  # every tensor here has rows of at most 40: a cosine of 0 passes, 0.5 fails


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend, "BLOCK", 16)
    monkeypatch.setattr(triton_backend, "CHUNK", 40)


def make_params(dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        for shape, _ in SHAPES.values()
    ]


def _radial_free(g: Tensor, p: Tensor) -> Tensor:
    """``g`` less its radial part in every row (dim 0) of ``p``."""
    dims = tuple(range(1, p.dim()))
    return g - (g * p).sum(dims, keepdim=True) / (p * p).sum(dims, keepdim=True) * p


def gradients(params: list[Tensor], seed: int) -> list[Tensor]:
    """Gradients that give each tested tensor the outcome of :data:`SHAPES`: "channel",
    orthogonal to every row; "layer", orthogonal to the whole tensor but with rows that
    point along the weights (alternately, so that their radial parts cancel); "none",
    along the weights."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for p, (_, outcome) in zip(params, SHAPES.values(), strict=True):
        w = p.detach().double()
        g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        if outcome == "channel":
            g = _radial_free(g, w)
        elif outcome == "layer":
            dims = tuple(range(1, w.dim()))
            signs = torch.tensor([(-1.0) ** i for i in range(w.shape[0])], dtype=torch.float64)
            scale = 10 * signs / (w * w).sum(dims)  # rows far from orthogonal
            scale[-1] = -(scale[:-1] * (w[:-1] * w[:-1]).sum(dims)).sum() / (w[-1] ** 2).sum()
            g = _radial_free(g, w) + scale.view(-1, *[1] * len(dims)) * w
        elif outcome == "none":
            g = g + 3 * w
        grads.append(g.to(p.dtype))
    return grads


def make_opt(cls: type, hyper: dict[str, Any], params: Any, **extra: Any) -> Any:
    hyper = {k: v.clone() if isinstance(v, Tensor) else v for k, v in hyper.items()}
    return cls(params, **{"delta": DELTA, **hyper, **extra})


def twins(
    config: str, dtype: torch.dtype = torch.float64
) -> tuple[list[nn.Parameter], list[nn.Parameter], Any, Any]:
    """Two copies of the params, each with its optimizer of ``config``: one for the
    backend under test, one for the eager math."""
    cls, hyper = CONFIGS[config]
    params, expected = make_params(dtype), make_params(dtype)
    return params, expected, make_opt(cls, hyper, params), make_opt(cls, hyper, expected)


def train(opt: Any, params: list[Tensor], backend: str, steps: int = 3, start: int = 0) -> None:
    for k in range(start, start + steps):
        for p, g in zip(params, gradients(params, k), strict=True):
            p.grad = g
        with backends.force(backend):
            opt.step()


class LaunchSpy:
    """Counts the launches of each kernel of the backend."""

    NAMES = ("row_sums_kernel", "test_kernel", "dots_kernel", "layer_dots_kernel", "update_kernel")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from adampx.backends.triton import kernels

        self.launches: list[str] = []
        for name in self.NAMES:
            monkeypatch.setattr(kernels, name, self._wrap(name, getattr(kernels, name)))

    def _wrap(self, name: str, kernel: Any) -> Any:
        spy = self

        class Wrapped:
            def __getitem__(self, grid: Any) -> Callable[..., Any]:
                launch = kernel[grid]

                @functools.wraps(launch)
                def run(*args: Any, **kwargs: Any) -> Any:
                    spy.launches.append(name)
                    return launch(*args, **kwargs)

                return run

        return Wrapped()


def assert_close(a: list[Tensor], b: list[Tensor], **tol: Any) -> None:
    for (name, _), x, y in zip(SHAPES.items(), a, b, strict=True):
        torch.testing.assert_close(x, y, **tol, msg=lambda m, n=name: f"{n}: {m}")


F64 = dict(rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- against the eager math


@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernels_match_the_eager_math(config: str) -> None:
    """Three float64 steps of every outcome, row length and option equal the eager math's,
    state included; the decisions are the eager math's, and all outcomes occur."""
    cls, hyper = CONFIGS[config]
    results = {}
    for backend in ("eager", "triton"):
        params = make_params()
        opt = make_opt(cls, hyper, params, track_statistics=True)
        train(opt, params, backend)
        views = [s.view for s in opt.statistics()]
        results[backend] = (params, opt, views)
    (p_eager, opt_eager, views_eager), (p_triton, opt_triton, views_triton) = results.values()
    assert_close(p_triton, p_eager, **F64)
    for a, b in zip(p_triton, p_eager, strict=True):
        for key, value in opt_eager.state[b].items():
            torch.testing.assert_close(opt_triton.state[a][key], value, **F64)
    assert views_triton == views_eager
    expected = [o if o != "untested" else "skipped" for _, o in SHAPES.values()]
    assert views_eager == expected


@pytest.mark.parametrize("config", ["adamp", "adamp-nesterov-max", "sgdp", "sgdp-nesterov"])
def test_kernels_match_the_reference_package(config: str) -> None:
    """The same, against ``adamp==0.3.0`` (SGDP without nesterov: with the reference's
    buffer aliasing fixed, see test_parity_reference)."""
    cls, hyper = CONFIGS[config]
    hyper = {k: v for k, v in hyper.items() if k != "maximize"}
    reference_cls = ref.AdamP if cls is AdamP else spy(ref.SGDP, fixed=not hyper.get("nesterov"))
    ours, theirs = make_params(), make_params()
    opt = make_opt(cls, hyper, ours)
    reference = reference_cls(theirs, **{"delta": DELTA, **hyper})
    train(opt, ours, "triton")
    for k in range(3):
        for p, g in zip(theirs, gradients(theirs, k), strict=True):
            p.grad = g
        reference.step()
    assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov"])
def test_lower_precision(dtype: torch.dtype, config: str) -> None:
    """float32 params within float32 rounding of the eager math; half params (stepped
    through their float32 copies, state in float32) within one unit in the last place."""
    cls, hyper = CONFIGS[config]
    results = []
    for backend in ("eager", "triton"):
        params = make_params(dtype)
        train(make_opt(cls, hyper, params), params, backend)
        results.append(params)
    if dtype == torch.float32:
        assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
        return
    for name, a, b in zip(SHAPES, results[1], results[0], strict=True):
        ulp = torch.finfo(dtype).eps * b.detach().float().abs().clamp_min(1e-3)
        assert ((a.float() - b.float()).abs() <= ulp).all(), name


def test_complex_params_through_their_real_view() -> None:
    def params() -> list[nn.Parameter]:
        gen = torch.Generator().manual_seed(3)
        return [
            nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.complex128)),
            nn.Parameter(torch.randn(3, generator=gen, dtype=torch.complex128)),
        ]

    results = []
    for backend in ("eager", "triton"):
        ps = params()
        opt = AdamP(ps, lr=1e-2, weight_decay=0.1, delta=0.5)
        for k in range(2):
            gen = torch.Generator().manual_seed(10 + k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            with backends.force(backend):
                opt.step()
        results.append(ps)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_groups_with_their_own_hyperparameters() -> None:
    """Two groups (different lr, weight decay, delta, wd_ratio, projection off in one)."""
    results = []
    for backend in ("eager", "triton"):
        params = make_params()
        groups = [
            {"params": params[:4], "lr": 2e-2, "weight_decay": 0.3, "wd_ratio": 0.5},
            {"params": params[4:], "delta": 0.05, "projection": False},
        ]
        train(AdamP(groups, lr=1e-2, weight_decay=0.1, delta=DELTA), params, backend)
        results.append(params)
    assert_close(results[1], results[0], **F64)


# --------------------------------------------------------------------- checkpoints, layout


@pytest.mark.parametrize("config", ["adamp", "sgdp"])
def test_checkpoint_resumes_on_another_backend(config: str) -> None:
    """Two steps on ``triton``, a checkpoint, one step on the eager math: the three steps
    of the eager math alone."""
    cls, hyper = CONFIGS[config]
    params = make_params()
    opt = make_opt(cls, hyper, params)
    train(opt, params, "triton", steps=2)
    saved = copy.deepcopy(opt.state_dict())
    resumed = make_opt(cls, hyper, params)
    resumed.load_state_dict(saved)
    train(resumed, params, "eager", steps=1, start=2)
    expected = make_params()
    train(make_opt(cls, hyper, expected), expected, "eager")
    assert_close(params, expected, **F64)


@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov"])
def test_channels_last_weights_are_stepped_in_place(config: str) -> None:
    """channels_last weights (a 4-d weight's rows are still blocks of memory, in another
    order inside) with channels_last gradients: the eager math's numbers, the layout kept."""
    cls, hyper = CONFIGS[config]
    results = []
    for backend in ("eager", "triton"):
        gen = torch.Generator().manual_seed(5)
        shapes = [(4, 3, 2, 2), (3, 20, 1, 1), (2, 5, 3, 3)]
        params = [
            nn.Parameter(
                torch.randn(s, generator=gen, dtype=torch.float64).to(
                    memory_format=torch.channels_last
                )
            )
            for s in shapes
        ]
        opt = make_opt(cls, hyper, params)
        for k in range(3):
            for p, g in zip(params, gradients_for(params, k), strict=True):
                p.grad = g.contiguous(memory_format=torch.channels_last)
            with backends.force(backend):
                opt.step()
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in params)
        results.append(params)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F64)


def gradients_for(params: list[Tensor], seed: int) -> list[Tensor]:
    """Gradients orthogonal to every row of each param (the channel view fires)."""
    gen = torch.Generator().manual_seed(seed)
    return [_radial_free(torch.randn(p.shape, generator=gen, dtype=p.dtype), p.detach())
            for p in params]  # fmt: skip


def test_tensors_it_cannot_take_are_refused_when_forced() -> None:
    """A weight whose gradient has another layout (a transposed one) or an empty tensor is
    an error under ``force("triton")``; the default routing never sends CPU tensors to
    Triton."""
    weight = nn.Parameter(torch.randn(4, 3, 2, 2))
    weight.grad = torch.randn(4, 3, 2, 2).transpose(2, 3).contiguous().transpose(2, 3)
    opt = AdamP([weight], lr=1e-2)
    with backends.force("triton"), pytest.raises(ValueError, match=r"'triton'.*layout"):
        opt.step()
    empty = nn.Parameter(torch.zeros(0, 3))
    empty.grad = torch.zeros(0, 3)
    with backends.force("triton"), pytest.raises(ValueError, match="non-empty"):
        AdamP([empty], lr=1e-2).step()
    assert "triton" not in [b.NAME for b in adampx.backends.plan.chain(
        adampx.algorithm.spec.Step(
            optimizer="adamp", lr=1e-2, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
            nesterov=False, maximize=False, projection=True,
        ),
        foreach_flag=None, fused=False, workspace=None,
    )[0]]  # fmt: skip


# ------------------------------------------------------------------ launches, host data


class HostData(TorchDispatchMode):
    """Records the operations that make a tensor from host data (``torch.tensor``) or read
    one on the host. (Not ``copy_``: the interpreter writes the kernels' outputs back with
    it; on a GPU the kernels write in place.)"""

    NAMES: ClassVar[set[str]] = {"lift_fresh", "_local_scalar_dense", "item", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in self.NAMES:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def count_builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls of the backend's layout and address-table builders."""
    built = {"_layout": 0, "_addresses": 0}
    for name in built:
        real = getattr(triton_backend, name)

        def counted(*args: Any, name: str = name, real: Any = real) -> Any:
            built[name] += 1
            return real(*args)

        monkeypatch.setattr(triton_backend, name, counted)
    return built


def test_launches_do_not_grow_with_the_number_of_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five kernel launches per step and group (AdamP adds one multi-tensor increment of
    its step counters), for 10 tensors as for 30; after the first step the layout and the
    address table come from the workspace: no tensor is made from host data, and nothing
    is read on the host."""
    launches = LaunchSpy(monkeypatch)
    built = count_builds(monkeypatch)
    for copies in (1, 3):
        params = [p for _ in range(copies) for p in make_params()]
        opt = AdamP(params, lr=1e-2, weight_decay=0.1, delta=DELTA)
        grads = [g for _ in range(copies) for g in gradients(make_params(), 0)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        for step in range(3):
            launches.launches.clear()
            built.update(_layout=0, _addresses=0)
            with backends.force("triton"), HostData() as host:
                opt.step()
            assert sorted(launches.launches) == sorted(LaunchSpy.NAMES), launches.launches
            first = int(step == 0)
            assert built == {"_layout": first, "_addresses": first}, (copies, step)
            # the first step builds its tables from host data; the others read nothing
            assert ("lift_fresh" in host.seen) == (step == 0), (step, host.seen)
            assert step == 0 or host.seen == [], host.seen


def test_new_gradients_rebuild_only_the_address_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients allocated afresh (``zero_grad()`` sets them to None; backward allocates
    new ones, maybe elsewhere): the address table is rebuilt, the layout is kept, and the
    step is the eager math's; a changed ``delta`` rebuilds the layout (its thresholds)."""
    built = count_builds(monkeypatch)
    params, expected = make_params(), make_params()
    opt = make_opt(AdamP, CONFIGS["adamp"][1], params)
    reference = make_opt(AdamP, CONFIGS["adamp"][1], expected)
    kept = []
    for k in range(3):
        for p, q, g in zip(params, expected, gradients(params, k), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        kept.append([p.grad for p in params])  # alive: the next ones are elsewhere
        with backends.force("triton"):
            opt.step()
        with backends.force("eager"):
            reference.step()
    assert built == {"_layout": 1, "_addresses": 3}
    assert_close(params, expected, **F64)
    opt.param_groups[0]["delta"] = DELTA / 2
    with backends.force("triton"):
        opt.step()
    assert built == {"_layout": 2, "_addresses": 3}


def test_a_step_where_some_gradients_are_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Params without a gradient keep their state and are left out of that step's tables
    (a layout of its own, rebuilt when they come back); the steps equal the eager math's."""
    built = count_builds(monkeypatch)
    params, expected = make_params(), make_params()
    opt = make_opt(AdamP, CONFIGS["adamp"][1], params)
    reference = make_opt(AdamP, CONFIGS["adamp"][1], expected)
    for k in range(4):
        for i, (p, q, g) in enumerate(zip(params, expected, gradients(params, k), strict=True)):
            frozen = k in (1, 2) and i in (0, 4, 7)  # a channel, a layer and an untested one
            p.grad, q.grad = (None, None) if frozen else (g.clone(), g.clone())
        with backends.force("triton"):
            opt.step()
        with backends.force("eager"):
            reference.step()
    assert_close(params, expected, **F64)
    assert float(opt.state[params[0]]["step"]) == 2 and float(opt.state[params[1]]["step"]) == 4
    assert built["_layout"] == 2  # all params, then the step without the frozen ones


# ----------------------------------------------------------------------- GradScaler


def scaled_loss(params: list[Tensor], k: int) -> Tensor:
    """A loss whose gradient is ``gradients(params, k)`` (each param's outcome kept)."""
    targets = gradients([p.detach() for p in params], k)
    return sum((p * g).sum() for p, g in zip(params, targets, strict=True))  # type: ignore[return-value]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf step
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov"])
def test_grad_scaler_is_taken_in_the_kernels(config: str, dtype: torch.dtype) -> None:
    """``torch.amp.GradScaler`` hands the kernels its scale and inf flag (torch's protocol
    for fused optimizers): the steps equal the eager math's on unscaled gradients, the
    gradients are left unscaled, nothing is read on the host; a step with an inf gradient
    changes no param, state or step counter, and leaves its gradients as they were."""
    params, expected, opt, reference = twins(config, dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(3):
        opt.zero_grad()
        scaler.scale(scaled_loss(params, k)).backward()
        unscaled = gradients([p.detach() for p in params], k)
        with backends.force("triton"):
            assert opt._step_supports_amp_scaling
            with HostData() as host:
                scaler.step(opt)
        assert "_local_scalar_dense" not in host.seen and "item" not in host.seen
        scaler.update()
        reference.zero_grad()
        scaled_loss(expected, k).backward()
        with backends.force("eager"):
            reference.step()
        for p, g in zip(params, unscaled, strict=True):
            assert torch.equal(p.grad, g.to(p.dtype))  # unscaled in place (by 2^10: exact)
    if dtype == torch.float64:
        assert_close(params, expected, **F64)
    else:
        for name, a, b in zip(SHAPES, params, expected, strict=True):
            ulp = torch.finfo(dtype).eps * b.detach().float().abs().clamp_min(1e-3)
            assert ((a.float() - b.float()).abs() <= ulp).all(), name
    assert scaler.get_scale() == 2.0**10

    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    scaler.scale(scaled_loss(params, 3)).backward()
    params[2].grad[0, 0] = float("inf")
    grads = [p.grad.clone() for p in params]
    with backends.force("triton"):
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for p, b, g in zip(params, before, grads, strict=True):
        assert torch.equal(p.detach(), b) and torch.equal(p.grad, g)
    for key, values in state.items():
        for name, value in values.items():
            assert torch.equal(opt.state_dict()["state"][key][name], value), (key, name)


@pytest.mark.parametrize("config", ["adamp", "sgdp"])
def test_grad_scaler_after_unscale_and_clipping(config: str) -> None:
    """The usual clipping recipe (``scaler.unscale_(opt)``, ``clip_grad_norm_``,
    ``scaler.step(opt)``): the scaler has unscaled the gradients, so it hands over only its
    inf flag; three steps equal the eager math on the clipped unscaled gradients."""
    params, expected, opt, reference = twins(config)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for k in range(3):
        opt.zero_grad()
        scaler.scale(scaled_loss(params, k)).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(params, max_norm=1.0)
        with backends.force("triton"):
            scaler.step(opt)
        scaler.update()
        reference.zero_grad()
        scaled_loss(expected, k).backward()
        nn.utils.clip_grad_norm_(expected, max_norm=1.0)
        with backends.force("eager"):
            reference.step()
    assert_close(params, expected, **F64)


def test_the_test_sees_unscaled_gradients() -> None:
    """Gradients below ``eps`` in norm, along the weights: unscaled, the test clamps their
    norm to ``eps`` and passes (the eager math projects); scaled by 2^16 they would fail
    it. The kernels test the unscaled gradients, so they decide as the eager math does."""
    views = {}
    for backend in ("eager", "triton"):
        gen = torch.Generator().manual_seed(7)
        weight = nn.Parameter(torch.randn(4, 10, generator=gen, dtype=torch.float64))
        opt = AdamP([weight], lr=1e-2, delta=DELTA, track_statistics=True)
        scale = 2.0**16
        (scale * 1e-10 * (weight * weight.detach()).sum()).backward()  # g = 2e-10·w, scaled
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)  # type: ignore[attr-defined]
        with backends.force(backend):
            opt.step()
        views[backend] = [s.view for s in opt.statistics()]
    assert views["triton"] == views["eager"] == ["channel"], views


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_other_backends_unscale_or_skip_a_scaler_step(found: float) -> None:
    """The eager math given a scale and an inf flag (as the optimizer is when a GradScaler
    hands them over): one read of the flag, then the step on unscaled gradients, or none."""
    cls, hyper = CONFIGS["adamp"]
    params, expected = make_params(), make_params()
    opt = make_opt(cls, hyper, params)
    reference = make_opt(cls, hyper, expected)
    for p, q, g in zip(params, expected, gradients(params, 0), strict=True):
        p.grad, q.grad = 8 * g, g.clone()
    before = [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(found)  # type: ignore[attr-defined]
    with backends.force("eager"):
        assert not opt._step_supports_amp_scaling
        opt.step()
        reference.step()
    if found:
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
        assert all(float(s["step"]) == 0 for s in opt.state.values())
    else:
        assert_close(params, expected, **F64)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, expected, strict=True))


# ----------------------------------------------------------- compiled for a GPU, no GPU


COMPILE_ALL = textwrap.dedent(
    """
    import itertools, os
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adampx.backends.triton import kernels

    LONGS = {"ptrs", "step_ptrs", "row_tensor", "row_start", "row_len", "row_slot",
             "row_tested", "chunk_tensor", "chunk_start", "chunk_len", "first_row", "rows"}

    def arg_type(name, fp):
        if name in ("T", "R", "S", "TT", "whole_rows", "unscaled"):
            return "i32"
        if name.endswith("_bits"):
            return "i64"
        if name == "sign":
            return "fp32"
        if name == "mode":
            return "*i32"
        if name in LONGS:
            return "*i64"
        if name in ("lr_ptr", "grad_scale_ptr", "found_inf_ptr"):
            return "*fp32"
        if name == "decay_ptr":
            return "*fp64"
        return "*fp64" if fp else "*fp32"

    compiled = 0
    for capability in (80, 90):
        target = GPUTarget("cuda", capability, 32)
        for name in ("row_sums_kernel", "test_kernel", "dots_kernel", "layer_dots_kernel",
                     "update_kernel"):
            kernel = getattr(kernels, name)
            flags = [f for f in ("ADAM", "NESTEROV", "LR_TENSOR", "AMP") if f in kernel.arg_names]
            for fp in (False, True):
                for values in itertools.product((False, True), repeat=len(flags)):
                    constants = dict(BLOCK=1024, FP64=fp, **dict(zip(flags, values)))
                    signature = {
                        a: "constexpr" if a in constants else arg_type(a, fp)
                        for a in kernel.arg_names
                    }
                    triton.compile(ASTSource(kernel, signature, constexprs=constants),
                                   target=target)
                    compiled += 1
    print(compiled)
    """
)


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path: Any) -> None:
    """The interpreter runs code a GPU compiler rejects (a function returning pointers of
    two types, say): every kernel, in every variant the backend launches, is compiled to
    PTX and a cubin for compute capabilities 8.0 and 9.0, with no GPU attached."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not found in a cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == 2 * (4 + 2 + 16 + 2 + 32)


# ------------------------------------------------------------------------ torch.compile


def test_the_custom_op_passes_opcheck() -> None:
    """``torch.ops.adampx.triton_step``: schema, fake implementation and in-place writes as
    torch's ``opcheck`` checks them (on CPU tensors, in the interpreter)."""
    from adampx.backends.triton import Scalars, op

    params = make_params()
    grads = gradients(params, 0)
    ps = [p.detach().clone() for p in params]
    first = [torch.zeros_like(p) for p in ps]
    second = [torch.zeros_like(p) for p in ps]
    steps = [torch.ones((), dtype=torch.float32) for _ in ps]
    tested = [k for k, p in enumerate(ps) if p.dim() > 1]
    scalars = Scalars(
        lr=1e-2, decay=1e-3, beta1=0.9, beta2=0.999, c1=0.1, eps=1e-8, wd_ratio=0.1,
        sign=1.0, delta=DELTA,
    )  # fmt: skip
    args = (ps, grads, first, second, steps, tested, list(scalars), [True, False])
    torch.library.opcheck(op.triton_step, (*args, None, None, None, None))


@pytest.mark.parametrize("config", ["adamp", "sgdp-nesterov"])
def test_a_compiled_step_calls_the_kernels_through_the_custom_op(
    config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.compile(opt.step, fullgraph=True)`` where the traced chain takes ``triton``
    (on CUDA by default; here made to, on CPU tensors in the interpreter): the compiled
    step launches the kernels through the custom op, with no graph break, and three steps
    equal the eager math's."""
    from adampx.backends import plan

    monkeypatch.setattr(plan, "_traced_chain", lambda *args: ([triton_backend], True))
    launches = []
    launch = triton_backend.launch
    monkeypatch.setattr(triton_backend, "launch", lambda *a: launches.append(1) or launch(*a))  # type: ignore[func-returns-value]
    cls, hyper = CONFIGS[config]
    params, expected = make_params(), make_params()
    opt = make_opt(cls, hyper, params)
    reference = make_opt(cls, hyper, expected)
    compiled = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    for k in range(3):
        for p, q, g in zip(params, expected, gradients(params, k), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        compiled()
        with backends.force("eager"):
            reference.step()
    assert len(launches) == 3
    assert_close(params, expected, **F64)


# -------------------------------------------------------------------- the start-up probe


def test_the_probe_runs_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ready()``'s probe (one AdamP step of a 2×2 tensor) passes where the kernels run
    (here: in the interpreter, on the CPU)."""
    monkeypatch.setattr(triton_backend, "_probe_device", lambda: torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert triton_backend.ready.__wrapped__() is True


def test_kernels_that_do_not_run_are_one_warning_and_the_eager_math(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the probe fails (a GPU or compiler Triton cannot use), one RuntimeWarning
    names the error, and CUDA tensors take the eager math: routing checks ``ready()``."""
    from adampx.backends import plan

    def broken(*args: Any) -> Any:
        raise RuntimeError("no compiler for the launcher")

    monkeypatch.setattr(triton_backend, "_probe_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(triton_backend, "launch", broken)
    with pytest.warns(RuntimeWarning, match="no compiler for the launcher") as caught:
        assert triton_backend.ready.__wrapped__() is False
    assert len(caught) == 1
    monkeypatch.setattr(triton_backend, "INSTALLED", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_backend, "ready", lambda: False)
    step = adampx.algorithm.spec.Step(
        optimizer="adamp", lr=1e-2, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
        nesterov=False, maximize=False, projection=True,
    )  # fmt: skip
    on_cuda = torch.zeros(2, 2).as_subclass(_OnCuda)
    chain, _ = plan.chain(
        step, foreach_flag=None, fused=None, workspace=Workspace(), tensors=[on_cuda]
    )
    assert triton_backend not in chain
