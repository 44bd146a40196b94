"""The README's first command: ``python -m adampx demo`` (on tiny settings)."""

import re
import subprocess
import sys

import pytest
import torch

from adampx.__main__ import main
from adampx.demo import make_model, scale_invariant_norm


def test_demo_trains_and_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["demo", "--epochs", "3", "--optimizers", "AdamP", "SGDP"])
    out = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+([\d.]+)%", out, re.M)}
    assert set(rows) == {"AdamP", "SGDP"}
    # Ten classes: chance is 10 %. Three epochs of real training must do far better.
    assert all(acc > 60.0 for acc in rows.values()), rows


def test_scale_invariant_norm_is_the_norm_of_all_conv_weights() -> None:
    model = make_model()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    expected = torch.cat([w.detach().flatten() for w in convs]).norm().item()
    assert scale_invariant_norm(model) == pytest.approx(expected, rel=1e-6)


def test_demo_rejects_unknown_optimizer() -> None:
    with pytest.raises(SystemExit, match=r"unknown optimizer.*Adamp.*choose from"):
        main(["demo", "--optimizers", "Adamp"])


def test_demo_rejects_nonpositive_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adampx", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout
