"""Optimizer step time and extra memory: adampx's paths vs torch.optim vs the reference package.

    python benchmarks/step_time.py                 # all shape sets, 2 threads
    python benchmarks/step_time.py --sets resnet50 --rounds 15
    python benchmarks/step_time.py --sets resnet50 --baseline main~3   # vs an older adampx
    python benchmarks/step_time.py --plot docs/figures/performance_cpu.png  # and a bar chart

For each shape set (the parameter shapes of ResNet-50, of ViT-B/16, an LLM-like set of
large matrices, and the demo's small ResNet, whose tensors are all small; generated here,
no torchvision), every candidate optimizer steps the same
parameters with the same random gradients. The candidates are *interleaved*: each round
times one step of every candidate in turn (each round starting at the next candidate), so
that the machine's noise hits all of them alike. The table shows the median step time over
rounds; the ratio to the matching fused torch optimizer (AdamW(fused=True) for the Adam
family, SGD(momentum=0.9, fused=True) for the SGD family) as the median over rounds of the
ratio *within* each round, with its quartiles, so that a slow phase of the machine, which
slows both steps of a round, divides out; how many times faster than the reference package,
likewise; and the peak extra memory of one step.

Peak extra memory is measured by counting, during one (non-first) step, the bytes of every
tensor that an operation creates and that is still alive, through a
``TorchDispatchMode``; the peak of that count, plus what an adampx optimizer keeps between
steps (its workspace), is what the step needs beyond the params, gradients and optimizer
state. It counts tensors, not allocator blocks.

Every timed call runs with Python's garbage collector off (collected just before), as
``timeit`` does, so that a collection does not land on one candidate.

The end-to-end row times forward + backward + step of a ResNet-18 layout (CIFAR stem) on
32×32 inputs, batch 64, AdamP vs AdamW (both default paths), interleaved, and reports
AdamP's overhead as a percentage with the spread over rounds.

``--baseline REV`` also times adampx as it was at git revision REV of this repository
(imported beside the current code as ``adampx_baseline``, see ``baseline.py``), so that a
refactor can show it is no slower: the candidates gain "old AdamP default", "old AdamP
fused", "old SGDP default" and "old SGDP fused" (with ``--baseline-all-paths``, the old
per-tensor and multi-tensor paths too), made with the same arguments as the current ones and
interleaved with them, and each set's table is followed by one row per path: the median over
rounds of the ratio current ÷ old within each round, its quartiles, both median step times,
and "no slower": yes where the median ratio is at most 1.05 or 1 lies within its quartiles.

``--plot PATH`` writes a horizontal bar chart (PNG, with matplotlib: the ``plot`` or ``demo``
extra) of every candidate's median ratio to the matching fused torch optimizer, one panel
per shape set, the quartiles as error bars, on a logarithmic axis with the fused optimizers
at 1.

The fused kernel's build time is measured once, at the start: ``load()`` of
``adampx.backends.cpu_kernel`` (looked up by that name when the benchmark runs) into a fresh
temporary ``ADAMPX_KERNEL_CACHE``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from baseline import Baseline, import_revision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import adampx

Shapes = list[tuple[int, ...]]


def resnet50_shapes() -> Shapes:
    """Parameter shapes of torchvision's ResNet-50 (25.6M parameters in 161 tensors)."""
    shapes: Shapes = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, c_in, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, c_in, 1, 1), (out,), (out,)]
            c_in = out
    return [*shapes, (1000, 2048), (1000,)]


def vit_b16_shapes() -> Shapes:
    """Parameter shapes of ViT-B/16 (86.6M parameters in 152 tensors)."""
    d, mlp = 768, 3072
    shapes: Shapes = [(1, 1, d), (1, 197, d), (d, 3, 16, 16), (d,)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    return [*shapes, (d,), (d,), (1000, d), (1000,)]


def llm_shapes() -> Shapes:
    """A few large matrices, as in a small language model (about 50M parameters)."""
    d = 1024
    return [(8192, d)] + [(4 * d, d), (d, 4 * d), (3 * d, d), (d, d)] * 4 + [(d,)] * 8


def small_resnet_shapes() -> Shapes:
    """Parameter shapes of the demo's small ResNet on 8×8 digits (78k parameters in 29
    tensors): a model whose tensors are all small, so that per-tensor costs, not memory,
    set the step time."""
    from adampx.experiments.models import build_model

    model = build_model("small_resnet", num_classes=10, in_channels=1, image_size=8)
    return [tuple(p.shape) for p in model.parameters()]


SHAPE_SETS: dict[str, Callable[[], Shapes]] = {
    "resnet50": resnet50_shapes,
    "vit_b16": vit_b16_shapes,
    "llm": llm_shapes,
    "small_resnet": small_resnet_shapes,
}

# Which weights of a set are scale invariant, as in the real network: ResNet-50's conv
# weights, each followed by a BatchNorm. Their gradient is orthogonal to every output
# channel's weights there, so AdamP and SGDP project them (channel-wise) at every step. The
# transformers' linear weights are not scale invariant; with random gradients they are
# rarely projected, as in real training.
SCALE_INVARIANT: dict[str, Callable[[tuple[int, ...]], bool]] = {
    "resnet50": lambda shape: len(shape) == 4,
    "small_resnet": lambda shape: len(shape) == 4,
    "vit_b16": lambda shape: False,
    "llm": lambda shape: False,
}


Make = Callable[[list[torch.Tensor]], Any]

# the adampx paths that --baseline compares with the old revision's, and those that
# --baseline-all-paths adds
BASELINE_PATHS = ("AdamP default", "AdamP fused", "SGDP default", "SGDP fused")
ALL_BASELINE_PATHS = (
    "AdamP per-tensor", "AdamP multi-tensor", "AdamP default", "AdamP fused",
    "SGDP per-tensor", "SGDP multi-tensor", "SGDP default", "SGDP fused",
)  # fmt: skip
OLD = "old "


def adampx_paths(module: ModuleType) -> dict[str, tuple[str, Make]]:
    """name -> (family, constructor) of the paths of ``module`` (adampx, or an older
    revision of it), all with the same arguments."""

    def adamp(**kw: Any) -> Make:
        return lambda ps: module.AdamP(ps, weight_decay=1e-2, **kw)

    def sgdp(**kw: Any) -> Make:
        return lambda ps: module.SGDP(ps, 0.1, 0.9, **kw)

    return {
        "AdamP per-tensor": ("adam", adamp(foreach=False)),
        "AdamP multi-tensor": ("adam", adamp(foreach=True)),
        "AdamP default": ("adam", adamp()),
        "AdamP fused": ("adam", adamp(fused=True)),
        "SGDP per-tensor": ("sgd", sgdp(foreach=False)),
        "SGDP multi-tensor": ("sgd", sgdp(foreach=True)),
        "SGDP default": ("sgd", sgdp()),
        "SGDP fused": ("sgd", sgdp(fused=True)),
    }


def candidates(
    old: ModuleType | None = None, old_paths: tuple[str, ...] = BASELINE_PATHS
) -> dict[str, tuple[str, Make]]:
    """name -> (family, constructor). Families: "adam", "sgd". With ``old`` (an older
    revision of adampx), its ``old_paths`` too, named "old " + the path, after each family's
    current candidates."""
    import adamp as reference

    new = adampx_paths(adampx)
    old_made = adampx_paths(old) if old is not None else {}

    def olds(family: str) -> dict[str, tuple[str, Make]]:
        paths = [path for path in old_paths if path in old_made]
        return {OLD + path: old_made[path] for path in paths if old_made[path][0] == family}

    adam = {
        **{path: new[path] for path in ALL_BASELINE_PATHS[:4]},
        # timm's defaults for AdamP (its create_optimizer_v2 entry "adamp"), and its cautious
        # variant ("cadamp"), on the default path
        "AdamP nesterov": (
            "adam",
            lambda ps: adampx.AdamP(ps, weight_decay=1e-2, wd_ratio=0.01, nesterov=True),
        ),
        "AdamP cautious": (
            "adam",
            lambda ps: adampx.AdamP(
                ps, weight_decay=1e-2, wd_ratio=0.01, nesterov=True, caution=True
            ),
        ),
        "AdamW foreach": ("adam", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        "AdamW fused": ("adam", lambda ps: torch.optim.AdamW(ps, fused=True)),
        "reference AdamP": ("adam", lambda ps: reference.AdamP(ps, weight_decay=1e-2)),
    }
    sgd = {
        **{path: new[path] for path in ALL_BASELINE_PATHS[4:]},
        "SGD foreach": ("sgd", lambda ps: torch.optim.SGD(ps, 0.1, 0.9, foreach=True)),
        "SGD fused": ("sgd", lambda ps: torch.optim.SGD(ps, 0.1, 0.9, fused=True)),
        "reference SGDP": ("sgd", lambda ps: reference.SGDP(ps, lr=0.1, momentum=0.9)),
    }
    return {**adam, **olds("adam"), **sgd, **olds("sgd")}


FUSED = {"adam": "AdamW fused", "sgd": "SGD fused"}
REFERENCE = {"adam": "reference AdamP", "sgd": "reference SGDP"}


def dense_parts(tree: Any) -> list[torch.Tensor]:
    """The dense tensors that hold the data of the tensors in ``tree``: a strided tensor
    itself, a sparse CSR tensor's indices and values (the default CPU path computes row dot
    products with ``torch.sparse.sampled_addmm``), a sparse COO tensor's."""
    parts = []
    for t in tree_flatten(tree)[0]:
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout == torch.strided:
            parts.append(t)
        elif t.layout == torch.sparse_csr:
            parts += [t.crow_indices(), t.col_indices(), t.values()]
        elif t.layout == torch.sparse_coo:
            parts += [t._indices(), t._values()]
    return parts


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created by operations and still alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in dense_parts((args, kwargs or {}))}
        out = func(*args, **(kwargs or {}))
        for t in dense_parts(out):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key, storage.nbytes())
        return out


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes, with Python's garbage collector run before and off during.

    As ``timeit`` does: with a dozen optimizers over the same shapes alive in one process, a
    collection that happens to start inside a step cost tens of milliseconds, and it lands
    on whichever candidate allocates Python objects at that moment.
    """
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def peak_extra_mib(optimizer: Any) -> float:
    """Peak MiB of tensors one step creates (the optimizer has stepped before), plus what
    an adampx optimizer keeps between steps (its workspace: scratch buffers, and constants
    such as the diagonal patterns of its row dot products)."""
    with _LiveBytes() as mode:
        optimizer.step()
    workspace = getattr(optimizer, "_workspace", None)
    kept_tensors = dense_parts(
        [getattr(workspace, "_buffers", {}), list(getattr(workspace, "_constants", {}).values())]
    )
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept_tensors}
    return (mode.peak + sum(storages.values())) / 2**20


def tangent_grads_(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Set each param's gradient to ``grads``' with its component along every output
    channel's weights removed, as backpropagation through a normalization layer leaves it
    (untimed: run before each step, since the step moves the weights)."""
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            rows, grad_rows = p.view(p.shape[0], -1), g.view(p.shape[0], -1)
            along = (rows * grad_rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True)
            assert p.grad is not None
            torch.sub(grad_rows, along * rows, out=p.grad.view(grad_rows.shape))


def paired_ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Round by round ``numerators[r] / denominators[r]``: two candidates timed seconds apart
    in the same round, so that a slow phase of the machine divides out of their ratio."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def measure_set(
    name: str,
    rounds: int,
    seed: int = 0,
    old: Baseline | None = None,
    old_paths: tuple[str, ...] = BASELINE_PATHS,
) -> list[dict[str, Any]]:
    """Interleaved step times and peak memory of every candidate on one shape set; with
    ``old``, also those of its ``old_paths``, then their comparison (:func:`compare`)."""
    shapes = SHAPE_SETS[name]()
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    invariant = [SCALE_INVARIANT[name](s) for s in shapes]
    runs, tangent = {}, {}
    for label, (family, make) in candidates(old and old.module, old_paths).items():
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g, inv in zip(params, grads, invariant, strict=True):
            # shared by all candidates (no step writes to it) to save memory, except where
            # it must stay orthogonal to this candidate's weights
            p.grad = g.clone() if inv else g
        tangent[label] = ([p for p, inv in zip(params, invariant, strict=True) if inv],
                          [g for g, inv in zip(grads, invariant, strict=True) if inv])  # fmt: skip
        tangent_grads_(*tangent[label])
        optimizer = make(params)
        optimizer.step()  # creates the state; not timed
        runs[label] = (family, optimizer)
    times: dict[str, list[float]] = {label: [] for label in runs}
    order = list(runs)
    for r in range(rounds):
        # each round starts at another candidate, so that none always runs after the same one
        for label in order[r % len(order) :] + order[: r % len(order)]:
            tangent_grads_(*tangent[label])
            times[label].append(timed(runs[label][1].step))
    rows = []
    for label, (family, optimizer) in runs.items():
        tangent_grads_(*tangent[label])
        ratios = paired_ratios(times[label], times[FUSED[family]])
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        rows.append(
            {
                "set": name,
                "candidate": label,
                "family": family,
                "ms": 1e3 * statistics.median(times[label]),
                "ratio": statistics.median(ratios),
                "ratio_q1": quartiles[0],
                "ratio_q3": quartiles[2],
                "speedup": statistics.median(paired_ratios(times[REFERENCE[family]], times[label])),
                "mib": peak_extra_mib(optimizer),
            }
        )
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"\n{name}: {n_params / 1e6:.1f}M parameters in {len(shapes)} tensors, "
          f"{sum(invariant)} scale invariant, {rounds} rounds")  # fmt: skip
    header = (
        f"{'candidate':<22}{'median ms':>10}{'× fused':>9}{'(quartiles)':>14}{'ref ÷ this':>12}"
        f"{'peak MiB':>10}"
    )
    print("  " + header)
    for r in rows:
        spread = f"({r['ratio_q1']:.2f}–{r['ratio_q3']:.2f})"
        print(
            f"  {r['candidate']:<22}{r['ms']:>10.1f}{r['ratio']:>9.2f}{spread:>14}"
            f"{r['speedup']:>12.2f}{r['mib']:>10.1f}"
        )
    if old is not None:
        compare(times, old_paths, old.rev)
    return rows


def compare(
    times: dict[str, list[float]], paths: tuple[str, ...], rev: str
) -> list[dict[str, Any]]:
    """Each current path against the same path of the old revision (``times`` holds both,
    the old under "old " + path): the median over rounds of current ÷ old within a round,
    with its quartiles; printed as a table, and returned."""
    rows = []
    for path in paths:
        ratios = paired_ratios(times[path], times[OLD + path])
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        median = statistics.median(ratios)
        rows.append(
            {
                "path": path,
                "ratio": median,
                "ratio_q1": quartiles[0],
                "ratio_q3": quartiles[2],
                "new_ms": 1e3 * statistics.median(times[path]),
                "old_ms": 1e3 * statistics.median(times[OLD + path]),
                # within 5 % of the old step, or no further from it than the machine's noise
                "no_slower": median <= 1.05 or quartiles[0] <= 1.0,
            }
        )
    print(f"  current ÷ old ({rev}): median over rounds of the ratio within a round")
    header = (
        f"{'path':<22}{'median':>8}{'(quartiles)':>14}{'new ms':>10}{'old ms':>10}{'no slower':>11}"
    )
    print("  " + header)
    for r in rows:
        spread = f"({r['ratio_q1']:.2f}–{r['ratio_q3']:.2f})"
        print(
            f"  {r['path']:<22}{r['ratio']:>8.2f}{spread:>14}{r['new_ms']:>10.2f}"
            f"{r['old_ms']:>10.2f}{'yes' if r['no_slower'] else 'NO':>11}"
        )
    return rows


def end_to_end(rounds: int) -> None:
    """Forward + backward + step of a ResNet-18 (CIFAR stem), AdamP vs AdamW, interleaved."""
    from adampx.experiments.models import build_model

    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    setups = {}
    for label, make in (
        ("AdamW", lambda ps: torch.optim.AdamW(ps, weight_decay=1e-2)),
        ("AdamP", lambda ps: adampx.AdamP(ps, weight_decay=1e-2)),
    ):
        torch.manual_seed(0)
        model = build_model("resnet18", 10, 3, 32)
        setups[label] = (model, make(model.parameters()))
    times: dict[str, list[float]] = {label: [] for label in setups}
    for r in range(rounds + 1):
        for label, (model, optimizer) in setups.items():

            def train_step(model: Any = model, optimizer: Any = optimizer) -> None:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

            seconds = timed(train_step)
            if r:  # the first round creates the state
                times[label].append(seconds)
    overhead = [100 * (p / w - 1) for p, w in zip(times["AdamP"], times["AdamW"], strict=True)]
    q = statistics.quantiles(overhead, n=4)
    print(f"\nend to end, ResNet-18 (CIFAR stem), 32×32, batch 64, {rounds} interleaved rounds")
    print(f"  AdamW step median {1e3 * statistics.median(times['AdamW']):.0f} ms, "
          f"AdamP {1e3 * statistics.median(times['AdamP']):.0f} ms")  # fmt: skip
    print(f"  AdamP overhead: median {statistics.median(overhead):+.1f} %, "
          f"interquartile {q[0]:+.1f} % to {q[2]:+.1f} %")  # fmt: skip


def require_matplotlib() -> ModuleType:
    """matplotlib's ``figure`` module, or an ImportError that names the extra to install."""
    try:
        from matplotlib import figure
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib: pip install 'adampx[plot]' (or the 'demo' extra)"
        ) from exc
    return figure


# bar colours by kind of candidate
COLOURS = {"adampx": "tab:blue", "old": "tab:cyan", "torch": "tab:gray", "reference": "tab:red"}


def kind(candidate: str) -> str:
    """The kind of a candidate: "adampx", "old" (an older adampx, with --baseline), "torch"
    or "reference"."""
    if candidate.startswith(OLD):
        return "old"
    if candidate.startswith(("AdamP", "SGDP")):
        return "adampx"
    if candidate.startswith("reference"):
        return "reference"
    return "torch"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Write a bar chart of ``rows`` (those of :func:`measure_set`, any number of sets) to
    ``path``: per set, each candidate's median ratio to the matching fused torch optimizer,
    with its quartiles as error bars, on a logarithmic axis; ``title`` above the panels."""
    figure = require_matplotlib()
    from matplotlib.patches import Patch

    sets = list(dict.fromkeys(r["set"] for r in rows))
    per_set = {name: [r for r in rows if r["set"] == name] for name in sets}
    height = max(len(v) for v in per_set.values())
    columns, lines = min(len(sets), 2), -(-len(sets) // 2)  # two panels a line
    fig = figure.Figure(figsize=(6.5 * columns, 0.3 * height * lines + 1.5))
    axes = fig.subplots(lines, columns, squeeze=False).ravel()
    top = max(r["ratio_q3"] for r in rows)
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100) if t <= top * 1.6]
    for ax, name in zip(axes, sets, strict=False):
        set_rows = per_set[name][::-1]  # the first candidate at the top
        y, at = [], 0.0
        for i, r in enumerate(set_rows):  # a gap between the Adam and the SGD family
            at += 0.0 if i == 0 else 1.0 if r["family"] == set_rows[i - 1]["family"] else 1.6
            y.append(at)
        ratios = [r["ratio"] for r in set_rows]
        errors = [[r["ratio"] - r["ratio_q1"] for r in set_rows],
                  [r["ratio_q3"] - r["ratio"] for r in set_rows]]  # fmt: skip
        ax.barh(y, ratios, xerr=errors, capsize=2, height=0.7,
                color=[COLOURS[kind(r["candidate"])] for r in set_rows])  # fmt: skip
        for row_y, r in zip(y, set_rows, strict=True):
            ax.text(r["ratio_q3"] * 1.05, row_y, f"{r['ratio']:.2f}", va="center", fontsize=7)
        ax.set_yticks(y, [r["candidate"] for r in set_rows], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(0.5, top * 1.6)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter("")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step time ÷ fused torch optimizer (median, quartiles)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    for ax in axes[len(sets) :]:
        ax.set_visible(False)
    kinds = [k for k in COLOURS if any(kind(r["candidate"]) == k for r in rows)]
    labels = {"adampx": "adampx", "old": "adampx, older revision", "torch": "torch.optim",
              "reference": "reference package (adamp)"}  # fmt: skip
    fig.legend([Patch(color=COLOURS[k]) for k in kinds], [labels[k] for k in kinds],
               loc="lower center", ncol=len(kinds), fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


KERNEL_LOADER = "adampx.backends.cpu_kernel.load"
KERNEL_CACHE = "ADAMPX_KERNEL_CACHE"


def kernel_loader() -> Callable[[], Path]:
    """The fused kernel's loader, looked up by name (:data:`KERNEL_LOADER`) when called."""
    module, _, name = KERNEL_LOADER.rpartition(".")
    return getattr(importlib.import_module(module), name)


def kernel_build_seconds(load: Callable[[], Any] | None = None) -> float:
    """Seconds the fused kernel takes to build from scratch: ``load()`` timed with
    ``ADAMPX_KERNEL_CACHE`` set to a fresh temporary directory. Then the variable is put
    back as it was and the kernel loaded again, from the usual cache, so that the steps
    timed afterwards run the cached library."""
    load = load or kernel_loader()
    previous = os.environ.get(KERNEL_CACHE)
    with tempfile.TemporaryDirectory(prefix="adampx-kernel-") as tmp:
        os.environ[KERNEL_CACHE] = tmp
        try:
            start = time.perf_counter()
            load()
            seconds = time.perf_counter() - start
        finally:
            if previous is None:
                del os.environ[KERNEL_CACHE]
            else:
                os.environ[KERNEL_CACHE] = previous
        load()  # back to the usual cache
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", nargs="+", default=list(SHAPE_SETS), choices=list(SHAPE_SETS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also time adampx at this git revision, interleaved, and compare (see above)",
    )
    parser.add_argument(
        "--baseline-all-paths",
        action="store_true",
        help="with --baseline, compare the per-tensor and multi-tensor paths too",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        type=Path,
        help="also write a bar chart of the ratios to the fused torch optimizers (PNG)",
    )
    args = parser.parse_args()
    if args.baseline_all_paths and args.baseline is None:
        parser.error("--baseline-all-paths needs --baseline")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    if args.plot is not None:
        try:
            require_matplotlib()  # before the run, not after it
        except ImportError as exc:
            parser.error(str(exc))
    torch.set_num_threads(args.threads)
    header = (
        f"{date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, adampx {adampx.__version__}"
    )
    print(header)
    built = kernel_build_seconds()
    print(f"fused kernel: built from scratch in {built:.2f} s, cached at {kernel_loader()()}")
    old, old_paths = None, ALL_BASELINE_PATHS if args.baseline_all_paths else BASELINE_PATHS
    if args.baseline is not None:
        try:
            old = import_revision(args.baseline)
        except (OSError, RuntimeError) as exc:  # no git, or no such revision
            parser.error(f"--baseline {args.baseline}: {exc}")
        print(
            f"baseline: adampx {old.module.__version__} at {args.baseline} ({old.commit[:12]}), "
            f"imported as {old.module.__name__}; its paths: {', '.join(old_paths)}"
        )
    rows = []
    for name in args.sets:
        rows += measure_set(name, args.rounds, old=old, old_paths=old_paths)
    if args.plot is not None:
        plot(rows, args.plot, f"{header}, {args.rounds} rounds")
        print(f"\nplot: {args.plot}")
    if not args.no_end_to_end:
        end_to_end(args.rounds * 2)


if __name__ == "__main__":
    main()
