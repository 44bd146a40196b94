"""The backends and their public controls: ``adampx.backends.available``, ``force``, the
routing rule of ``adampx.backends.plan``, and every backend against every other in float64.

The parity of each backend with the reference package and with ``torch.optim`` is in
``test_parity_reference.py`` / ``test_parity_torch.py`` (every test there runs once per
backend); here each backend trains a model whose tensors take every route a backend has
(small and large, row blocks, channels_last, a tensor lr, untested tensors) and must land
where the eager math lands.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adampx
from adampx import SGDP, AdamP, backends
from adampx.backends import cpu_kernel, plan
from adampx.backends.cpu import large, small
from adampx.backends.cpu_kernel import abi

F64 = dict(rtol=1e-10, atol=1e-12)

CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "adamp": (AdamP, dict(lr=1e-2, weight_decay=0.05, wd_ratio=0.2)),
    "adamp-nesterov-max": (AdamP, dict(lr=1e-2, weight_decay=0.05, nesterov=True, maximize=True)),
    "adamp-tensor-lr": (AdamP, dict(lr=torch.tensor(1e-2), weight_decay=0.05, delta=0.5)),
    "sgdp": (SGDP, dict(lr=0.05, momentum=0.9, weight_decay=0.05)),
    "sgdp-nesterov": (SGDP, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)),
    "sgdp-damp-max": (SGDP, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    "sgdp-no-momentum": (SGDP, dict(lr=0.1, weight_decay=0.05, delta=0.5)),
}


def refused(name: str, cls: type, hyper: dict[str, Any]) -> bool:
    """Whether backend ``name`` must refuse these options: torch's fused kernels, which
    ``cpu`` runs on, have no Nesterov Adam and no SGD without momentum."""
    if name != "cpu":
        return False
    return bool(hyper.get("nesterov")) if cls is AdamP else hyper.get("momentum", 0) == 0


class Model(nn.Module):
    """Scale-invariant and plain weights of every kind a backend treats differently: a conv
    before BatchNorm (channels_last, 4-D), a wide linear before LayerNorm (larger than the
    tests' block size), small ones, a plain head and its bias (untested)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.wide = nn.Linear(8 * 4 * 4, 64, bias=False)
        self.ln = nn.LayerNorm(64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.head(torch.relu(self.ln(self.wide(x))))


def make_model() -> Model:
    """The test model, its conv weight channels_last."""
    torch.manual_seed(0)
    model = Model().double()
    model.conv.to(memory_format=torch.channels_last)
    return model


def train(model: Model, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 5, (6,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def make_opt(cls: type, hyper: dict[str, Any], params: Any) -> torch.optim.Optimizer:
    hyper = {k: v.clone() if isinstance(v, Tensor) else v for k, v in hyper.items()}
    return cls(params, **hyper)


class Spy:
    """Records which backend stepped which params (wraps each backend's ``step_``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[str, list[Tensor]]] = []
        for name in backends.NAMES:
            module = backends.get(name)
            monkeypatch.setattr(module, "step_", self._wrap(name, module.step_))

    def _wrap(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(step: Any, batch: Any, workspace: Any) -> None:
            self.seen.append((name, list(batch.params)))
            fn(step, batch, workspace)

        return wrapper

    def backends_of(self, param: Tensor) -> set[str]:
        return {name for name, params in self.seen if any(p is param for p in params)}

    def names(self) -> set[str]:
        return {name for name, _ in self.seen}


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


@pytest.fixture
def tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes small enough that the test model takes every route of the ``cpu`` backend: the
    wide weight (8192 elements) on its own in row blocks, the others in chunks."""
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 1000)
    monkeypatch.setattr(small, "CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(large, "BLOCK_ELEMENTS", 1000)


# --------------------------------------------------------------- every backend, every other


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", backends.available())
def test_backend_lands_where_the_eager_math_lands(
    name: str, config: str, spy: Spy, tiny_sizes: None
) -> None:
    """Five float64 steps of each available backend equal the eager math's, state included;
    the projection fired (the parity is not AdamW's or SGD's), and the forced backend stepped
    every param (a channels_last conv weight among them). Backends that do not run the
    options refuse them, naming the option."""
    cls, hyper = CONFIGS[config]
    with backends.force("eager"):
        expected = make_model()
        opt_expected = make_opt(cls, hyper, expected.parameters())
        train(expected, opt_expected)
    model = make_model()
    opt = make_opt(cls, hyper, model.parameters())
    with backends.force(name):
        if refused(name, cls, hyper):
            with pytest.raises(ValueError, match=f"{name!r} cannot run (AdamP with nes|SGDP w)"):
                train(model, opt, 1)
            return
        train(model, opt)
    for p in model.parameters():
        assert spy.backends_of(p) >= {name}, tuple(p.shape)
    for (key, p_exp), p in zip(expected.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, p_exp, **F64, msg=lambda m, k=key: f"{k}: {m}")
        for state_key, value in opt_expected.state[p_exp].items():
            actual = opt.state[p][state_key]
            torch.testing.assert_close(actual, value, **F64, msg=lambda m, k=key: f"{k}: {m}")
    # without the projection (delta = 0) the conv weight would be elsewhere
    plain = make_model()
    with backends.force("eager"):
        train(plain, make_opt(cls, {**hyper, "delta": 0.0}, plain.parameters()))
    assert not torch.allclose(plain.conv.weight, expected.conv.weight, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- available


def test_available_lists_the_backends_that_run_here() -> None:
    names = backends.available()
    assert names == [n for n in backends.NAMES if n in names]  # in NAMES order
    assert {"eager", "foreach", "cpu"} <= set(names)
    assert set(backends.NAMES) == {"eager", "foreach", "cpu", "cpu-kernel", "triton"}


def test_available_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing the backends compiles and loads nothing: ``cpu-kernel`` is listed when a
    compiler is on the path, and only a step that needs the kernel builds it."""

    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("available() built the kernel")

    monkeypatch.setattr(cpu_kernel, "load", no_build)
    monkeypatch.setattr(cpu_kernel, "_compile", no_build)
    monkeypatch.setenv("CC", sys.executable)  # an executable on the path
    assert "cpu-kernel" in backends.available()
    monkeypatch.setenv("CC", "no-such-compiler-adampx")
    assert "cpu-kernel" not in backends.available()
    with pytest.raises(ValueError, match="'cpu-kernel' cannot run here; available: eager"):
        with backends.force("cpu-kernel"):
            pass


# --------------------------------------------------------------------------------- force


def _net() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.LayerNorm(6), nn.Linear(6, 2))
    return model, AdamP(model.parameters(), lr=1e-2)


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.ones(3, 4)).sum().backward()
    opt.step()


def test_force_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown adampx backend 'gpu'; the backends are eager"):
        with backends.force("gpu"):
            pass
    with pytest.raises(ValueError, match="unknown adampx backend"):
        backends.get("gpu")


def test_default_route_on_the_cpu(spy: Spy) -> None:
    """Nothing forced: CPU tensors take the ``cpu`` backend; with ``fused=True`` the kernel
    where it runs; AdamP with nesterov (no fused Nesterov Adam in torch) the kernel too,
    unless ``fused=False``, which leaves it to the eager math."""
    model, opt = _net()
    _step(model, opt)
    assert spy.names() == {"cpu"}
    spy.seen.clear()
    opt = AdamP(model.parameters(), lr=1e-2, nesterov=True, fused=False)
    _step(model, opt)
    assert spy.names() == {"eager"}
    spy.seen.clear()
    opt = AdamP(model.parameters(), lr=1e-2, nesterov=True, foreach=True, fused=False)
    _step(model, opt)
    assert spy.names() == {"foreach"}
    if "cpu-kernel" in backends.available():
        spy.seen.clear()
        opt = AdamP(model.parameters(), lr=1e-2, nesterov=True)
        _step(model, opt)
        assert spy.names() == {"cpu-kernel"}
        spy.seen.clear()
        opt = AdamP(model.parameters(), lr=1e-2, nesterov=True, fused=True)
        _step(model, opt)
        assert spy.names() == {"cpu-kernel"}


def test_nesterov_falls_back_to_the_eager_math_where_the_kernel_does_not_build(
    spy: Spy, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The default route's use of the C kernel (AdamP's nesterov) needs a compiler: without
    one, a warning, once, and the eager math, with its numbers."""
    monkeypatch.setattr(cpu_kernel, "_LIBRARY", None)
    monkeypatch.setattr(cpu_kernel, "_UNBUILT", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ADAMPX_KERNEL_CACHE", str(tmp_path / "cache"))
    model, _ = _net()
    expected = [p.detach().clone() for p in model.parameters()]
    reference_model, _ = _net()
    reference = AdamP(reference_model.parameters(), lr=1e-2, nesterov=True, fused=False)
    opt = AdamP(model.parameters(), lr=1e-2, nesterov=True)
    with pytest.warns(RuntimeWarning, match="could not be built; they take the slower eager"):
        _step(model, opt)
    assert spy.names() == {"eager"}
    _step(reference_model, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        _step(model, opt)
    _step(reference_model, reference)
    for p, r, e in zip(model.parameters(), reference_model.parameters(), expected, strict=True):
        assert not torch.equal(p, e)
        assert torch.equal(p, r)


def test_a_kernel_that_does_not_load_is_a_warning_too(
    spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A built library that cannot be loaded (a truncated file: ``OSError``; a struct out of
    step: ``RuntimeError``) is, for the default route, the same warning and the eager math."""
    for error in (OSError("file too short"), RuntimeError("hyper_t layout mismatch")):
        monkeypatch.setattr(cpu_kernel, "_LIBRARY", None)
        monkeypatch.setattr(cpu_kernel, "_UNBUILT", None)

        def broken(error: Exception = error) -> None:
            raise error

        monkeypatch.setattr(cpu_kernel, "load", broken)
        model, _ = _net()
        opt = AdamP(model.parameters(), lr=1e-2, nesterov=True)
        with pytest.warns(RuntimeWarning, match=str(error)):
            _step(model, opt)
        assert spy.names() == {"eager"}
        spy.seen.clear()


def test_force_nests_and_restores(spy: Spy) -> None:
    model, opt = _net()
    assert backends.forced() is None
    with backends.force("foreach"):
        _step(model, opt)
        assert spy.names() == {"foreach"}
        with backends.force("eager"):
            assert backends.forced() is backends.get("eager")
            spy.seen.clear()
            _step(model, opt)
            assert spy.names() == {"eager"}
        spy.seen.clear()
        _step(model, opt)
        assert spy.names() == {"foreach"}
    assert backends.forced() is None
    spy.seen.clear()
    _step(model, opt)
    assert spy.names() == {"cpu"}


def test_force_is_per_thread(spy: Spy) -> None:
    """Another thread's steps are not forced by this thread's ``force``."""
    model, opt = _net()
    other_model, other_opt = _net()
    seen_in_thread: list[Any] = []

    def other() -> None:
        seen_in_thread.append(backends.forced())
        _step(other_model, other_opt)

    with backends.force("eager"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        _step(model, opt)
    assert seen_in_thread == [None]
    assert spy.backends_of(other_model[0].weight) == {"cpu"}
    assert spy.backends_of(model[0].weight) == {"eager"}


def test_forced_backend_refuses_a_tensor_it_cannot_take() -> None:
    """A forced backend never hands a tensor to another: a transposed weight (no dense
    layout shared with a contiguous gradient) is an error naming the backend and why."""
    weight = nn.Parameter(torch.randn(6, 4).t())  # non-contiguous
    opt = AdamP([weight], lr=1e-2)
    weight.grad = torch.randn(4, 6)
    with (
        backends.force("cpu"),
        pytest.raises(
            ValueError, match=r"'cpu' cannot step a param of shape \(4, 6\).*dense layout"
        ),
    ):
        opt.step()
    assert float(opt.state[weight]["step"]) == 0  # nothing stepped


def test_forced_backend_refuses_options_it_does_not_run() -> None:
    model, _ = _net()
    opt = SGDP(model.parameters(), lr=0.1)  # no momentum: no fused SGD without a buffer
    with backends.force("cpu"), pytest.raises(ValueError, match="SGDP with momentum=0"):
        _step(model, opt)
    opt = AdamP(model.parameters(), lr=0.1, nesterov=True)
    with backends.force("cpu"), pytest.raises(ValueError, match="AdamP with nesterov"):
        _step(model, opt)


def test_compiling_takes_the_eager_math(monkeypatch: pytest.MonkeyPatch) -> None:
    """While ``torch.compile`` traces a step, the chain is empty (fused kernels and the C
    kernel cannot be traced), ``force`` included: every tensor takes the eager math."""
    step = adampx.algorithm.spec.Step(
        optimizer="adamp", lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
        delta=0.1, wd_ratio=0.1, nesterov=False, maximize=False, projection=True,
    )  # fmt: skip
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with backends.force("cpu"):
        assert plan.chain(step, foreach_flag=None, fused=False, workspace=None) == ([], False)
    assert plan.eager_math(True, []) is backends.get("foreach")
    assert plan.eager_math(False, []) is backends.get("eager")


# ------------------------------------------------------------------------ fused=True, meta


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_fused_on_meta_params_constructs_and_refuses_at_step(cls: type) -> None:
    """A model built on the meta device constructs its ``fused=True`` optimizer (as torch's
    do, before ``to_empty``); a step on non-CPU params is an error that says fused=True is
    for CPU params."""
    weight = nn.Parameter(torch.empty(4, 3, device="meta"))
    kwargs = dict(lr=0.1, momentum=0.9) if cls is SGDP else dict(lr=0.1)
    opt = cls([weight], fused=True, **kwargs)
    weight.grad = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"cpu-kernel.*on meta.*fused=True is for CPU params"):
        opt.step()


# ------------------------------------------------------------------ the kernel's struct


def test_kernel_struct_mismatch_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C kernel's ``hyper_t`` is checked against ``abi.Hyper`` when it loads: a field
    removed on one side is a load-time error, not wrong numbers."""
    if "cpu-kernel" not in backends.available():
        pytest.fail("this machine has no C compiler; the test suite needs one")
    library = ctypes.CDLL(str(cpu_kernel.load()))
    abi.check_layout(library)  # the real pair agrees
    fields = len(abi.Hyper._fields_)  # so the C struct's count

    class Shorter(ctypes.Structure):  # a field removed on the Python side only
        _fields_ = [(n, t) for n, t in abi.Hyper._fields_ if n != "dampening"]

    monkeypatch.setattr(abi, "Hyper", Shorter)
    match = (
        rf"layout mismatch: field \d+ .* in Python .*C struct has {fields} fields, "
        rf"abi.Hyper {fields - 1}"
    )
    with pytest.raises(RuntimeError, match=match):
        abi.check_layout(library)


# ------------------------------------------------------------------- names kept for users


def test_public_names() -> None:
    assert adampx.KernelBuildError is cpu_kernel.KernelBuildError
    assert issubclass(adampx.KernelBuildError, RuntimeError)
    projection = importlib.import_module("adampx.projection")
    algorithm = importlib.import_module("adampx.algorithm.projection")
    for name in ("decide", "row_statistics", "Decision", "Decisions", "is_projectable"):
        assert getattr(projection, name) is getattr(algorithm, name), name
    plots = importlib.import_module("adampx.plots")
    tools_plots = importlib.import_module("adampx.tools.plots")
    assert set(tools_plots.__all__) <= set(dir(plots))
    for name in (
        "AdamP",
        "SGDP",
        "Projected",
        "NormMonitor",
        "inspect",
        "param_groups",
        "backends",
    ):
        assert name in adampx.__all__ and hasattr(adampx, name), name
    assert callable(importlib.import_module("adampx.adamp").adamp)
    assert callable(importlib.import_module("adampx.sgdp").sgdp)


def test_old_fused_module_warns() -> None:
    """``adampx.fused`` (where the kernel's driver was) still works and says where it went."""
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    import adampx.fused\nexcept DeprecationWarning as w:\n    print(w)\n"
        "warnings.simplefilter('ignore')\nimport adampx.fused as f, adampx\n"
        "print(f.KernelBuildError is adampx.KernelBuildError, callable(f.load))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert "adampx.backends.cpu_kernel" in first
    assert second == "True True"
