"""The benchmark commands of docs/performance.md run and print their tables.

No timing is asserted here (the targets are read from the benchmark's output, never from a
timed test): these tests only catch a benchmark that no longer runs, prints rows that do not
add up, or measures other shapes than the networks it names.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str) -> ModuleType:
    """A benchmark script as a module; scripts import ``step_time`` from beside them."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_shape_sets_are_those_of_the_networks() -> None:
    """Parameter counts of torchvision's resnet50 and vit_b_16 (weights and tensors), which
    the shape lists are generated to match without torchvision."""
    sets = _load("step_time").SHAPE_SETS
    for name, tensors, numel in (("resnet50", 161, 25_557_032), ("vit_b16", 152, 86_567_656)):
        shapes = sets[name]()
        assert len(shapes) == tensors, name
        assert sum(torch.Size(s).numel() for s in shapes) == numel, name


def test_step_time_prints_every_candidate() -> None:
    out = _run("step_time.py", "--sets", "small_resnet", "--rounds", "1", "--threads", "1")
    assert re.search(r"torch \S+, adampx \S+", out.splitlines()[0])
    assert re.search(r"fused kernel: built from scratch in \d+\.\d\d s, cached at \S+", out)
    rows = {}
    number = r"(\d+\.\d+)"
    pattern = rf"  (\S.*?)\s+{number}\s+{number}\s+\({number}–{number}\)\s+{number}\s+{number}$"
    for line in out.splitlines():
        match = re.match(pattern, line)
        if match:
            rows[match.group(1)] = [float(x) for x in match.groups()[1:]]
    bench = _load("step_time")
    assert set(rows) == set(bench.candidates())
    for label, (ms, ratio, q1, q3, speedup, mib) in rows.items():
        assert ms > 0 and ratio > 0 and speedup > 0 and mib >= 0, label
        assert q1 <= ratio <= q3, label
    for baseline in ("AdamW fused", "SGD fused"):
        assert rows[baseline][1:4] == [1.0, 1.0, 1.0]
    for reference in ("reference AdamP", "reference SGDP"):
        assert rows[reference][4] == 1.0
    assert rows["AdamW foreach"][5] > 0  # its multi-tensor temporaries are counted
    end_to_end = re.search(
        r"AdamW step median (\d+) ms, AdamP (\d+) ms\n"
        r"  AdamP overhead: median ([+-]\d+\.\d) %, interquartile ([+-]\d+\.\d) % to "
        r"([+-]\d+\.\d) %",
        out,
    )
    assert end_to_end is not None, out
    assert float(end_to_end.group(4)) <= float(end_to_end.group(5))


def test_step_time_plots_the_ratios(tmp_path: Path) -> None:
    """--plot writes the bar chart of the ratios to the fused torch optimizers (a PNG)."""
    path = tmp_path / "figures" / "step_time.png"
    out = _run(
        "step_time.py",
        *("--sets", "small_resnet", "--rounds", "2", "--threads", "1", "--no-end-to-end"),
        *("--plot", str(path)),
    )
    assert f"plot: {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_step_time_plot_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _load("step_time")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'adampx\[plot\]'"):
        bench.require_matplotlib()


def test_step_time_kernel_build_from_scratch_restores_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The build is timed in a fresh, empty cache; then ADAMPX_KERNEL_CACHE is as it was
    (set or not) and the kernel is loaded again from there."""
    bench = _load("step_time")
    assert bench.KERNEL_LOADER == "adampx.backends.cpu_kernel.load"
    for usual in (str(tmp_path), None):
        if usual is None:
            monkeypatch.delenv("ADAMPX_KERNEL_CACHE", raising=False)
        else:
            monkeypatch.setenv("ADAMPX_KERNEL_CACHE", usual)
        caches: list[str | None] = []

        def load(caches: list[str | None] = caches) -> None:
            cache = os.environ.get("ADAMPX_KERNEL_CACHE")
            caches.append(cache)
            if len(caches) == 1:
                assert cache is not None and not os.listdir(cache)

        assert bench.kernel_build_seconds(load) >= 0
        assert caches[1:] == [usual], caches
        assert caches[0] != usual and not Path(caches[0]).exists()  # removed after
        assert os.environ.get("ADAMPX_KERNEL_CACHE") == usual


def test_baseline_rewrites_the_package_imports() -> None:
    """An old revision imports itself as adampx_baseline: names in code and strings that are
    module paths change; comments, docstrings, attributes and other strings do not."""
    rewrite = _load("baseline").rewrite_source
    source = (
        '"""Doc: see adampx.fused."""\n'
        "import adampx\n"
        "import adampx.fused as fused  # adampx's kernel\n"
        "from adampx._tensors import scratch\n"
        'kernel = resources.files("adampx") / "kernels" / "projected_step.c"\n'
        "module = importlib.import_module('adampx.backends.cpu_kernel')\n"
        "hint = \"pip install 'adampx[demo]'\"; x = obj.adampx; y = adampx.SGDP\n"
    )
    assert rewrite(source) == (
        '"""Doc: see adampx.fused."""\n'
        "import adampx_baseline\n"
        "import adampx_baseline.fused as fused  # adampx's kernel\n"
        "from adampx_baseline._tensors import scratch\n"
        'kernel = resources.files("adampx_baseline") / "kernels" / "projected_step.c"\n'
        "module = importlib.import_module('adampx_baseline.backends.cpu_kernel')\n"
        "hint = \"pip install 'adampx[demo]'\"; x = obj.adampx; y = adampx_baseline.SGDP\n"
    )


def test_step_time_against_a_baseline_revision() -> None:
    """--baseline HEAD imports the committed package beside the working tree's, times its
    paths interleaved with the current ones, and prints the paired ratios. Needs git and the
    repository's history (CI runs in a clone): fails, not skips, without them."""
    out = _run(
        "step_time.py",
        *("--sets", "small_resnet", "--rounds", "2", "--threads", "1", "--no-end-to-end"),
        *("--baseline", "HEAD"),
    )
    assert re.search(
        r"^baseline: adampx \S+ at HEAD \([0-9a-f]{12}\), imported as adampx_baseline", out, re.M
    ), out
    bench = _load("step_time")
    number = r"(\d+\.\d+)"
    main_row = rf"  (\S.*?)\s+{number}\s+{number}\s+\({number}–{number}\)\s+{number}\s+{number}$"
    labels = {m.group(1) for m in re.finditer(main_row, out, re.M)}
    old = {"old " + path for path in bench.BASELINE_PATHS}
    assert labels == set(bench.candidates()) | old
    title = out.index("current ÷ old (HEAD): median over rounds of the ratio within a round")
    rows = {}
    pattern = rf"  (\S.*?)\s+{number}\s+\({number}–{number}\)\s+{number}\s+{number}\s+(yes|NO)$"
    for line in out[title:].splitlines():
        match = re.match(pattern, line)
        if match:
            rows[match.group(1)] = [float(x) for x in match.groups()[1:-1]]
    assert list(rows) == ["AdamP default", "AdamP fused", "SGDP default", "SGDP fused"], out
    for path, (ratio, q1, q3, new_ms, old_ms) in rows.items():
        assert 0 < q1 <= ratio <= q3 and new_ms > 0 and old_ms > 0, path


def test_op_count_prints_counts() -> None:
    out = _run("op_count.py", "--sets", "small_resnet").splitlines()
    names = list(_load("op_count").CANDIDATES)
    counts = dict(zip(names, map(int, out[-1].split()[1:]), strict=True))
    assert out[-1].split()[0] == "small_resnet"
    assert all(c > 0 for c in counts.values())
    assert list(counts) == [
        "AdamP eager", "AdamW foreach", "AdamW fused",
        "SGDP eager", "SGD foreach", "SGD fused",
    ]  # fmt: skip
    # the eager multi-tensor math tests tensor by tensor: more operations than torch's steps
    assert counts["AdamP eager"] > counts["AdamW foreach"] > counts["AdamW fused"]
    assert counts["SGDP eager"] > counts["SGD foreach"] >= counts["SGD fused"]


def test_gpu_check_runs_its_parity_section_on_cpu() -> None:
    """The GPU script cannot run here; its parity section (against the reference package,
    across layouts and dtypes) takes any device, so its code is kept working on the CPU."""
    results = _load("gpu_check").check_parity(torch.device("cpu"))
    assert len(results) == 10  # 5 comparisons each for AdamP and SGDP
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_gpu_check_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, even on a machine with one
    out = _run("gpu_check.py")
    assert "CUDA is not available" in out
