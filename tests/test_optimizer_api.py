"""The optimizer API: argument checks, signatures, closures, frozen params, per-group settings,
schedulers, tensor lr, GradScaler, NaN gradients, named params, hooks and maximize.

Numbers are compared with independent references only: the reference package ``adamp``
(``import adamp as ref``), ``torch.optim`` and the closed forms of docs/algorithm.md.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import adamp as ref
import pytest
import torch
from torch import nn
from torch.optim.optimizer import required

from adampx import SGDP, AdamP
from norm_mlp import loss_at, make_model

# float64 parity with another implementation (different operation order in the projection).
REF_TOL = dict(rtol=1e-10, atol=1e-12)
STEPS = 4


# ---------------------------------------------------------------------------- helpers


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int = STEPS,
    *,
    sign: float = 1.0,
    after_backward: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    for i in range(steps):
        opt.zero_grad()
        (sign * loss_at(model, i)).backward()
        if after_backward is not None:
            after_backward(i)
        opt.step()
        if after_step is not None:
            after_step(i)


def assert_models_close(a: nn.Module, b: nn.Module, **tol: Any) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, **tol, msg=lambda m, n=name: f"{n}: {m}")


def assert_models_equal(a: nn.Module, b: nn.Module) -> None:
    assert_models_close(a, b, rtol=0, atol=0)


def twins(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    model = make_model(dtype)
    return model, copy.deepcopy(model)


def params_changed(model: nn.Module, before: nn.Module) -> bool:
    return any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True)
    )


ADAMP_HYPER = dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.1, delta=0.1, wd_ratio=0.2)
# nesterov=True: the reference projects its momentum buffer when nesterov is off.
SGDP_HYPER = dict(lr=5e-2, momentum=0.9, weight_decay=1e-2, nesterov=True, wd_ratio=0.3)
PAIRS = {"AdamP": (AdamP, ref.AdamP, ADAMP_HYPER), "SGDP": (SGDP, ref.SGDP, SGDP_HYPER)}
FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
BOTH = pytest.mark.parametrize("name", list(PAIRS))


# ---------------------------------------------------------------------------- (a) validation


def one_param() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(3, 2))]


BAD_ADAMP = [
    ("lr", dict(lr=-1e-3)),
    ("lr", dict(lr=torch.tensor(-1e-3))),
    ("lr", dict(lr=float("nan"))),
    ("lr", dict(lr="0.1")),
    ("weight_decay", dict(weight_decay=-0.1)),
    ("weight_decay", dict(weight_decay=float("nan"))),
    ("delta", dict(delta=-0.1)),
    ("eps", dict(eps=0.0)),
    ("eps", dict(eps=-1e-8)),
    ("beta1", dict(betas=(-0.1, 0.999))),
    ("beta1", dict(betas=(1.0, 0.999))),
    ("beta2", dict(betas=(0.9, -0.1))),
    ("beta2", dict(betas=(0.9, 1.0))),
    ("betas", dict(betas=(0.9,))),
    ("betas", dict(betas=0.9)),
    ("betas", dict(betas=(0.9, 0.99, 0.999))),
    ("wd_ratio", dict(wd_ratio=-0.1)),
    ("wd_ratio", dict(wd_ratio=1.1)),
    ("nesterov", dict(nesterov=1)),
    ("maximize", dict(maximize="yes")),
    ("projection", dict(projection=0)),
    ("foreach", dict(foreach=1)),
]
BAD_SGDP = [
    ("lr", dict(lr=-0.1)),
    ("lr", dict(lr=torch.tensor(-0.1))),
    ("weight_decay", dict(weight_decay=-0.1)),
    ("delta", dict(delta=-0.1)),
    ("eps", dict(eps=0.0)),
    ("eps", dict(eps=-1.0)),
    ("wd_ratio", dict(wd_ratio=-0.1)),
    ("wd_ratio", dict(wd_ratio=1.5)),
    ("momentum", dict(momentum=-0.1)),
    ("momentum", dict(momentum=1.0)),
    ("dampening", dict(dampening=-0.1)),
    ("dampening", dict(dampening=1.1)),
    ("nesterov", dict(nesterov=True, momentum=0.0)),
    ("nesterov", dict(nesterov=True, momentum=0.9, dampening=0.1)),
    ("nesterov", dict(nesterov="true", momentum=0.9)),
    ("maximize", dict(maximize=None)),
    ("projection", dict(projection="no")),
    ("foreach", dict(foreach="auto")),
]
BAD_CASES = [(AdamP, {}, arg, kw) for arg, kw in BAD_ADAMP] + [
    (SGDP, {"lr": 0.1}, arg, kw) for arg, kw in BAD_SGDP
]
BAD_IDS = [f"{cls.__name__}-{arg}-{i}" for i, (cls, _, arg, _) in enumerate(BAD_CASES)]


@pytest.mark.parametrize("how", ["constructor", "group_dict", "add_param_group"])
@pytest.mark.parametrize("cls, base, arg, bad", BAD_CASES, ids=BAD_IDS)
def test_bad_hyperparameter_raises_naming_it(cls, base, arg, bad, how):
    if how == "constructor":
        with pytest.raises(ValueError, match=arg):
            cls(one_param(), **{**base, **bad})
    elif how == "group_dict":
        with pytest.raises(ValueError, match=arg):
            cls([{"params": one_param(), **bad}], **base)
    else:
        opt = cls(one_param(), **base)
        with pytest.raises(ValueError, match=arg):
            opt.add_param_group({"params": one_param(), **bad})


@pytest.mark.parametrize("cls, base", [(AdamP, {}), (SGDP, {"lr": 0.1})], ids=["AdamP", "SGDP"])
def test_rejected_param_group_leaves_optimizer_unchanged(cls, base):
    """A param group that add_param_group rejects must not stay in the optimizer: its bad
    hyperparameters would be used by the next step, and the params could not be re-added."""
    opt = cls(one_param(), **base)
    extra = one_param()
    with pytest.raises(ValueError, match="delta"):
        opt.add_param_group({"params": extra, "delta": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": extra, "delta": 0.5})  # the same params, now valid
    assert len(opt.param_groups) == 2


def test_sgdp_requires_lr():
    with pytest.raises(ValueError, match="lr"):
        SGDP(one_param())
    with pytest.raises(ValueError, match="lr"):
        SGDP([{"params": one_param()}], momentum=0.9)
    SGDP([{"params": one_param(), "lr": 0.1}])  # lr given per group is enough


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (AdamP, dict(lr=0.0, betas=(0.0, 0.0), eps=1e-30, delta=0.0, wd_ratio=0.0)),
        (AdamP, dict(lr=torch.tensor(0.5), wd_ratio=1.0, nesterov=True, foreach=None)),
        (SGDP, dict(lr=0.0, momentum=0.0, dampening=1.0, wd_ratio=1.0, delta=0.0)),
        (SGDP, dict(lr=1, momentum=0.99, nesterov=True, projection=False, maximize=True)),
    ],
)
def test_boundary_hyperparameters_are_accepted(cls, kwargs):
    cls(one_param(), **kwargs)


# ---------------------------------------------------------------------------- (b) signature


@pytest.mark.parametrize(
    "ours, theirs", [(AdamP, ref.AdamP), (SGDP, ref.SGDP)], ids=["AdamP", "SGDP"]
)
def test_signature_matches_reference_positionally(ours, theirs):
    """The reference package's positional arguments, in its order, then ``caution`` where
    timm 1.0.31 adds it (its copies' last positional argument; checked against timm itself
    in tests_timm/)."""

    def positional(cls: type) -> list[tuple[str, Any]]:
        return [
            (p.name, p.default)
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"
        ]

    assert positional(ours) == [*positional(theirs), ("caution", False)]
    extras = {
        name: (p.kind, p.default)
        for name, p in inspect.signature(ours.__init__).parameters.items()
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD
    }
    keyword_only = inspect.Parameter.KEYWORD_ONLY
    assert extras == {
        "foreach": (keyword_only, None),
        "maximize": (keyword_only, False),
        "projection": (keyword_only, True),
        "track_statistics": (keyword_only, False),
        "fused": (keyword_only, None),
        "capturable": (keyword_only, False),
    }
    if ours is SGDP:
        assert positional(ours)[1] == ("lr", required)


@pytest.mark.parametrize(
    "ours, theirs, args",
    [
        (AdamP, ref.AdamP, (2e-2, (0.8, 0.99), 1e-6, 0.1, 0.2, 0.3, True)),
        (SGDP, ref.SGDP, (2e-2, 0.9, 0.0, 0.1, True, 1e-6, 0.2, 0.3)),
    ],
    ids=["AdamP", "SGDP"],
)
def test_positional_arguments_land_like_reference(ours, theirs, args):
    mine = ours(one_param(), *args).param_groups[0]
    their = theirs(one_param(), *args).param_groups[0]
    for key, value in their.items():
        if key != "params":
            assert mine[key] == value, key


# ---------------------------------------------------------------------------- (c) sparse


@FOREACH
@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_sparse_gradient_raises(cls, foreach):
    emb = nn.Embedding(5, 3, sparse=True)
    opt = cls(emb.parameters(), lr=0.1, foreach=foreach)
    emb(torch.tensor([1, 3])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)


# ---------------------------------------------------------------------------- (d) closure


@BOTH
def test_closure_runs_with_grad_enabled_under_no_grad(name):
    cls, ref_cls, hyper = PAIRS[name]
    model, model_ref = twins()
    opt = cls(model.parameters(), **hyper)
    opt_ref = ref_cls(model_ref.parameters(), **hyper)
    seen: list[bool] = []

    def closure() -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_at(model, 0)
        loss.backward()
        return loss

    with torch.no_grad():
        returned = opt.step(closure)
    assert seen == [True]
    assert isinstance(returned, torch.Tensor)
    torch.testing.assert_close(returned, loss_at(model_ref, 0), rtol=0, atol=0)
    assert opt.step() is None  # no closure: no loss

    loss_at(model_ref, 0).backward()
    opt_ref.step()
    opt_ref.step()  # the second step above reused the same gradients
    assert_models_close(model, model_ref, **REF_TOL)


# ---------------------------------------------------------------------------- (e) frozen params


@FOREACH
@BOTH
def test_frozen_param_is_skipped_and_resumes_with_its_own_step_count(name, foreach):
    cls, ref_cls, hyper = PAIRS[name]
    model, model_ref = twins()
    opt = cls(model.parameters(), foreach=foreach, **hyper)
    opt_ref = ref_cls(model_ref.parameters(), **hyper)
    frozen_steps = {1, 2, 3}  # weights of the channel-invariant and head layers
    total = 6

    def freezer(m: nn.Module) -> Callable[[int], None]:
        def drop(i: int) -> None:
            if i in frozen_steps:
                m[0].weight.grad = None
                m[6].weight.grad = None

        return drop

    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def check_untouched(i: int) -> None:
        w = model[0].weight
        current = {"param": w.detach().clone()}
        current.update({k: v.clone() for k, v in opt.state[w].items()})
        if i - 1 in snapshots and i in frozen_steps:
            for key, value in snapshots[i - 1].items():
                assert torch.equal(current[key], value), (i, key)
        snapshots[i] = current

    train(model, opt, total, after_backward=freezer(model), after_step=check_untouched)
    train(model_ref, opt_ref, total, after_backward=freezer(model_ref))
    assert_models_close(model, model_ref, **REF_TOL)
    if name == "AdamP":
        assert opt.state[model[0].weight]["step"].item() == total - len(frozen_steps)
        assert opt.state[model[3].weight]["step"].item() == total


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_param_without_grad_gets_no_state(cls):
    model = make_model()
    unused = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = cls([*model.parameters(), unused], lr=0.1)
    train(model, opt, 2)
    assert len(opt.state[unused]) == 0
    assert torch.equal(unused, torch.ones(2, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------- (f) per group


@FOREACH
def test_adamp_groups_match_separate_reference_optimizers(foreach):
    model, model_ref = twins()
    first = dict(lr=2e-2, weight_decay=0.1, delta=0.15, wd_ratio=0.2)
    second = dict(lr=5e-3, betas=(0.85, 0.98), weight_decay=0.02)
    params = list(model.parameters())
    opt = AdamP(
        [{"params": params[:3], **first}, {"params": params[3:], "projection": False, **second}],
        foreach=foreach,
        delta=0.3,  # the second group's delta: projection=False must ignore it
    )
    params_ref = list(model_ref.parameters())
    opt_a = ref.AdamP(params_ref[:3], **first)
    opt_b = torch.optim.AdamW(params_ref[3:], **second)

    for i in range(STEPS):
        for o in (opt, opt_a, opt_b):
            o.zero_grad()
        loss_at(model, i).backward()
        loss_at(model_ref, i).backward()
        for o in (opt, opt_a, opt_b):
            o.step()
    assert_models_close(model, model_ref, **REF_TOL)


@FOREACH
def test_sgdp_groups_match_separate_reference_optimizers(foreach):
    model, model_ref = twins()
    first = dict(lr=5e-2, momentum=0.9, weight_decay=0.05, nesterov=True, delta=0.15)
    # projection=False, dampening 0, no weight decay: torch.optim.SGD (docs/algorithm.md).
    second = dict(lr=2e-2, momentum=0.8)
    params = list(model.parameters())
    opt = SGDP(
        [{"params": params[:3], **first}, {"params": params[3:], "projection": False, **second}],
        lr=1.0,
        foreach=foreach,
    )
    params_ref = list(model_ref.parameters())
    opt_a = ref.SGDP(params_ref[:3], **first)
    opt_b = torch.optim.SGD(params_ref[3:], **second)
    for i in range(STEPS):
        for o in (opt, opt_a, opt_b):
            o.zero_grad()
        loss_at(model, i).backward()
        loss_at(model_ref, i).backward()
        for o in (opt, opt_a, opt_b):
            o.step()
    assert_models_close(model, model_ref, **REF_TOL)


# ---------------------------------------------------------------------------- (g) schedulers

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    # cycles betas[0] for AdamP and momentum for SGDP
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=5e-2, total_steps=6, base_momentum=0.8, max_momentum=0.95
    ),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@FOREACH
@BOTH
def test_scheduler_matches_reference(name, foreach, scheduler):
    cls, ref_cls, hyper = PAIRS[name]
    model, model_ref = twins()
    opt = cls(model.parameters(), foreach=foreach, **hyper)
    opt_ref = ref_cls(model_ref.parameters(), **hyper)
    sched = SCHEDULERS[scheduler](opt)
    sched_ref = SCHEDULERS[scheduler](opt_ref)
    train(model, opt, 6, after_step=lambda i: sched.step())
    train(model_ref, opt_ref, 6, after_step=lambda i: sched_ref.step())
    assert opt.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"] != hyper["lr"]
    assert_models_close(model, model_ref, **REF_TOL)


# ---------------------------------------------------------------------------- (h) tensor lr


@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32], ids=["lr64", "lr32"])
@FOREACH
@BOTH
def test_tensor_lr_equals_float_lr_and_follows_in_place_changes(name, foreach, lr_dtype):
    """A float32 tensor lr (``torch.tensor(1e-2)``) makes lr·λ a float32 product, as in
    torch.optim.AdamW, hence the looser tolerance with float64 params."""
    cls, _, hyper = PAIRS[name]
    lr = torch.tensor(hyper["lr"], dtype=lr_dtype)
    tol = dict(rtol=1e-14, atol=0) if lr_dtype == torch.float64 else dict(rtol=1e-6, atol=1e-9)
    model_t, model_f = twins()
    opt_t = cls(model_t.parameters(), foreach=foreach, **{**hyper, "lr": lr})
    opt_f = cls(model_f.parameters(), foreach=foreach, **{**hyper, "lr": lr.item()})
    train(model_t, opt_t, 2)
    train(model_f, opt_f, 2)
    assert_models_close(model_t, model_f, **tol)

    # lr 0 in place: no update at all (weight decay is lr·λ), yet the state advances.
    lr.fill_(0.0)
    before = copy.deepcopy(model_t)
    train(model_t, opt_t, 1)
    assert_models_equal(model_t, before)

    # A new value in place equals a float lr changed in the group at the same point.
    lr.fill_(3e-2)
    opt_f.param_groups[0]["lr"] = 0.0
    train(model_f, opt_f, 1)
    opt_f.param_groups[0]["lr"] = lr.item()
    train(model_t, opt_t, 2)
    train(model_f, opt_f, 2)
    assert params_changed(model_t, before)
    assert_models_close(model_t, model_f, **tol)


# ---------------------------------------------------------------------------- (i) GradScaler


@FOREACH
@BOTH
def test_grad_scaler_equals_unscaled_training_and_skips_inf(name, foreach):
    cls, _, hyper = PAIRS[name]
    model, model_plain = twins(torch.float32)
    opt = cls(model.parameters(), foreach=foreach, **hyper)
    opt_plain = cls(model_plain.parameters(), foreach=foreach, **hyper)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    for i in range(STEPS):
        opt.zero_grad()
        scaler.scale(loss_at(model, i)).backward()
        scaler.step(opt)
        scaler.update()
    train(model_plain, opt_plain)
    assert_models_close(model, model_plain)  # float32 tolerance
    assert scaler.get_scale() == 2.0**12

    # A step with an inf gradient is skipped: params and state unchanged, scale backs off.
    before = copy.deepcopy(model)
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    scaler.scale(loss_at(model, STEPS)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert_models_equal(model, before)
    state_after = opt.state_dict()["state"]
    for k, state in state_before.items():
        for key, value in state.items():
            assert torch.equal(state_after[k][key], value), (k, key)
    assert scaler.get_scale() == 2.0**11


# ---------------------------------------------------------------------------- (j) NaN


@FOREACH
def test_nan_gradient_without_scaler_propagates_like_adamw(foreach):
    """Without a GradScaler nothing checks gradients for NaN, as in torch.optim.AdamW.

    A NaN in one gradient element makes that element's moments NaN and the param element NaN
    (the other elements stay finite). The scale-invariance test of the poisoned tensor sees a
    NaN cosine, which compares false (docs/algorithm.md: ``max c_i < threshold``), so that tensor
    is not projected on that step: it moves exactly like AdamW's, as in the reference package.
    On the next step the NaN weight makes the loss NaN and every param NaN, in AdamW too.
    """
    model, model_w = twins()
    model_ref = copy.deepcopy(model)
    hyper = dict(lr=1e-2, weight_decay=0.1)
    opt = AdamP(model.parameters(), foreach=foreach, **hyper)
    opt_w = torch.optim.AdamW(model_w.parameters(), **hyper)
    opt_ref = ref.AdamP(model_ref.parameters(), **hyper)

    def poison(m: nn.Module) -> Callable[[int], None]:
        def inject(i: int) -> None:
            if i == 0:
                m[0].weight.grad[2, 3] = float("nan")

        return inject

    for m, o in ((model, opt), (model_w, opt_w), (model_ref, opt_ref)):
        train(m, o, 1, after_backward=poison(m))
    w = model[0].weight
    assert torch.isnan(w[2, 3]) and torch.isnan(w).sum() == 1
    for p, q in zip(model.parameters(), model_w.parameters(), strict=True):
        assert torch.equal(torch.isnan(p), torch.isnan(q))
    torch.testing.assert_close(w, model_w[0].weight, equal_nan=True, **REF_TOL)
    assert_models_close(model, model_ref, equal_nan=True, **REF_TOL)

    train(model, opt, 1)
    train(model_w, opt_w, 1)
    for p, q in zip(model.parameters(), model_w.parameters(), strict=True):
        assert torch.isnan(p).all() and torch.isnan(q).all()


# ---------------------------------------------------------------------------- (k) named params


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_named_parameters_are_saved(cls):
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    opt = cls(model.named_parameters(), lr=0.1)
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    items = list(model.named_parameters())
    opt = cls([{"params": items[:2]}, {"params": items[2:], "lr": 0.2}], lr=0.1)
    groups = opt.state_dict()["param_groups"]
    assert [g["param_names"] for g in groups] == [names[:2], names[2:]]
    assert [g["lr"] for g in groups] == [0.1, 0.2]


# ---------------------------------------------------------------------------- (l) hooks


@BOTH
def test_step_and_load_hooks_fire(name):
    cls, _, hyper = PAIRS[name]
    model = make_model()
    opt = cls(model.parameters(), **hyper)
    calls: list[str] = []

    def pre(o: Any, args: Any, kwargs: Any) -> None:
        assert o is opt
        calls.append("pre")

    def post(o: Any, args: Any, kwargs: Any) -> None:
        assert o is opt
        calls.append("post")

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    train(model, opt, 2)
    assert calls == ["pre", "post", "pre", "post"]
    for handle in handles:
        handle.remove()
    train(model, opt, 1)
    assert len(calls) == 4

    def load_pre(o: Any, state_dict: dict) -> dict:
        calls.append("load_pre")
        changed = copy.deepcopy(state_dict)
        changed["param_groups"][0]["lr"] = 0.123
        return changed

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.load_state_dict(opt.state_dict())
    assert calls[4:] == ["load_pre", "load_post"]
    assert opt.param_groups[0]["lr"] == 0.123


# ---------------------------------------------------------------------------- (m) maximize


@FOREACH
@BOTH
def test_maximize_equals_minimizing_the_negated_loss(name, foreach):
    cls, _, hyper = PAIRS[name]
    model, model_neg = twins()
    opt = cls(model.parameters(), foreach=foreach, maximize=True, **hyper)
    opt_neg = cls(model_neg.parameters(), foreach=foreach, **hyper)
    before = copy.deepcopy(model)
    train(model, opt)  # maximize the loss
    train(model_neg, opt_neg, sign=-1.0)  # minimize its negation
    assert params_changed(model, before)
    assert_models_equal(model, model_neg)
