"""``track_statistics=True``: ``optimizer.statistics()`` reports what the last step did, as a
direct computation from docs/algorithm.md in this file says, and costs nothing when off."""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from adampx import SGDP, AdamP

DELTA = 0.1
EPS = 1e-8
LR = {"AdamP": 1e-2, "SGDP": 0.05}
OPTIMIZERS = {
    "AdamP": lambda params, **kw: AdamP(params, lr=LR["AdamP"], weight_decay=0.01, **kw),
    "SGDP": lambda params, **kw: SGDP(params, lr=LR["SGDP"], momentum=0.9, weight_decay=0.01, **kw),
}
# names of the weights of make_model by the view the projection must fire in
CHANNEL_WEIGHT, LAYER_WEIGHT, PLAIN_WEIGHT = "0.weight", "5.weight", "8.weight"


# ---------------------------------------------------------------------------- helpers


def make_model(seed: int = 0) -> nn.Module:
    """conv → BatchNorm (channel view), bias-free linear → LayerNorm (layer view), a head
    (not projected), 1-d gains and biases (skipped); float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),  # 0
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),  # 2
        nn.Flatten(),  # 3
        nn.Dropout(0.0),  # 4
        nn.Linear(16, 8, bias=False),  # 5
        nn.LayerNorm(8),  # 6
        nn.ReLU(),  # 7
        nn.Linear(8, 3),  # 8
    ).double()
    with torch.no_grad():  # no zero-norm gains or biases
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def backward(model: nn.Module, i: int) -> None:
    gen = torch.Generator().manual_seed(100 + i)
    x = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()


def direct_test(w: Tensor, g: Tensor) -> dict[str, Any]:
    """The scale-invariance test of docs/algorithm.md with F.cosine_similarity."""
    n0 = w.shape[0]
    row_length = w.numel() // n0
    max_cos = F.cosine_similarity(g.reshape(n0, -1), w.reshape(n0, -1), dim=1, eps=EPS)
    max_cos = max_cos.abs().max().item()
    layer_cos = F.cosine_similarity(g.reshape(1, -1), w.reshape(1, -1), dim=1, eps=EPS)
    layer_cos = layer_cos.abs().item()
    channel_thr = DELTA / math.sqrt(row_length)
    layer_thr = DELTA / math.sqrt(w.numel())
    view = "channel" if max_cos < channel_thr else "layer" if layer_cos < layer_thr else "none"
    return dict(
        view=view,
        max_cosine=max_cos,
        channel_threshold=channel_thr,
        layer_cosine=layer_cos,
        layer_threshold=layer_thr,
    )


def expected_record(before: Tensor, grad: Tensor, after: Tensor, lr: float) -> dict[str, Any]:
    norm = torch.linalg.vector_norm(before).item()
    update = torch.linalg.vector_norm(after - before).item()
    out: dict[str, Any] = dict(
        norm=norm,
        update_norm=update,
        lr=lr,
        effective_step=lr / norm**2,
        relative_update=update / norm,
    )
    if before.dim() > 1:
        out.update(direct_test(before, grad))
    else:
        out["view"] = "skipped"
    return out


def check_record(rec: Any, exp: dict[str, Any]) -> None:
    assert rec.view == exp["view"], rec.name
    for key in ("norm", "update_norm", "lr", "effective_step", "relative_update"):
        assert getattr(rec, key) == pytest.approx(exp[key], rel=1e-12, abs=0), (rec.name, key)
    if exp["view"] == "skipped":
        for key in ("max_cosine", "channel_threshold", "layer_cosine", "layer_threshold"):
            assert math.isnan(getattr(rec, key)), (rec.name, key)
        return
    for key in ("channel_threshold", "layer_threshold"):
        assert getattr(rec, key) == pytest.approx(exp[key], rel=1e-12), (rec.name, key)
    for key in ("max_cosine", "layer_cosine"):
        assert getattr(rec, key) == pytest.approx(exp[key], rel=1e-9, abs=1e-14), (rec.name, key)


def step_and_expect(
    model: nn.Module, opt: torch.optim.Optimizer, i: int, lr: float
) -> dict[str, dict[str, Any]]:
    """One backward + step; the expected record of every param, computed here."""
    backward(model, i)
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.detach().clone() for n, p in named.items()}
    opt.step()
    return {n: expected_record(before[n], grads[n], named[n].detach(), lr) for n in named}


# ---------------------------------------------------------------------------- records


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_records_agree_with_direct_computation(name: str, foreach: bool) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model.named_parameters(), foreach=foreach, track_statistics=True)
    expected = {}
    for i in range(2):
        expected = step_and_expect(model, opt, i, LR[name])
    # the model exercises all three outcomes of the test
    assert expected[CHANNEL_WEIGHT]["view"] == "channel"
    assert expected[LAYER_WEIGHT]["view"] == "layer"
    assert expected[PLAIN_WEIGHT]["view"] == "none"

    records = opt.statistics()
    # names from named_parameters, in order, one record per param: only the last step
    assert [r.name for r in records] == [n for n, _ in model.named_parameters()]
    assert {r.step for r in records} == {2}
    for rec in records:
        check_record(rec, expected[rec.name])
    for n, p in model.named_parameters():
        if p.dim() <= 1:
            assert next(r for r in records if r.name == n).view == "skipped"


def test_statistics_reflect_only_the_last_step() -> None:
    model = make_model()
    opt = OPTIMIZERS["AdamP"](model.named_parameters(), track_statistics=True)
    first = step_and_expect(model, opt, 0, LR["AdamP"])
    records_1 = opt.statistics()
    for rec in records_1:
        check_record(rec, first[rec.name])
    second = step_and_expect(model, opt, 1, LR["AdamP"])
    records_2 = opt.statistics()
    assert len(records_2) == len(records_1) == len(list(model.parameters()))
    for rec in records_2:
        check_record(rec, second[rec.name])
    # the first step's numbers are not the second's
    assert records_1[0].norm != records_2[0].norm
    assert records_1[0].step == 1 and records_2[0].step == 2


def test_names_without_named_parameters() -> None:
    model = make_model()
    params = list(model.parameters())
    opt = AdamP([{"params": params[:3]}, {"params": params[3:]}], lr=1e-3, track_statistics=True)
    backward(model, 0)
    opt.step()
    names = [r.name for r in opt.statistics()]
    assert names == [f"group0.param{i}" for i in range(3)] + [
        f"group1.param{i}" for i in range(len(params) - 3)
    ]


def test_group_level_switch() -> None:
    model = make_model()
    named = list(model.named_parameters())
    tracked = [(n, p) for n, p in named if n.startswith(("0.", "1."))]
    untracked = [(n, p) for n, p in named if not n.startswith(("0.", "1."))]
    opt = AdamP([{"params": tracked, "track_statistics": True}, {"params": untracked}], lr=1e-3)
    assert [g["track_statistics"] for g in opt.param_groups] == [True, False]
    expected = step_and_expect(model, opt, 0, 1e-3)
    records = opt.statistics()
    assert [r.name for r in records] == [n for n, _ in tracked]
    for rec in records:
        check_record(rec, expected[rec.name])


def test_projection_false_group_is_skipped() -> None:
    model = make_model()
    opt = AdamP(model.named_parameters(), lr=1e-3, projection=False, track_statistics=True)
    backward(model, 0)
    opt.step()
    assert {r.view for r in opt.statistics()} == {"skipped"}


# ---------------------------------------------------------------------------- no side effects


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tracking_does_not_change_the_numbers(name: str, foreach: bool) -> None:
    models = [make_model(), make_model()]
    opts = [
        OPTIMIZERS[name](m.parameters(), foreach=foreach, track_statistics=on)
        for m, on in zip(models, (False, True), strict=True)
    ]
    for i in range(3):
        for m, o in zip(models, opts, strict=True):
            backward(m, i)
            o.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), n
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        sa, sb = opts[0].state[a], opts[1].state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert opts[0].statistics() == []
    assert len(opts[1].statistics()) == len(list(models[1].parameters()))


class OpRecorder(TorchDispatchMode):
    """Counts aten ops; counts copies whose source shares storage with a parameter."""

    COPIES = ("clone", "_to_copy", "copy_", "copy")

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.param_copies = 0
        self._storages = {p.untyped_storage().data_ptr() for p in params}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in self.COPIES:
            src = args[1] if name == "copy_" else args[0]
            if isinstance(src, Tensor) and src.untyped_storage().data_ptr() in self._storages:
                self.param_copies += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_statistics_off_adds_no_work_to_the_step(name: str, foreach: bool) -> None:
    counts = {}
    for on in (False, True):
        model = make_model()
        opt = OPTIMIZERS[name](model.parameters(), foreach=foreach, track_statistics=on)
        backward(model, 0)
        params = list(model.parameters())
        recorder = OpRecorder(params)
        with recorder:
            opt.step()
        counts[on] = recorder
        if not on:
            assert opt.statistics() == []
    off, on_ = counts[False], counts[True]
    assert off.param_copies == 0
    assert sum(off.ops.values()) < sum(on_.ops.values())
    # The projection takes row norms itself; tracking adds two per param (‖w‖ before the
    # step and ‖Δw‖), and a snapshot copy of each: the recorder sees that work when on. The
    # CPU default path also completes the test's record (the layer view's cosine, two
    # norms) of a tensor whose channel view passed, which it skips when nothing is recorded.
    extra_norms = on_.ops["linalg_vector_norm"] - off.ops["linalg_vector_norm"]
    tested = sum(p.dim() > 1 for p in params)
    assert 2 * len(params) <= extra_norms <= 2 * len(params) + 2 * tested
    assert on_.param_copies >= len(params)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_keeps_track_statistics_as_constructed(name: str) -> None:
    model = make_model()
    saved_on = OPTIMIZERS[name](model.parameters(), track_statistics=True)
    backward(model, 0)
    saved_on.step()
    sd = saved_on.state_dict()
    assert sd["param_groups"][0]["track_statistics"] is True

    twin = copy.deepcopy(model)
    off = OPTIMIZERS[name](twin.parameters(), track_statistics=False)
    off.load_state_dict(sd)
    assert all(g["track_statistics"] is False for g in off.param_groups)
    backward(twin, 1)
    off.step()
    assert off.statistics() == []

    # and the other way round: saved off, constructed on, stays on
    model_off = make_model()
    saved_off = OPTIMIZERS[name](model_off.parameters(), track_statistics=False)
    backward(model_off, 0)
    saved_off.step()
    twin_on = copy.deepcopy(model_off)
    on = OPTIMIZERS[name](twin_on.parameters(), track_statistics=True)
    on.load_state_dict(saved_off.state_dict())
    assert all(g["track_statistics"] is True for g in on.param_groups)
    expected = step_and_expect(twin_on, on, 1, LR[name])
    records = on.statistics()
    assert len(records) == len(list(twin_on.parameters()))
    for rec, n in zip(records, expected, strict=True):
        check_record(rec, expected[n])


def test_param_without_gradient_in_the_last_step_has_no_record() -> None:
    model = make_model()
    opt = AdamP(model.named_parameters(), lr=1e-3, track_statistics=True)
    step_and_expect(model, opt, 0, 1e-3)
    backward(model, 1)
    named = dict(model.named_parameters())
    named[CHANNEL_WEIGHT].grad = None
    opt.step()
    names = [r.name for r in opt.statistics()]
    assert names == [n for n in named if n != CHANNEL_WEIGHT]


def test_statistics_empty_after_tracking_is_switched_off() -> None:
    model = make_model()
    opt = AdamP(model.parameters(), lr=1e-3, track_statistics=True)
    backward(model, 0)
    opt.step()
    assert opt.statistics()
    opt.param_groups[0]["track_statistics"] = False
    backward(model, 1)
    opt.step()
    assert opt.statistics() == []  # "Empty when no group tracks statistics"


def test_tensor_lr_reported_as_used_in_the_step() -> None:
    model = make_model()
    opt = AdamP(model.named_parameters(), lr=torch.tensor(0.5), track_statistics=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected = step_and_expect(model, opt, 0, 0.5)
    scheduler.step()
    assert float(opt.param_groups[0]["lr"]) == 0.25
    for rec in opt.statistics():
        check_record(rec, expected[rec.name])
