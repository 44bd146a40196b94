"""``adampx.inspect``: the probe finds the known scale invariances, reports AdamP's cosine test
as a direct computation from docs/algorithm.md does, and leaves the model exactly as it was.

Every case uses its own small model so that one weight's invariance cannot leak into another
(for example a bias-free conv → ReLU feeding a LayerNorm would be layer invariant).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adampx

DELTA = 0.1
EPS = 1e-8


# ---------------------------------------------------------------------------- helpers


class WSConv2d(nn.Conv2d):
    """Weight standardization: each output filter is standardized over dims 1..3."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, (w - mean) / std, self.bias)


def fixed_loss(seed: int = 123) -> Callable[[Tensor], Tensor]:
    """A fixed random linear function of the output (the same in the test and in inspect)."""
    cache: dict[tuple[int, ...], Tensor] = {}

    def loss_fn(out: Tensor) -> Tensor:
        key = tuple(out.shape)
        if key not in cache:
            gen = torch.Generator().manual_seed(seed)
            cache[key] = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        return (out * cache[key]).sum()

    return loss_fn


def direct_decision(
    model: nn.Module, inputs: tuple[Tensor, ...], loss_fn: Callable[[Tensor], Tensor], name: str
) -> dict[str, float | str]:
    """AdamP's test for one weight, computed from docs/algorithm.md on a gradient taken here.

    The gradient comes from a copy of the model in training mode, forward on the same inputs
    with the same RNG state as the caller's (so dropout masks match), with the same loss.
    """
    twin = copy.deepcopy(model)
    twin.train()
    state = torch.random.get_rng_state()
    try:
        loss_fn(twin(*inputs)).backward()
    finally:
        torch.random.set_rng_state(state)
    p = dict(twin.named_parameters())[name]
    w, g = p.detach().double(), p.grad.detach().double()
    n0 = w.shape[0]
    rows_w, rows_g = w.reshape(n0, -1), g.reshape(n0, -1)
    max_cos = F.cosine_similarity(rows_g, rows_w, dim=1, eps=EPS).abs().max().item()
    layer_cos = F.cosine_similarity(g.reshape(1, -1), w.reshape(1, -1), dim=1, eps=EPS)
    layer_cos = layer_cos.abs().item()
    channel_thr = DELTA / math.sqrt(w.numel() / n0)
    layer_thr = DELTA / math.sqrt(w.numel())
    if max_cos < channel_thr:
        view = "channel"
    elif layer_cos < layer_thr:
        view = "layer"
    else:
        view = "none"
    return dict(
        view=view,
        max_cosine=max_cos,
        layer_cosine=layer_cos,
        channel_threshold=channel_thr,
        layer_threshold=layer_thr,
    )


def by_name(
    report: adampx.tools.inspection.Report,
) -> dict[str, adampx.tools.inspection.ParamReport]:
    return {r.name: r for r in report}


def images(seed: int = 0, n: int = 8, c: int = 3, hw: int = 6) -> Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


def linear_ln_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(6, 16, bias=False),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def conv_gn_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.GroupNorm(num_groups=2, num_channels=8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


def conv_relu_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def ws_conv_model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        WSConv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


# (model factory, inputs, name of the weight under test, expected invariance, name of the head)
CASES = {
    "conv_batchnorm": (conv_bn_model, lambda: (images(),), "0.weight", "channel", "4.weight"),
    "linear_layernorm": (
        linear_ln_model,
        lambda: (torch.randn(8, 6, generator=torch.Generator().manual_seed(5)),),
        "0.weight",
        "layer",
        "3.weight",
    ),
    "conv_groupnorm": (conv_gn_model, lambda: (images(1),), "0.weight", "layer", "4.weight"),
    "conv_relu_no_norm": (conv_relu_model, lambda: (images(2),), "0.weight", "none", "3.weight"),
    "weight_standardized": (ws_conv_model, lambda: (images(3),), "0.weight", "channel", "3.weight"),
}


# ---------------------------------------------------------------------------- known cases


@pytest.mark.parametrize("case", list(CASES))
def test_known_invariance_and_adamp_view(case: str) -> None:
    make, inputs_fn, weight, expected, head = CASES[case]
    model, inputs, loss_fn = make(), inputs_fn(), fixed_loss()
    report = by_name(adampx.inspect(model, *inputs, loss_fn=loss_fn))
    assert list(report) == [n for n, _ in model.named_parameters()]

    r = report[weight]
    assert r.invariance == expected, (case, r)
    direct = direct_decision(model, inputs, loss_fn, weight)
    assert r.adamp_view == direct["view"]
    if expected != "none":
        # a scale-invariant weight has a gradient orthogonal to it (per row or as a whole)
        assert r.adamp_view == expected
        assert r.agrees
    if expected == "channel":
        assert r.channel_change <= 1e-3
    else:
        assert r.channel_change > 1e-3
    if expected == "layer":
        assert r.layer_change <= 1e-3
    if expected == "none":
        assert r.layer_change > 1e-3

    # the final classifier Linear is never invariant
    h = report[head]
    assert h.invariance == "none"
    assert h.channel_change > 1e-3 and h.layer_change > 1e-3
    assert h.adamp_view == direct_decision(model, inputs, loss_fn, head)["view"]

    # 1-d tensors are never tested by AdamP
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert report[name].adamp_view == "skipped"
            assert math.isnan(report[name].max_cosine)


def test_conv_relu_weight_not_projected_by_adamp() -> None:
    """A conv with bias feeding ReLU and a classifier: not invariant, AdamP does not project
    it (its gradient has a clear radial component)."""
    model, x, loss_fn = conv_relu_model(), images(2), fixed_loss()
    r = by_name(adampx.inspect(model, x, loss_fn=loss_fn))["0.weight"]
    direct = direct_decision(model, (x,), loss_fn, "0.weight")
    assert direct["view"] == "none"
    assert r.adamp_view == "none"
    assert r.agrees


@pytest.mark.parametrize("weight", ["0.weight", "4.weight"])
def test_cosines_match_direct_cosine_similarity(weight: str) -> None:
    model, x, loss_fn = conv_bn_model(), images(), fixed_loss(7)
    r = by_name(adampx.inspect(model, x, loss_fn=loss_fn, delta=DELTA, eps=EPS))[weight]
    direct = direct_decision(model, (x,), loss_fn, weight)
    assert r.adamp_view == direct["view"]
    assert r.max_cosine == pytest.approx(direct["max_cosine"], rel=1e-6, abs=1e-10)
    assert r.layer_cosine == pytest.approx(direct["layer_cosine"], rel=1e-6, abs=1e-10)
    assert r.channel_threshold == pytest.approx(direct["channel_threshold"], rel=1e-12)
    assert r.layer_threshold == pytest.approx(direct["layer_threshold"], rel=1e-12)


def test_delta_changes_the_decision_as_the_threshold_says() -> None:
    """With delta large enough that the head's cosine falls under the channel threshold, the
    decision flips to "channel", exactly where the direct computation says."""
    model, x, loss_fn = conv_bn_model(), images(), fixed_loss(7)
    direct = direct_decision(model, (x,), loss_fn, "4.weight")
    assert direct["view"] == "none"
    row_len = model[4].weight[0].numel()
    big_delta = 2 * direct["max_cosine"] * math.sqrt(row_len)
    r = by_name(adampx.inspect(model, x, loss_fn=loss_fn, delta=big_delta))["4.weight"]
    assert r.adamp_view == "channel"
    assert r.invariance == "none"
    assert not r.agrees


# ---------------------------------------------------------------------------- model untouched


def test_model_is_left_exactly_as_it_was() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )
    x = images()
    # non-trivial buffers: a few training steps of BatchNorm statistics
    with torch.no_grad():
        for i in range(3):
            model(images(10 + i))
    model.eval()
    model[3].train()  # mixed flags must come back as they were
    head = model[5]
    existing_grad = torch.randn_like(head.weight)
    head.weight.grad = existing_grad
    expected_grad = existing_grad.clone()

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    param_objects = {n: p for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    assert int(model[1].num_batches_tracked) == 3

    rng = torch.random.get_rng_state()
    adampx.inspect(model, x)
    after = torch.rand(16)
    torch.random.set_rng_state(rng)
    assert torch.equal(after, torch.rand(16))

    for n, p in model.named_parameters():
        assert p is param_objects[n]
        assert torch.equal(p.detach(), params[n]), n
    assert head.weight.grad is not None
    assert torch.equal(head.weight.grad, expected_grad)
    for n, p in model.named_parameters():
        if n != "5.weight":
            assert p.grad is None, n
    for n, b in model.named_buffers():
        assert b.dtype == buffers[n].dtype
        assert torch.equal(b, buffers[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.training is False and model[3].training is True


def test_dropout_gets_the_same_masks_in_every_probe() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Dropout(0.5),
        nn.Linear(6, 16, bias=False),
        nn.LayerNorm(16),
        nn.Dropout(0.5),
        nn.Linear(16, 4),
    )
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(8))
    loss_fn = fixed_loss()
    report = by_name(adampx.inspect(model, x, loss_fn=loss_fn))
    r = report["1.weight"]
    assert r.invariance == "layer"
    assert r.layer_change <= 1e-3
    # the probe gradient used the same masks as a forward pass here from the same RNG state
    direct = direct_decision(model, (x,), loss_fn, "1.weight")
    assert direct["view"] == r.adamp_view == "layer"
    assert r.layer_cosine == pytest.approx(direct["layer_cosine"], rel=1e-6, abs=1e-10)
    assert report["4.weight"].invariance == "none"


def test_all_zero_parameter_is_none_with_a_note() -> None:
    model = conv_bn_model()
    with torch.no_grad():
        model[4].weight.zero_()
    report = by_name(adampx.inspect(model, images()))
    r = report["4.weight"]
    assert r.invariance == "none"
    assert r.note and "zero" in r.note
    assert report["0.weight"].note == ""
    assert report["0.weight"].invariance == "channel"
    assert r.note in str(adampx.inspect(model, images()))


# ---------------------------------------------------------------------------- report and errors


def test_str_report_is_a_table_with_every_parameter() -> None:
    model = conv_gn_model()
    report = adampx.inspect(model, images(1))
    text = str(report)
    lines = text.splitlines()
    names = [n for n, _ in model.named_parameters()]
    assert len(lines) == 2 + len(names)  # header, rule, one row per parameter
    assert set(lines[1]) == {"-"}
    for name, line in zip(names, lines[2:], strict=True):
        assert line.startswith(name)
    for r, line in zip(report, lines[2:], strict=True):
        assert r.invariance in line and r.adamp_view in line


def test_bad_input_raises_value_error() -> None:
    model = conv_bn_model()
    with pytest.raises(ValueError):
        adampx.inspect(model)
    with pytest.raises(ValueError):
        adampx.inspect(model, images(), rtol=0.0)
    with pytest.raises(ValueError):
        adampx.inspect(model, images(), rtol=-1e-3)


def test_str_report_contains_long_parameter_names() -> None:
    model = nn.Module()
    model.feature_extractor_backbone_stage1 = nn.Linear(4, 6)
    model.head = nn.Linear(6, 2)

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner.head(self.inner.feature_extractor_backbone_stage1(x).relu())

    wrapped = Wrapper(model)
    text = str(adampx.inspect(wrapped, torch.randn(5, 4)))
    for name, _ in wrapped.named_parameters():
        assert name in text, name


def test_inspect_works_under_no_grad() -> None:
    model, x, loss_fn = linear_ln_model(), torch.randn(8, 6), fixed_loss()
    report = adampx.inspect(model, x, loss_fn=loss_fn)
    expected = [(r.name, r.invariance, r.adamp_view) for r in report]
    with torch.no_grad():
        report = adampx.inspect(model, x, loss_fn=loss_fn)
    assert [(r.name, r.invariance, r.adamp_view) for r in report] == expected
