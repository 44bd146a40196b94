"""Parameters that an engine flattened (``adampx.optim.flattened``): FSDP1's are refused, a
flat group (DeepSpeed ZeRO) is warned about once, and models that keep their shapes are left
alone.

The FSDP1 cases run real ``FullyShardedDataParallel`` models on 2 gloo processes (the
pattern and helpers of tests/test_distributed.py); the configuration the error recommends
besides FSDP2 (``use_orig_params=True`` with ``NO_SHARD``) is trained there and must give the
single-process numbers. DeepSpeed's flattening is reproduced here as DeepSpeed does it:
``group["params"]`` replaced after construction by one flat partition per group (ZeRO-1/2),
or filled and emptied around each step (ZeRO-3).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from adampx import SGDP, AdamP, Projected
from adampx.optim.flattened import FlattenedParamsWarning
from adampx.tools.param_groups import param_groups
from test_distributed import (
    CONFIGS,
    STEPS,
    gloo,
    make_model,
    make_projected,
    single_process,
    train,
)

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "AdamP": lambda ps: AdamP(ps, lr=1e-2, weight_decay=0.1),
    "SGDP": lambda ps: SGDP(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "Projected": lambda ps: Projected(torch.optim.AdamW(ps, weight_decay=0.0), weight_decay=0.1),
}


@pytest.fixture
def flattened_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """The warnings raised inside the test, each recorded (no deduplication)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def flattened(caught: list[warnings.WarningMessage]) -> list[str]:
    """The messages of the FlattenedParamsWarnings among ``caught``."""
    return [str(w.message) for w in caught if issubclass(w.category, FlattenedParamsWarning)]


def flat_count(caught: list[warnings.WarningMessage]) -> int:
    return len(flattened(caught))


def step_model(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def hf_groups(model: nn.Module, decay_key: str = "weight_decay") -> list[dict[str, Any]]:
    """The Hugging Face Trainer's split: biases and norm weights without weight decay
    (``decay_key="projected_weight_decay"`` for :class:`Projected`)."""
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    return [{"params": decay, decay_key: 0.01}, {"params": no_decay, decay_key: 0.0}]


LAYOUTS: dict[str, Callable[[nn.Module], Any]] = {
    "all params": lambda m: m.parameters(),
    "adampx.tools.param_groups": param_groups,
    "biases first (Trainer's groups reversed)": lambda m: hf_groups(m)[::-1],
    "weights unprojected": lambda m: [
        {"params": [p for p in m.parameters() if p.dim() >= 2], "projection": False},
        {"params": [p for p in m.parameters() if p.dim() < 2]},
    ],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_models_that_keep_their_shapes_stay_silent(
    name: str, layout: str, flattened_warnings: list[warnings.WarningMessage]
) -> None:
    """Common layouts, including groups of only biases and norm gains, warn about nothing."""
    model = make_model()
    opt = OPTIMIZERS[name](LAYOUTS[layout](model))
    step_model(model, opt)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # a group of one 1-D tensor
    named = "param_names" in opt.param_groups[0]
    opt.add_param_group({"params": [("extra", extra)] if named else [extra]})
    step_model(model, opt)
    assert flat_count(flattened_warnings) == 0


def test_projected_keeps_silent_on_the_trainer_groups(
    flattened_warnings: list[warnings.WarningMessage],
) -> None:
    model = make_model()
    groups = hf_groups(model, "projected_weight_decay")
    opt = Projected(torch.optim.AdamW(groups, weight_decay=0.0), weight_decay=0.1)
    step_model(model, opt)
    assert flat_count(flattened_warnings) == 0


def zero12_flatten(opt: torch.optim.Optimizer) -> list[Tensor]:
    """What DeepSpeed ZeRO-1/2 does to the optimizer it is given: each group's params become
    one flat float32 tensor (``param_group['params'] = [single_partition_of_fp32_groups[i]]``
    in deepspeed/runtime/zero/stage_1_and_2.py)."""
    flats = []
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).float()
        flat.requires_grad_(True)
        group["params"] = [flat]
        flats.append(flat)
    return flats


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_flattened_engine_is_warned_about_once(
    name: str, flattened_warnings: list[warnings.WarningMessage]
) -> None:
    model = make_model()
    decay_key = "projected_weight_decay" if name == "Projected" else "weight_decay"
    opt = OPTIMIZERS[name](hf_groups(model, decay_key))
    assert flat_count(flattened_warnings) == 0  # the shapes are there at construction
    flats = zero12_flatten(opt)
    for i in range(3):
        for flat in flats:
            flat.grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(i))
        opt.step()
    (message,) = flattened(flattened_warnings)
    assert name in message and "DeepSpeed ZeRO" in message and "integrations.md" in message
    assert ("projected=False" if name == "Projected" else "projection=False") in message


def test_zero3_style_params_set_around_each_step_warn_once(
    flattened_warnings: list[warnings.WarningMessage],
) -> None:
    """ZeRO-3 empties every group after construction and puts one flat partition into one
    group around each of its optimizer steps (deepspeed/runtime/zero/stage3.py)."""
    model = make_model()
    opt = OPTIMIZERS["AdamP"](hf_groups(model))
    sizes = [sum(p.numel() for p in g["params"]) for g in opt.param_groups]
    for group in opt.param_groups:
        group["params"] = []
    assert flat_count(flattened_warnings) == 0
    flats = [torch.zeros(n, requires_grad=True) for n in sizes]
    for _ in range(2):
        for group, flat in zip(opt.param_groups, flats, strict=True):
            flat.grad = torch.ones_like(flat)
            group["params"] = [flat]
            opt.step()
            group["params"] = []
    assert flat_count(flattened_warnings) == 1


def test_flattened_adamp_is_adamw_as_the_warning_says() -> None:
    """The claim of the warning, checked: on ZeRO's flat partition AdamP's numbers are
    torch.optim.AdamW's."""
    model = make_model()
    with pytest.warns(FlattenedParamsWarning):
        opt = AdamP(model.parameters(), lr=1e-2, weight_decay=0.1)
        (flat,) = zero12_flatten(opt)
        twin = flat.detach().clone().requires_grad_(True)
        adamw = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1)
        for i in range(3):
            flat.grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(i))
            twin.grad = flat.grad.clone()
            opt.step()
            adamw.step()
    torch.testing.assert_close(flat, twin, rtol=1e-6, atol=1e-7)
    assert not torch.equal(flat, torch.cat([p.reshape(-1) for p in model.parameters()]).float())


@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_only_1d_params_warn_at_construction_unless_projection_is_off(
    name: str, flattened_warnings: list[warnings.WarningMessage]
) -> None:
    vector = nn.Parameter(torch.zeros(5))
    cls = AdamP if name == "AdamP" else SGDP
    kwargs = {"momentum": 0.9} if name == "SGDP" else {}
    cls([vector], lr=0.1, projection=False, **kwargs)
    cls([{"params": [vector], "projection": False}, {"params": []}], lr=0.1, **kwargs)
    assert flat_count(flattened_warnings) == 0
    cls([vector], lr=0.1, **kwargs)
    assert flat_count(flattened_warnings) == 1


# ------------------------------------------------------------------- FSDP1 and FSDP2 on gloo

# (use_orig_params, sharding strategy) of FSDP1; the optimizer must refuse all but NO_SHARD
# with use_orig_params=True, which keeps every parameter's shape.
FSDP1_CASES = {
    "flat, FULL_SHARD": (False, "FULL_SHARD"),
    "flat, NO_SHARD": (False, "NO_SHARD"),
    "views, FULL_SHARD": (True, "FULL_SHARD"),
    "views, SHARD_GRAD_OP": (True, "SHARD_GRAD_OP"),
    "views, NO_SHARD": (True, "NO_SHARD"),
}
MAKERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "AdamP": lambda ps: CONFIGS["adamp"](ps, False),
    "SGDP": lambda ps: CONFIGS["sgdp"](ps, False),
    "Projected": lambda ps: make_projected(ps, False),
}


def _outcome(make: Callable[[Any], torch.optim.Optimizer], params: Any) -> tuple[str, Any]:
    """("error", message), or ("ok", the number of FlattenedParamsWarnings) at construction."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make(params)
        except ValueError as error:
            return "error", str(error)
    return "ok", flat_count(caught)


def _fsdp_worker(rank: int, world: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy, fully_shard

    with gloo(rank, world, store):
        results: dict[Any, Any] = {}

        def fsdp1(case: str) -> nn.Module:
            orig, strategy = FSDP1_CASES[case]
            return FSDP(
                make_model(),
                use_orig_params=orig,
                sharding_strategy=ShardingStrategy[strategy],
                device_id=torch.device("cpu"),
            )

        for case in FSDP1_CASES:
            for name, make in MAKERS.items():
                results[(case, name)] = _outcome(make, fsdp1(case).parameters())
        # the library's param groups (a group of 1-D params), and the way out it names
        with_groups = partial(AdamP, lr=1e-2)
        results["param_groups"] = _outcome(with_groups, param_groups(fsdp1("views, FULL_SHARD")))
        unprojected = partial(AdamP, projection=False)
        results["projection off"] = _outcome(unprojected, fsdp1("views, FULL_SHARD").parameters())
        results["NO_SHARD param_groups"] = _outcome(
            with_groups, param_groups(fsdp1("views, NO_SHARD"))
        )
        # NO_SHARD trains as one process; FSDP2 neither warns nor errs
        for name, make in MAKERS.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                net = fsdp1("views, NO_SHARD")
                train(net, make(net.parameters()), STEPS, torch.float64)
                model = make_model()
                fully_shard(model)
                train(model, make(model.parameters()), 1, torch.float64)
            trained = [p.detach().clone() for p in net.parameters()]
            results[("trained", name)] = (trained, flat_count(caught))
        torch.save(results, f"{out}.{rank}")
    os._exit(0)  # see test_distributed.gloo


@pytest.mark.slow
def test_fsdp1_flattened_params_are_refused_and_fsdp2_stays_silent(tmp_path: Path) -> None:
    out, store = str(tmp_path / "fsdp1"), str(tmp_path / "fsdp1.store")
    mp.spawn(_fsdp_worker, args=(2, store, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    reference = single_process()
    for rank, results in enumerate(ranks):
        for case, (orig, _) in FSDP1_CASES.items():
            for name in MAKERS:
                kind, detail = results[(case, name)]
                if case == "views, NO_SHARD":
                    assert (kind, detail) == ("ok", 0), (rank, case, name)
                    continue
                assert kind == "error", (rank, case, name, detail)
                assert detail.startswith(f"{name} cannot project FSDP1's flattened parameters")
                what = "FlatParameter" if not orig else "1-D shard"
                assert what in detail, detail
                for way_out in ("fully_shard", "use_orig_params=True", "NO_SHARD"):
                    assert way_out in detail, detail
        kind, detail = results["param_groups"]
        assert kind == "error" and "param group 0" in detail, detail
        assert results["projection off"] == ("ok", 0)
        assert results["NO_SHARD param_groups"] == ("ok", 0)
        for name in MAKERS:
            trained, warned = results[("trained", name)]
            assert warned == 0, (rank, name)
            expected = reference[("sgdp" if name == "SGDP" else "adamp", False)][0]
            for i, (p, r) in enumerate(zip(trained, expected, strict=True)):
                assert p.shape == r.shape
                torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12, msg=f"{name} {i}")
