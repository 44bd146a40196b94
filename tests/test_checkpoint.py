"""Checkpoints: save / load round trips, foreign checkpoints (reference ``adamp``, torch AdamW).

Every comparison is against an independent run: the same optimizer trained without
interruption, the reference package continuing from its own checkpoint, or
``torch.optim.AdamW`` continuing from its own checkpoint.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import adamp as ref
import pytest
import torch
from torch import nn

import fixtures.make_checkpoint as old
from adampx import SGDP, AdamP
from norm_mlp import loss_at, make_model

STEPS_BEFORE = 3
STEPS_AFTER = 3
# float64 parity with another implementation (different operation order in the projection).
REF_TOL = dict(rtol=1e-10, atol=1e-12)
ADAMP_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
# written by tests/fixtures/make_checkpoint.py (imported as ``old``) at commit b78b873
FIXTURE = Path(__file__).with_name("fixtures") / "checkpoint_b78b873.pt"


# ---------------------------------------------------------------------------- helpers


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        loss_at(model, i).backward()
        opt.step()


def save_load(obj: Any) -> Any:
    """``torch.save`` then ``torch.load(weights_only=True)`` through memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def two_groups(model: nn.Module, named: bool, hyper: list[dict[str, Any]]) -> list[dict]:
    """Split the model's params into two groups (first block / rest) with ``hyper``."""
    items = list(model.named_parameters())
    params = items if named else [p for _, p in items]
    return [{"params": params[:3], **hyper[0]}, {"params": params[3:], **hyper[1]}]


def assert_params_equal(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if tol:
            torch.testing.assert_close(pa, pb, **tol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(pa, pb), name


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


ADAMP_HYPER = [
    dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.1, delta=0.1, wd_ratio=0.2),
    dict(lr=5e-3, eps=1e-6, weight_decay=0.01, delta=0.2, wd_ratio=0.5, nesterov=True),
]
SGDP_HYPER = [
    dict(lr=5e-2, momentum=0.9, weight_decay=1e-2, nesterov=True, wd_ratio=0.3),
    dict(lr=1e-2, momentum=0.5, dampening=0.1, weight_decay=1e-3, delta=0.2),
]
OPTIMIZERS = {"AdamP": (AdamP, ADAMP_HYPER), "SGDP": (SGDP, SGDP_HYPER)}


# ---------------------------------------------------------------------------- (a) round trip


@pytest.mark.parametrize("named", [False, True], ids=["params", "named"])
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_mid_run_round_trip_equals_uninterrupted(name, dtype, foreach, named):
    cls, hyper = OPTIMIZERS[name]
    model_a = make_model(dtype)
    model_b = copy.deepcopy(model_a)

    # Uninterrupted run.
    opt_a = cls(two_groups(model_a, named, hyper), foreach=foreach)
    train(model_a, opt_a, 0, STEPS_BEFORE + STEPS_AFTER)

    # Interrupted run: save mid-run, then a fresh optimizer (default hyperparameters: the
    # checkpoint must bring them back) on a copy of the model continues.
    opt_b = cls(two_groups(model_b, named, hyper), foreach=foreach)
    train(model_b, opt_b, 0, STEPS_BEFORE)
    checkpoint = save_load(opt_b.state_dict())
    model_c = copy.deepcopy(model_b)
    opt_c = cls(two_groups(model_c, named, [{"lr": 0.5}, {"lr": 0.5}]), foreach=foreach)
    opt_c.load_state_dict(checkpoint)
    for group, h in zip(opt_c.param_groups, hyper, strict=True):
        for key, value in h.items():
            assert group[key] == value, key
    if named:
        names = [n for n, _ in model_c.named_parameters()]
        assert [g["param_names"] for g in opt_c.param_groups] == [names[:3], names[3:]]
    train(model_c, opt_c, STEPS_BEFORE, STEPS_AFTER)

    assert_params_equal(model_a, model_c)
    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert_state_equal(opt_a.state[pa], opt_c.state[pc])


# ---------------------------------------------------------------------------- (b) reference


REF_CASES = {
    "AdamP": (
        ref.AdamP,
        AdamP,
        dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.1, delta=0.1, wd_ratio=0.2),
    ),
    # nesterov=True: the reference projects its momentum buffer when nesterov is off.
    "SGDP": (
        ref.SGDP,
        SGDP,
        dict(lr=5e-2, momentum=0.9, weight_decay=1e-2, nesterov=True, wd_ratio=0.3),
    ),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("name", list(REF_CASES))
def test_reference_checkpoint_continues_like_reference(name, foreach):
    ref_cls, cls, hyper = REF_CASES[name]
    model_ref = make_model()
    opt_ref = ref_cls(model_ref.parameters(), **hyper)
    train(model_ref, opt_ref, 0, STEPS_BEFORE)
    checkpoint = save_load(opt_ref.state_dict())
    if name == "AdamP":
        assert isinstance(checkpoint["state"][0]["step"], int)  # the reference's own format

    model = copy.deepcopy(model_ref)
    opt = cls(model.parameters(), lr=0.5, foreach=foreach)  # lr must come from the checkpoint
    opt.load_state_dict(checkpoint)
    group = opt.param_groups[0]
    for key, value in hyper.items():
        assert group[key] == value, key
    assert group["foreach"] is foreach
    assert group["projection"] is True
    assert group["maximize"] is False
    if name == "AdamP":
        for p in model.parameters():
            step = opt.state[p]["step"]
            assert isinstance(step, torch.Tensor)
            assert step.dtype == torch.float32 and step.dim() == 0
            assert step.item() == STEPS_BEFORE

    train(model_ref, opt_ref, STEPS_BEFORE, STEPS_AFTER)
    train(model, opt, STEPS_BEFORE, STEPS_AFTER)
    assert_params_equal(model, model_ref, **REF_TOL)
    ref_keys = ADAMP_STATE_KEYS[1:] if name == "AdamP" else ("momentum",)
    for p, q in zip(model.parameters(), model_ref.parameters(), strict=True):
        for key in ref_keys:
            torch.testing.assert_close(opt.state[p][key], opt_ref.state[q][key], **REF_TOL)


def test_reference_checkpoint_state_matters():
    """Guard for the test above: a fresh AdamP (no checkpoint) does *not* match the reference
    continuing, so the parity really depends on the loaded moments and step counts."""
    _, cls, hyper = REF_CASES["AdamP"]
    model_ref = make_model()
    opt_ref = ref.AdamP(model_ref.parameters(), **hyper)
    train(model_ref, opt_ref, 0, STEPS_BEFORE)
    model = copy.deepcopy(model_ref)
    opt = cls(model.parameters(), **hyper)
    train(model_ref, opt_ref, STEPS_BEFORE, STEPS_AFTER)
    train(model, opt, STEPS_BEFORE, STEPS_AFTER)
    with pytest.raises(AssertionError):
        assert_params_equal(model, model_ref, **REF_TOL)


# ---------------------------------------------------------------------------- (c) AdamW

ADAMW_HYPER = dict(lr=1e-2, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05)


def adamw_checkpoint(
    model: nn.Module, steps: int = STEPS_BEFORE, **kwargs: Any
) -> tuple[torch.optim.AdamW, dict]:
    opt = torch.optim.AdamW(model.parameters(), **{**ADAMW_HYPER, "foreach": False, **kwargs})
    train(model, opt, 0, steps)
    return opt, save_load(opt.state_dict())


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
def test_adamw_checkpoint_continues_like_adamw(foreach):
    model_w = make_model()
    opt_w, checkpoint = adamw_checkpoint(model_w)
    assert checkpoint["param_groups"][0]["foreach"] is False

    model = copy.deepcopy(model_w)
    opt = AdamP(model.parameters(), delta=0.0, wd_ratio=0.3, nesterov=False, foreach=foreach)
    opt.load_state_dict(checkpoint)
    group = opt.param_groups[0]
    assert group["delta"] == 0.0
    assert group["wd_ratio"] == 0.3
    assert group["nesterov"] is False
    assert group["foreach"] is foreach  # implementation flag stays as constructed
    for key, value in ADAMW_HYPER.items():
        assert group[key] == value, key
    for key in ("amsgrad", "decoupled_weight_decay"):
        assert key not in group, key
    # AdamW's checkpoint says fused=None, capturable=False; ours stay as constructed
    assert group["fused"] is None and group["capturable"] is False

    train(model_w, opt_w, STEPS_BEFORE, STEPS_AFTER)
    train(model, opt, STEPS_BEFORE, STEPS_AFTER)
    assert_params_equal(model, model_w, **REF_TOL)
    for p, q in zip(model.parameters(), model_w.parameters(), strict=True):
        for key in ADAMP_STATE_KEYS:
            torch.testing.assert_close(opt.state[p][key], opt_w.state[q][key], **REF_TOL)


def _own_checkpoint(model: nn.Module) -> dict:
    opt = AdamP(model.parameters(), lr=1e-2)
    train(model, opt, 0, 1)
    return save_load(opt.state_dict())


def _ref_checkpoint(model: nn.Module) -> dict:
    opt = ref.AdamP(model.parameters(), lr=1e-2)
    train(model, opt, 0, 1)
    return save_load(opt.state_dict())


def _adamw_checkpoint(model: nn.Module) -> dict:
    return adamw_checkpoint(model, steps=1)[1]


@pytest.mark.parametrize(
    "source",
    [_own_checkpoint, _ref_checkpoint, _adamw_checkpoint, None],
    ids=["own", "reference", "adamw", "deepcopy"],
)
def test_group_keys_after_load_match_a_fresh_optimizer(source):
    """After loading (any source) or deepcopy, a param group has exactly the keys of a freshly
    constructed AdamP: nothing foreign (amsgrad, differentiable, ...)."""
    model = make_model()
    expected = set(AdamP(model.parameters()).param_groups[0])
    if source is None:
        opt = AdamP(model.parameters())
        train(model, opt, 0, 1)
        loaded = copy.deepcopy(opt)
    else:
        checkpoint = source(copy.deepcopy(model))
        loaded = AdamP(model.parameters())
        loaded.load_state_dict(checkpoint)
    assert set(loaded.param_groups[0]) == expected
    assert set(loaded.state_dict()["param_groups"][0]) == expected


@pytest.mark.parametrize("steps", [0, 1], ids=["before_step", "after_step"])
def test_adamw_amsgrad_checkpoint_raises(steps):
    model = make_model()
    _, checkpoint = adamw_checkpoint(copy.deepcopy(model), steps=steps, amsgrad=True)
    opt = AdamP(model.parameters(), lr=0.5)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"(?i)amsgrad"):
        opt.load_state_dict(checkpoint)
    assert opt.state_dict() == before  # a rejected checkpoint leaves the optimizer as it was


def test_adam_coupled_weight_decay_checkpoint_raises():
    model = make_model()
    opt_l2 = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"(?i)weight decay"):
        AdamP(model.parameters()).load_state_dict(save_load(opt_l2.state_dict()))
    # Adam without weight decay is AdamW without weight decay: accepted.
    opt_plain = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=1e-2)
    AdamP(model.parameters()).load_state_dict(save_load(opt_plain.state_dict()))


# ---------------------------------------------------------------------------- (d) half dtypes


def half_params(dtype: torch.dtype) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(7)
    return [
        nn.Parameter(torch.randn(5, 4, generator=gen).to(dtype)),
        nn.Parameter(torch.randn(5, generator=gen).to(dtype)),
    ]


def half_train(params: list[nn.Parameter], opt: torch.optim.Optimizer, start: int, n: int):
    for i in range(start, start + n):
        gen = torch.Generator().manual_seed(50 + i)
        opt.zero_grad()
        loss = sum((p.float() * torch.randn(p.shape, generator=gen)).sum() ** 2 for p in params)
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps, fe: AdamP(ps, lr=1e-2, weight_decay=0.1, foreach=fe),
        lambda ps, fe: SGDP(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, foreach=fe),
    ],
    ids=["AdamP", "SGDP"],
)
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_params_keep_float32_state_through_checkpoint(make_opt, foreach, dtype):
    params_a = half_params(dtype)
    params_b = [nn.Parameter(p.detach().clone()) for p in params_a]
    opt_a = make_opt(params_a, foreach)
    half_train(params_a, opt_a, 0, STEPS_BEFORE + STEPS_AFTER)

    opt_b = make_opt(params_b, foreach)
    half_train(params_b, opt_b, 0, STEPS_BEFORE)
    saved = {i: {k: v.clone() for k, v in opt_b.state[p].items()} for i, p in enumerate(params_b)}
    checkpoint = save_load(opt_b.state_dict())
    params_c = [nn.Parameter(p.detach().clone()) for p in params_b]
    opt_c = make_opt(params_c, foreach)
    opt_c.load_state_dict(checkpoint)

    for i, p in enumerate(params_c):
        state = opt_c.state[p]
        for key, value in state.items():
            assert value.dtype == torch.float32, key
        if "step" in state:
            assert state["step"].dim() == 0
        # float32 values survive exactly: a cast through bf16/f16 would round them.
        assert_state_equal(state, saved[i])

    half_train(params_c, opt_c, STEPS_BEFORE, STEPS_AFTER)
    for pa, pc in zip(params_a, params_c, strict=True):
        assert pc.dtype == dtype
        assert torch.equal(pa, pc)
        assert_state_equal(opt_a.state[pa], opt_c.state[pc])


# ---------------------------------------------------------------------------- (e) copies


@pytest.mark.parametrize("through_disk", [False, True], ids=["in_memory", "saved"])
def test_loaded_state_is_a_copy(through_disk):
    model = make_model()
    opt = AdamP(model.parameters(), lr=1e-2)
    train(model, opt, 0, 2)
    checkpoint = opt.state_dict()
    if through_disk:
        checkpoint = save_load(checkpoint)
    other_model = copy.deepcopy(model)
    other = AdamP(other_model.parameters())
    other.load_state_dict(checkpoint)
    snapshot = {k: v.clone() for k, v in other.state[other_model[0].weight].items()}

    # Mutate the dict that was loaded, and keep training the source optimizer (whose state
    # tensors an in-memory state_dict() aliases).
    for value in checkpoint["state"][0].values():
        value.add_(1.0)
    train(model, opt, 2, 1)

    assert_state_equal(other.state[other_model[0].weight], snapshot)


# ---------------------------------------------------------------------------- (f) deepcopy


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_deepcopy_of_model_and_optimizer_continues_identically(name):
    cls, hyper = OPTIMIZERS[name]
    model = make_model()
    opt = cls(two_groups(model, False, hyper))
    train(model, opt, 0, STEPS_BEFORE)

    model_copy, opt_copy = copy.deepcopy((model, opt))
    # The copy holds its own params and state tensors.
    copied_params = {id(p) for p in model_copy.parameters()}
    assert {id(p) for g in opt_copy.param_groups for p in g["params"]} == copied_params
    for p, q in zip(model.parameters(), model_copy.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert value.data_ptr() != opt_copy.state[q][key].data_ptr()

    train(model, opt, STEPS_BEFORE, STEPS_AFTER)
    train(model_copy, opt_copy, STEPS_BEFORE, STEPS_AFTER)
    assert_params_equal(model, model_copy)


# ---------------------------------------------------------------------------- (g) mismatches


Mutation = Callable[[dict], None]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd["param_groups"].pop(), "group"),
        (lambda sd: sd["param_groups"].append({**sd["param_groups"][0], "params": []}), "group"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "param"),
    ],
    ids=["fewer_groups", "more_groups", "fewer_params"],
)
def test_mismatched_checkpoint_raises(mutate: Mutation, match: str):
    model = make_model()
    opt = AdamP(two_groups(model, False, ADAMP_HYPER))
    train(model, opt, 0, 1)
    checkpoint = save_load(opt.state_dict())
    mutate(checkpoint)
    target = AdamP(two_groups(copy.deepcopy(model), False, ADAMP_HYPER))
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(checkpoint)


# ------------------------------------------------------- checkpoints of an earlier adampx


@pytest.mark.parametrize("name", ["adamp", "adamp_nesterov", "sgdp", "sgdp_nesterov"])
def test_checkpoint_saved_by_an_earlier_version_resumes(name: str) -> None:
    """A checkpoint that adampx wrote before its backends were reorganised (commit b78b873,
    stored in ``tests/fixtures``) loads into today's optimizer, and 3 more steps give the
    weights that the old code reached in 6 uninterrupted steps: the state-dict keys and the
    meaning of every entry are unchanged."""
    stored = torch.load(FIXTURE, weights_only=True)
    assert stored["commit"] == "b78b873"
    saved = stored[name]
    net = old.model()
    net.load_state_dict(saved["model"])
    optimizer = old.CONFIGS[name](net.parameters())
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()
    for index, state in optimizer.state_dict()["state"].items():
        assert state.keys() == saved["optimizer"]["state"][index].keys()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    old.train(net, optimizer, 3)
    for key, expected in saved["final"].items():
        actual = net.state_dict()[key]
        if actual.is_floating_point() and key.endswith("weight") and actual.dim() > 1:
            assert not torch.equal(actual, before[key]), f"{key} did not move"
        torch.testing.assert_close(actual, expected, **REF_TOL, msg=lambda m, k=key: f"{k}: {m}")
