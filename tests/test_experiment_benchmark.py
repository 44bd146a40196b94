"""benchmarks/reproduce_time.py runs the suite quiet and busy and prints its table.

No timing is asserted (the targets are read from the benchmark's output on a quiet machine,
never from a timed test): the test runs a tiny suite (the 2-D toy, in one process) and checks
that the rows add up, the busy processes are gone, both suites' results are kept and the
markdown lands between its markers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce_time.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_reproduce_time", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def test_reproduce_time_quiet_and_busy(tmp_path: Path) -> None:
    bench = load_script()
    doc = tmp_path / "results.md"
    doc.write_text(f"intro\n{bench.BEGIN}\nold table\n{bench.END}\ntail\n")
    keep = tmp_path / "keep"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--busy", "1", "--markdown", str(doc), "--out", str(keep),
         "--", "--tasks", "toy2d", "--jobs", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"machine: .+, \d+ CPUs usable .+Python \S+, torch \S+, adampx \S+", out)
    assert "command: python -m adampx reproduce --tasks toy2d --jobs 1 (6 runs)" in out
    stopped = re.search(r"busy processes stopped: \[(\d+)\]", out)
    assert stopped is not None and not alive(int(stopped.group(1)))
    number = r"(\d+\.\d)\s+(\d+\.\d\d)\s+(≤ .+?)\s+(yes|NO)$"
    quiet = re.search(rf"^quiet\s+{number}", out, re.M)
    busy = re.search(rf"^busy \(1 busy process\)\s+{number}", out, re.M)
    assert quiet is not None and busy is not None, out
    q, b = float(quiet.group(1)), float(busy.group(1))
    assert q > 0 and b > 0 and float(quiet.group(2)) == 1.0
    ratio = float(busy.group(2))
    assert abs(ratio - b / q) <= 0.01 + 0.05 / q * (1 + b / q)  # from rounded seconds
    assert (quiet.group(4) == "yes") == (q <= bench.QUIET_TARGET_S)
    assert (busy.group(4) == "yes") == (ratio <= bench.BUSY_RATIO_TARGET)
    assert "same numbers quiet and busy: yes" in out
    for run in ("quiet", "busy"):
        assert len(json.loads((keep / run / "results.json").read_text())["runs"]) == 6
    text = doc.read_text()
    assert text.startswith(f"intro\n{bench.BEGIN}\n") and text.endswith(f"{bench.END}\ntail\n")
    assert "old table" not in text
    assert "| quiet | " in text and "| busy (1 busy process) |" in text
    assert "Same numbers quiet and busy: yes." in text


def test_markdown_needs_the_markers_in_an_existing_file(tmp_path: Path) -> None:
    bench = load_script()
    doc = tmp_path / "results.md"
    doc.write_text("a page without markers\n")
    with pytest.raises(SystemExit, match="without the lines"):
        bench.write_markdown(doc, "table")
    assert doc.read_text() == "a page without markers\n"
    new = tmp_path / "new.md"
    bench.write_markdown(new, "table")
    assert new.read_text() == f"{bench.BEGIN}\ntable\n{bench.END}\n"


def test_reproduce_time_refuses_no_busy_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--busy", "0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--busy must be at least 1" in done.stderr
