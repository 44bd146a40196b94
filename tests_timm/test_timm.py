"""adampx against timm itself (timm 1.0.31): the cautious variants, timm's defaults on the
default path, and the optimizer factory.

Not part of the default suite: timm needs torchvision, which does not import beside the CPU
build of torch that the default environment uses. ``scripts/test_timm.sh`` makes the
environment these tests run in (``requirements-timm.txt``) and runs them; ``.ci/run`` calls
it after the default suite.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

import adampx
import adampx.integrations.timm as px_timm

torch.set_num_threads(1)
DTYPE = torch.float64
STEPS = 12
RTOL, ATOL = 1e-10, 1e-12


def test_the_versions_these_tests_are_for() -> None:
    assert timm.__version__ == "1.0.31"


# ---------------------------------------------------------------------------- models


def cnn() -> nn.Module:
    """Convolutions feeding batch norms (scale invariant per channel), a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )  # fmt: skip


def vit() -> nn.Module:
    """A two-block vision transformer of timm's own (LayerNorm before every block).

    Without the qkv bias: the key's bias has no effect on the attention (the softmax does
    not see a constant), so its gradient is rounding noise, whose signs the cautious mask
    then follows; two implementations that round differently part there at once."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=24,
        depth=2, num_heads=2, num_classes=5, qkv_bias=False,
    )  # fmt: skip


MODELS = {"cnn": cnn, "vit": vit}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(DTYPE)


def data(steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(6, 3, 16, 16, generator=gen, dtype=DTYPE), torch.randint(0, 5, (6,)))
        for _ in range(steps)
    ]


def train_pair(
    name: str,
    make_timm: Callable[[nn.Module], torch.optim.Optimizer],
    make_ours: Callable[[nn.Module], torch.optim.Optimizer],
    context: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Two copies of model ``name`` trained side by side, the params compared after every
    step in float64; returns the two optimizers."""
    theirs = make(name)
    ours = copy.deepcopy(theirs)
    opt_theirs, opt_ours = make_timm(theirs), make_ours(ours)
    assert isinstance(opt_ours, (adampx.AdamP, adampx.SGDP)), type(opt_ours)
    for step, (x, y) in enumerate(data(), start=1):
        runs = ((theirs, opt_theirs, contextlib.nullcontext), (ours, opt_ours, context))
        for model, opt, ctx in runs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with ctx():
                opt.step()
        for (param, a), b in zip(theirs.named_parameters(), ours.parameters(), strict=True):
            where = f"{name}.{param}, step {step}"
            torch.testing.assert_close(
                b, a, rtol=RTOL, atol=ATOL, msg=lambda m, where=where: f"{where}: {m}"
            )
    return opt_theirs, opt_ours


# ---------------------------------------------------------------------------- caution

ROUTES: dict[str, tuple[dict[str, Any], Callable[[], Any]]] = {
    "default": ({}, contextlib.nullcontext),
    "foreach": ({"foreach": True}, contextlib.nullcontext),
    "per-tensor": ({"foreach": False}, contextlib.nullcontext),
    "fused": ({"fused": True}, contextlib.nullcontext),
    "forced-eager": ({}, lambda: adampx.backends.force("eager")),
    "forced-foreach": ({}, lambda: adampx.backends.force("foreach")),
}
HYPER = {
    "adamp": dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, wd_ratio=0.1),
    "sgdp": dict(lr=0.05, momentum=0.9, weight_decay=1e-3, eps=1e-8, wd_ratio=0.1),
}
CLASSES = {
    "adamp": (timm.optim.AdamP, adampx.AdamP),
    "sgdp": (timm.optim.SGDP, adampx.SGDP),
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("delta", [0.1, 10.0])
@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
@pytest.mark.parametrize("model", list(MODELS))
def test_caution_matches_timm(
    model: str, kind: str, delta: float, nesterov: bool, route: str
) -> None:
    """``caution=True`` as timm computes it, on every route a user can ask for (the fused
    backends have no mask: their routes take the eager math). ``delta=10`` projects every
    tested tensor, also those with a large radial gradient, where the spherical mask differs
    from the standard one."""
    flags, context = ROUTES[route]
    hyper = dict(HYPER[kind], delta=delta, nesterov=nesterov, caution=True)
    theirs, ours = CLASSES[kind]
    train_pair(model, lambda m: theirs(m.parameters(), **hyper),
               lambda m: ours(m.parameters(), **hyper, **flags), context)  # fmt: skip


@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_caution_with_projection_false_is_timm_with_delta_zero(kind: str) -> None:
    """``projection=False`` masks every tensor the standard way: timm with ``delta=0``, whose
    test never passes."""
    hyper = dict(HYPER[kind], nesterov=True, caution=True)
    theirs, ours = CLASSES[kind]
    for model in MODELS:
        train_pair(model, lambda m: theirs(m.parameters(), **hyper, delta=0.0),
                   lambda m: ours(m.parameters(), **hyper, projection=False))  # fmt: skip


@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_signature_is_timms(kind: str) -> None:
    """The positional arguments, their order and defaults are timm's (``caution`` last)."""

    def positional(cls: type) -> list[tuple[str, Any]]:
        return [
            (p.name, p.default)
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"
        ]

    theirs, ours = CLASSES[kind]
    assert positional(ours) == positional(theirs)


@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_a_timm_checkpoint_resumes_in_adampx(kind: str, tmp_path: Any) -> None:
    """A cautious timm run saved after 4 steps and loaded into adampx (constructed without
    caution: the checkpoint's groups carry it) ends where the timm run ends."""
    hyper = dict(HYPER[kind], delta=0.1, nesterov=True, caution=True)
    theirs_cls, ours_cls = CLASSES[kind]
    model = make("cnn")
    opt = theirs_cls(model.parameters(), **hyper)
    batches = data(8)

    def run(model: nn.Module, opt: torch.optim.Optimizer, part: list[Any]) -> None:
        for x, y in part:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    run(model, opt, batches[:4])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "timm.pt")
    run(model, opt, batches[4:])
    saved = torch.load(tmp_path / "timm.pt")
    resumed = make("cnn")
    resumed.load_state_dict(saved["model"])
    ours = ours_cls(resumed.parameters(), **dict(hyper, caution=False))
    ours.load_state_dict(saved["opt"])
    assert ours.param_groups[0]["caution"] is True
    run(resumed, ours, batches[4:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


# ------------------------------------------------- timm's defaults on the default path


@pytest.mark.parametrize("model", list(MODELS))
def test_nesterov_adamp_on_the_default_path_matches_timm(model: str) -> None:
    """timm's ``adamp`` entry builds AdamP with ``nesterov=True``: on the CPU adampx's
    default step runs it in the C kernel (torch's fused AdamW has no Nesterov variant)."""
    hyper = dict(HYPER["adamp"], delta=0.1, nesterov=True)
    seen: list[str] = []
    kernel = adampx.backends.get("cpu-kernel")
    step = kernel.step_

    def spy(*args: Any) -> None:
        seen.append("cpu-kernel")
        step(*args)

    kernel.step_ = spy
    try:
        train_pair(model, lambda m: timm.optim.AdamP(m.parameters(), **hyper),
                   lambda m: adampx.AdamP(m.parameters(), **hyper))  # fmt: skip
    finally:
        kernel.step_ = step
    assert len(seen) == STEPS


# ------------------------------------------------------------------ the factory


@pytest.fixture(scope="module")
def registered() -> Iterator[list[str]]:
    yield px_timm.register()


@pytest.mark.parametrize("layer_decay", [None, 0.75])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("adampx-adamp", "adamp"), ("adampx-sgdp", "sgdp"), ("adampx-cadamp", "cadamp"),
     ("adampx-csgdp", "csgdp")],
)  # fmt: skip
def test_factory_matches_timms_entries(
    registered: list[str], ours: str, theirs: str, layer_decay: float | None
) -> None:
    """``create_optimizer_v2(model, "adampx-X", ...)`` gives timm's ``X`` numbers, with
    timm's param groups (no decay on biases and norms, layer decay on the ViT)."""
    assert ours in registered and ours in timm.optim.list_optimizers()
    lr = 1e-2 if "adamp" in theirs else 0.05
    kwargs = dict(lr=lr, weight_decay=0.05, layer_decay=layer_decay)
    models = ["vit"] if layer_decay else list(MODELS)
    for model in models:
        opt_theirs, opt_ours = train_pair(
            model,
            lambda m: create_optimizer_v2(m, theirs, **kwargs),
            lambda m: create_optimizer_v2(m, ours, **kwargs),
        )
        groups = [
            [(len(g["params"]), g["weight_decay"], g["lr"]) for g in opt.param_groups]
            for opt in (opt_theirs, opt_ours)
        ]
        assert groups[0] == groups[1]
        assert len(groups[0]) > 1  # biases and norms in a group of their own, without decay
        for key in ("nesterov", "wd_ratio", "caution", "momentum", "betas"):
            a = opt_theirs.param_groups[0].get(key)
            assert a == opt_ours.param_groups[0].get(key), key


def test_factory_names_resolve_to_adampx(registered: list[str]) -> None:
    model = make("cnn")
    for name in registered:
        opt = create_optimizer_v2(model, name, lr=0.1)
        assert type(opt).__module__.startswith("adampx."), (name, type(opt))
    wrapped = create_optimizer_v2(model, "lookahead_adampx-adamp", lr=1e-3)
    assert type(wrapped).__name__ == "Lookahead"
    assert "projection" in wrapped.param_groups[0]  # a group of adampx's AdamP
    F.cross_entropy(model(data(1)[0][0]), data(1)[0][1]).backward()
    wrapped.step()


def test_register_twice_changes_nothing(
    registered: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    before = timm.optim.list_optimizers(with_description=True)
    assert px_timm.register() == registered
    assert timm.optim.list_optimizers(with_description=True) == before
    assert "overwriting" not in caplog.text


def test_register_into_another_registry() -> None:
    registry = timm.optim.OptimizerRegistry()
    assert px_timm.register(registry) == list(px_timm.ENTRIES)
    info = registry.get_optimizer_info("adampx-adamp")
    assert info.opt_class is adampx.AdamP
    assert info.defaults == px_timm.ENTRIES["adampx-adamp"][2]  # timm's entry absent there


def test_the_recipe_of_the_docs_runs_as_written() -> None:
    """The first code block of docs/integrations.md's "timm" section, run as it is written
    with a model of ours; it must leave an adampx AdamP in ``optimizer``."""
    import re
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "integrations.md").read_text()
    section = page.split("\n## timm\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"model": make("cnn")}
    exec(code.group(1), namespace)
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, adampx.AdamP)
    assert optimizer.param_groups[-1]["nesterov"] is True
    assert optimizer.param_groups[-1]["wd_ratio"] == 0.01
