"""The ``cpu-kernel`` backend (``fused=True``): the whole AdamP / SGDP step in one C kernel.

The kernel (``projected_step.c`` beside this file, its dtype-generic body in
``projected_step_body.h``) steps each tested tensor in three stages: its row sums ``p·p``,
``g·g`` and ``p·g`` (a read of ``p`` and ``g``); the scale-invariance test on them; then the
step with the memory traffic of AdamW / SGD. A tensor the test does not project takes
AdamW's or SGD's one-pass step. One projected per row is stepped row by row: the moments and
the update direction ``d`` of a row (AdamP keeps it in a per-thread buffer of one row), its
dot with ``p`` and the row's coefficient, then the param, while the row is still in cache.
So AdamP reads 6 and writes 3 param-sized arrays where AdamW reads 4 and writes 3, and SGDP
reads 5 and writes 2 where SGD reads 3 and writes 2. A tensor projected as a whole, or rows
longer than :data:`ROW_LIMIT` (rare), take a second pass that recomputes ``d`` from the
updated moments. With ``caution=True`` every tensor takes three passes after its row sums
(the moments and the rows' ``p·d``; the count of elements the mask keeps and the rows' dots
with the masked update; the step), ``d`` recomputed from the updated state in each, since the
mask's mean needs the whole tensor before any element can be written. One call steps the
whole param group.

The kernel is plain C with OpenMP. It is compiled on first use with the system C compiler
(``$CC``, else ``cc``; about a second) and cached under ``$ADAMPX_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/adampx`` or ``~/.cache/adampx``, keyed by the source, the compiler, the
flags and the CPU. :func:`load` builds it ahead of time and returns where it lies; loading
checks that the C parameter struct and its ctypes mirror (:mod:`.abi`) agree.

Takes CPU tensors whose compute views (float32 copies of half params, real views of complex
ones) share one dense layout (contiguous or channels_last) with their gradient and state,
and float32 step counters on the CPU; every AdamP / SGDP option.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adampx.algorithm.projection import Decision, OneTensor
from adampx.algorithm.spec import Step, lr_float
from adampx.backends.cpu_kernel.abi import Hyper, check_layout
from adampx.util.tensors import Batch, layout_refusal
from adampx.util.workspace import Workspace, scratch

__all__ = [
    "NAME",
    "KernelBuildError",
    "cache_dir",
    "load",
    "ready",
    "runs_here",
    "step_",
    "supports",
    "takes",
]

NAME = "cpu-kernel"

# -fno-math-errno lets sqrt vectorise; it changes no result (IEEE sqrt is exact either way)
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp")
_FALLBACK_FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared")  # no OpenMP: one thread
_SOURCES = ("projected_step.c", "projected_step_body.h")
_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_PTR = ctypes.c_void_p


class KernelBuildError(RuntimeError):
    """The C compiler could not build the fused kernel."""


# AdamP steps rows up to this many elements in cache, in a per-thread buffer of one row
# (a float32 row of this length is 256 KiB: in L2); longer rows take a second pass
ROW_LIMIT = 1 << 16


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def runs_here() -> bool:
    """Whether a C compiler is on the path to build the kernel (nothing is built here)."""
    return shutil.which(_compiler()) is not None


def supports(step: Step) -> str | None:
    """The kernel runs every AdamP and SGDP option."""
    return None


def takes(
    param: Tensor, p: Tensor, g: Tensor, states: list[Tensor], counter: Tensor | None
) -> str | None:
    """Why the kernel cannot step ``param`` (None if it can)."""
    if not p.is_cpu:
        return f"the kernel runs on the CPU, the param is on {p.device.type}"
    reason = layout_refusal(param, p, g, states)
    if reason is not None:
        return reason
    if counter is not None and not (
        counter.dtype == torch.float32 and counter.is_cpu and counter.dim() == 0
    ):
        return "the kernel increments AdamP's step counter in place: a 0-d float32 CPU tensor"
    return None


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
        source_ref = resources.files("adampx.backends.cpu_kernel") / "projected_step.c"
        with resources.as_file(source_ref) as source:
            text = source.read_bytes()
            text += (source.parent / _SOURCES[1]).read_bytes()  # the body, included by the .c
            compiler = _compiler()
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
            library = ctypes.CDLL(str(target))
            check_layout(library)
            _LIBRARY = library
        return target


_UNBUILT: str | None = None  # why the kernel did not build for ready(), once


def ready() -> bool:
    """Whether the kernel is loaded or builds now, for the default routing (``fused`` left
    None) of the options torch's fused kernels lack. A build that fails is reported once,
    as a warning, and not tried again in this process: those tensors take the eager math."""
    global _UNBUILT
    if _LIBRARY is not None:
        return True
    if _UNBUILT is not None:
        return False
    try:
        load()
    except (OSError, RuntimeError) as exc:  # no compiler, a failed build, a broken library
        _UNBUILT = str(exc)
        warnings.warn(
            "adampx: AdamP with nesterov=True, SGDP with momentum=0 and caution=True run on "
            "the CPU in adampx's C kernel, which could not be built; they take the slower "
            "eager math. "
            f"{exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _library() -> ctypes.CDLL:
    if _LIBRARY is None:
        load()
    assert _LIBRARY is not None
    return _LIBRARY


def _pointers(tensors: list[Tensor]) -> Any:
    return (_PTR * len(tensors))(*[t.data_ptr() for t in tensors])


def _int_array(ctype: Any, values: list[int]) -> Any:
    return (ctype * len(values))(*values)


def _hyper(step: Step) -> Hyper:
    """The kernel's parameters: the step's, with the decay amount computed once in Python."""
    decay = step.decay_value() if step.weight_decay != 0 else 0.0
    return Hyper(
        lr=lr_float(step.lr), beta1=step.beta1, beta2=step.beta2, eps=step.eps, decay=decay,
        delta=step.delta, wd_ratio=step.wd_ratio, momentum=step.momentum,
        dampening=step.dampening, row_limit=0, maximize=int(step.maximize),
        nesterov=int(step.nesterov), threads=torch.get_num_threads(),
        caution=int(step.caution),
    )  # fmt: skip


def step_(step: Step, batch: Batch, workspace: Workspace | None) -> None:
    """AdamP's or SGDP's step of ``batch`` (CPU tensors of one dtype) in one kernel call;
    the step's decisions recorded if asked."""
    params, ps = batch.params, batch.ps
    hyper = _hyper(step)
    tested = [step.tested(param) for param in params]
    rows = [p.shape[0] if t else 1 for p, t in zip(ps, tested, strict=True)]
    cols = [p.numel() // r for p, r in zip(ps, rows, strict=True)]
    # per row: p·p, g·g, p·g; p·d; and the cautious step's p·(masked u)
    sums = torch.empty(5 * max(rows), dtype=torch.float64)
    out = torch.zeros(len(ps), 4, dtype=torch.float64)
    suffix = "f32" if ps[0].dtype == torch.float32 else "f64"
    args = [ctypes.c_int64(len(ps)), *(_pointers(a) for a in [ps, batch.gs, *batch.states])]
    if step.optimizer == "adamp":
        args.append(_pointers(batch.steps))
    args += [
        _int_array(ctypes.c_int64, rows),
        _int_array(ctypes.c_int64, cols),
        _int_array(ctypes.c_int32, [int(t) for t in tested]),
        ctypes.byref(hyper),
        _PTR(sums.data_ptr()),
    ]
    if step.optimizer == "adamp":  # AdamP keeps the direction of a row in hand, one per thread
        longest = max([c for c, t in zip(cols, tested, strict=True) if t], default=1)
        hyper.row_limit = min(ROW_LIMIT, longest)
        size = hyper.threads * hyper.row_limit
        args.append(_PTR(scratch(workspace, "row", size, ps[0].dtype, ps[0].device).data_ptr()))
    args.append(_PTR(out.data_ptr()))
    getattr(_library(), f"{step.optimizer}_{suffix}")(*args)
    if step.decisions is None:
        return
    for k, param in enumerate(params):
        if tested[k]:
            rows_k = OneTensor(rows[k], cols[k])
            channel_threshold, layer_threshold = rows_k.threshold_values(step.delta, 0)
            step.decisions[param] = Decision(
                channel=out[k, 0] != 0,
                layer=out[k, 1] != 0,
                max_cosine_channel=out[k, 2].to(ps[k].dtype),
                cosine_layer=out[k, 3].to(ps[k].dtype),
                channel_threshold=channel_threshold,
                layer_threshold=layer_threshold,
            )
