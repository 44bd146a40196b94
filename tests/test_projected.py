"""``adampx.Projected``: any torch optimizer with AdamP's projection and decoupled weight decay.

Every number is compared with an independent reference: ``adampx.AdamP`` / ``adampx.SGDP``
where the math coincides (their own parity with the reference package is
tests/test_parity_reference.py), the reference package ``adamp==0.3.0`` itself, and, for
wrapped optimizers that have no projected counterpart, the wrapped optimizer stepped on its
own followed by the reference package's projection (``adamp.AdamP._projection``) and decay.
Every case that compares projected runs also checks that the projection took part.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Iterable
from typing import Any

import adamp as ref
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adampx
from adampx import SGDP, AdamP, Projected

RTOL, ATOL = 1e-10, 1e-12
REF_TOL = dict(rtol=RTOL, atol=ATOL)  # float64 parity with another implementation
STEPS = 10


# ---------------------------------------------------------------------------- model


class Net(nn.Module):
    """conv (no bias) + BatchNorm2d: scale invariant per output channel (the channel view);
    linear (no bias) + LayerNorm: invariant to scaling the whole weight (the layer view);
    1-d gains and biases, and a head that is not scale invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 6, bias=False)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.head(F.relu(self.ln(self.fc(h))))


INVARIANT = ("conv.weight", "fc.weight")  # the weights the projection must fire on


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def twins(dtype: torch.dtype = torch.float64) -> tuple[Net, Net]:
    model = make_model(dtype)
    return model, copy.deepcopy(model)


def loss_at(model: nn.Module, i: int) -> Tensor:
    """Loss of ``model`` on the deterministic batch number ``i``."""
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(500 + i)
    x = torch.randn(8, 3, 6, 6, generator=gen).to(dtype)
    y = torch.randint(0, 3, (8,), generator=gen)
    return F.cross_entropy(model(x), y)


def train(
    model: nn.Module,
    opt: Any,
    steps: int = STEPS,
    start: int = 0,
    *,
    after_step: Callable[[int], None] | None = None,
) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        loss_at(model, i).backward()
        opt.step()
        if after_step is not None:
            after_step(i)


def assert_models_close(a: nn.Module, b: nn.Module, **tol: Any) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.dtype == pb.dtype, name
        torch.testing.assert_close(pa, pb, **tol, msg=lambda m, n=name: f"{n}: {m}")


def assert_models_equal(a: nn.Module, b: nn.Module) -> None:
    assert_models_close(a, b, rtol=0, atol=0)


def max_change(a: nn.Module, b: nn.Module, names: Iterable[str] = INVARIANT) -> float:
    """How much the named params of two models differ: the smallest over the names of the
    largest elementwise difference (every named param differs by at least that)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return min((pa[n] - pb[n]).abs().max().item() for n in names)


def save_load(obj: Any) -> Any:
    """``torch.save`` then ``torch.load(weights_only=True)`` through memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW without its own weight decay (Projected's decay replaces it)."""
    return torch.optim.AdamW(params, **{"weight_decay": 0.0, **kwargs})


def fired_views(opt: AdamP, model: nn.Module, steps: int = STEPS) -> set[str]:
    """Train ``model`` with ``opt`` (AdamP of its params, ``track_statistics=True``); the views
    it projected in."""
    views: set[str] = set()

    def record(i: int) -> None:
        views.update(s.view for s in opt.statistics())

    train(model, opt, steps, after_step=record)
    return views


class SpyAdamP(ref.AdamP):
    """The reference AdamP, counting how often its projection fired."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fired = 0

    def _projection(self, *args: Any) -> Any:
        perturb, wd = super()._projection(*args)
        self.fired += wd != 1
        return perturb, wd


# ----------------------------------------------------------------------- (1) exactness

WRAPPED_ADAMW = pytest.mark.parametrize(
    "impl",
    [dict(foreach=False), dict(foreach=True), dict(fused=True)],
    ids=["for-loop", "foreach", "fused"],
)
ADAMP_HYPER = dict(lr=2e-2, betas=(0.85, 0.99), eps=1e-8)


@WRAPPED_ADAMW
@pytest.mark.parametrize(
    "weight_decay, delta, wd_ratio",
    [(0.0, 0.1, 0.1), (0.1, 0.1, 0.1), (0.05, 0.3, 0.5)],
    ids=["wd0", "wd", "wd-delta-ratio"],
)
def test_projected_adamw_equals_adamp(
    impl: dict[str, bool], weight_decay: float, delta: float, wd_ratio: float
) -> None:
    """Params and the wrapped AdamW's state equal AdamP's after every step."""
    model, model_ref = twins()
    inner = adamw(model.parameters(), **ADAMP_HYPER, **impl)
    opt = Projected(inner, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio)
    assert opt.state is inner.state and opt.param_groups is inner.param_groups
    hyper = dict(**ADAMP_HYPER, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio)
    opt_ref = AdamP(model_ref.parameters(), **hyper)

    def compare(i: int) -> None:
        opt_ref.zero_grad()
        loss_at(model_ref, i).backward()
        opt_ref.step()
        assert_models_close(model, model_ref, **REF_TOL)
        for p, q in zip(model.parameters(), model_ref.parameters(), strict=True):
            state, state_ref = inner.state[p], opt_ref.state[q]
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            assert float(state["step"]) == float(state_ref["step"]) == i + 1
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], state_ref[key], **REF_TOL)

    train(model, opt, after_step=compare)
    # not vacuous: AdamP, equal to it, projected in both views on this model
    model_s = make_model()
    assert {"channel", "layer"} <= fired_views(
        AdamP(model_s.parameters(), **hyper, track_statistics=True), model_s
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
def test_projected_adamw_equals_reference_package(weight_decay: float) -> None:
    model, model_ref = twins()
    hyper = dict(**ADAMP_HYPER, weight_decay=weight_decay, delta=0.1, wd_ratio=0.2)
    opt = Projected(
        adamw(model.parameters(), **ADAMP_HYPER), weight_decay=weight_decay, delta=0.1, wd_ratio=0.2
    )
    opt_ref = SpyAdamP(model_ref.parameters(), **hyper)
    train(model, opt)
    train(model_ref, opt_ref)
    assert_models_close(model, model_ref, **REF_TOL)
    assert opt_ref.fired >= 2 * STEPS  # both scale-invariant weights, every step


@pytest.mark.parametrize(
    "foreach, nesterov",
    [
        (False, False),
        (False, True),
        (True, False),
        pytest.param(True, True),
    ],
    ids=["per_tensor-momentum", "per_tensor-nesterov", "foreach-momentum", "foreach-nesterov"],
)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["wd0", "wd"])
def test_projected_sgd_equals_sgdp(foreach: bool, nesterov: bool, weight_decay: float) -> None:
    """``Projected(SGD(momentum=μ), weight_decay=λ/(1−μ))`` is ``SGDP(weight_decay=λ)``: SGDP
    scales its decay by 1/(1−μ); the momentum buffers are equal too."""
    lr, mu = 5e-2, 0.9
    model, model_ref = twins()
    inner = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=mu, nesterov=nesterov, foreach=foreach
    )
    if weight_decay == 0:
        opt = Projected(inner, delta=0.1, wd_ratio=0.3)  # the default: no decay
    else:
        opt = Projected(inner, weight_decay=weight_decay / (1 - mu), delta=0.1, wd_ratio=0.3)
    opt_ref = SGDP(
        model_ref.parameters(),
        lr=lr,
        momentum=mu,
        nesterov=nesterov,
        weight_decay=weight_decay,
        delta=0.1,
        wd_ratio=0.3,
    )

    def compare(i: int) -> None:
        opt_ref.zero_grad()
        loss_at(model_ref, i).backward()
        opt_ref.step()
        assert_models_close(model, model_ref, **REF_TOL)
        for p, q in zip(model.parameters(), model_ref.parameters(), strict=True):
            assert set(inner.state[p]) == {"momentum_buffer"}
            torch.testing.assert_close(
                inner.state[p]["momentum_buffer"], opt_ref.state[q]["momentum"], **REF_TOL
            )

    train(model, opt, after_step=compare)
    unprojected = make_model()
    train(
        unprojected,
        Projected(
            torch.optim.SGD(unprojected.parameters(), lr=lr, momentum=mu, nesterov=nesterov),
            delta=0.0,
        ),
    )
    assert max_change(model, unprojected) > 1e-6


def test_projection_changes_the_result_and_delta_0_is_the_wrapped_optimizer() -> None:
    """With ``delta=0`` and no decay, Projected is its wrapped optimizer; the default delta
    changes both scale-invariant weights (the parities above are not those of a no-op)."""
    plain, projected, off = make_model(), make_model(), make_model()
    train(plain, adamw(plain.parameters(), **ADAMP_HYPER))
    train(projected, Projected(adamw(projected.parameters(), **ADAMP_HYPER)))
    train(off, Projected(adamw(off.parameters(), **ADAMP_HYPER), delta=0.0))
    assert_models_close(off, plain, rtol=1e-14, atol=1e-15)
    assert max_change(projected, plain) > 1e-5


REF_PROJECTION = ref.AdamP([torch.zeros(1, requires_grad=True)])._projection


def reference_train(
    model: nn.Module,
    inner: torch.optim.Optimizer,
    *,
    lr: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    eps: float = 1e-8,
    steps: int = STEPS,
) -> int:
    """The module doc's algorithm, built from independent parts: ``inner`` steps on its own,
    then the reference package's test and projection of its update ``Δ`` and the decay
    ``p·(1 − lr·λ·r)`` of every tensor of 2+ dims; 1-d tensors decay before the step.
    Returns how often the projection fired."""
    fired = 0
    for i in range(steps):
        inner.zero_grad()
        loss_at(model, i).backward()
        with torch.no_grad():
            tested = [p for p in model.parameters() if p.dim() > 1]
            for p in model.parameters():
                if p.dim() == 1:
                    p.mul_(1 - lr * weight_decay)
            before = [p.detach().clone() for p in tested]
            inner.step()
            for p, b in zip(tested, before, strict=True):
                d, r = REF_PROJECTION(b, p.grad, p - b, delta, wd_ratio, eps)
                fired += r != 1
                p.copy_(b.mul(1 - lr * weight_decay * r).add(d))
    return fired


WRAPPED = {
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5, centered=True),
    "adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, lr_decay=0.01),
    # its update scales with RMS(p): the decay before the step reaches it
    "adafactor": lambda ps, lr: torch.optim.Adafactor(ps, lr=lr),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr, amsgrad=True),
    # its own decay too (allow_weight_decay): projected away with the radial part
    "adamw-own-decay": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.5),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_any_optimizer_is_its_step_then_the_reference_projection(name: str) -> None:
    lr, hyper = 1e-2, dict(weight_decay=0.2, delta=0.1, wd_ratio=0.3)
    model, model_ref = twins()
    inner = WRAPPED[name](model.parameters(), lr)
    opt = Projected(inner, **hyper, allow_weight_decay=name == "adamw-own-decay")
    train(model, opt)
    fired = reference_train(model_ref, WRAPPED[name](model_ref.parameters(), lr), lr=lr, **hyper)
    assert_models_close(model, model_ref, **REF_TOL)
    assert fired >= 2 * STEPS
    assert all(len(inner.state[p]) > 0 for p in model.parameters())


class GradClobberingSGD(torch.optim.SGD):
    """torch's SGD that then overwrites each gradient in place with its param (as torch's
    foreach SGD with nesterov overwrites it with ``g + μ·b``)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.copy_(p)
        return loss


def test_the_test_sees_the_gradient_the_step_was_given() -> None:
    """What the wrapped step does to ``p.grad`` afterwards does not change the result."""
    hyper = dict(lr=5e-2, momentum=0.9)
    model, model_ref = twins()
    train(model, Projected(GradClobberingSGD(model.parameters(), **hyper), weight_decay=0.1))
    train(model_ref, Projected(torch.optim.SGD(model_ref.parameters(), **hyper), weight_decay=0.1))
    assert_models_close(model, model_ref, **REF_TOL)


# ------------------------------------------------------------------- (2) per group


def test_per_group_keys_equal_adamp_groups() -> None:
    """``projected_*`` keys set in the wrapped optimizer's groups are AdamP's per-group delta,
    wd_ratio, weight_decay and projection; Projected's arguments only fill missing keys."""
    first = dict(lr=2e-2, betas=(0.8, 0.99))
    second = dict(lr=5e-3, betas=(0.9, 0.98), eps=1e-7)

    def wrapped(model: nn.Module, projected: bool) -> torch.optim.AdamW:
        params = list(model.parameters())
        return adamw(
            [
                {
                    "params": params[:3],
                    **first,
                    "projected_delta": 0.2,
                    "projected_wd_ratio": 0.3,
                    "projected_weight_decay": 0.1,
                },
                {
                    "params": params[3:],
                    **second,
                    "projected": projected,
                    "projected_eps": 1e-7,
                    "projected_weight_decay": 0.02,
                },
            ]
        )

    model, model_ref = twins()
    params_ref = list(model_ref.parameters())
    # AdamP has one eps (Adam's and the projection's): the same in both places here
    opt = Projected(wrapped(model, False), delta=5.0, wd_ratio=1.0, weight_decay=0.7, eps=1e-8)
    opt_ref = AdamP(
        [
            {"params": params_ref[:3], **first, "delta": 0.2, "wd_ratio": 0.3, "weight_decay": 0.1},
            {"params": params_ref[3:], **second, "projection": False, "weight_decay": 0.02},
        ],
        delta=5.0,
    )
    assert opt.param_groups[1]["projected_delta"] == 5.0  # filled from the defaults
    assert opt.param_groups[0]["projected_eps"] == 1e-8
    train(model, opt)
    train(model_ref, opt_ref)
    assert_models_close(model, model_ref, **REF_TOL)
    # the second group's projection is off: its LayerNorm-fed weight moves otherwise than in
    # the same run with it on
    on = make_model()
    train(on, Projected(wrapped(on, True), delta=0.1, wd_ratio=1.0, weight_decay=0.7, eps=1e-8))
    assert max_change(model, on, ["fc.weight"]) > 1e-5


# ------------------------------------------------------------------- (3) contract


def two_group_adamw(model: nn.Module, hyper: list[dict[str, Any]], **kwargs: Any) -> Any:
    params = list(model.parameters())
    return adamw([{"params": params[:3], **hyper[0]}, {"params": params[3:], **hyper[1]}], **kwargs)


GROUPS = [
    dict(
        lr=2e-2,
        betas=(0.8, 0.99),
        projected_delta=0.2,
        projected_wd_ratio=0.3,
        projected_weight_decay=0.1,
    ),
    dict(lr=5e-3, eps=1e-6, projected=False, projected_weight_decay=0.02, projected_eps=1e-6),
]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_checkpoint_round_trip_resumes_exactly(foreach: bool) -> None:
    """Train 3, save (weights_only load), a new Projected(new AdamW) loads, trains 3 more: the
    6 uninterrupted steps exactly, the per-group keys coming back from the checkpoint."""
    model_a, model_b = twins()
    opt_a = Projected(two_group_adamw(model_a, GROUPS, foreach=foreach))
    train(model_a, opt_a, 6)

    opt_b = Projected(two_group_adamw(model_b, GROUPS, foreach=foreach))
    train(model_b, opt_b, 3)
    checkpoint = save_load(opt_b.state_dict())
    model_c = copy.deepcopy(model_b)
    inner_c = two_group_adamw(model_c, [{"lr": 0.5}, {"lr": 0.5}], foreach=foreach)
    opt_c = Projected(inner_c, delta=0.9, wd_ratio=1.0, weight_decay=0.3, eps=1e-3)
    opt_c.load_state_dict(checkpoint)
    assert opt_c.param_groups is inner_c.param_groups and opt_c.state is inner_c.state
    for group, hyper in zip(opt_c.param_groups, GROUPS, strict=True):
        for key, value in hyper.items():
            assert group[key] == value, key
    train(model_c, opt_c, 3, start=3)
    assert_models_equal(model_a, model_c)
    for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True):
        for key, value in opt_a.state[p].items():
            assert torch.equal(opt_c.state[q][key], value), key


def test_adamw_checkpoint_loads_with_projection_defaults() -> None:
    """A plain AdamW checkpoint: the projection's keys come from Projected's defaults, and the
    run continues like AdamP loaded from the same checkpoint."""
    model_w = make_model()
    opt_w = adamw(model_w.parameters(), **ADAMP_HYPER)
    train(opt=opt_w, model=model_w, steps=3)
    checkpoint = save_load(opt_w.state_dict())

    model, model_ref = copy.deepcopy(model_w), copy.deepcopy(model_w)
    opt = Projected(adamw(model.parameters(), lr=0.5), delta=0.2, wd_ratio=0.3, weight_decay=0.05)
    opt.load_state_dict(checkpoint)
    group = opt.param_groups[0]
    assert (group["projected_delta"], group["projected_wd_ratio"]) == (0.2, 0.3)
    assert group["projected_weight_decay"] == 0.05 and group["projected"] is True
    assert group["lr"] == ADAMP_HYPER["lr"]

    opt_ref = AdamP(model_ref.parameters(), delta=0.2, wd_ratio=0.3)
    opt_ref.load_state_dict(checkpoint)
    opt_ref.param_groups[0]["weight_decay"] = 0.05  # the checkpoint's AdamW had none
    train(model, opt, 3, start=3)
    train(model_ref, opt_ref, 3, start=3)
    assert_models_close(model, model_ref, **REF_TOL)
    assert float(opt.state[model.conv.weight]["step"]) == 6


@pytest.mark.parametrize("bad", ["wrapped_weight_decay", "projected_delta"])
def test_rejected_checkpoint_leaves_optimizer_unchanged(bad: str) -> None:
    model = make_model()
    opt = Projected(adamw(model.parameters(), lr=1e-2), weight_decay=0.1)
    train(model, opt, 1)
    checkpoint = save_load(opt.state_dict())
    if bad == "wrapped_weight_decay":
        checkpoint["param_groups"][0]["weight_decay"] = 0.1
    else:
        checkpoint["param_groups"][0]["projected_delta"] = -1.0
    checkpoint["param_groups"][0]["lr"] = 0.123
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="weight_decay" if bad.startswith("wrapped") else bad):
        opt.load_state_dict(checkpoint)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert opt.param_groups[0]["lr"] == 1e-2
    for k, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][k][key], value), (k, key)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_scheduler_on_projected_matches_adamp(scheduler: str) -> None:
    """A scheduler on the Projected changes the lr that the wrapped AdamW and the decay use."""
    model, model_ref = twins()
    inner = adamw(model.parameters(), **ADAMP_HYPER)
    opt = Projected(inner, weight_decay=0.5)
    opt_ref = AdamP(model_ref.parameters(), **ADAMP_HYPER, weight_decay=0.5)
    sched, sched_ref = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](opt_ref)
    train(model, opt, 6, after_step=lambda i: sched.step())
    train(model_ref, opt_ref, 6, after_step=lambda i: sched_ref.step())
    lr = inner.param_groups[0]["lr"]
    assert lr == opt_ref.param_groups[0]["lr"] != ADAMP_HYPER["lr"]
    assert_models_close(model, model_ref, **REF_TOL)


def test_one_cycle_scheduler_cycles_the_wrapped_betas() -> None:
    def one_cycle(o: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=5e-2, total_steps=6, base_momentum=0.8, max_momentum=0.95
        )

    model, model_ref = twins()
    opt = Projected(adamw(model.parameters(), **ADAMP_HYPER), weight_decay=0.5)
    opt_ref = AdamP(model_ref.parameters(), **ADAMP_HYPER, weight_decay=0.5)
    sched, sched_ref = one_cycle(opt), one_cycle(opt_ref)
    train(model, opt, 5, after_step=lambda i: sched.step())
    train(model_ref, opt_ref, 5, after_step=lambda i: sched_ref.step())
    assert opt.param_groups[0]["betas"] == opt_ref.param_groups[0]["betas"]
    assert_models_close(model, model_ref, **REF_TOL)


def test_grad_scaler_matches_adamp_and_skips_inf() -> None:
    model, model_ref = twins(torch.float32)
    inner = adamw(model.parameters(), **ADAMP_HYPER)
    opt = Projected(inner, weight_decay=0.1)
    opt_ref = AdamP(model_ref.parameters(), **ADAMP_HYPER, weight_decay=0.1)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    for i in range(4):
        for m, o, scaler in ((model, opt, scalers[0]), (model_ref, opt_ref, scalers[1])):
            o.zero_grad()
            scaler.scale(loss_at(m, i)).backward()
            scaler.step(o)
            scaler.update()
    assert_models_close(model, model_ref)  # float32 tolerance
    assert float(inner.state[model.conv.weight]["step"]) == 4

    # a step with an inf gradient is skipped: params and state unchanged, the scale backs off
    before = copy.deepcopy(model)
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    scalers[0].scale(loss_at(model, 4)).backward()
    model.conv.weight.grad[0, 0, 0, 0] = float("inf")
    scalers[0].step(opt)
    scalers[0].update()
    assert_models_equal(model, before)
    state_after = opt.state_dict()["state"]
    for k, state in state_before.items():
        for key, value in state.items():
            assert torch.equal(state_after[k][key], value), (k, key)
    assert scalers[0].get_scale() == 2.0**11


def test_add_param_group_fills_and_validates() -> None:
    model, model_ref = twins()
    params, params_ref = list(model.parameters()), list(model_ref.parameters())
    inner = adamw(params[:3], **ADAMP_HYPER)
    opt = Projected(inner, delta=0.2, wd_ratio=0.3, weight_decay=0.1)
    extra = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    for bad, name in (
        ({"projected_delta": -1.0}, "projected_delta"),
        ({"projected_wd_ratio": 1.5}, "projected_wd_ratio"),
        ({"weight_decay": 0.1}, "weight_decay"),
        ({"lr": None}, "lr"),
    ):
        with pytest.raises(ValueError, match=name):
            opt.add_param_group({"params": [extra], **bad})
        assert len(opt.param_groups) == len(inner.param_groups) == 1, name
    opt.add_param_group({"params": params[3:], "lr": 5e-3, "projected_weight_decay": 0.02})
    group = inner.param_groups[1]
    assert opt.param_groups[1] is group
    assert (group["projected_delta"], group["projected_wd_ratio"]) == (0.2, 0.3)
    assert group["projected_weight_decay"] == 0.02 and group["betas"] == ADAMP_HYPER["betas"]

    opt_ref = AdamP(params_ref[:3], **ADAMP_HYPER, delta=0.2, wd_ratio=0.3, weight_decay=0.1)
    opt_ref.add_param_group({"params": params_ref[3:], "lr": 5e-3, "weight_decay": 0.02})
    train(model, opt)
    train(model_ref, opt_ref)
    assert_models_close(model, model_ref, **REF_TOL)
    opt.add_param_group({"params": [extra]})  # the params of a rejected group are not taken


def test_named_parameters() -> None:
    model, model_ref = twins()
    names = [n for n, _ in model.named_parameters()]
    opt = Projected(adamw(model.named_parameters(), **ADAMP_HYPER), weight_decay=0.1)
    opt_ref = AdamP(model_ref.named_parameters(), **ADAMP_HYPER, weight_decay=0.1)
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    train(model, opt)
    train(model_ref, opt_ref)
    assert_models_close(model, model_ref, **REF_TOL)
    assert save_load(opt.state_dict())["param_groups"][0]["param_names"] == names


def test_zero_grad() -> None:
    model = make_model()
    opt = Projected(adamw(model.parameters()))
    loss_at(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_params_without_grad_are_untouched() -> None:
    """Params without a gradient get neither the update nor the decay, nor state."""
    model, model_ref = twins()
    unused = [
        nn.Parameter(torch.ones(3, 2, dtype=torch.float64)),
        nn.Parameter(torch.ones(4, dtype=torch.float64)),
    ]
    inner = adamw([*model.parameters(), *unused], **ADAMP_HYPER)
    opt = Projected(inner, weight_decay=0.5)
    opt_ref = AdamP(model_ref.parameters(), **ADAMP_HYPER, weight_decay=0.5)
    train(model, opt)
    train(model_ref, opt_ref)
    assert_models_close(model, model_ref, **REF_TOL)
    for p in unused:
        assert torch.equal(p, torch.ones_like(p)) and len(inner.state[p]) == 0


def orthogonal_rows(p: Tensor, g: Tensor) -> Tensor:
    """``g`` less its radial part along each row of ``p`` (rows of the real views): a
    gradient the channel view's cosine test passes on."""
    pr, gr = torch.view_as_real(p) if p.is_complex() else p, g
    gr = torch.view_as_real(g) if g.is_complex() else g
    pr, gr = pr.reshape(p.shape[0], -1), gr.reshape(p.shape[0], -1).clone()
    gr -= pr * (pr * gr).sum(1, keepdim=True) / (pr * pr).sum(1, keepdim=True)
    out = gr.reshape(torch.view_as_real(g).shape if g.is_complex() else g.shape)
    return torch.view_as_complex(out) if g.is_complex() else out


def fixed_gradient_run(
    xs: list[Tensor], grads: list[list[Tensor]], make: Callable[[list[Tensor]], Any]
) -> tuple[list[Tensor], Any]:
    """Params cloned from ``xs`` stepped with the given gradients; the params and optimizer."""
    ps = [nn.Parameter(x.clone()) for x in xs]
    opt = make(ps)
    for step in grads:
        for p, g in zip(ps, step, strict=True):
            p.grad = g.to(p.dtype)
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_params_within_their_rounding_of_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 8, generator=gen).to(dtype).float()  # representable in ``dtype``
    b = torch.randn(6, generator=gen).to(dtype).float()
    # Adam's step does not depend on the gradients' scale; large ones keep torch's AdamW state,
    # which it holds in float16 for float16 params, out of float16's subnormal range
    grads = [
        [
            orthogonal_rows(w, 100 * torch.randn(6, 8, generator=gen)).to(dtype).float(),
            (100 * torch.randn(6, generator=gen)).to(dtype).float(),
        ]
        for _ in range(3)
    ]

    def make(delta: float) -> Callable[[list[Tensor]], Any]:
        return lambda ps: Projected(adamw(ps, lr=0.05), weight_decay=1.0, delta=delta)

    half, _ = fixed_gradient_run([w.to(dtype), b.to(dtype)], grads, make(0.1))
    full, _ = fixed_gradient_run([w, b], grads, make(0.1))
    unprojected, _ = fixed_gradient_run([w, b], grads, make(0.0))
    eps = torch.finfo(dtype).eps
    for h, f in zip(half, full, strict=True):
        assert h.dtype == dtype
        # roundings to ``dtype`` of values of order 1
        torch.testing.assert_close(h.float(), f, rtol=2 * eps, atol=2 * eps)
    # the projection fired (wd_ratio 0.1: far less decay) far above that tolerance
    assert (full[0] - unprojected[0]).abs().max() > 10 * eps


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=str)
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_complex_params_equal_adamp(dtype: torch.dtype, foreach: bool) -> None:
    """A complex weight is tested on its real view (rows along dim 0), a 1-d complex bias never."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, generator=gen, dtype=dtype)
    b = torch.randn(4, generator=gen, dtype=dtype)
    grads = [
        [
            orthogonal_rows(w, torch.randn(4, 3, generator=gen, dtype=dtype)) * (1 + 0.1 * k),
            torch.randn(4, generator=gen, dtype=dtype),
        ]
        for k in range(4)
    ]
    hyper = dict(weight_decay=0.2, delta=0.1, wd_ratio=0.3)
    ours, opt = fixed_gradient_run(
        [w, b], grads, lambda ps: Projected(adamw(ps, **ADAMP_HYPER, foreach=foreach), **hyper)
    )
    theirs, opt_ref = fixed_gradient_run(
        [w, b], grads, lambda ps: AdamP(ps, **ADAMP_HYPER, **hyper, foreach=foreach)
    )
    unprojected, _ = fixed_gradient_run(
        [w, b], grads, lambda ps: AdamP(ps, **ADAMP_HYPER, **{**hyper, "delta": 0.0})
    )
    tol = REF_TOL if dtype == torch.complex128 else dict(rtol=2e-6, atol=1e-6)
    for p, q in zip(ours, theirs, strict=True):
        assert p.dtype == dtype
        torch.testing.assert_close(p, q, **tol)
    for p, q in zip(opt.param_groups[0]["params"], opt_ref.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], opt_ref.state[q][key], **tol)
    assert (ours[0] - unprojected[0]).abs().max() > 1e-3


def test_tensor_lr_equals_adamp_and_follows_in_place_changes() -> None:
    model, model_ref = twins()
    lr, lr_ref = torch.tensor(1e-2, dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64)
    opt = Projected(adamw(model.parameters(), lr=lr, foreach=False), weight_decay=0.5)
    opt_ref = AdamP(model_ref.parameters(), lr=lr_ref, weight_decay=0.5)
    train(model, opt, 2)
    train(model_ref, opt_ref, 2)
    assert_models_close(model, model_ref, **REF_TOL)

    # lr 0 in place: neither update nor decay (lr·λ)
    lr.fill_(0.0)
    before = copy.deepcopy(model)
    train(model, opt, 1, start=2)
    assert_models_equal(model, before)
    lr_ref.fill_(0.0)
    train(model_ref, opt_ref, 1, start=2)

    lr.fill_(3e-2)
    lr_ref.fill_(3e-2)
    train(model, opt, 3, start=3)
    train(model_ref, opt_ref, 3, start=3)
    assert_models_close(model, model_ref, **REF_TOL)
    assert max_change(model, before) > 1e-3


def test_closure_runs_with_grad_enabled_and_returns_the_loss() -> None:
    model, model_ref = twins()
    opt = Projected(adamw(model.parameters(), **ADAMP_HYPER), weight_decay=0.1)
    seen: list[bool] = []

    def closure() -> Tensor:
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_at(model, 0)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True]
    torch.testing.assert_close(loss, loss_at(model_ref, 0), rtol=0, atol=0)
    assert opt.step() is None
    opt_ref = AdamP(model_ref.parameters(), **ADAMP_HYPER, weight_decay=0.1)
    loss_at(model_ref, 0).backward()
    opt_ref.step()
    opt_ref.step()  # Projected's second step reused the same gradients
    assert_models_close(model, model_ref, **REF_TOL)


def test_step_and_state_dict_hooks_fire() -> None:
    model = make_model()
    opt = Projected(adamw(model.parameters(), **ADAMP_HYPER))
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict"))
    train(model, opt, 2)
    opt.state_dict()
    assert calls == ["pre", "post", "pre", "post", "state_dict"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_continues_like_the_original(how: str) -> None:
    """A copy of model and optimizer together (one memo) trains on like the original."""
    model = make_model()
    opt = Projected(adamw(model.parameters(), **ADAMP_HYPER), weight_decay=0.1)
    train(model, opt, 2)
    if how == "deepcopy":
        model_c, opt_c = copy.deepcopy((model, opt))
    else:
        model_c, opt_c = pickle.loads(pickle.dumps((model, opt)))
    assert opt_c.param_groups[0]["params"][0] is model_c.conv.weight
    train(model, opt, 3, start=2)
    train(model_c, opt_c, 3, start=2)
    assert_models_equal(model, model_c)
    assert opt_c.param_groups is opt_c.optimizer.param_groups
    assert opt_c.state is opt_c.optimizer.state


def test_load_state_dict_hooks_fire() -> None:
    model = make_model()
    opt = Projected(adamw(model.parameters(), **ADAMP_HYPER))
    train(model, opt, 1)
    calls: list[str] = []

    def load_pre(o: Any, state_dict: dict) -> dict:
        calls.append("load_pre")
        changed = copy.deepcopy(state_dict)
        changed["param_groups"][0]["lr"] = 0.123
        return changed

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["load_pre", "load_post"]
    assert opt.param_groups[0]["lr"] == 0.123


# ------------------------------------------------------------------- (4) bad input


def one_param() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(3, 2, dtype=torch.float64))]


@pytest.mark.parametrize(
    "make",
    [
        lambda: one_param(),
        lambda: iter(one_param()),
        lambda: torch.optim.AdamW,  # the class, not an optimizer
        lambda: {"params": one_param()},
    ],
    ids=["list", "iterator", "class", "dict"],
)
def test_non_optimizer_is_a_type_error(make: Callable[[], Any]) -> None:
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        Projected(make())


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Projected(adamw(ps)),
        lambda ps: AdamP(ps),
        lambda ps: SGDP(ps, lr=0.1),
    ],
    ids=["Projected", "AdamP", "SGDP"],
)
def test_projecting_optimizers_cannot_be_wrapped(make: Callable[[Any], Any]) -> None:
    inner = make(one_param())
    with pytest.raises(ValueError, match=f"{type(inner).__name__}.*projects already"):
        Projected(inner)


@pytest.mark.parametrize(
    "lr", [None, "0.01", True, torch.tensor([1e-2, 1e-2]), torch.tensor(1)], ids=str
)
def test_group_without_numeric_lr_is_refused(lr: Any) -> None:
    inner = adamw(one_param(), lr=1e-2)
    inner.param_groups[0]["lr"] = lr
    with pytest.raises(ValueError, match="numeric lr"):
        Projected(inner)
    # set after construction: the step refuses it before anything moves
    model = make_model()
    opt = Projected(adamw(model.parameters(), lr=1e-2), weight_decay=0.1)
    before = copy.deepcopy(model)
    opt.param_groups[0]["lr"] = lr
    loss_at(model, 0).backward()
    with pytest.raises(ValueError, match="numeric lr"):
        opt.step()
    assert_models_equal(model, before)
    assert len(opt.state) == 0


def test_adafactor_takes_no_relative_step_size() -> None:
    """torch's Adafactor has no ``lr=None`` (relative step) to refuse: torch refuses it."""
    with pytest.raises(TypeError):
        torch.optim.Adafactor(one_param(), lr=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps),  # torch's default weight_decay=0.01
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-4),
        lambda ps: torch.optim.Adam(ps, weight_decay=1e-4),
        lambda ps: adamw([{"params": ps, "weight_decay": 0.1}]),
    ],
    ids=["adamw-default", "sgd", "adam", "group"],
)
def test_wrapped_weight_decay_is_refused_unless_allowed(make: Callable[[Any], Any]) -> None:
    with pytest.raises(ValueError, match=r"weight_decay=.*allow_weight_decay=True"):
        Projected(make(one_param()))
    Projected(make(one_param()), allow_weight_decay=True)  # numbers: the "adamw-own-decay" case


BAD = [
    ("projected_delta", "delta", -0.1),
    ("projected_delta", "delta", float("nan")),
    ("projected_delta", "delta", float("inf")),
    ("projected_wd_ratio", "wd_ratio", -0.1),
    ("projected_wd_ratio", "wd_ratio", 1.1),
    ("projected_weight_decay", "weight_decay", -0.1),
    ("projected_weight_decay", "weight_decay", float("nan")),
    ("projected_weight_decay", "weight_decay", "0.1"),
    ("projected_eps", "eps", 0.0),
    ("projected_eps", "eps", -1e-8),
    ("projected", "projection", 0),
    ("projected", "projection", "no"),
]


@pytest.mark.parametrize("how", ["constructor", "wrapped_group", "add_param_group", "edited"])
@pytest.mark.parametrize("key, arg, value", BAD, ids=[f"{k}={v}" for k, _, v in BAD])
def test_out_of_range_hyperparameter_names_it(key: str, arg: str, value: Any, how: str) -> None:
    match = rf"Invalid {key}\b"
    if how == "constructor":
        with pytest.raises(ValueError, match=match):
            Projected(adamw(one_param()), **{arg: value})
    elif how == "wrapped_group":
        with pytest.raises(ValueError, match=match):
            Projected(adamw([{"params": one_param(), key: value}]))
    elif how == "add_param_group":
        opt = Projected(adamw(one_param()))
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": one_param(), key: value})
        assert len(opt.param_groups) == 1
    else:  # edited in the group: the next step refuses it, nothing moves
        ps = one_param()
        opt = Projected(adamw(ps))
        opt.param_groups[0][key] = value
        before = ps[0].detach().clone()
        ps[0].grad = torch.ones_like(ps[0])
        with pytest.raises(ValueError, match=match):
            opt.step()
        assert torch.equal(ps[0], before)


def test_allow_weight_decay_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="allow_weight_decay"):
        Projected(adamw(one_param()), allow_weight_decay=1)  # type: ignore[arg-type]


def test_boundary_hyperparameters_are_accepted() -> None:
    opt = Projected(adamw(one_param()), delta=0.0, wd_ratio=1.0, weight_decay=0.0, eps=1e-30)
    opt.add_param_group({"params": one_param(), "projected_wd_ratio": 0.0, "lr": 0})
    opt.add_param_group({"params": one_param(), "lr": torch.tensor(0.5), "projected": False})


# ------------------------------------------------------------------- (5) torch.compile


def tiny_step(make_opt: Callable[[Any], Any], dtype: torch.dtype = torch.float32) -> Any:
    """An optimizer of a fresh model after one eager step (its state exists, as in training)."""
    model = make_model(dtype)
    opt = make_opt(model.parameters())
    loss_at(model, 0).backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_step_has_no_graph_breaks(foreach: bool) -> None:
    """One graph: traced, the wrapped step runs without torch's decorator, whose explicit
    graph breaks around the step would split it (torch.compile of AdamW.step alone has
    them)."""
    torch._dynamo.reset()
    try:
        _, opt = tiny_step(
            lambda ps: Projected(adamw(ps, lr=1e-2, foreach=foreach), weight_decay=0.1)
        )
        explanation = torch._dynamo.explain(opt.step)()
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]


@pytest.mark.compile
def test_compiled_step_matches_eager() -> None:
    """``torch.compile(step)`` (graph breaks allowed): float32 rounding from eager."""

    def make(ps: Any) -> Projected:
        return Projected(adamw(ps, **ADAMP_HYPER, foreach=True), weight_decay=0.1)

    torch._dynamo.reset()
    try:
        model, model_c = twins(torch.float32)
        opt, opt_c = make(model.parameters()), make(model_c.parameters())
        compiled = torch.compile(opt_c.step)
        for i in range(4):
            for m, o, step in ((model, opt, opt.step), (model_c, opt_c, compiled)):
                o.zero_grad()
                loss_at(m, i).backward()
                step()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    finally:
        torch._dynamo.reset()
    assert_models_close(model, model_c, rtol=1e-5, atol=1e-6)
    unprojected = make_model(torch.float32)
    train(
        unprojected,
        Projected(adamw(unprojected.parameters(), **ADAMP_HYPER), delta=0.0, weight_decay=0.1),
        4,
    )
    assert max_change(model, unprojected) > 1e-5


def test_param_groups_for_projected_equal_adamp_with_param_groups() -> None:
    """``adampx.param_groups(model, projected=True)`` gives the wrapper's keys: biases and
    norm gains without its decay, as ``adampx.param_groups(model)`` gives AdamP; the
    decay-free groups matter (the same run with one group differs)."""
    model, model_ref = twins()
    groups = adampx.param_groups(model, projected=True)
    assert any(g.get("projected_weight_decay") == 0.0 for g in groups)
    assert all("weight_decay" not in g and "projection" not in g for g in groups)
    opt = Projected(adamw(groups, **ADAMP_HYPER), weight_decay=0.1)
    opt_ref = AdamP(adampx.param_groups(model_ref), **ADAMP_HYPER, weight_decay=0.1)
    train(model, opt)
    train(model_ref, opt_ref)
    assert_models_close(model, model_ref, **REF_TOL)
    one_group = make_model()
    train(one_group, Projected(adamw(one_group.parameters(), **ADAMP_HYPER), weight_decay=0.1))
    assert not all(
        torch.allclose(a, b, rtol=1e-6, atol=0)
        for a, b in zip(one_group.parameters(), model.parameters(), strict=True)
    )


def test_half_gradient_norms_do_not_overflow_in_the_test() -> None:
    """A float16 gradient whose row norms exceed float16's range is tested in float32, as
    AdamP tests it: a gradient parallel to the weight is not projected."""
    w0 = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)).half()
    results = []
    for make in (
        lambda ps: AdamP(ps, lr=1e-2),
        lambda ps: Projected(adamw(ps, lr=1e-2)),
    ):
        w = nn.Parameter(w0.clone())
        opt = make([w])
        w.grad = (w0.float() * 2000).half()  # ‖g_i‖ = 2000·‖w_i‖ > 65504: parallel to w
        opt.step()
        results.append(w.detach().float())
    torch.testing.assert_close(results[1], results[0], rtol=4e-3, atol=1e-3)  # fp16 rounding
    assert (results[1].norm(dim=1) < w0.float().norm(dim=1) - 0.3).all()  # not projected


def test_sparse_gradient_is_refused_before_anything_changes() -> None:
    bias = nn.Parameter(torch.ones(4))
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = Projected(torch.optim.Adagrad([bias, embedding.weight], lr=1e-2), weight_decay=0.5)
    (embedding(torch.tensor([1])).sum() + bias.sum()).backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"sparse gradient \(shape \(10, 4\)\)"):
        opt.step()
    assert torch.equal(bias.detach(), torch.ones(4))  # not decayed either
    assert torch.equal(embedding.weight.detach(), before)


def test_optimizer_whose_step_needs_a_closure_is_refused() -> None:
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="LBFGS: its step needs a closure"):
        Projected(torch.optim.LBFGS([w], lr=1))
