"""Parity of adampx with the reference package ``adamp==0.3.0`` in float64.

Each test trains two identical copies of a small model for ``STEPS`` steps (loss.backward on
the same batches), one with the reference optimizer and one with adampx, and compares the
params and the optimizer state after every step. The reference optimizers are wrapped by a
spy that counts how often their projection fired, so that every case also checks that the
projection did (or did not) take part as its ``delta`` says: the parity is never vacuous.

Known difference: the reference SGDP with ``nesterov=False`` projects its momentum buffer in
place (the update aliases the buffer). adampx follows the paper and never projects the buffer,
so for that case the reference is "fixed" by handing ``_projection`` a copy of the update;
``test_unfixed_reference_sgdp_projects_its_buffer`` documents the difference itself.
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
from adampx.algorithm.projection import decide, row_statistics
from conftest import step_or_refusal

# Every test once per backend run (``conftest.backend``): each backend that can run here
# forced, the default routing, and the ``cpu`` backend with its sizes made tiny.
pytestmark = pytest.mark.usefixtures("backend")

STEPS = 20
RTOL, ATOL = 1e-10, 1e-12
DTYPE = torch.float64


# ---------------------------------------------------------------------------------- models


class ConvBN(nn.Module):
    """conv (no bias) + BatchNorm2d + ReLU + pool + linear: the conv weight is scale invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))

    @staticmethod
    def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(8, 3, 6, 6, generator=gen, dtype=DTYPE)
        return x, torch.randint(0, 3, (8,), generator=gen)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


class LinearLN(nn.Module):
    """linear (no bias) + LayerNorm + ReLU + linear: the first weight is scale invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 8, bias=False)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.ln(self.fc1(x))))

    @staticmethod
    def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(16, 10, generator=gen, dtype=DTYPE)
        return x, torch.randint(0, 3, (16,), generator=gen)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


class OddShapes(nn.Module):
    """Params of shapes [1, N], [N, 1], 3-d (conv1d), 5-d (conv3d), 1-d and 0-d.

    The conv3d weight feeds a batch norm (scale invariant per channel); the others are not
    scale invariant, so whether they are projected depends on the actual cosines.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w5 = nn.Parameter(torch.randn(3, 2, 2, 2, 2))
        self.w3 = nn.Parameter(torch.randn(3, 2, 3) * 0.5)
        self.bias = nn.Parameter(torch.randn(3) * 0.1)
        self.col = nn.Parameter(torch.randn(5, 1))
        self.row = nn.Parameter(torch.randn(1, 5))
        self.scale = nn.Parameter(torch.tensor(0.7))

    @staticmethod
    def batch(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        x3 = torch.randn(6, 2, 3, 3, 3, generator=gen, dtype=DTYPE)
        x1 = torch.randn(6, 2, 6, generator=gen, dtype=DTYPE)
        return x3, x1, torch.randn(6, generator=gen, dtype=DTYPE)

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x3, x1, y = batch
        a = F.batch_norm(F.conv3d(x3, self.w5), None, None, training=True).mean((2, 3, 4))
        b = torch.tanh(F.conv1d(x1, self.w3)).mean(2)
        h = a + b + self.bias  # [B, 3]
        u = torch.tanh(h[:, :1] @ self.col.T)  # [B, 5]
        out = self.scale * (u @ self.row.T).squeeze(1)  # [B]
        return F.mse_loss(out, y)


MODELS = (ConvBN, LinearLN, OddShapes)


# ------------------------------------------------------------------ reference wrappers


def spy(cls: type, *, fixed: bool = False) -> type:
    """A subclass of a reference optimizer that counts its projections.

    ``tested`` counts calls of ``_projection`` (tensors with dim > 1), ``fired`` those where it
    projected (the returned weight-decay ratio is ``wd_ratio``, never 1 in these tests). With
    ``fixed=True`` the update is copied first, so that the reference SGDP no longer projects
    its momentum buffer through the alias (the paper's algorithm); the math is otherwise
    the reference's own.
    """

    class Spy(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tested = 0
            self.fired = 0

        def _projection(self, p: Tensor, grad: Tensor, perturb: Tensor, *args: Any) -> Any:
            if fixed:
                perturb = perturb.clone()
            perturb, wd = super()._projection(p, grad, perturb, *args)
            self.tested += 1
            self.fired += wd != 1
            return perturb, wd

    Spy.__name__ = f"Spy{cls.__name__}{'Fixed' if fixed else ''}"
    return Spy


# ----------------------------------------------------------------------------- harness


def batches(model_cls: type, steps: int = STEPS) -> list[Any]:
    gen = torch.Generator().manual_seed(1234)
    return [model_cls.batch(gen) for _ in range(steps)]


def make_model(model_cls: type) -> nn.Module:
    torch.manual_seed(0)
    return model_cls().to(DTYPE)


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def train_pair(
    model_cls: type,
    make_ref: Callable[[Any], torch.optim.Optimizer],
    make_new: Callable[[Any], torch.optim.Optimizer],
) -> Iterator[tuple[int, nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]]:
    """Train a reference copy and an adampx copy side by side; yield after every step.

    Yields nothing where the backend forced by the test run refuses the adampx optimizer's
    options (``conftest.refuses``), after checking that its first step raises so.
    """
    model_ref = make_model(model_cls)
    model_new = copy.deepcopy(model_ref)
    opt_ref = make_ref(model_ref.parameters())
    opt_new = make_new(model_new.parameters())
    for step, batch in enumerate(batches(model_cls), start=1):
        for model, opt in ((model_ref, opt_ref), (model_new, opt_new)):
            opt.zero_grad()
            model.loss(batch).backward()
            if not step_or_refusal(opt):
                return
        yield step, model_ref, model_new, opt_ref, opt_new


def check_parity(
    model_cls: type,
    make_ref: Callable[[Any], torch.optim.Optimizer],
    make_new: Callable[[Any], torch.optim.Optimizer],
    state_keys: tuple[str, ...],
) -> torch.optim.Optimizer:
    """Params and state equal after every step; returns the reference optimizer (its spy),
    or None where the forced backend refused the options (see :func:`train_pair`)."""
    opt_ref = None
    for step, model_ref, model_new, opt_ref, opt_new in train_pair(model_cls, make_ref, make_new):
        named = zip(model_ref.named_parameters(), model_new.parameters(), strict=True)
        for (name, p_ref), p_new in named:
            where = f"{model_cls.__name__}.{name} after step {step}"
            assert p_new.dtype == DTYPE and p_new.shape == p_ref.shape
            assert_close(p_new, p_ref, f"param {where}")
            s_ref, s_new = opt_ref.state[p_ref], opt_new.state[p_new]
            assert set(s_new) == set(state_keys), where
            for key in state_keys:
                if key == "step":
                    assert float(s_new["step"]) == s_ref["step"] == step, where
                else:
                    assert_close(s_new[key], s_ref[key], f"state {key!r} of {where}")
    return opt_ref


def check_fired(opt_ref: Any, delta: float, model_cls: type) -> None:
    """The projection took part as ``delta`` says (counted in the reference); nothing to
    check where the forced backend refused the options (``opt_ref`` None)."""
    if opt_ref is None:
        return
    n_tested = sum(p.dim() > 1 for p in make_model(model_cls).parameters())
    assert opt_ref.tested == n_tested * STEPS, model_cls.__name__
    if delta == 0:
        assert opt_ref.fired == 0, model_cls.__name__
    elif delta >= 10:  # every row length here is < 100: the channel view always passes
        assert opt_ref.fired == opt_ref.tested, model_cls.__name__
    else:
        assert opt_ref.fired >= STEPS, model_cls.__name__  # the scale-invariant weight


# ------------------------------------------------------------------------------- AdamP

FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])


DELTA = pytest.mark.parametrize("delta", [0.1, 0.0, 10.0])
DECAY = pytest.mark.parametrize(
    ("weight_decay", "wd_ratio"), [(0.0, 0.1), (0.05, 0.1), (0.05, 0.5)], ids=["wd0", "wd", "wd-r"]
)


@FOREACH
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@DECAY
@DELTA
def test_adamp_matches_reference(
    foreach: bool, nesterov: bool, weight_decay: float, wd_ratio: float, delta: float
) -> None:
    kwargs = dict(
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=weight_decay,
        delta=delta,
        wd_ratio=wd_ratio,
        nesterov=nesterov,
    )
    for model_cls in MODELS:
        opt_ref = check_parity(
            model_cls,
            lambda ps: spy(ref.AdamP)(ps, **kwargs),
            lambda ps: AdamP(ps, **kwargs, foreach=foreach),
            ("step", "exp_avg", "exp_avg_sq"),
        )
        check_fired(opt_ref, delta, model_cls)


# -------------------------------------------------------------------------------- SGDP

SGD_MOMENTUM = pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov"),
    [(0.0, 0.0, False), (0.9, 0.0, False), (0.8, 0.3, False), (0.9, 0.0, True)],
    ids=["no-momentum", "momentum", "dampening", "nesterov"],
)


@FOREACH
@SGD_MOMENTUM
@DECAY
@DELTA
def test_sgdp_matches_reference(
    foreach: bool,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    wd_ratio: float,
    delta: float,
) -> None:
    kwargs = dict(
        lr=0.05,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        eps=1e-8,
        delta=delta,
        wd_ratio=wd_ratio,
    )
    # With nesterov the reference's update is a fresh tensor: compare to it unmodified.
    reference = spy(ref.SGDP, fixed=not nesterov)
    for model_cls in MODELS:
        opt_ref = check_parity(
            model_cls,
            lambda ps: reference(ps, **kwargs),
            lambda ps: SGDP(ps, **kwargs, foreach=foreach),
            ("momentum",),
        )
        check_fired(opt_ref, delta, model_cls)


def row_cosines(a: Tensor, b: Tensor) -> Tensor:
    """``cos(a_i, b_i)`` of every row (dim 0) in float64, computed directly."""
    a, b = a.detach().flatten(1), b.detach().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@FOREACH
def test_unfixed_reference_sgdp_projects_its_buffer(foreach: bool) -> None:
    """Documents the known difference: reference SGDP (nesterov off) projects its buffer.

    BatchNorm's eps makes the conv weight only nearly scale invariant: its gradient keeps a
    small radial part (|cos| ~ 1e-6). After the first step adampx's buffer is exactly the
    gradient (b = μ·0 + g, the paper), while the reference's buffer has lost its radial part
    (it is the projected update); the two trajectories then drift apart.
    """
    kwargs = dict(lr=0.05, momentum=0.9)
    steps = train_pair(
        ConvBN,
        lambda ps: ref.SGDP(ps, **kwargs),
        lambda ps: SGDP(ps, **kwargs, foreach=foreach),
    )
    w0 = make_model(ConvBN).conv.weight  # the weight before the first step
    _, model_ref, model_new, opt_ref, opt_new = next(steps)
    w_ref, w_new = model_ref.conv.weight, model_new.conv.weight
    b_ref, b_new = opt_ref.state[w_ref]["momentum"], opt_new.state[w_new]["momentum"]
    torch.testing.assert_close(b_new, w_new.grad, rtol=0, atol=0)
    assert row_cosines(w0, w_ref.grad).abs().max() > 1e-8
    assert row_cosines(w0, b_ref).abs().max() < 1e-10
    assert not torch.allclose(b_ref, w_ref.grad, rtol=1e-6, atol=0)
    *_, (_, model_ref, model_new, _, _) = steps
    diffs = [
        (p_new - p_ref).abs().max().item()
        for p_ref, p_new in zip(model_ref.parameters(), model_new.parameters(), strict=True)
    ]
    assert max(diffs) > 1e-6


# --------------------------------------------------------------- the projection fires


def test_projection_fires_on_scale_invariant_weights() -> None:
    """adampx's own test on real gradients: BN/LN-fed weights pass, the classifier fails."""
    for model_cls, invariant, view in (
        (ConvBN, "conv.weight", "channel"),
        (LinearLN, "fc1.weight", "layer"),
        (OddShapes, "w5", "channel"),
    ):
        model = make_model(model_cls)
        model.loss(batches(model_cls, 1)[0]).backward()
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            decision = decide(row_statistics(p.detach(), p.grad), 0.1, 1e-8)
            if name == invariant:
                assert bool(getattr(decision, view)), f"{model_cls.__name__}.{name}"
            elif name in ("fc.weight", "fc2.weight"):
                assert not bool(decision.fired), f"{model_cls.__name__}.{name}"


@pytest.mark.parametrize("opt_cls", [AdamP, SGDP])
def test_default_delta_differs_from_no_projection(opt_cls: type) -> None:
    """The parity at the default delta is not that of a projection that never fires."""
    lr = 1e-2 if opt_cls is AdamP else 0.02
    final = []
    for delta in (0.1, 0.0):
        model = make_model(ConvBN)
        momentum = dict(momentum=0.9) if opt_cls is SGDP else {}
        opt = opt_cls(model.parameters(), lr=lr, weight_decay=0.05, delta=delta, **momentum)
        for batch in batches(ConvBN, 5):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
        final.append(model.conv.weight.detach().clone())
    assert not torch.allclose(final[0], final[1], rtol=1e-6, atol=0)


@FOREACH
@pytest.mark.parametrize("opt_name", ["adamp", "sgdp", "sgdp-nesterov"])
def test_large_eps_matches_reference(foreach: bool, opt_name: str) -> None:
    """eps = 0.1 is not negligible next to the row norms: the cosine's ``max(‖·‖, eps)`` and
    the ``p / (‖p‖ + eps)`` of the projection (and Adam's denominator) must be the reference's.
    """
    common = dict(eps=0.1, weight_decay=0.05, delta=0.5)
    if opt_name == "adamp":
        reference, new, kwargs = spy(ref.AdamP), AdamP, dict(lr=1e-2, **common)
        state_keys: tuple[str, ...] = ("step", "exp_avg", "exp_avg_sq")
    else:
        nesterov = opt_name == "sgdp-nesterov"
        reference, new = spy(ref.SGDP, fixed=not nesterov), SGDP
        kwargs = dict(lr=0.05, momentum=0.9, nesterov=nesterov, **common)
        state_keys = ("momentum",)
    for model_cls in MODELS:
        opt_ref = check_parity(
            model_cls,
            lambda ps: reference(ps, **kwargs),
            lambda ps: new(ps, **kwargs, foreach=foreach),
            state_keys,
        )
        assert opt_ref is None or opt_ref.fired > 0, model_cls.__name__
