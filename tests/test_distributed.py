"""AdamP and SGDP under real process groups (gloo on CPU): DDP, FSDP2, ZeRO, DCP.

Every rank sees the same global batch, so the gradients are those of one process; the
sharded runs must then give the single-process parameters to 1e-10 relative in float64, and
the projection must fire on the same tensors in the same view. The workers run in processes
spawned by the test; each writes its result to a file the test compares against a
single-process run computed here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adampx import SGDP, AdamP, Projected

STEPS = 5
CONFIGS: dict[str, Callable[[Any, bool], torch.optim.Optimizer]] = {
    "adamp": lambda ps, fe: AdamP(ps, lr=1e-2, weight_decay=0.1, foreach=fe, track_statistics=True),
    "sgdp": lambda ps, fe: SGDP(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=fe,
        track_statistics=True,
    ),
}  # fmt: skip


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv+BatchNorm (channel invariant), linear+LayerNorm (layer invariant), a head.

    Row counts 5, 7 and 2 shard unevenly over 2 and 3 ranks, and the head's 2 rows leave the
    third rank an empty shard.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7, bias=False),
        nn.LayerNorm(7),
        nn.ReLU(),
        nn.Linear(7, 2),
    ).to(dtype)


def batch(i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 3, 6, 6, generator=gen).to(dtype), torch.randint(
        0, 2, (8,), generator=gen
    )


def train(model: nn.Module, opt: Any, steps: int, dtype: torch.dtype) -> list[dict[str, str]]:
    """Train; return per step the view each tensor was projected in (the statistics)."""
    views = []
    for i in range(steps):
        x, y = batch(i, dtype)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if hasattr(opt, "statistics"):
            views.append({s.name: s.view for s in opt.statistics()})
    return views


@contextlib.contextmanager
def gloo(rank: int, world: int, store: str) -> Iterator[None]:
    """A worker's gloo process group through a file store (no port to race for), one
    thread; on leaving, a barrier (no rank tears gloo down while another still talks to it),
    then the group destroyed. The worker then ends with ``os._exit(0)``, skipping the
    interpreter's teardown: now and then a gloo thread still joinable there aborts the
    process ("terminate called without an active exception") after all work is done."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def counted_step(net: nn.Module, opt: Any, i: int, dtype: torch.dtype) -> int:
    """One more step on batch ``i``, its collectives counted (the batched projection's
    all-reduces; statistics, which gather norms, turned off first)."""
    from torch.distributed.tensor.debug import CommDebugMode

    for group in opt.param_groups:
        group["track_statistics"] = False
    x, y = batch(i, dtype)
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    with CommDebugMode() as comm:
        opt.step()
    return int(comm.get_total_counts())


def _worker(rank: int, world: int, store: str, scheme: str, out: str) -> None:
    with gloo(rank, world, store):
        results: dict[Any, Any] = {}
        collectives: dict[str, int] = {}
        for name, make in CONFIGS.items():
            for foreach in (False, True):
                dtype, steps = (torch.float32, 1) if scheme == "fsdp32" else (torch.float64, STEPS)
                model = make_model(dtype)
                if scheme == "ddp":
                    net: nn.Module = nn.parallel.DistributedDataParallel(model)
                    opt = make(model.parameters(), foreach)
                elif scheme.startswith("fsdp"):
                    from torch.distributed.fsdp import fully_shard
                    from torch.distributed.tensor import Shard

                    placement = None
                    if scheme == "fsdp_shard1":  # dim 1 where it divides evenly (FSDP's rule)

                        def placement(p: torch.Tensor) -> Shard:
                            even = p.dim() > 1 and p.shape[1] % world == 0
                            return Shard(1) if even else Shard(0)

                    net = fully_shard(model, shard_placement_fn=placement)
                    opt = make(model.parameters(), foreach)
                else:  # zero
                    from torch.distributed.optim import ZeroRedundancyOptimizer

                    net = model
                    cls = AdamP if name == "adamp" else SGDP
                    kwargs = make([torch.zeros(1, requires_grad=True)], foreach).defaults
                    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
                views = train(net, opt, steps, dtype)
                if scheme == "zero":
                    views = []  # each rank's local optimizer sees only its own params
                params = [full(p).detach().clone() for p in model.parameters()]
                results[(name, foreach)] = (params, views)
                if scheme.startswith("fsdp") and foreach:
                    collectives[name] = counted_step(net, opt, steps, dtype)
        if rank == 0:
            torch.save((results, collectives), out)
    os._exit(0)  # see gloo


def run_scheme(scheme: str, world: int, tmp_path: Path) -> tuple[dict[Any, Any], dict[str, int]]:
    out = str(tmp_path / f"{scheme}-{world}.pt")
    store = str(tmp_path / f"{scheme}-{world}.store")
    mp.spawn(_worker, args=(world, store, scheme, out), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


def single_process(dtype: torch.dtype = torch.float64, steps: int = STEPS) -> dict[Any, Any]:
    results = {}
    for name, make in CONFIGS.items():
        for foreach in (False, True):
            model = make_model(dtype)
            views = train(model, make(model.parameters(), foreach), steps, dtype)
            results[(name, foreach)] = ([p.detach().clone() for p in model.parameters()], views)
    return results


@pytest.fixture(scope="module")
def reference() -> dict[Any, Any]:
    return single_process()


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme, world",
    [
        ("ddp", 2),
        ("ddp", 3),
        ("fsdp", 2),
        ("fsdp", 3),
        ("fsdp_shard1", 2),
        ("zero", 2),
        ("zero", 3),
    ],
)
def test_sharded_training_equals_one_process(
    scheme: str, world: int, tmp_path: Path, reference: dict[Any, Any]
) -> None:
    results, collectives = run_scheme(scheme, world, tmp_path)
    assert set(results) == set(reference)
    if scheme.startswith("fsdp"):  # sharded: the whole step's projection in two all-reduces
        assert collectives == {"adamp": 2, "sgdp": 2}
    for key, (params, views) in results.items():
        ref_params, ref_views = reference[key]
        for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
            torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12, msg=f"{key} param {i}")
        if views:  # the same tensors projected in the same view at every step
            assert views == ref_views, key
    fired = [v for step in reference[("adamp", False)][1] for v in step.values()]
    assert "channel" in fired and "layer" in fired  # the comparison is not vacuous


@pytest.mark.slow
def test_float32_step_agrees_to_a_few_ulp(tmp_path: Path) -> None:
    """One float32 step under FSDP2 (3 ranks) on the gradients of one process."""
    results, _ = run_scheme("fsdp32", 3, tmp_path)
    reference = single_process(torch.float32, 1)
    for key, (params, views) in results.items():
        for i, (p, r) in enumerate(zip(params, reference[key][0], strict=True)):
            # a few float32 ulp (2^-23 ≈ 1.2e-7): sums over shards round in another order
            torch.testing.assert_close(p, r, rtol=5e-7, atol=1e-7, msg=f"{key} param {i}")
        assert views == reference[key][1], key


def _dcp_worker(rank: int, world: int, store: str, phase: str, ckpt: str, out: str) -> None:
    """Phase "save": 2 steps, then a DCP checkpoint; phase "load": load it, 3 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    with gloo(rank, world, store):
        model = make_model()
        fully_shard(model)
        opt = CONFIGS["adamp"](model.parameters(), False)
        if phase == "save":
            train(model, opt, 2, torch.float64)
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
        else:
            model_sd, optim_sd = get_state_dict(model, opt)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(
                model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            for i in range(2, STEPS):  # the batches the uninterrupted run saw next
                x, y = batch(i, torch.float64)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            params = [full(p).detach().clone() for p in model.parameters()]
            if rank == 0:
                torch.save(params, out)
    os._exit(0)


@pytest.mark.slow
def test_dcp_checkpoint_resumes_on_another_number_of_ranks(
    tmp_path: Path, reference: dict[Any, Any]
) -> None:
    """Saved with torch.distributed.checkpoint on 2 ranks, resumed on 3: as if uninterrupted."""
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "params.pt")
    for phase, world in (("save", 2), ("load", 3)):
        store = str(tmp_path / f"{phase}.store")
        mp.spawn(_dcp_worker, args=(world, store, phase, ckpt, out), nprocs=world, join=True)
    params = torch.load(out, weights_only=True)
    for i, (p, r) in enumerate(zip(params, reference[("adamp", False)][0], strict=True)):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12, msg=f"param {i}")


def make_projected(ps: Any, foreach: bool, delta: float = 0.1) -> Projected:
    """``Projected(AdamW)`` with the math of ``CONFIGS["adamp"]`` (AdamW's defaults are
    AdamP's), whose single-process run is in the ``reference`` fixture."""
    inner = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, foreach=foreach)
    return Projected(inner, weight_decay=0.1, delta=delta)


def _projected_worker(rank: int, world: int, store: str, out: str) -> None:
    """FSDP2 (``fully_shard``) training with :func:`make_projected`, per foreach setting."""
    from torch.distributed.fsdp import fully_shard

    with gloo(rank, world, store):
        results = {}
        for foreach in (False, True):
            model = make_model()
            net = fully_shard(model)
            train(net, make_projected(model.parameters(), foreach), STEPS, torch.float64)
            results[foreach] = [full(p).detach().clone() for p in model.parameters()]
        if rank == 0:
            torch.save(results, out)
    os._exit(0)


@pytest.mark.slow
def test_projected_adamw_under_fsdp2_equals_one_process(
    tmp_path: Path, reference: dict[Any, Any]
) -> None:
    """``Projected(AdamW)`` on 2 FSDP2 ranks: the single-process run of itself, and of
    AdamP (equal math), to 1e-10; the projection fired (delta=0 gives other numbers)."""
    out, store = str(tmp_path / "projected.pt"), str(tmp_path / "projected.store")
    mp.spawn(_projected_worker, args=(2, store, out), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    assert set(results) == {False, True}
    for foreach, params in results.items():
        model, unprojected = make_model(), make_model()
        train(model, make_projected(model.parameters(), foreach), STEPS, torch.float64)
        train(
            unprojected,
            make_projected(unprojected.parameters(), foreach, delta=0.0),
            STEPS,
            torch.float64,
        )
        ref_params, ref_views = reference[("adamp", foreach)]
        for i, (p, q, r) in enumerate(zip(params, model.parameters(), ref_params, strict=True)):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"{foreach} param {i}")
            torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12, msg=f"{foreach} param {i}")
        fired = {v for step in ref_views for v in step.values()}
        assert {"channel", "layer"} <= fired
        conv, fc = params[0], params[3]  # the scale-invariant weights
        for p, u in ((conv, unprojected[0].weight), (fc, unprojected[4].weight)):
            assert (p - u).abs().max() > 1e-6


def _caution_worker(rank: int, world: int, store: str, out: str) -> None:
    """FSDP2 with ``caution=True``: refused when the optimizer is built, and by a step (a
    group switched to caution after construction) before anything changes."""
    from torch.distributed.fsdp import fully_shard

    with gloo(rank, world, store):
        model = make_model()
        fully_shard(model)
        errors = []
        for cls, kwargs in ((AdamP, dict(lr=1e-2)), (SGDP, dict(lr=0.1, momentum=0.9))):
            try:
                cls(model.parameters(), caution=True, **kwargs)
            except ValueError as exc:
                errors.append(str(exc))
            opt = cls(model.parameters(), **kwargs)
            train(model, opt, 1, torch.float64)  # state exists
            before = [full(p).detach().clone() for p in model.parameters()]
            state = [{k: full(v).clone() for k, v in s.items()} for s in opt.state.values()]
            opt.param_groups[0]["caution"] = True
            x, y = batch(1, torch.float64)
            nn.functional.cross_entropy(model(x), y).backward()
            try:
                opt.step()
            except ValueError as exc:
                errors.append(str(exc))
            after = [full(p).detach() for p in model.parameters()]
            unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            for saved, now in zip(state, opt.state.values(), strict=True):
                unchanged &= all(torch.equal(saved[k], full(v)) for k, v in now.items())
            errors.append(f"unchanged={unchanged}")
        if rank == 0:
            torch.save(errors, out)
    os._exit(0)


@pytest.mark.slow
def test_caution_under_fsdp2_is_refused_before_anything_changes(tmp_path: Path) -> None:
    out, store = str(tmp_path / "caution.pt"), str(tmp_path / "caution.store")
    mp.spawn(_caution_worker, args=(2, store, out), nprocs=2, join=True)
    errors = torch.load(out)
    refusal = "caution=True cannot step a sharded param (a DTensor of shape (5, 3, 3, 3))"
    for cls in range(2):
        built, stepped, unchanged = errors[3 * cls : 3 * cls + 3]
        assert refusal in built and "use caution=False under FSDP2" in built
        assert refusal in stepped
        assert unchanged == "unchanged=True"


def _triton_worker(rank: int, world: int, store: str, scheme: str, out: str) -> None:
    """FSDP2 training with every step forced onto the ``triton`` kernels (Triton's
    interpreter on the CPU shards; blocks of 16 elements, so rows of 7 fit one and rows of
    27 and 80 do not)."""
    import adampx
    from adampx.backends import triton

    triton.BLOCK, triton.CHUNK = 16, 40
    with gloo(rank, world, store):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        results: dict[Any, Any] = {}
        collectives: dict[str, int] = {}
        for name, make in CONFIGS.items():
            model = make_model()
            placement = None
            if scheme == "fsdp_shard1":  # dim 1 where it divides evenly: part of each row

                def placement(p: torch.Tensor) -> Shard:
                    return Shard(1) if p.dim() > 1 and p.shape[1] % world == 0 else Shard(0)

            net = fully_shard(model, shard_placement_fn=placement)
            opt = make(model.parameters(), None)
            with adampx.backends.force("triton"):
                views = train(net, opt, STEPS, torch.float64)
                params = [full(p).detach().clone() for p in model.parameters()]
                results[name] = (params, views)
                collectives[name] = counted_step(net, opt, STEPS, torch.float64)
        if rank == 0:
            torch.save((results, collectives), out)
    os._exit(0)  # see gloo


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme, world", [("fsdp", 2), ("fsdp", 3), ("fsdp_shard1", 2), ("fsdp_shard1", 3)]
)
def test_triton_kernels_on_fsdp2_shards_equal_one_process(
    scheme: str, world: int, tmp_path: Path
) -> None:
    """The ``triton`` backend on FSDP2's local shards (whole rows from dim-0 shards, uneven
    and, on 3 ranks, empty; parts of rows from dim-1 shards: on 2 ranks the layer-view
    linear weight's, on 3 the channel-view conv weight's, rows shorter than a block, whose
    dots must not be taken in registers): the rows' sums and dots are
    all-reduced between the passes (two collectives per step), and the training equals one
    process's eager math, projection decisions included."""
    import platform

    from adampx.backends import triton

    if not triton.runs_here():
        assert platform.system() != "Linux" or platform.machine() != "x86_64"
        pytest.skip("the test extra installs triton on Linux x86_64 only")
    out, store = str(tmp_path / "triton.pt"), str(tmp_path / "triton.store")
    mp.spawn(_triton_worker, args=(world, store, scheme, out), nprocs=world, join=True)
    results, collectives = torch.load(out, weights_only=False)
    assert collectives == {"adamp": 2, "sgdp": 2}
    for name, make in CONFIGS.items():
        model = make_model()
        ref_views = train(model, make(model.parameters(), False), STEPS, torch.float64)
        params, views = results[name]
        for i, (p, r) in enumerate(zip(params, model.parameters(), strict=True)):
            torch.testing.assert_close(p, r.detach(), rtol=1e-10, atol=1e-12, msg=f"{name} {i}")
        assert views == ref_views, name
    fired = [v for step in ref_views for v in step.values()]
    assert "channel" in fired and "layer" in fired  # the comparison is not vacuous


def _two_meshes_worker(rank: int, world: int, store: str, out: str) -> None:
    """One group with shards on two meshes: a weight sharded over both ranks, and an
    "expert" on a one-rank mesh of its own, different on each rank."""
    import adampx
    from adampx.backends import triton

    triton.BLOCK, triton.CHUNK = 16, 40
    with gloo(rank, world, store):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "ep"))
        gen = torch.Generator().manual_seed(0)
        shared, shared_grad = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in "ab")
        gen.manual_seed(100 + rank)
        expert = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        expert_grad = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        # orthogonal to the expert's rows: its channel view fires
        dots = (expert_grad * expert).sum(1, keepdim=True)
        expert_grad -= dots / (expert * expert).sum(1, keepdim=True) * expert
        results = {}
        for backend in ("eager", "triton"):
            a = nn.Parameter(distribute_tensor(shared.clone(), mesh["dp"], [Shard(0)]))
            b = nn.Parameter(DTensor.from_local(expert.clone(), mesh["ep"], [Shard(0)]))
            a.grad = distribute_tensor(shared_grad.clone(), mesh["dp"], [Shard(0)])
            b.grad = DTensor.from_local(expert_grad.clone(), mesh["ep"], [Shard(0)])
            opt = AdamP([a, b], lr=0.1, weight_decay=0.1, track_statistics=True)
            with adampx.backends.force(backend):
                opt.step()
            views = [s.view for s in opt.statistics()]
            results[backend] = ([a.to_local().clone(), b.to_local().clone()], views)
        torch.save(results, f"{out}.{rank}")
    os._exit(0)  # see gloo


def test_triton_kernels_reduce_each_mesh_over_its_own_group(tmp_path: Path) -> None:
    """Shards of two device meshes in one param group (as expert parallelism makes them):
    each mesh's rows are all-reduced over that mesh's group, and the step equals the eager
    math's (DTensor's own collectives) on every rank."""
    from adampx.backends import triton

    if not triton.runs_here():
        pytest.skip("the test extra installs triton on Linux x86_64 only")
    out, store = str(tmp_path / "meshes"), str(tmp_path / "meshes.store")
    mp.spawn(_two_meshes_worker, args=(2, store, out), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(f"{out}.{rank}", weights_only=False)
        (eager, eager_views), (ours, views) = results["eager"], results["triton"]
        for a, b in zip(ours, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert views == eager_views and "channel" in views, views
