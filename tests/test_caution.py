"""The cautious variants (``caution=True``) against an oracle written from their definition.

The oracle (:class:`Cautious`) is AdamP / SGDP as timm 1.0.31 defines ``caution=True``,
written here per tensor from the formulas (docs/algorithm.md, "The cautious variants"):
the projection with explicit channel and layer views and ``F.cosine_similarity``, the
spherical mask ``[u ⊙ g⊥ > 0]`` on projected tensors followed by a second projection, the
standard mask ``[u ⊙ g > 0]`` elsewhere, both divided by ``max(mean, 1e-3)`` over the whole
tensor. adampx computes the same with row sums and coefficients (``adampx.algorithm``), so
agreement in float64 is a real check; tests_timm/ repeats it against timm itself.

Every test runs once per backend run (``conftest.backend``): the backends that have the
mask (``eager``, ``foreach``, ``cpu-kernel``, and the default routing, which sends cautious
steps to the kernel on the CPU) must match; those without it (``cpu``, on torch's fused
kernels, and ``triton``) must refuse it when forced.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import adampx
from adampx import SGDP, AdamP
from adampx.algorithm.caution import MIN_KEPT, mask_
from conftest import step_or_refusal
from test_parity_reference import MODELS, OddShapes, assert_close, batches, make_model
from test_parity_torch import TinyNet, check_parity, explain_step, state_map, train_pair

STEPS = 12


# ---------------------------------------------------------------------------- the oracle


def _views(p: Tensor) -> list[Tensor]:
    return [p.reshape(p.shape[0], -1), p.reshape(1, -1)]


def _masked(u: Tensor, g: Tensor) -> tuple[Tensor, bool]:
    keep = (u * g > 0).to(u.dtype)
    return u * (keep / keep.mean().clamp(min=MIN_KEPT)), bool((keep == 0).any())


class Cautious(torch.optim.Optimizer):
    """timm 1.0.31's ``AdamP(caution=True)`` / ``SGDP(caution=True)``, per tensor, from the
    definition; counts the masks that removed something, per kind, so that a test can check
    that both took part."""

    def __init__(self, params: Any, kind: str, **hyper: Any) -> None:
        super().__init__(params, hyper)
        self.kind = kind
        self.spherical = 0  # projected tensors whose mask dropped elements
        self.standard = 0  # the others

    def _direction(self, p: Tensor, g: Tensor, u: Tensor, group: dict) -> tuple[Tensor, float]:
        delta, eps = group["delta"], group["eps"]
        if p.dim() > 1 and group.get("projection", True):
            for pv, gv in zip(_views(p), _views(g), strict=True):
                cosine = F.cosine_similarity(gv, pv, dim=1, eps=eps).abs()
                if cosine.max() < delta / math.sqrt(pv.shape[1]):
                    unit = pv / (pv.norm(dim=1, keepdim=True) + eps)

                    def radial(x: Tensor, unit: Tensor = unit) -> Tensor:
                        rows = x.reshape(unit.shape)
                        return (unit * (unit * rows).sum(1, keepdim=True)).reshape(p.shape)

                    u = u - radial(u)
                    u, dropped = _masked(u, g - radial(g))
                    self.spherical += dropped
                    return u - radial(u), group["wd_ratio"]
        u, dropped = _masked(u, g)
        self.standard += dropped
        return u, 1.0

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                g = -p.grad if group.get("maximize") else p.grad
                state = self.state[p]
                if self.kind == "adamp":
                    beta1, beta2 = group["betas"]
                    if not state:
                        state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                    state["step"] += 1
                    t, m, v = state["step"], state["m"], state["v"]
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = v.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
                    top = beta1 * m + (1 - beta1) * g if group["nesterov"] else m
                    u, r = self._direction(p, g, top / denom, group)
                    p.mul_(1 - group["lr"] * group["weight_decay"] * r)
                    p.add_(u, alpha=-group["lr"] / (1 - beta1**t))
                else:
                    mu = group["momentum"]
                    b = state.setdefault("b", torch.zeros_like(p))
                    b.mul_(mu).add_(g, alpha=1 - group["dampening"])
                    d = g + mu * b if group["nesterov"] else b.clone()
                    u, r = self._direction(p, g, d, group)
                    p.mul_(1 - group["lr"] * group["weight_decay"] * r / (1 - mu))
                    p.add_(u, alpha=-group["lr"])


# ---------------------------------------------------------------------------- harness

ADAMP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, delta=0.1, wd_ratio=0.1)
SGDP_HYPER = dict(
    lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-3, eps=1e-8, delta=0.1, wd_ratio=0.1
)


def train_against_oracle(
    model_cls: type, kind: str, hyper: dict[str, Any], ours: dict[str, Any]
) -> Cautious | None:
    """Train the oracle and adampx side by side (``caution=True``), comparing params after
    every step; the oracle, or None where the forced backend refused (and said so)."""
    model_ref = make_model(model_cls)
    model_new = copy.deepcopy(model_ref)
    oracle = Cautious(model_ref.parameters(), kind, **hyper)
    cls = AdamP if kind == "adamp" else SGDP
    opt = cls(model_new.parameters(), **hyper, caution=True, **ours)
    for step, batch in enumerate(batches(model_cls, STEPS), start=1):
        for model in (model_ref, model_new):
            model.zero_grad()
            # maximize: the negated loss, so that both runs descend the loss and stay finite
            (-model.loss(batch) if hyper.get("maximize") else model.loss(batch)).backward()
        oracle.step()
        if not step_or_refusal(opt):
            return None
        for (name, p_ref), p_new in zip(
            model_ref.named_parameters(), model_new.parameters(), strict=True
        ):
            assert_close(p_new, p_ref, f"{model_cls.__name__}.{name} after step {step}")
    return oracle


def check_masks_took_part(oracle: Cautious | None, model_cls: type, projection: bool) -> None:
    """Both masks dropped elements somewhere (the parity is never vacuous): the spherical
    one on the scale-invariant weights, the standard one on the others."""
    if oracle is None:
        return
    assert oracle.standard > 0, model_cls.__name__
    if projection and model_cls is not OddShapes:  # OddShapes: projected only by chance
        assert oracle.spherical > 0, model_cls.__name__


# ------------------------------------------------------------------------------ tests

pytestmark = pytest.mark.usefixtures("backend")
KIND = pytest.mark.parametrize("kind", ["adamp", "sgdp"])
NESTEROV = pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])


@KIND
@NESTEROV
@pytest.mark.parametrize("foreach", [None, False, True], ids=str)
@pytest.mark.parametrize("delta", [0.1, 10.0])
def test_matches_the_definition(
    kind: str, nesterov: bool, foreach: bool | None, delta: float
) -> None:
    """``delta=0.1``: the scale-invariant weights are projected, and their gradient is
    nearly tangent already (``g⊥ ≈ g``); ``delta=10``: every row length here is below 100,
    so every tested tensor is projected, also those whose gradient has a large radial
    part: there the spherical mask differs from the standard one."""
    hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=nesterov, delta=delta)
    for model_cls in MODELS:
        oracle = train_against_oracle(model_cls, kind, hyper, dict(foreach=foreach))
        check_masks_took_part(oracle, model_cls, projection=True)
        if oracle is not None and delta == 10.0:
            assert oracle.spherical > 0, model_cls.__name__


@KIND
def test_fused_true(kind: str) -> None:
    """``fused=True`` with ``caution=True``: the C kernel's cautious step."""
    hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=True)
    for model_cls in MODELS:
        train_against_oracle(model_cls, kind, hyper, dict(fused=True))


@KIND
def test_maximize(kind: str) -> None:
    """With ``maximize`` the masks compare with the ascent direction ``−g``: the oracle
    negates the gradient before everything else (both maximize the negated loss)."""
    hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=False, maximize=True)
    for model_cls in MODELS:
        oracle = train_against_oracle(model_cls, kind, hyper, {})
        check_masks_took_part(oracle, model_cls, projection=True)


@KIND
def test_projection_false_masks_every_tensor_the_standard_way(kind: str) -> None:
    hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=False, projection=False)
    for model_cls in MODELS:
        oracle = train_against_oracle(model_cls, kind, hyper, {})
        check_masks_took_part(oracle, model_cls, projection=False)
        if oracle is not None:
            assert oracle.spherical == 0


# ------------------------------------------------------------- outside the backend runs


@pytest.mark.parametrize("backend", ["default"], indirect=True)
def test_mask_in_closed_form(backend: str) -> None:
    """``mask_``: the signs that agree kept, scaled by 1 / (fraction kept); none kept gives
    a zero update (the fraction is floored at 1e-3, never divided by zero)."""
    u = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    g = torch.tensor([2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    expected = torch.tensor([4 / 3, 0.0, 4.0, -16 / 3], dtype=torch.float64)
    torch.testing.assert_close(mask_(u.clone(), g), expected)
    torch.testing.assert_close(mask_(u.clone(), -u), torch.zeros(4, dtype=torch.float64))
    assert mask_(torch.zeros(0), torch.zeros(0)).shape == (0,)


@pytest.mark.parametrize("backend", ["default"], indirect=True)
@pytest.mark.parametrize("name", ["cpu"])
def test_fused_backends_refuse_when_forced(backend: str, name: str) -> None:
    if name not in adampx.backends.available():
        pytest.fail(f"backend {name} should run on CI's machine")
    model = make_model(MODELS[0])
    opt = AdamP(model.parameters(), lr=1e-2, caution=True)
    model.loss(batches(MODELS[0], 1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with adampx.backends.force(name), pytest.raises(ValueError, match=r"cannot run caution=True"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend", ["default"], indirect=True)
def test_invalid_caution_is_named(backend: str) -> None:
    with pytest.raises(ValueError, match="Invalid caution: expected True or False, got 'yes'"):
        AdamP([torch.zeros(2, 2, requires_grad=True)], caution="yes")
    with pytest.raises(ValueError, match="Invalid caution"):
        SGDP([torch.zeros(2, 2, requires_grad=True)], lr=0.1, caution=1)


@pytest.mark.parametrize("backend", ["default"], indirect=True)
@KIND
def test_checkpoint_resumes_to_the_same_result(backend: str, kind: str, tmp_path: Any) -> None:
    """Saved after 5 steps, loaded into a new optimizer (built with caution=False: the saved
    group's caution=True wins), the run ends where an uninterrupted one does, bit for bit."""
    model_cls = MODELS[0]
    hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=True)
    cls = AdamP if kind == "adamp" else SGDP
    data = batches(model_cls, 10)

    def run(model: Any, opt: Any, part: list[Any]) -> None:
        for batch in part:
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()

    whole = make_model(model_cls)
    run(whole, cls(whole.parameters(), **hyper, caution=True), data)
    first = make_model(model_cls)
    opt = cls(first.parameters(), **hyper, caution=True)
    run(first, opt, data[:5])
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt")
    resumed = make_model(model_cls)
    resumed.load_state_dict(saved["model"])
    opt = cls(resumed.parameters(), **hyper, caution=False)
    opt.load_state_dict(saved["opt"])
    assert opt.param_groups[0]["caution"] is True
    run(resumed, opt, data[5:])
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


CAUTIOUS_ADAMP = dict(lr=1e-2, weight_decay=0.05, nesterov=True, caution=True)


@pytest.mark.parametrize("backend", ["default"], indirect=True)
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_cautious_step_has_no_graph_breaks(backend: str, foreach: bool) -> None:
    """The masks are tensor operations (the kept fraction never reaches the host)."""
    explanation = explain_step(lambda ps: AdamP(ps, **CAUTIOUS_ADAMP, foreach=foreach))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["default"], indirect=True)
def test_compiled_cautious_step_matches_eager(backend: str) -> None:
    """``torch.compile(step, fullgraph=True)`` of a cautious step: float32 rounding from
    eager, one compile."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            pairs = train_pair(
                TinyNet,
                lambda ps: AdamP(ps, **CAUTIOUS_ADAMP),
                lambda ps: AdamP(ps, **CAUTIOUS_ADAMP),
                dtype=torch.float32,
                steps=4,
                step_b=lambda opt: torch.compile(opt.step, fullgraph=True),
            )
            assert check_parity(pairs, state_map(AdamP), rtol=1e-5, atol=1e-6) == 4
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["default"], indirect=True)
@KIND
def test_complex_params_are_masked_on_their_real_view(backend: str, kind: str) -> None:
    """A complex weight steps as its real view does (``[n, m, 2]``: the same rows), the
    masks included; the gradients are given, the same numbers for both."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 4, 2, generator=gen, dtype=torch.float64)
    real = weight.clone().requires_grad_()
    complex_ = torch.view_as_complex(weight.clone()).requires_grad_()
    hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=True, delta=10.0)
    cls = AdamP if kind == "adamp" else SGDP
    opts = [cls([real], **hyper, caution=True), cls([complex_], **hyper, caution=True)]
    for _ in range(4):
        grad = torch.randn(5, 4, 2, generator=gen, dtype=torch.float64)
        real.grad = grad.clone()
        complex_.grad = torch.view_as_complex(grad.clone())
        for opt in opts:
            opt.step()
    assert not torch.equal(real.detach(), weight)
    torch.testing.assert_close(torch.view_as_real(complex_.detach()), real.detach())


@pytest.mark.parametrize("backend", ["default"], indirect=True)
@KIND
@pytest.mark.parametrize("delta", [0.0, 10.0], ids=["not-projected", "projected"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_on_tensors_of_many_blocks(
    backend: str, kind: str, delta: float, threads: int
) -> None:
    """The C kernel cuts a tensor it does not project into blocks of 4096 elements (the last
    one shorter) and runs large ones on every thread: a 1-d tensor of 70,001 elements and a
    matrix of 97 × 733 (projected per row with ``delta=10``), against the oracle."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(70_001,), (97, 733)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=True, delta=delta)
    cls = AdamP if kind == "adamp" else SGDP
    opt = cls(ours, **hyper, caution=True, fused=True)
    oracle = Cautious(theirs, kind, **hyper)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            for a, b in zip(ours, theirs, strict=True):
                a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
                b.grad = a.grad.clone()
            opt.step()
            oracle.step()
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a.detach(), b.detach(), f"shape {tuple(a.shape)}")
    assert oracle.standard > 0
    assert (oracle.spherical > 0) == (delta == 10.0)


@pytest.mark.parametrize("backend", ["default"], indirect=True)
@KIND
def test_a_nan_or_inf_gradient_gives_the_eager_maths_nan(backend: str, kind: str) -> None:
    """The kernel's mask multiplies, as the eager math's does: a NaN or inf in the gradient
    of a tested and of an untested tensor makes the same elements NaN or inf (never a
    silent zero that would freeze the weight), and the finite ones agree."""
    results = []
    for fused in (True, None, False):
        gen = torch.Generator().manual_seed(5)
        a = torch.randn(16, 40, generator=gen, dtype=torch.float64).requires_grad_()
        b = torch.randn(40, generator=gen, dtype=torch.float64).requires_grad_()
        hyper = dict(ADAMP if kind == "adamp" else SGDP_HYPER, nesterov=True)
        cls = AdamP if kind == "adamp" else SGDP
        opt = cls([a, b], **hyper, caution=True, fused=fused)
        for i in range(3):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = torch.randn(b.shape, generator=gen, dtype=torch.float64)
            if i == 1:
                a.grad[0, 0], b.grad[3] = float("nan"), float("inf")
            opt.step()
        results.append((a.detach(), b.detach()))
    eager = results[-1]
    assert not eager[0].isfinite().all() and not eager[1].isfinite().all()
    for kernel in results[:-1]:
        for x, y in zip(kernel, eager, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, equal_nan=True)
