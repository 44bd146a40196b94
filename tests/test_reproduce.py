"""``adampx reproduce``: the toys, the command line end to end, resume, Ctrl-C, the report.

Every expected value here is computed independently (closed forms, hand-written
``torch.optim.SGD`` loops, numpy/scipy statistics, the documented schema), never copied from
an earlier run of the suite. Runs are tiny (digits, one epoch, one seed) to fit two CPU cores.
The suite runs in two worker processes; tests that replace a function of the runner run it
in this process (``--jobs 1``). Crashes, Ctrl-C and orphans of the parallel suite:
``tests/test_experiment_parallel.py``; the language-model task: ``tests/test_experiment_lm.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

import adampx.experiments.runner as runner
from adampx.__main__ import main
from adampx.experiments import toys
from adampx.experiments.classification import OPTIMIZERS
from adampx.experiments.data import load_dataset
from adampx.experiments.report import _claims, summarize_classification

TINY = ["--seeds", "0", "--epochs", "1"]
SUITE_ARGS = [
    "--tasks", "toy2d", "toy3d", "classification", "--optimizers", "SGD", "SGDP", *TINY,
]  # fmt: skip
BATCH = 64  # the digits default of the suite (small_resnet, batch 64)

# results.json schema (runner's docstring): field -> allowed types
SCHEMA: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "task": (str,),
    "dataset": (str,),
    "model": (str,),
    "optimizer": (str,),
    "weight_decay": (float,),
    "seed": (int,),
    "test_accuracy": (float, type(None)),
    "test_perplexity": (type(None),),  # the lm task's (tests/test_experiment_lm.py)
    "norm_start": (float,),
    "norm_end": (float,),
    "lr": (float, type(None)),
    "epochs": (int, type(None)),
    "steps": (int,),
    "seconds": (float,),
    "train_loss": (float, type(None)),
    "final_error": (float, type(None)),
    "curve": (str,),
}


def reproduce(out: Path, *args: str) -> int:
    return main(["reproduce", *args, "--out", str(out)])


def load(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def by_id(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in results["runs"]}


def without_seconds(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "seconds"}


def n_train_digits() -> int:
    return len(load_dataset("digits", None, seed=0).train)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run of the default tasks: toys, and SGD/SGDP with and without weight decay,
    in two worker processes."""
    out = tmp_path_factory.mktemp("suite") / "out"
    assert reproduce(out, *SUITE_ARGS, "--jobs", "2") == 0
    return out


# ---------------------------------------------------------------------------- 2-D toy


def test_toy2d_gd_follows_the_orthogonal_gradient_recursion() -> None:
    # Without momentum the gradient of −⟨w/‖w‖, w*⟩ is orthogonal to w with norm
    # sin(θ)/‖w‖, so ‖w‖² grows by exactly lr²·sin²θ/‖w‖² and the angle shrinks by
    # atan(lr·sinθ/‖w‖²) per step.
    run = toys.run_toy2d("GD")
    lr, r, theta = toys.TOY2D_LR, 1.0, math.radians(toys.TOY2D_TARGET_DEG)
    norms, errors = [r], [math.degrees(theta)]
    for _ in range(toys.TOY2D_STEPS):
        g = math.sin(theta) / r
        theta -= math.atan(lr * g / r)
        r = math.sqrt(r * r + lr * lr * g * g)
        norms.append(r)
        errors.append(math.degrees(theta))
    np.testing.assert_allclose(run.norms, norms, rtol=0, atol=1e-12)
    np.testing.assert_allclose(run.errors, errors, rtol=0, atol=1e-7)
    assert run.norms[-1] > run.norms[0]  # the norm does grow, if slowly
    # the projection has nothing to remove from a gradient orthogonal to w
    projected = toys.run_toy2d("GD + projection")
    np.testing.assert_allclose(projected.norms, norms, rtol=0, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_toy2d_momentum_without_projection_is_torch_sgd(momentum: float) -> None:
    run = toys.run_toy2d(f"GD momentum {momentum:g}")
    target = math.radians(toys.TOY2D_TARGET_DEG)
    w_star = torch.tensor([math.cos(target), math.sin(target)], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=toys.TOY2D_LR, momentum=momentum)
    path = [w.detach().clone()]
    for _ in range(toys.TOY2D_STEPS):
        opt.zero_grad()
        (-(w / w.norm()) @ w_star).backward()
        opt.step()
        path.append(w.detach().clone())
    expected = torch.stack(path)
    torch.testing.assert_close(
        torch.tensor(run.path, dtype=torch.float64), expected, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        torch.tensor(run.norms, dtype=torch.float64), expected.norm(dim=1), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("momentum", ["0.9", "0.99"])
def test_toy2d_projection_slows_the_norm_growth(momentum: str) -> None:
    # The paper's claim, measured: momentum inflates ‖w‖, the projection keeps it near 1.
    plain = toys.run_toy2d(f"GD momentum {momentum}")
    projected = toys.run_toy2d(f"GD momentum {momentum} + projection")
    assert plain.norms[-1] > projected.norms[-1]
    assert max(projected.norms) < 1.5
    assert plain.norms[-1] > 1.5


# ---------------------------------------------------------------------------- 3-D toy


def sphere(a: float, b: float, r: float = 1.0) -> list[float]:
    return [r * math.sin(b) * math.cos(a), r * math.sin(b) * math.sin(a), r * math.cos(b)]


def test_toy3d_angles_round_trip_and_rosenbrock_minimum() -> None:
    for a in np.linspace(-3.0, 3.0, 13):
        for b in np.linspace(0.1, 3.0, 11):
            for r in (0.5, 1.0, 3.0):
                w = torch.tensor([sphere(a, b, r)], dtype=torch.float64)
                got_a, got_b = toys._angles(w)
                assert float(got_a) == pytest.approx(a, abs=1e-12)
                assert float(got_b) == pytest.approx(b, abs=1e-12)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert float(toys.rosenbrock(one, one)) == 0.0
    a, b = torch.tensor(-2.0), torch.tensor(2.0)
    assert float(toys.rosenbrock(a, b)) == pytest.approx(9 + 100 * (2 - 4) ** 2)


@pytest.mark.parametrize(
    ("method", "lr"), [("momentum GD", 1e-3), ("momentum GD + weight decay", 5e-4)]
)
def test_toy3d_without_projection_is_torch_sgd(method: str, lr: float) -> None:
    run = toys.run_toy3d(method, lr=lr)
    wd = 1.0 if "weight decay" in method else 0.0
    momentum = 0.9
    w = torch.tensor([sphere(*toys.TOY3D_START)], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum)

    def angles() -> tuple[torch.Tensor, torch.Tensor]:
        x, y, z = w[0]
        return torch.atan2(y, x), torch.atan2(torch.sqrt(x**2 + y**2), z)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (1 - a) ** 2 + 100 * (b - a**2) ** 2

    norms, errors, path = [], [], []

    def record() -> None:
        with torch.no_grad():
            a, b = angles()
            norms.append(float(w.norm()))
            errors.append(float(f(a, b)))
            path.append([float(a), float(b)])

    record()
    for _ in range(toys.TOY3D_STEPS):
        opt.zero_grad()
        f(*angles()).backward()
        with torch.no_grad():  # SGDP's decoupled decay (wd_ratio 1, no projection): ×1/(1−μ)
            w.mul_(1 - lr * wd / (1 - momentum))
        opt.step()
        record()
    np.testing.assert_allclose(run.norms, norms, rtol=1e-10)
    np.testing.assert_allclose(run.errors, errors, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(run.path, path, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- end to end


def check_schema(run: dict[str, Any]) -> None:
    assert set(run) == set(SCHEMA), run["run_id"]
    for key, types in SCHEMA.items():
        value = run[key]
        # bool is an int in Python; the schema's ints and floats are not booleans
        assert type(value) in types, (run["run_id"], key, value)
    assert run["norm_start"] > 0 and run["norm_end"] > 0
    assert math.isfinite(run["norm_start"]) and math.isfinite(run["norm_end"])
    assert run["seconds"] >= 0


def test_suite_results_follow_the_schema(suite: Path) -> None:
    results = load(suite)
    assert results["schema"] == 2
    assert results["settings"]["dataset"] == "digits"
    assert results["settings"]["epochs"] == 1
    assert results["settings"]["threads_per_run"] == 1
    assert results["failed"] == []
    runs = by_id(results)
    assert len(runs) == len(results["runs"])  # run ids are unique

    toy2d = {k: r for k, r in runs.items() if r["task"] == "toy2d"}
    toy3d = {k: r for k, r in runs.items() if r["task"] == "toy3d"}
    cls = {k: r for k, r in runs.items() if r["task"] == "classification"}
    assert len(runs) == len(toy2d) + len(toy3d) + len(cls)
    assert sorted(r["optimizer"] for r in toy2d.values()) == sorted(toys.TOY2D_METHODS)
    assert len(toy3d) == len(toys.TOY3D_METHODS) * len(toys.TOY3D_LRS)
    assert {(r["optimizer"], r["lr"]) for r in toy3d.values()} == {
        (m, lr) for m in toys.TOY3D_METHODS for lr in toys.TOY3D_LRS
    }
    assert sorted((r["optimizer"], r["weight_decay"] > 0) for r in cls.values()) == sorted(
        (opt, on) for opt in ("SGD", "SGDP") for on in (True, False)
    )

    steps = math.ceil(n_train_digits() / BATCH)
    for run in runs.values():
        check_schema(run)
        curve_file = suite / run["curve"]
        assert curve_file.is_file(), run["run_id"]
        curve = json.loads(curve_file.read_text())
        if run["task"] == "classification":
            assert 0.0 <= run["test_accuracy"] <= 1.0
            assert math.isfinite(run["train_loss"])
            assert run["epochs"] == 1 and run["steps"] == steps and run["seed"] == 0
            assert run["lr"] is None and run["final_error"] is None
            assert run["dataset"] == "digits"
            table_wd = OPTIMIZERS[run["optimizer"]][1]
            expected_wd = table_wd if run["run_id"].split("/")[4] == "wd=on" else 0.0
            assert run["weight_decay"] == expected_wd
            assert set(curve) == {"curve", "layers", "views"}
            assert isinstance(curve["curve"], list) and curve["curve"]
            assert {"step", "norm", "relative_update", "effective_step"} <= set(curve["curve"][0])
            # per-layer records at the first and the last logged step, the same layers in both
            first, last = curve["curve"][0]["step"], curve["curve"][-1]["step"]
            by_step: dict[int, set[str]] = {}
            for rec in curve["layers"]:
                by_step.setdefault(rec["step"], set()).add(rec["name"])
            assert set(by_step) == {first, last} and by_step[first] == by_step[last]
            # the projected optimizers report which view fired for every tested tensor
            if run["optimizer"].endswith("P"):
                assert curve["views"] and {v for _, v in curve["views"]} <= {
                    "channel",
                    "layer",
                    "none",
                    "skipped",
                }
                assert "channel" in {v for _, v in curve["views"]}
            else:
                assert curve["views"] == []
        else:
            assert run["test_accuracy"] is None and run["epochs"] is None
            assert run["train_loss"] is None
            n_steps = toys.TOY2D_STEPS if run["task"] == "toy2d" else toys.TOY3D_STEPS
            assert run["steps"] == n_steps
            assert len(curve["norms"]) == len(curve["errors"]) == len(curve["path"]) == n_steps + 1
            assert run["norm_start"] == curve["norms"][0]
            assert run["norm_end"] == curve["norms"][-1]
            assert run["final_error"] == curve["errors"][-1]
            if run["task"] == "toy2d":
                assert run["lr"] == toys.TOY2D_LR and run["weight_decay"] == 0.0
            else:
                assert run["weight_decay"] == toys.TOY3D_METHODS[run["optimizer"]][1]


def test_suite_toy_records_match_the_toy_functions(suite: Path) -> None:
    runs = by_id(load(suite))
    for method in toys.TOY2D_METHODS:
        run = toys.run_toy2d(method)
        rec = runs[f"toy2d/{method}"]
        assert rec["norm_end"] == pytest.approx(run.norms[-1], rel=1e-12)
        assert rec["final_error"] == pytest.approx(run.errors[-1], rel=1e-9, abs=1e-9)


def test_suite_report_mentions_every_run_and_its_figures_exist(suite: Path) -> None:
    report = (suite / "report.md").read_text()
    for opt in ("SGD", "SGDP"):
        assert f"| {opt} |" in report
    for method in (*toys.TOY2D_METHODS, *toys.TOY3D_METHODS):
        assert f"| {method} |" in report
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"toy2d.png", "toy3d.png", "classification_norms.png"} <= set(figures)
    assert "classification_accuracy.png" in figures
    for name in figures:
        data = (suite / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 1000, name
    assert not list(suite.glob("*.tmp")) and not list((suite / "curves").glob("*.tmp"))


def test_parallel_workers_give_the_numbers_of_one_process(suite: Path, tmp_path: Path) -> None:
    """The suite's runs in two workers and again one after the other in this process: the
    same numbers, bit for bit. Like with like: both give every run one intra-op thread (the
    number of threads changes the order of reductions, so their rounding)."""
    out = tmp_path / "again"
    args = ["--tasks", "classification", "--optimizers", "SGD", "SGDP", *TINY, "--jobs", "1"]
    assert reproduce(out, *args) == 0
    first = {k: r for k, r in by_id(load(suite)).items() if r["task"] == "classification"}
    second = by_id(load(out))
    assert first.keys() == second.keys()
    for run_id, rec in first.items():
        assert without_seconds(rec) == without_seconds(second[run_id]), run_id
        curve_a = json.loads((suite / rec["curve"]).read_text())
        curve_b = json.loads((out / second[run_id]["curve"]).read_text())
        assert curve_a == curve_b, run_id


# ---------------------------------------------------------------------------- resume


def test_resume_runs_only_the_missing_run(
    suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(suite, out)
    full = load(suite)
    partial = dict(full, runs=full["runs"][:-1])
    (out / "results.json").write_text(json.dumps(partial))
    missing = full["runs"][-1]

    calls: list[str] = []
    real_train, real_2d, real_3d = runner.train_classifier, toys.run_toy2d, toys.run_toy3d

    def counting(fn: Any, label: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(label)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(runner, "train_classifier", counting(real_train, "classification"))
    monkeypatch.setattr(toys, "run_toy2d", counting(real_2d, "toy2d"))
    monkeypatch.setattr(toys, "run_toy3d", counting(real_3d, "toy3d"))
    capsys.readouterr()
    assert reproduce(out, *SUITE_ARGS, "--resume", "--jobs", "1") == 0
    assert calls == [missing["task"]]

    resumed = load(out)
    assert len(resumed["runs"]) == len(full["runs"])
    # the kept runs are untouched (their timings too), the missing one is back
    assert resumed["runs"][:-1] == partial["runs"]
    assert without_seconds(resumed["runs"][-1]) == without_seconds(missing)


def test_second_run_without_resume_refuses_to_overwrite(
    suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(suite, out)
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert reproduce(out, *SUITE_ARGS) == 2
    err = capsys.readouterr().err
    assert "overwrite" in err and "--resume" in err
    assert (out / "results.json").read_bytes() == before


def test_overwrite_starts_over(suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(suite, out)
    assert reproduce(out, "--tasks", "classification", "--optimizers", "SGDP", *TINY,
                     "--overwrite", "--jobs", "1") == 0  # fmt: skip
    runs = load(out)["runs"]
    assert sorted(r["run_id"].split("/", 3)[-1] for r in runs) == [
        "SGDP/wd=off/seed=0",
        "SGDP/wd=on/seed=0",
    ]


def test_resume_with_other_epochs_is_refused(
    suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(suite, out)
    before = (out / "results.json").read_bytes()
    args = ["--tasks", "classification", "--optimizers", "SGD", "SGDP", "--seeds", "0"]
    capsys.readouterr()
    assert reproduce(out, *args, "--epochs", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "epochs" in err and "same settings" in err
    assert (out / "results.json").read_bytes() == before


# ---------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_keeps_finished_runs_and_resume_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["--tasks", "classification", "--optimizers", "SGDP", *TINY, "--jobs", "1"]
    real_train = runner.train_classifier
    calls = 0

    def interrupted_second_time(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real_train(*a, **kw)

    monkeypatch.setattr(runner, "train_classifier", interrupted_second_time)
    capsys.readouterr()
    assert reproduce(out, *args) == 130
    err = capsys.readouterr().err
    assert "--resume" in err
    kept = load(out)["runs"]
    assert [r["run_id"].split("/", 3)[-1] for r in kept] == ["SGDP/wd=on/seed=0"]
    check_schema(kept[0])
    assert (out / kept[0]["curve"]).is_file()
    assert not (out / "report.md").exists()

    monkeypatch.setattr(runner, "train_classifier", real_train)
    assert reproduce(out, *args, "--resume") == 0
    runs = load(out)["runs"]
    assert runs[0] == kept[0]
    assert [r["run_id"].split("/", 3)[-1] for r in runs] == [
        "SGDP/wd=on/seed=0",
        "SGDP/wd=off/seed=0",
    ]
    assert (out / "report.md").is_file()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--optimizers", "SGDX"], ["SGDX", *OPTIMIZERS]),
        (["--dataset", "mnist"], ["mnist", "digits", "cifar10"]),
        (["--tasks", "toy4d"], ["toy4d", "toy2d", "toy3d", "classification"]),
        (["--suite", "huge"], ["huge", "quick", "full"]),
        (["--dataset", "cifar10"], ["--data-dir", "cs.toronto.edu"]),
        (["--dataset", "cifar10", "--data-dir", "EMPTY"], ["cs.toronto.edu"]),
        (["--tasks", "toy2d", "--epochs", "0"], ["--epochs"]),
        (["--jobs", "0"], ["--jobs", "positive integer", "0"]),
        (["--jobs", "-3"], ["--jobs", "positive integer", "-3"]),
        (["--tasks", "lm", "--lm-steps", "2"], ["--lm-steps", "at least 5"]),
        (["--tasks", "lm", "--optimizers", "SGD"], ["lm", "AdamW and AdamP", "SGD"]),
    ],
    ids=[
        "optimizer",
        "dataset",
        "task",
        "suite",
        "cifar-no-dir",
        "cifar-empty-dir",
        "epochs0",
        "jobs0",
        "jobs-negative",
        "lm-steps",
        "lm-optimizers",
    ],
)
def test_bad_input_exits_2_with_a_message(
    args: list[str], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if a == "EMPTY" else a for a in args]
    if "--tasks" not in args:
        args = ["--tasks", "classification", *args]
    capsys.readouterr()
    assert reproduce(tmp_path / "out", *args, *TINY[:2]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out" / "results.json").exists()


def test_jobs_that_is_not_a_number_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        reproduce(tmp_path / "out", "--tasks", "toy2d", "--jobs", "two")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "'two'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert reproduce(tmp_path / "out", "--tasks", "toy2d", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "cuda" in err.lower() and "error" in err
    assert not (tmp_path / "out" / "results.json").exists()


# ---------------------------------------------------------------------------- report logic


def record(opt: str, wd: float, seed: int, acc: float, growth: float) -> dict[str, Any]:
    return {
        "run_id": f"classification/x/y/{opt}/wd={'on' if wd else 'off'}/seed={seed}",
        "task": "classification",
        "optimizer": opt,
        "weight_decay": wd,
        "seed": seed,
        "test_accuracy": acc,
        "norm_start": 2.0,
        "norm_end": 2.0 * growth,
    }


def records(opt: str, wd: float, accs: list[float], growths: list[float]) -> list[dict[str, Any]]:
    return [record(opt, wd, i, a, g) for i, (a, g) in enumerate(zip(accs, growths, strict=True))]


def test_summarize_classification_statistics() -> None:
    rng = np.random.default_rng(0)
    accs = {("SGD", True): rng.uniform(0.5, 0.9, 5), ("SGDP", False): rng.uniform(0.5, 0.9, 3)}
    growths = {k: rng.uniform(0.8, 3.0, len(v)) for k, v in accs.items()}
    runs = [{"task": "toy2d", "optimizer": "GD", "weight_decay": 0.0}]  # ignored
    for (opt, on), acc in accs.items():
        runs += records(opt, 1e-4 if on else 0.0, list(acc), list(growths[(opt, on)]))
    rows = summarize_classification(runs)
    assert [(r["optimizer"], r["weight_decay_on"]) for r in rows] == [
        ("SGD", True),
        ("SGDP", False),
    ]
    for row in rows:
        key = (row["optimizer"], row["weight_decay_on"])
        pct, g = 100 * accs[key], growths[key]
        n = len(pct)
        std = np.std(pct, ddof=1)
        assert row["n"] == n
        assert row["acc_mean"] == pytest.approx(np.mean(pct), rel=1e-12)
        assert row["acc_std"] == pytest.approx(std, rel=1e-12)
        assert row["acc_ci95"] == pytest.approx(
            stats.t.ppf(0.975, n - 1) * std / math.sqrt(n), rel=1e-12
        )
        assert row["growth"] == pytest.approx(np.mean(g), rel=1e-12)
        assert row["eff_step_ratio"] == pytest.approx(np.mean(1 / g**2), rel=1e-12)
        assert row["norm_start"] == pytest.approx(2.0)
        assert row["norm_end"] == pytest.approx(np.mean(2.0 * g), rel=1e-12)


def test_summarize_one_seed_has_no_interval() -> None:
    (row,) = summarize_classification(records("AdamP", 1e-2, [0.7], [1.1]))
    assert row["n"] == 1 and row["acc_mean"] == pytest.approx(70.0)
    assert math.isnan(row["acc_std"]) and math.isnan(row["acc_ci95"])
    (line,) = [c for c in _claims(summarize_classification(
        records("AdamP", 1e-2, [0.7], [1.1]) + records("AdamW", 1e-2, [0.6], [1.2])
    )) if c.startswith("- Accuracy")]  # fmt: skip
    assert "not resolvable with one seed" in line


def claim(lines: list[str], kind: str, proj: str, base: str, wd: str) -> str:
    (line,) = [c for c in lines if c.startswith(f"- {kind}, {proj} vs {base} {wd} ")]
    return line


def test_claims_judge_norm_growth_and_accuracy() -> None:
    tight_hi, tight_lo = [0.90, 0.91, 0.92, 0.91], [0.70, 0.71, 0.72, 0.71]
    runs = (
        # with weight decay: SGDP grows less and is far more accurate
        records("SGD", 1e-4, tight_lo, [1.5, 1.6, 1.5, 1.6])
        + records("SGDP", 1e-5, tight_hi, [1.1, 1.0, 1.1, 1.0])
        # without: SGDP grows more, accuracies overlap
        + records("SGD", 0.0, [0.80, 0.70, 0.90, 0.75], [1.1, 1.1, 1.1, 1.1])
        + records("SGDP", 0.0, [0.81, 0.71, 0.88, 0.76], [1.3, 1.3, 1.3, 1.3])
        # Adam/AdamP with weight decay: AdamP clearly less accurate
        + records("Adam", 1e-4, tight_hi, [2.0] * 4)
        + records("AdamP", 1e-2, tight_lo, [1.0] * 4)
    )
    lines = _claims(summarize_classification(runs))
    on = claim(lines, "Norm growth", "SGDP", "SGD", "with")
    assert "**shown**" in on
    off = claim(lines, "Norm growth", "SGDP", "SGD", "without")
    assert "**not shown**" in off
    assert "more accurate, beyond" in claim(lines, "Accuracy", "SGDP", "SGD", "with")
    assert "no difference resolvable" in claim(lines, "Accuracy", "SGDP", "SGD", "without")
    assert "LESS accurate" in claim(lines, "Accuracy", "AdamP", "Adam", "with")
    assert "**shown**" in claim(lines, "Norm growth", "AdamP", "Adam", "with")
    # no claim about a pair that did not run
    assert not [c for c in lines if "AdamW" in c]


def tight(mean: float) -> list[float]:
    """Four accuracies around ``mean`` with a 95 % interval of about ±0.13 points."""
    return [mean, mean + 0.001, mean + 0.002, mean + 0.001]


@pytest.mark.parametrize(
    ("sgdp_off", "verdict"),
    [
        (0.895, "**shown**: SGDP loses less"),  # loses 0.5 points vs SGD's 5
        (0.70, "**not shown**: SGDP loses more"),  # loses 20 points
        (0.8505, "no difference resolvable"),  # loses 4.95 points
    ],
)
def test_claims_compare_the_loss_from_turning_weight_decay_off(
    sgdp_off: float, verdict: str
) -> None:
    runs = (
        records("SGD", 1e-4, tight(0.90), [1.0] * 4)
        + records("SGD", 0.0, tight(0.85), [1.0] * 4)
        + records("SGDP", 1e-5, tight(0.90), [1.0] * 4)
        + records("SGDP", 0.0, tight(sgdp_off), [1.0] * 4)
    )
    lines = _claims(summarize_classification(runs))
    (line,) = [c for c in lines if c.startswith("- Accuracy lost by turning weight decay off")]
    assert verdict in line
    # equal growth is not "lower"
    assert "**not shown**" in claim(lines, "Norm growth", "SGDP", "SGD", "with")


def test_claims_loss_from_weight_decay_needs_two_seeds() -> None:
    runs = [
        record("Adam", 1e-4, 0, 0.9, 1.0),
        record("Adam", 0.0, 0, 0.8, 1.0),
        record("AdamP", 1e-2, 0, 0.9, 1.0),
        record("AdamP", 0.0, 0, 0.9, 1.0),
    ]
    lines = _claims(summarize_classification(runs))
    (line,) = [c for c in lines if c.startswith("- Accuracy lost by turning weight decay off")]
    assert "not resolvable with one seed" in line


# ---------------------------------------------------------------------------- distributed


TORCHRUN_RESULTS: dict[str, list[dict[str, Any]]] = {}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_two_processes(tmp_path: Path, parallel: str) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "adampx", "reproduce", "--tasks", "classification", "--optimizers", "AdamP",
        *TINY, "--out", str(out), "--parallel", parallel,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = load(out)["runs"]
    assert sorted(r["run_id"].split("/", 3)[-1] for r in runs) == [
        "AdamP/wd=off/seed=0",
        "AdamP/wd=on/seed=0",
    ]
    # each of the two ranks trains on its half of every epoch
    per_rank = math.ceil(n_train_digits() / 2)
    for run in runs:
        check_schema(run)
        assert run["steps"] == math.ceil(per_rank / BATCH)
        assert run["test_accuracy"] > 0.25  # chance is 0.1 (ten digits)
        assert (out / run["curve"]).is_file()
    # only rank 0 reports
    assert proc.stdout.count("report: ") == 1
    assert proc.stdout.count("classification: norm of the scale-invariant weights") == 1
    assert (out / "report.md").is_file()
    # DDP and FSDP2 train the same model on the same data: the same numbers (to rounding)
    TORCHRUN_RESULTS[parallel] = runs
    if len(TORCHRUN_RESULTS) == 2:
        for a, b in zip(TORCHRUN_RESULTS["ddp"], TORCHRUN_RESULTS["fsdp2"], strict=True):
            assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)
            assert a["norm_end"] == pytest.approx(b["norm_end"], rel=1e-5)
