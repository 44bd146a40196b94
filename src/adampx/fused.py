"""``fused=True``: the whole AdamP / SGDP step in one compiled CPU kernel.

The kernel (``adampx/kernels/projected_step.c``) steps each tested tensor in three stages:
its row sums ``p·p``, ``g·g`` and ``p·g`` (a read of ``p`` and ``g``); the scale-invariance
test on them; then the step with the memory traffic of AdamW / SGD. A tensor the test does
not project takes AdamW's or SGD's one-pass step. One projected per row is stepped row by
row: the moments and the update direction ``d`` of a row (AdamP keeps it in a per-thread
buffer of one row), its dot with ``p`` and the row's coefficient, then the param, while
the row is still in cache. So AdamP reads 6 and writes 3 param-sized arrays where AdamW
reads 4 and writes 3, and SGDP reads 5 and writes 2 where SGD reads 3 and writes 2. A
tensor projected as a whole, or rows longer than :data:`ROW_LIMIT` (rare), take a second
pass that recomputes ``d`` from the updated moments. One call steps the whole param group.

The kernel is plain C with OpenMP. It is compiled on first use with the system C compiler
(``$CC``, else ``cc``; about a second) and cached under ``$ADAMPX_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/adampx`` or ``~/.cache/adampx``, keyed by the source, the compiler, the
flags and the CPU. :func:`load` builds it ahead of time and returns where it lies.

Float32 and float64 run natively; float16/bfloat16 params run on float32 copies with their
float32 state, complex params on their real views. Params whose compute views do not share
one dense layout (contiguous or channels_last) with their gradient and state take the plain
per-tensor code. The kernel is for CPU tensors; on CUDA, use the default multi-tensor path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adampx._shared_step import Decisions
from adampx._tensors import Workspace, scratch
from adampx.projection import Decision, is_projectable

__all__ = ["KernelBuildError", "build_seconds", "cache_dir", "load"]

# -fno-math-errno lets sqrt vectorise; it changes no result (IEEE sqrt is exact either way)
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp")
_FALLBACK_FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared")  # no OpenMP: one thread
_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_PTR = ctypes.c_void_p


class KernelBuildError(RuntimeError):
    """The C compiler could not build the fused kernel."""


# AdamP steps rows up to this many elements in cache, in a per-thread buffer of one row
# (a float32 row of this length is 256 KiB: in L2); longer rows take a second pass
ROW_LIMIT = 1 << 16


class _Hyper(ctypes.Structure):
    _fields_ = (
        [
            (name, ctypes.c_double)
            for name in (
                "lr", "beta1", "beta2", "eps", "weight_decay", "delta", "wd_ratio",
                "momentum", "dampening",
            )
        ]
        + [("row_limit", ctypes.c_int64)]
        + [(name, ctypes.c_int32) for name in ("maximize", "nesterov", "threads")]
    )  # fmt: skip


def cache_dir() -> Path:
    """Where built kernels are kept (see the module doc)."""
    if "ADAMPX_KERNEL_CACHE" in os.environ:
        return Path(os.environ["ADAMPX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adampx"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile(source: Path, target: Path, compiler: str) -> None:
    errors = []
    for flags in (_FLAGS, _FALLBACK_FLAGS):
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [compiler, *flags, "-o", str(out), str(source), "-lm"]
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as exc:  # no such compiler
                raise KernelBuildError(
                    f"fused=True needs a C compiler to build its kernel: {compiler!r} failed "
                    f"to start ({exc}); install gcc or clang, or set CC"
                ) from exc
            if run.returncode == 0:
                os.replace(out, target)  # atomic: concurrent ranks may build at once
                return
            errors.append(f"$ {' '.join(cmd)}\n{run.stderr.strip()}")
    raise KernelBuildError("fused=True: building the kernel failed:\n" + "\n".join(errors))


def load() -> Path:
    """Build (or find in the cache) and load the fused kernel; return the library's path.

    Raises:
        KernelBuildError: no working C compiler.
    """
    global _LIBRARY
    with _LOCK:
        source_ref = resources.files("adampx") / "kernels" / "projected_step.c"
        with resources.as_file(source_ref) as source:
            text = source.read_bytes()
            compiler = os.environ.get("CC", "cc")
            key = hashlib.sha256(
                b"\0".join(
                    [text, compiler.encode(), " ".join(_FLAGS).encode(), _cpu_signature().encode()]
                )
            ).hexdigest()[:16]
            target = cache_dir() / f"projected_step-{key}.so"
            if not target.exists():
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _compile(source, target, compiler)
                except OSError as exc:  # the cache cannot be written
                    raise KernelBuildError(
                        f"fused=True: cannot write the kernel cache {target.parent} ({exc}); "
                        "set ADAMPX_KERNEL_CACHE to a writable directory"
                    ) from exc
        if _LIBRARY is None or _LIBRARY._name != str(target):
            _LIBRARY = ctypes.CDLL(str(target))
        return target


def build_seconds() -> float:
    """Seconds to build the kernel from scratch (into a fresh temporary cache), for reports."""
    with tempfile.TemporaryDirectory() as tmp:
        previous = os.environ.get("ADAMPX_KERNEL_CACHE")
        os.environ["ADAMPX_KERNEL_CACHE"] = tmp
        try:
            start = time.perf_counter()
            load()
            return time.perf_counter() - start
        finally:
            if previous is None:
                del os.environ["ADAMPX_KERNEL_CACHE"]
            else:
                os.environ["ADAMPX_KERNEL_CACHE"] = previous
            load()  # back to the usual cache


def _library() -> ctypes.CDLL:
    if _LIBRARY is None:
        load()
    assert _LIBRARY is not None
    return _LIBRARY


def step_supported(step: Tensor) -> bool:
    """The kernel increments AdamP's step counter in place: a 0-d float32 CPU tensor."""
    return step.dtype == torch.float32 and step.device.type == "cpu" and step.dim() == 0


def _pointers(tensors: list[Tensor]) -> Any:
    return (_PTR * len(tensors))(*[t.data_ptr() for t in tensors])


def _int_array(ctype: Any, values: list[int]) -> Any:
    return (ctype * len(values))(*values)


def _hyper(**values: Any) -> _Hyper:
    lr = values["lr"]
    values["lr"] = float(lr) if isinstance(lr, Tensor) else lr
    return _Hyper(threads=torch.get_num_threads(), **values)


def _run(
    name: str,
    params: list[Tensor],
    ps: list[Tensor],
    arrays: list[list[Tensor]],
    hyper: _Hyper,
    *,
    projection: bool,
    decisions: Decisions | None,
    workspace: Workspace | None,
    steps: list[Tensor] | None = None,
) -> None:
    """Call ``name`` (adamp / sgdp) for params of one dtype; record decisions if asked."""
    tested = [projection and is_projectable(param) for param in params]
    rows = [p.shape[0] if t else 1 for p, t in zip(ps, tested, strict=True)]
    cols = [p.numel() // r for p, r in zip(ps, rows, strict=True)]
    sums = torch.empty(4 * max(rows), dtype=torch.float64)  # per row: p·p, g·g, p·g; p·d
    out = torch.zeros(len(ps), 4, dtype=torch.float64)
    suffix = "f32" if ps[0].dtype == torch.float32 else "f64"
    args = [ctypes.c_int64(len(ps)), *(_pointers(a) for a in [ps, *arrays])]
    if steps is not None:
        args.append(_pointers(steps))
    args += [
        _int_array(ctypes.c_int64, rows),
        _int_array(ctypes.c_int64, cols),
        _int_array(ctypes.c_int32, [int(t) for t in tested]),
        ctypes.byref(hyper),
        _PTR(sums.data_ptr()),
    ]
    if name == "adamp":  # AdamP keeps the direction of a row in hand, one row per thread
        longest = max([c for c, t in zip(cols, tested, strict=True) if t], default=1)
        hyper.row_limit = min(ROW_LIMIT, longest)
        size = hyper.threads * hyper.row_limit
        args.append(_PTR(scratch(workspace, "row", size, ps[0].dtype, ps[0].device).data_ptr()))
    args.append(_PTR(out.data_ptr()))
    getattr(_library(), f"{name}_{suffix}")(*args)
    if decisions is None:
        return
    for k, param in enumerate(params):
        if tested[k]:
            decisions[param] = Decision(
                channel=out[k, 0] != 0,
                layer=out[k, 1] != 0,
                max_cosine_channel=out[k, 2].to(ps[k].dtype),
                cosine_layer=out[k, 3].to(ps[k].dtype),
                channel_threshold=hyper.delta / cols[k] ** 0.5,
                layer_threshold=hyper.delta / (cols[k] * rows[k]) ** 0.5,
            )


def adamp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None,
    workspace: Workspace | None = None,
) -> None:
    """AdamP for compute views of one dtype and dense layout (see the module doc)."""
    hyper = _hyper(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, delta=delta,
        wd_ratio=wd_ratio, maximize=int(maximize), nesterov=int(nesterov),
    )  # fmt: skip
    _run(
        "adamp",
        params,
        ps,
        [gs, exp_avgs, exp_avg_sqs],
        hyper,
        projection=projection,
        decisions=decisions,
        workspace=workspace,
        steps=state_steps,
    )


def sgdp_(
    params: list[Tensor],
    ps: list[Tensor],
    gs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    projection: bool,
    decisions: Decisions | None,
    workspace: Workspace | None = None,
) -> None:
    """SGDP for compute views of one dtype and dense layout (see the module doc)."""
    hyper = _hyper(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, eps=eps,
        delta=delta, wd_ratio=wd_ratio, maximize=int(maximize), nesterov=int(nesterov),
    )  # fmt: skip
    _run(
        "sgdp",
        params,
        ps,
        [gs, momentum_buffers],
        hyper,
        projection=projection,
        decisions=decisions,
        workspace=workspace,
    )
