"""Parity of adampx with torch.optim, between its own code paths, and under torch.compile.

- With the projection never firing (``delta=0`` or ``projection=False``), AdamP is
  ``torch.optim.AdamW`` and SGDP (dampening 0, weight decay 0) is ``torch.optim.SGD``:
  float64, real training, params and state compared after every step, both code paths,
  ``maximize`` included.
- The multi-tensor path (``foreach=True``) equals the per-tensor path with the projection
  firing, also for a param group that mixes float32 and float64 params.
- ``step`` traces without graph breaks (``torch._dynamo.explain``), unlike the reference
  package's, and ``torch.compile(step, fullgraph=True)`` agrees with eager (marked
  ``compile``: slow on a CPU).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import adamp as ref
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adampx import SGDP, AdamP
from conftest import refuses, step_or_refusal

# Every test once per backend run (``conftest.backend``): each backend that can run here
# forced, the default routing, and the ``cpu`` backend with its sizes made tiny.
pytestmark = pytest.mark.usefixtures("backend")

STEPS = 20
RTOL, ATOL = 1e-10, 1e-12
Factory = Callable[[Any], torch.optim.Optimizer]


# ---------------------------------------------------------------------------------- models


class Net(nn.Module):
    """Two scale-invariant weights (conv before BatchNorm, linear before LayerNorm) + a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 3 * 3, 6, bias=False)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(F.relu(self.ln(self.fc1(h.flatten(1)))))

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x.to(self.conv.weight.dtype)), y)


class TinyNet(nn.Module):
    """conv 3->4 (no bias) + BatchNorm2d + linear: for Dynamo and torch.compile."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        out = self.fc(F.relu(self.bn(self.conv(x.to(self.conv.weight.dtype)))).mean((2, 3)))
        return F.cross_entropy(out, y)


class Mixed(nn.Module):
    """float32 and float64 params in one module; two are scale invariant row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.w64 = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
        self.w32 = nn.Parameter(torch.randn(4, 6, dtype=torch.float32))
        self.v32 = nn.Parameter(torch.randn(3, 4, dtype=torch.float32) * 0.5)
        self.b64 = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.s32 = nn.Parameter(torch.tensor(1.0, dtype=torch.float32))

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        x = x.flatten(1)[:, :6].double()
        a = x @ F.normalize(self.w64, dim=1).T
        c = x @ F.normalize(self.w32.double(), dim=1).T
        out = self.s32.double() * (torch.tanh(a + c) @ self.v32.double().T + self.b64)
        return F.cross_entropy(out, y)


def batches(steps: int = STEPS, size: int = 6) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    return [
        (
            torch.randn(8, 3, size, size, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(steps)
    ]


# ----------------------------------------------------------------------------- harness


def train_pair(
    model_cls: type,
    make_a: Factory,
    make_b: Factory,
    *,
    dtype: torch.dtype | None = torch.float64,
    steps: int = STEPS,
    step_b: Callable[[torch.optim.Optimizer], Callable[[], Any]] | None = None,
) -> Iterator[tuple[int, nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]]:
    """Train two identical copies side by side (one batch, one backward each); yield per step.

    ``step_b(opt_b)`` may replace ``opt_b.step`` from the second step on (torch.compile).
    Yields nothing where the backend forced by the test run refuses an optimizer's options
    (``conftest.refuses``), after checking that its first step raises so.
    """
    torch.manual_seed(0)
    model_a = model_cls() if dtype is None else model_cls().to(dtype)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = make_a(model_a.parameters()), make_b(model_b.parameters())
    stepper_b = opt_b.step
    for step, batch in enumerate(batches(steps, 6 if model_cls is Net else 5), start=1):
        for model, opt, stepper in ((model_a, opt_a, opt_a.step), (model_b, opt_b, stepper_b)):
            opt.zero_grad()
            model.loss(batch).backward()
            if step == 1 and refuses(opt):
                step_or_refusal(opt)
                return
            stepper()
        if step == 1 and step_b is not None:
            stepper_b = step_b(opt_b)
        yield step, model_a, model_b, opt_a, opt_b


def check_parity(
    pairs: Iterator[tuple[int, nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]],
    state_keys: dict[str, str],
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    rtol32: float | None = None,
    atol32: float | None = None,
) -> int | None:
    """Params and state (``state_keys``: key in b -> key in a) equal after every step.

    float32 params use ``rtol32``/``atol32`` when given. Returns the number of steps, or
    None where the forced backend refused the options (:func:`train_pair` checked the error).
    """
    step = 0
    refused = True
    for step, model_a, model_b, opt_a, opt_b in pairs:
        refused = False
        named = zip(model_a.named_parameters(), model_b.parameters(), strict=True)
        for (name, p_a), p_b in named:
            where = f"{name} after step {step}"
            tol = dict(rtol=rtol, atol=atol)
            if p_a.dtype == torch.float32 and rtol32 is not None:
                tol = dict(rtol=rtol32, atol=atol32)
            assert p_b.dtype == p_a.dtype, where
            torch.testing.assert_close(p_b, p_a, **tol, msg=lambda m, w=where: f"param {w}: {m}")
            s_a, s_b = opt_a.state[p_a], opt_b.state[p_b]
            for key_b, key_a in state_keys.items():
                if key_b == "step":
                    assert float(s_b["step"]) == float(s_a["step"]) == step, where
                    continue
                assert s_b[key_b].dtype == p_b.dtype, where
                torch.testing.assert_close(
                    s_b[key_b],
                    s_a[key_a],
                    **tol,
                    msg=lambda m, w=f"{key_b} of {where}": f"{w}: {m}",
                )
    return None if refused else step


FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])


MAXIMIZE = pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
# Two ways to keep the projection from ever firing.
NEVER_FIRES = pytest.mark.parametrize(
    "off", [dict(delta=0.0), dict(projection=False)], ids=["delta0", "projection-off"]
)
ADAM_STATE = {"step": "step", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


# ---------------------------------------------------------------------- torch.optim parity


@FOREACH
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd"])
@MAXIMIZE
@NEVER_FIRES
def test_adamp_without_projection_is_adamw(
    foreach: bool, weight_decay: float, maximize: bool, off: dict[str, Any]
) -> None:
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    pairs = train_pair(
        Net,
        lambda ps: torch.optim.AdamW(ps, **kwargs, maximize=maximize, foreach=foreach),
        lambda ps: AdamP(ps, **kwargs, **off, maximize=maximize, foreach=foreach),
    )
    assert check_parity(pairs, ADAM_STATE) in (STEPS, None)


@FOREACH
@pytest.mark.parametrize(
    ("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)], ids=["sgd", "mom", "nes"]
)
@MAXIMIZE
@NEVER_FIRES
def test_sgdp_without_projection_is_sgd(
    foreach: bool, momentum: float, nesterov: bool, maximize: bool, off: dict[str, Any]
) -> None:
    kwargs = dict(lr=0.05, momentum=momentum, nesterov=nesterov, maximize=maximize)
    pairs = train_pair(
        Net,
        lambda ps: torch.optim.SGD(ps, **kwargs, foreach=foreach),
        lambda ps: SGDP(ps, **kwargs, **off, foreach=foreach),
    )
    # torch keeps no buffer without momentum; SGDP's is then the last gradient (b = g).
    assert check_parity(pairs, {"momentum": "momentum_buffer"} if momentum else {}) in (STEPS, None)


def test_never_firing_is_not_the_default() -> None:
    """The parities above need the switch: at the default delta AdamP is not AdamW."""
    pairs = train_pair(
        Net,
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
        lambda ps: AdamP(ps, lr=1e-2, weight_decay=0.05),
        steps=3,
    )
    with pytest.raises(AssertionError, match="param"):
        check_parity(pairs, ADAM_STATE)


# ------------------------------------------------------------------ foreach == per-tensor

PATH_CONFIGS = pytest.mark.parametrize(
    ("opt_cls", "kwargs"),
    [
        (AdamP, dict(lr=1e-2, weight_decay=0.05)),
        (AdamP, dict(lr=1e-2, weight_decay=0.05, nesterov=True, delta=10.0, wd_ratio=0.5)),
        (AdamP, dict(lr=1e-2, weight_decay=0.05, maximize=True)),
        (SGDP, dict(lr=0.05, momentum=0.9, weight_decay=0.05)),
        (SGDP, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, delta=10.0)),
        (SGDP, dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.05, maximize=True)),
    ],
    ids=["adamp", "adamp-nesterov", "adamp-max", "sgdp", "sgdp-nesterov", "sgdp-damp-max"],
)


def state_map(opt_cls: type) -> dict[str, str]:
    return ADAM_STATE if opt_cls is AdamP else {"momentum": "momentum"}


@PATH_CONFIGS
def test_foreach_equals_single_tensor(opt_cls: type, kwargs: dict[str, Any]) -> None:
    pairs = train_pair(
        Net,
        lambda ps: opt_cls(ps, **kwargs, foreach=False),
        lambda ps: opt_cls(ps, **kwargs, foreach=True),
    )
    assert check_parity(pairs, state_map(opt_cls)) in (STEPS, None)


@PATH_CONFIGS
def test_foreach_equals_single_tensor_mixed_dtypes(opt_cls: type, kwargs: dict[str, Any]) -> None:
    """One param group with float32 and float64 params (the multi-tensor path splits it).

    The two paths round float32 math differently (the per-tensor path runs torch's fused
    kernels on CPU), and the float32 params feed the float64 params' gradients, so every
    param is held to float32 tolerances here; the float64-only tests hold float64 ones.
    """
    model = Mixed()
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32, torch.float64}
    pairs = train_pair(
        Mixed,
        lambda ps: opt_cls(ps, **kwargs, foreach=False),
        lambda ps: opt_cls(ps, **kwargs, foreach=True),
        dtype=None,
    )
    steps = check_parity(pairs, state_map(opt_cls), rtol=1e-5, atol=1e-6)
    assert steps in (STEPS, None)


def test_mixed_dtypes_projection_fires() -> None:
    """In ``Mixed`` the projection fires on both dtypes (the path test is not vacuous)."""
    for dtype in (torch.float32, torch.float64):
        results = []
        for delta in (0.1, 0.0):
            torch.manual_seed(0)
            model = Mixed()
            opt = AdamP(model.parameters(), lr=1e-2, delta=delta, foreach=True)
            for batch in batches(3, 5):
                opt.zero_grad()
                model.loss(batch).backward()
                opt.step()
            w = model.w32 if dtype == torch.float32 else model.w64
            assert w.dtype == dtype
            results.append(w.detach().clone())
        assert not torch.allclose(results[0], results[1], rtol=1e-4, atol=0), dtype


# ------------------------------------------------------------------- Dynamo and compile

OPTIMIZERS = pytest.mark.parametrize(
    ("opt_cls", "kwargs"),
    [
        (AdamP, dict(lr=1e-2, weight_decay=0.05)),
        (SGDP, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ],
    ids=["adamp", "sgdp"],
)


def explain_step(make_opt: Factory) -> Any:
    """``torch._dynamo.explain`` of ``step`` on ``TinyNet``, after one eager step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_opt(model.parameters())
    model.loss(batches(1, 5)[0]).backward()
    opt.step()  # creates the state, as in training
    try:
        return torch._dynamo.explain(opt.step)()
    finally:
        torch._dynamo.reset()


@OPTIMIZERS
@FOREACH
def test_step_has_no_graph_breaks(opt_cls: type, kwargs: dict[str, Any], foreach: bool) -> None:
    explanation = explain_step(lambda ps: opt_cls(ps, **kwargs, foreach=foreach))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_reference_adamp_step_has_graph_breaks() -> None:
    """The same check fails for the reference AdamP (data-dependent Python branch)."""
    explanation = explain_step(lambda ps: ref.AdamP(ps, lr=1e-2, weight_decay=0.05))
    assert explanation.graph_break_count >= 1


@pytest.mark.compile
@OPTIMIZERS
@FOREACH
def test_compiled_step_matches_eager(opt_cls: type, kwargs: dict[str, Any], foreach: bool) -> None:
    """``torch.compile(step, fullgraph=True)``: one compile, float32 rounding from eager."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            pairs = train_pair(
                TinyNet,
                lambda ps: opt_cls(ps, **kwargs, foreach=foreach),
                lambda ps: opt_cls(ps, **kwargs, foreach=foreach),
                dtype=torch.float32,
                steps=4,
                step_b=lambda opt: torch.compile(opt.step, fullgraph=True),
            )
            assert check_parity(pairs, state_map(opt_cls), rtol=1e-5, atol=1e-6) in (4, None)
    finally:
        torch._dynamo.reset()
