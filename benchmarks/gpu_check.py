"""GPU behaviour of adampx's AdamP and SGDP: host syncs, CUDA-graph capture, step time, memory.

    python benchmarks/gpu_check.py                        # every check, every shape set
    python benchmarks/gpu_check.py --sets resnet50 --rounds 50 --device cuda:1

Needs an NVIDIA GPU. Without CUDA the script says so and exits with status 0. It prints a
report in six parts; the paths checked are each optimizer's default (on CUDA, the ``triton``
backend where Triton is installed, else the multi-tensor eager math: the header says
which), AdamP with ``nesterov=True`` (timm's default, also ``triton``), the multi-tensor
eager math (``foreach=True, fused=False``) and the per-tensor path (``foreach=False``).
``fused=True`` is adampx's CPU kernel and is not used here.

0. Parity on CUDA: the default path against the reference package ``adamp`` (float64, if
   installed) and against the per-tensor path, channels_last against contiguous, and
   float16 / bfloat16 params against float32 ones.

1. Sync-free: after one warm-up step (which creates the state), further steps run under
   ``torch.cuda.set_sync_debug_mode("error")``, which turns every synchronizing CUDA call
   (``.item()``, a blocking device-to-host copy, ...) into a RuntimeError. A positive
   control first checks that the mode does raise on ``.item()`` with this torch build.
   The default paths are also stepped through ``torch.amp.GradScaler`` (the scaler hands
   its scale and inf flag to the Triton kernels), one step with an inf gradient among them,
   which must leave the params as they were. Target: zero host syncs on every path.
2. CUDA-graph capture: with ``capturable=True``, ``opt.step()`` is warmed up on a side stream
   and captured in a ``torch.cuda.CUDAGraph``, as the PyTorch CUDA-graph docs describe;
   the graph is then replayed with fresh gradients copied into the static ``.grad``
   tensors. Params and optimizer state (``step`` included) are compared with an identical
   optimizer stepped eagerly on the same gradients. Target: every path capturable, and the
   replayed result equal to the eager one within float32 tolerance (relative 1e-5).
3. Step time and memory on the parameter shapes of ResNet-50, ViT-B/16 and an LLM-like set
   (the shape sets of ``benchmarks/step_time.py``): adampx's paths against torch's foreach
   and fused AdamW / SGD and against the reference package ``adamp`` (skipped if it is not
   installed). Candidates are interleaved round by round; each step is timed on the host
   between two ``torch.cuda.synchronize()`` calls, so launch overhead and any host sync
   count. The table gives the median, the ratio to AdamW(fused=True) for the Adam family
   and to SGD(momentum=0.9, fused=True) for the SGD family, and the peak memory one step
   allocates beyond what was allocated before it (``torch.cuda.max_memory_allocated``), and
   the scratch buffers an adampx optimizer keeps between steps ("kept MiB").
   Targets: AdamP default <= 1.5x AdamW(fused=True) and SGDP default <= 1.5x
   SGD(fused=True), on every shape set; >= 5x faster than the reference package; kept
   memory under 1 % of the params.
4. Graph replay time, printed under each set's table: AdamP's default path captured in a
   CUDA graph against AdamW(fused=True, capturable=True) captured the same way (only if
   the capture check of AdamP default passed).
5. With ``--compile SET``: ``torch.compile(opt.step)`` of AdamP (which compiles its eager
   multi-tensor math) and of AdamW(foreach=True) on that shape set, first-call time and
   step time against eager AdamW(fused=True).

The exit status is 1 if a sync-free or capture check failed, else 0 (the timing target is
reported, not enforced).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import adampx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import SHAPE_SETS, Shapes


def load_reference() -> Any:
    """The reference package ``adamp`` (``import adamp as reference``), or None."""
    try:
        return importlib.import_module("adamp")
    except ImportError:  # optional: its rows are skipped
        return None


reference = load_reference()

Factory = Callable[[Sequence[Tensor]], Any]

RTOL = 1e-5  # float32 tolerance of the capture check (normwise, per tensor)
TARGET_RATIO = 1.5  # AdamP (SGDP) default step time / AdamW (SGD) fused step time
REFERENCE_SPEEDUP = 5.0  # the reference package's step time / the default's, at least
KEPT_SHARE = 0.01  # the scratch an optimizer keeps between steps / the params' memory
WARMUP_STEPS = 3  # eager steps on a side stream before a capture
REPLAYS = 5  # graph replays compared with eager steps

# A small model: conv weight + norm gain/bias, linear weights, an embedding, biases.
CHECK_SHAPES: Shapes = [
    (64, 32, 3, 3),
    (64,),
    (64,),
    (256, 576),
    (256,),
    (1000, 64),
    (10, 256),
    (10,),
]


@dataclass
class CheckResult:
    section: str
    path: str
    ok: bool
    detail: str


# ---------------------------------------------------------------------------- optimizers


def default_backend() -> str:
    """The backend the default path takes for CUDA float32 tensors here."""
    if torch.cuda.is_available() and "triton" in adampx.backends.available():
        return "triton"
    return "foreach (Triton is not installed)"


def adampx_paths(capturable: bool) -> dict[str, Factory]:
    """The checked paths of AdamP and SGDP: the default (``triton`` on CUDA), AdamP with
    nesterov, the multi-tensor eager math and the per-tensor path."""
    c = capturable
    return {
        "AdamP default": lambda ps: adampx.AdamP(ps, weight_decay=1e-2, capturable=c),
        "AdamP nesterov": lambda ps: adampx.AdamP(
            ps, weight_decay=1e-2, nesterov=True, capturable=c
        ),
        "AdamP foreach": lambda ps: adampx.AdamP(
            ps, weight_decay=1e-2, foreach=True, fused=False, capturable=c
        ),
        "AdamP per-tensor": lambda ps: adampx.AdamP(
            ps, weight_decay=1e-2, foreach=False, capturable=c
        ),
        "SGDP default": lambda ps: adampx.SGDP(
            ps, lr=0.1, momentum=0.9, weight_decay=1e-2, capturable=c
        ),
        "SGDP foreach": lambda ps: adampx.SGDP(
            ps, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True, fused=False, capturable=c
        ),
        "SGDP per-tensor": lambda ps: adampx.SGDP(
            ps, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False, capturable=c
        ),
    }


def timing_candidates() -> dict[str, tuple[str, Factory]]:
    """name -> (family, constructor) for the timing table. Families: "adam", "sgd"."""
    paths = adampx_paths(capturable=False)
    adam: dict[str, Factory] = {
        **{k: v for k, v in paths.items() if k.startswith("AdamP")},
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, weight_decay=1e-2, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, weight_decay=1e-2, fused=True),
    }
    sgd: dict[str, Factory] = {
        **{k: v for k, v in paths.items() if k.startswith("SGDP")},
        "SGD foreach": lambda ps: torch.optim.SGD(
            ps, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True
        ),
        "SGD fused": lambda ps: torch.optim.SGD(
            ps, lr=0.1, momentum=0.9, weight_decay=1e-2, fused=True
        ),
    }
    if reference is not None:
        ref = reference
        adam["reference AdamP"] = lambda ps: ref.AdamP(ps, weight_decay=1e-2)
        sgd["reference SGDP"] = lambda ps: ref.SGDP(ps, lr=0.1, momentum=0.9, weight_decay=1e-2)
    return {
        **{name: ("adam", make) for name, make in adam.items()},
        **{name: ("sgd", make) for name, make in sgd.items()},
    }


FUSED = {"adam": "AdamW fused", "sgd": "SGD fused"}


# ---------------------------------------------------------------------------- helpers


def make_params(shapes: Shapes, device: torch.device, seed: int) -> list[Tensor]:
    """Float32 params of the given shapes, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def make_grads(params: Sequence[Tensor], steps: int, seed: int) -> list[list[Tensor]]:
    """``steps`` lists of gradients for ``params``.

    The first param's gradients are made orthogonal to its initial value (as a whole), so
    that the scale-invariance test fires and the projection branch really runs.
    """
    gen = torch.Generator().manual_seed(seed)
    p0 = params[0].detach().cpu()
    out = []
    for _ in range(steps):
        grads = [1e-2 * torch.randn(p.shape, generator=gen) for p in params]
        grads[0] -= (grads[0] * p0).sum() / (p0 * p0).sum() * p0
        out.append([g.to(params[0].device) for g in grads])
    return out


def copy_grads_(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Copy ``grads`` into the (static) ``.grad`` tensors of ``params``; device to device."""
    for p, g in zip(params, grads, strict=True):
        assert p.grad is not None
        p.grad.copy_(g)


def capture_step(opt: Any, params: Sequence[Tensor], warmup: Sequence[Sequence[Tensor]]) -> Any:
    """Warm ``opt.step()`` up on a side stream, then capture it; returns the CUDAGraph.

    The warm-up steps are real steps (they change params and state); the capture itself
    runs nothing. ``params`` must already hold their static ``.grad`` tensors.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for grads in warmup:
            copy_grads_(params, grads)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def state_tensors(opt: Any, params: Sequence[Tensor]) -> list[tuple[str, Tensor]]:
    """(name, tensor) for every state tensor of ``params`` in ``opt``, in param order."""
    out = []
    for i, p in enumerate(params):
        for key, value in sorted(opt.state[p].items()):
            if isinstance(value, Tensor):
                out.append((f"state[{i}][{key!r}]", value))
    return out


def normwise_rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max |b| (0 when both are zero)."""
    diff = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def short(exc: BaseException) -> str:
    """The first line of an exception, with its type and the innermost adampx frame."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "adampx" in Path(f.filename).parts and Path(f.filename).name != Path(__file__).name
    ]
    if frames:
        f = frames[-1]
        text += f" (at adampx/{Path(f.filename).name}:{f.lineno}, in {f.name})"
    return text


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------------------- 0. parity


def run_steps(
    make: Factory, shapes: Shapes, grads: Sequence[Sequence[Tensor]], device: torch.device,
    dtype: torch.dtype, channels_last: bool = False,
) -> list[Tensor]:  # fmt: skip
    """Params after stepping ``make``'s optimizer on ``grads`` (same start for every call)."""
    params = [p.detach().to(dtype) for p in make_params(shapes, device, seed=0)]
    if channels_last:
        params = [p.to(memory_format=torch.channels_last) if p.dim() == 4 else p for p in params]
    params = [torch.nn.Parameter(p) for p in params]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.to(dtype).contiguous(memory_format=_memory_format(p))
        opt.step()
    return [p.detach() for p in params]


def _memory_format(p: Tensor) -> torch.memory_format:
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def worst_difference(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> tuple[int, float]:
    """(index, normwise relative difference) of the worst pair."""
    diffs = [normwise_rel_diff(a, e) for a, e in zip(actual, expected, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return worst, diffs[worst]


F32, F64 = torch.float32, torch.float64


def parity_kwargs() -> dict[str, dict[str, Any]]:
    """The hyperparameters of the parity checks, per optimizer."""
    return {
        "AdamP": dict(lr=1e-2, weight_decay=1e-2),
        "SGDP": dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    }


def parity_optimizers() -> dict[str, tuple[Factory, Factory, Factory | None]]:
    """name -> (default path, per-tensor path, reference package or None) for the parity."""
    adam, sgd = parity_kwargs()["AdamP"], parity_kwargs()["SGDP"]
    ref = reference
    return {
        "AdamP": (
            lambda ps: adampx.AdamP(ps, **adam),
            lambda ps: adampx.AdamP(ps, **adam, foreach=False),
            None if ref is None else lambda ps: ref.AdamP(ps, **adam),
        ),
        "SGDP": (
            lambda ps: adampx.SGDP(ps, **sgd),
            lambda ps: adampx.SGDP(ps, **sgd, foreach=False),
            None if ref is None else lambda ps: ref.SGDP(ps, **sgd),
        ),
    }


def check_parity(device: torch.device, steps: int = 5) -> list[CheckResult]:
    """adampx on CUDA against the reference package (float64), and across layouts and dtypes."""
    print(
        f"\n0. parity on CUDA ({steps} steps; the first tensor's gradients are orthogonal to "
        "it, so its projection fires)"
    )
    results = []
    grads = make_grads(make_params(CHECK_SHAPES, device, seed=0), steps, seed=1)
    for name, (ours, per_tensor, ref) in parity_optimizers().items():
        # label, (optimizer, dtype, channels_last) run and compared with the expected run
        Run = tuple[Factory, torch.dtype, bool]
        comparisons: list[tuple[str, Run, Run, float]] = []
        if ref is not None:
            comparisons.append(
                (f"{name} float64 vs reference", (ours, F64, False), (ref, F64, False), 1e-10)
            )
        base32: Run = (ours, F32, False)
        comparisons += [
            (f"{name} default vs per-tensor, float64", (ours, F64, False), (per_tensor, F64, False),
             1e-10),
            (f"{name} channels_last vs contiguous, float32", (ours, F32, True), base32, 1e-5),
            (f"{name} float16 vs float32", (ours, torch.float16, False), base32, 3e-2),
            (f"{name} bfloat16 vs float32", (ours, torch.bfloat16, False), base32, 3e-2),
        ]  # fmt: skip
        for label, run, expected_run, tol in comparisons:
            try:
                actual = [
                    p.to(F64) for p in run_steps(run[0], CHECK_SHAPES, grads, device, *run[1:])
                ]
                expected = run_steps(
                    expected_run[0], CHECK_SHAPES, grads, device, *expected_run[1:]
                )
                finite = all(bool(torch.isfinite(a).all()) for a in actual)
                index, diff = worst_difference(actual, expected)
                ok = finite and diff <= tol
                detail = f"max relative difference {diff:.2e} (param[{index}]), tolerance {tol:g}"
                detail += "" if finite else ", NOT FINITE"
                result = CheckResult("parity", label, ok, detail)
            except Exception as exc:
                result = CheckResult("parity", label, False, short(exc))
            print(f"  {label:<44}{'PASS' if result.ok else 'FAIL'}  {result.detail}")
            results.append(result)
    if reference is None:
        print("  (the comparisons with the reference package were skipped: adamp is not installed)")
    return results


# ---------------------------------------------------------------------------- 1. sync-free


def sync_debug_mode_works(device: torch.device) -> bool:
    """Positive control: the "error" mode must raise on ``.item()``."""
    x = torch.ones(4, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x.sum().item()
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return False


def check_sync_free(device: torch.device, steps: int = 3) -> list[CheckResult]:
    """Steps after the first under ``set_sync_debug_mode("error")``, per path."""
    print("\n1. sync-free steps (torch.cuda.set_sync_debug_mode('error') after a warm-up step)")
    if not sync_debug_mode_works(device):
        print("  the positive control failed: .item() did not raise; the check means nothing")
        return [CheckResult("sync-free", "positive control", False, ".item() did not raise")]
    print("  positive control: .item() raises under the mode, as it should")
    results = []
    for label, make in adampx_paths(capturable=False).items():
        try:
            params = make_params(CHECK_SHAPES, device, seed=0)
            grads = make_grads(params, steps + 1, seed=1)
            opt = make(params)
            for p, g in zip(params, grads[0], strict=True):
                p.grad = g
            opt.step()  # creates the state
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                for step_grads in grads[1:]:
                    for p, g in zip(params, step_grads, strict=True):
                        p.grad = g
                    opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize(device)
            finite = all(bool(torch.isfinite(p).all()) for p in params)
            result = CheckResult(
                "sync-free",
                label,
                finite,
                f"{steps} steps, no sync" + ("" if finite else ", but params are not finite"),
            )
        except Exception as exc:  # a sync raises RuntimeError; report anything else too
            result = CheckResult("sync-free", label, False, short(exc))
        print(f"  {label:<20}{'PASS' if result.ok else 'FAIL'}  {result.detail}")
        results.append(result)
    for label in ("AdamP default", "SGDP default"):
        result = check_grad_scaler(label, adampx_paths(capturable=False)[label], device, steps)
        print(f"  {result.path:<20}{'PASS' if result.ok else 'FAIL'}  {result.detail}")
        results.append(result)
    return results


def check_grad_scaler(label: str, make: Factory, device: torch.device, steps: int) -> CheckResult:
    """``steps`` GradScaler steps under the sync debug mode after a warm-up step, the last
    one with an inf gradient: no sync, and that step leaves the params as they were."""
    path = f"{label} + GradScaler"
    try:
        params = make_params(CHECK_SHAPES, device, seed=0)
        grads = make_grads(params, steps + 1, seed=1)
        opt = make(params)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
        if not opt._step_supports_amp_scaling:
            return CheckResult("sync-free", path, False, "the scaler's flag is read on the host")

        def scaled_step(step_grads: Sequence[Tensor], poison: bool) -> None:
            opt.zero_grad()
            loss = sum((p * g).sum() for p, g in zip(params, step_grads, strict=True))
            scaler.scale(loss).backward()  # type: ignore[arg-type]
            if poison:
                params[0].grad[0].fill_(float("inf"))
            scaler.step(opt)
            scaler.update()

        scaled_step(grads[0], poison=False)  # creates the state
        torch.cuda.synchronize(device)
        before: list[Tensor] = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for k, step_grads in enumerate(grads[1:]):
                poison = k == len(grads) - 2  # the last step
                if poison:
                    before = [p.detach().clone() for p in params]
                scaled_step(step_grads, poison)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
        kept = all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        ok = kept and finite
        detail = f"{steps} steps, no sync, the inf step skipped"
        if not ok:
            detail = "the inf step changed the params" if not kept else "params are not finite"
        return CheckResult("sync-free", path, ok, detail)
    except Exception as exc:
        return CheckResult("sync-free", path, False, short(exc))


# ---------------------------------------------------------------------------- 2. capture


def check_capture(device: torch.device) -> list[CheckResult]:
    """Graph-captured ``step()`` with ``capturable=True`` against the same steps run eagerly."""
    print(
        f"\n2. CUDA-graph capture (capturable=True; {WARMUP_STEPS} warm-up steps on a side "
        f"stream, capture, {REPLAYS} replays with fresh gradients) vs eager, rtol {RTOL:g}"
    )
    results = []
    for label, make in adampx_paths(capturable=True).items():
        try:
            grads_params = make_params(CHECK_SHAPES, device, seed=0)
            grads = make_grads(grads_params, WARMUP_STEPS + REPLAYS, seed=1)
            del grads_params

            # eager: every step run directly, on the same gradients
            eager_params = make_params(CHECK_SHAPES, device, seed=0)
            for p in eager_params:
                p.grad = torch.zeros_like(p)
            eager = make(eager_params)
            for step_grads in grads:
                copy_grads_(eager_params, step_grads)
                eager.step()

            # graph: warm-up steps, capture, then replays with fresh gradients
            graph_params = make_params(CHECK_SHAPES, device, seed=0)
            for p in graph_params:
                p.grad = torch.zeros_like(p)  # static: the graph reads these addresses
            opt = make(graph_params)
            graph = capture_step(opt, graph_params, grads[:WARMUP_STEPS])
            for step_grads in grads[WARMUP_STEPS:]:
                copy_grads_(graph_params, step_grads)
                graph.replay()
            torch.cuda.synchronize(device)

            graph_state = state_tensors(opt, graph_params)
            eager_state = state_tensors(eager, eager_params)
            if [n for n, _ in graph_state] != [n for n, _ in eager_state]:
                raise RuntimeError("the graph and eager optimizers hold different state keys")
            pairs = [
                (f"param[{i}]", g, e)
                for i, (g, e) in enumerate(zip(graph_params, eager_params, strict=True))
            ]
            pairs += [(n, g, e) for (n, g), (_, e) in zip(graph_state, eager_state, strict=True)]
            worst_name, worst = max(
                ((name, normwise_rel_diff(g, e)) for name, g, e in pairs), key=lambda x: x[1]
            )
            identical = all(torch.equal(g, e) for _, g, e in pairs)
            ok = worst <= RTOL
            detail = f"max relative difference {worst:.2e} ({worst_name})"
            detail += ", bitwise identical" if identical else ""
            result = CheckResult("capture", label, ok, detail)
        except Exception as exc:
            result = CheckResult("capture", label, False, short(exc))
        print(f"  {label:<20}{'PASS' if result.ok else 'FAIL'}  {result.detail}")
        results.append(result)
    return results


# ---------------------------------------------------------------------------- 3. timing


def timed_step(opt: Any, device: torch.device) -> float:
    """Seconds of one ``opt.step()``, host time between two device synchronizations."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    opt.step()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_peak_mib(opt: Any, device: torch.device) -> float:
    """MiB one step allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    opt.step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def workspace_mib(opt: Any) -> float:
    """MiB of the scratch buffers an adampx optimizer keeps between steps (0 for others)."""
    workspace = getattr(opt, "_workspace", None)
    buffers = getattr(workspace, "_buffers", {})
    return sum(b.numel() * b.element_size() for b in buffers.values()) / 2**20


def time_set(name: str, rounds: int, device: torch.device) -> dict[str, float]:
    """Interleaved step times and peak memory of every candidate; returns median ms."""
    shapes = SHAPE_SETS[name]()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"\n{name}: {n_params / 1e6:.1f}M parameters in {len(shapes)} tensors, {rounds} rounds")
    torch.manual_seed(0)
    grads = [1e-3 * torch.randn(s, device=device) for s in shapes]
    runs: dict[str, tuple[str, Any]] = {}
    for label, (family, make) in timing_candidates().items():
        torch.manual_seed(1)  # the same params for every candidate
        params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device)) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # shared by all candidates (no step writes to it): saves memory
        opt = make(params)
        opt.step()  # creates the state; not timed
        opt.step()  # one more untimed step: kernels loaded, allocator warm
        runs[label] = (family, opt)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, (_, opt) in runs.items():
            times[label].append(timed_step(opt, device))
    medians = {label: median_ms(ts) for label, ts in times.items()}
    mib = {label: step_peak_mib(opt, device) for label, (_, opt) in runs.items()}
    kept = {label: workspace_mib(opt) for label, (_, opt) in runs.items()}

    print(f"  {'candidate':<20}{'median ms':>10}{'× fused':>9}{'peak MiB':>10}{'kept MiB':>10}")
    for label, (family, _) in runs.items():
        ratio = medians[label] / medians[FUSED[family]]
        print(
            f"  {label:<20}{medians[label]:>10.3f}{ratio:>9.2f}{mib[label]:>10.1f}"
            f"{kept[label]:>10.1f}"
        )
    if reference is None:
        print("  (reference AdamP / SGDP skipped: the package adamp is not installed)")
    params_mib = sum(math.prod(s) for s in shapes) * 4 / 2**20
    for ours, fused, ref in (("AdamP default", "AdamW fused", "reference AdamP"),
                             ("AdamP nesterov", "AdamW fused", None),
                             ("SGDP default", "SGD fused", "reference SGDP")):  # fmt: skip
        ratio = medians[ours] / medians[fused]
        verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
        print(f"  target {ours} <= {TARGET_RATIO}x {fused}: {ratio:.2f}x  {verdict}")
        if ref is not None and ref in medians:
            speedup = medians[ref] / medians[ours]
            verdict = "PASS" if speedup >= REFERENCE_SPEEDUP else "MISS"
            print(f"  target {ours} >= {REFERENCE_SPEEDUP}x faster than {ref}: "
                  f"{speedup:.1f}x  {verdict}")  # fmt: skip
        share = kept[ours] / params_mib
        verdict = "PASS" if share < KEPT_SHARE else "MISS"
        print(f"  target {ours} kept memory < {KEPT_SHARE:.0%} of the params: {share:.2%}  "
              f"{verdict}")  # fmt: skip
    return medians


# ---------------------------------------------------------------------------- 4. graph replay


def time_graph_replay(name: str, rounds: int, device: torch.device, eager_ms: float) -> None:
    """Replay time of a captured AdamP default step vs captured AdamW(fused=True)."""
    shapes = SHAPE_SETS[name]()
    makers: dict[str, Factory] = {
        "AdamP default": lambda ps: adampx.AdamP(ps, weight_decay=1e-2, capturable=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(
            ps, weight_decay=1e-2, fused=True, capturable=True
        ),
    }
    torch.manual_seed(0)
    grads = [1e-3 * torch.randn(s, device=device) for s in shapes]
    graphs = {}
    for label, make in makers.items():
        torch.manual_seed(1)
        params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device)) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()  # static gradients owned by this graph
        opt = make(params)
        graphs[label] = (capture_step(opt, params, [grads] * WARMUP_STEPS), opt, params)
    times: dict[str, list[float]] = {label: [] for label in graphs}
    for _ in range(rounds + 1):
        for label, (graph, _, _) in graphs.items():
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize(device)
            times[label].append(time.perf_counter() - start)
    medians = {label: median_ms(ts[1:]) for label, ts in times.items()}  # first: warm-up
    adamp_ms, adamw_ms = medians["AdamP default"], medians["AdamW fused"]
    print(
        f"  graph replay: AdamP default {adamp_ms:.3f} ms (eager {eager_ms:.3f} ms), "
        f"AdamW fused capturable {adamw_ms:.3f} ms, ratio {adamp_ms / adamw_ms:.2f}x"
    )


# ---------------------------------------------------------------------------- 5. compiled


def time_compiled(name: str, rounds: int, device: torch.device) -> None:
    """``torch.compile(opt.step)`` of AdamP (default) and AdamW (foreach) vs eager fused AdamW.

    Prints each compiled step's first-call time (the compilation) and median step time.
    """
    shapes = SHAPE_SETS[name]()
    print(f"\n5. compiled steps, {name} ({len(shapes)} tensors), {rounds} rounds")
    makers: dict[str, tuple[Factory, bool]] = {
        "AdamP compiled": (lambda ps: adampx.AdamP(ps, weight_decay=1e-2), True),
        "AdamW foreach compiled": (
            lambda ps: torch.optim.AdamW(ps, weight_decay=1e-2, foreach=True),
            True,
        ),
        "AdamW fused": (lambda ps: torch.optim.AdamW(ps, weight_decay=1e-2, fused=True), False),
    }
    torch.manual_seed(0)
    grads = [1e-3 * torch.randn(s, device=device) for s in shapes]
    steps: dict[str, Callable[[], Any]] = {}
    for label, (make, compiled) in makers.items():
        torch.manual_seed(1)
        params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device)) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt = make(params)
        step = torch.compile(opt.step) if compiled else opt.step
        try:
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            first = time.perf_counter() - start
            step()  # a second call: any recompilation for the state's steady form happens here
        except Exception as exc:
            print(f"  {label:<24}failed: {short(exc)}")
            print("    " + str(exc)[-2000:].replace("\n", "\n    "))
            continue
        print(f"  {label:<24}first call (compile) {first:.1f} s")
        steps[label] = step
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            times[label].append(time.perf_counter() - start)
    if "AdamW fused" not in times:
        return
    base = median_ms(times["AdamW fused"])
    for label, ts in times.items():
        print(f"  {label:<24}{median_ms(ts):>10.3f} ms{median_ms(ts) / base:>8.2f}x AdamW fused")


# ---------------------------------------------------------------------------- main


def header(device: torch.device) -> None:
    props = torch.cuda.get_device_properties(device)
    try:
        ref = f"adamp {importlib.metadata.version('adamp')}"
    except importlib.metadata.PackageNotFoundError:
        ref = "adamp not installed" if reference is None else "adamp (no package metadata)"
    print(
        f"{date.today()}, {torch.cuda.get_device_name(device)} "
        f"(compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, adampx {adampx.__version__}, {ref}; "
        f"the default path takes {default_backend()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", nargs="+", default=list(SHAPE_SETS), choices=list(SHAPE_SETS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--compile",
        choices=list(SHAPE_SETS),
        help="also time torch.compile(opt.step) on this shape set (compiles for a minute or more)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error(f"--device must be a CUDA device, got {args.device!r}")
    if not torch.cuda.is_available():
        print(
            "CUDA is not available (torch reports no usable NVIDIA GPU): "
            "nothing to check; run this script on a machine with an NVIDIA GPU."
        )
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if device.index is not None:
        torch.cuda.set_device(device)
    device = torch.device("cuda", torch.cuda.current_device())

    header(device)
    results = check_parity(device)
    results += check_sync_free(device)
    results += check_capture(device)
    capture_ok = any(r.ok and r.path == "AdamP default" for r in results if r.section == "capture")

    print("\n3. step time (host time between synchronizations) and peak extra memory of a step")
    for name in args.sets:
        try:
            medians = time_set(name, args.rounds, device)
            if capture_ok:
                time_graph_replay(name, args.rounds, device, medians["AdamP default"])
            else:
                print("  graph replay: skipped (the capture of AdamP default failed)")
        except Exception as exc:
            print(f"  {name}: failed: {short(exc)}")
            traceback.print_exc()
        torch.cuda.empty_cache()

    if args.compile:
        try:
            time_compiled(args.compile, args.rounds, device)
        except Exception as exc:
            print(f"  compiled steps failed: {short(exc)}")
            traceback.print_exc()

    failed = [r for r in results if not r.ok]
    print(f"\nsummary: {len(results) - len(failed)} of {len(results)} checks passed")
    for r in failed:
        print(f"  FAIL {r.section}, {r.path}: {r.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
