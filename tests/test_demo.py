"""``python -m adampx demo``: a thin layer over the reproduction's classification runs.

Run on tiny settings (2 epochs); the expected values are computed here, never hard-coded.
"""

import contextlib
import io
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from adampx.__main__ import main
from adampx.experiments.classification import OPTIMIZERS, train_classifier
from adampx.experiments.data import load_dataset
from adampx.experiments.demo import DEFAULT_OPTIMIZERS, run
from adampx.experiments.models import build_model
from adampx.experiments.runner import DATASET_DEFAULTS

ROW = re.compile(
    r"^(\w+)\s+([\d.e+-]+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)×\s+([\d.]+)$", re.M
)


def parse_rows(out: str) -> dict[str, dict[str, float]]:
    keys = ("wd", "acc", "start", "end", "growth", "seconds")
    rows = {}
    for m in ROW.finditer(out):
        rows[m[1]] = dict(zip(keys, map(float, m.groups()[1:]), strict=True))
    return rows


@pytest.fixture(scope="module")
def demo_sgd_sgdp() -> tuple[str, dict]:
    """The demo's stdout and results for SGD and SGDP, 2 epochs, seed 1."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = run(epochs=2, seed=1, optimizers=["SGDP", "SGD"])
    return out.getvalue(), results


def test_demo_prints_one_row_per_optimizer_in_order(demo_sgd_sgdp) -> None:
    out, results = demo_sgd_sgdp
    rows = parse_rows(out)
    assert list(rows) == ["SGDP", "SGD"] == list(results)
    assert "2 epochs, seed 1" in out
    for name, row in rows.items():
        r = results[name]
        assert row["acc"] == pytest.approx(100 * r.test_accuracy, abs=0.051)
        assert row["start"] == pytest.approx(r.norm_start, abs=0.0051)
        assert row["end"] == pytest.approx(r.norm_end, abs=0.0051)
        assert row["growth"] == pytest.approx(r.norm_end / r.norm_start, abs=0.0051)
        assert row["seconds"] == pytest.approx(r.seconds, abs=0.051)
        # Ten classes: chance is 10 %. Two epochs of real training must do far better.
        assert row["acc"] > 60.0, rows


def test_demo_uses_the_reproductions_weight_decay(demo_sgd_sgdp) -> None:
    """The registry of the experiments, not a copy: SGD 1e-4 (L2), SGDP 1e-5 (decoupled)."""
    out, results = demo_sgd_sgdp
    rows = parse_rows(out)
    for name in ("SGD", "SGDP"):
        assert results[name].weight_decay == OPTIMIZERS[name][1]
        assert rows[name]["wd"] == pytest.approx(OPTIMIZERS[name][1], rel=1e-6)


def test_demo_norms_are_those_of_the_reproductions_model(demo_sgd_sgdp) -> None:
    """‖w‖ start: every conv weight (each feeds a BatchNorm) of the seeded digits model."""
    _, results = demo_sgd_sgdp
    model_name = DATASET_DEFAULTS["digits"][0]
    torch.manual_seed(1)
    model = build_model(model_name, 10, 1, 8)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    expected = math.sqrt(sum(float(w.detach().double().square().sum()) for w in convs))
    for r in results.values():
        assert r.norm_start == pytest.approx(expected, rel=1e-9)


def test_demo_shows_momentum_inflating_the_norm_and_sgdp_curbing_it(demo_sgd_sgdp) -> None:
    _, results = demo_sgd_sgdp
    sgd, sgdp = results["SGD"], results["SGDP"]
    assert sgd.norm_end > sgd.norm_start
    assert sgdp.norm_end / sgdp.norm_start < sgd.norm_end / sgd.norm_start


def test_demo_run_is_the_reproductions_run(demo_sgd_sgdp) -> None:
    """The SGDP row equals ``train_classifier`` on the reproduction's digits split."""
    _, results = demo_sgd_sgdp
    model_name, batch_size, _, _ = DATASET_DEFAULTS["digits"]
    direct = train_classifier(
        load_dataset("digits", seed=0),
        model_name=model_name,
        optimizer_name="SGDP",
        weight_decay_on=True,
        seed=1,
        epochs=2,
        batch_size=batch_size,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
    )
    demo = results["SGDP"]
    assert (demo.test_accuracy, demo.norm_start, demo.norm_end, demo.steps) == (
        direct.test_accuracy,
        direct.norm_start,
        direct.norm_end,
        direct.steps,
    )


def test_demo_command_line_default_optimizers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` passes the options through; without --optimizers all four run, in order."""
    calls = []

    def fake_train(data, **kwargs):
        calls.append(kwargs)
        return _FakeResult()

    monkeypatch.setattr("adampx.experiments.demo.train_classifier", fake_train)
    assert main(["demo", "--epochs", "3", "--seed", "7"]) == 0
    assert [c["optimizer_name"] for c in calls] == list(DEFAULT_OPTIMIZERS)
    assert all(c["epochs"] == 3 and c["seed"] == 7 and c["weight_decay_on"] for c in calls)
    assert list(parse_rows(capsys.readouterr().out)) == list(DEFAULT_OPTIMIZERS)


class _FakeResult:
    test_accuracy, norm_start, norm_end, weight_decay, seconds = 0.5, 2.0, 3.0, 1e-4, 0.1


def test_demo_rejects_unknown_optimizer() -> None:
    with pytest.raises(SystemExit, match=r"unknown optimizer.*Adamp.*choose from"):
        main(["demo", "--optimizers", "Adamp"])


def test_demo_rejects_nonpositive_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adampx", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--epochs" in result.stdout and "--optimizers" in result.stdout
