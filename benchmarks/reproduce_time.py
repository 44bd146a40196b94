"""Wall time of ``adampx reproduce`` on a quiet machine and on a busy one, in one run.

    python benchmarks/reproduce_time.py                     # the quick suite, quiet then busy
    python benchmarks/reproduce_time.py --out bench-out     # keep both suites' results
    python benchmarks/reproduce_time.py --markdown docs/results.md   # also write the table
    python benchmarks/reproduce_time.py --quiet-only -- --tasks lm   # reproduce's options after --

Runs ``python -m adampx reproduce`` (the quick suite, or the options given after ``--``) once
with nothing else started ("quiet"), then starts ``--busy`` (default 2) single-threaded
CPU-bound processes (Python's ``while True: pass``), runs it again ("busy") and stops them.
Each time is the suite's wall time as a user sees it, start to exit, report included. Prints
the machine, the versions and a table with the targets of the quick suite on a 2-core
machine like CI's: quiet at most 120 s, busy at most twice quiet. It also checks that both
suites gave the same numbers (they are seeded and each run has one thread, so a busy machine
may only slow them down).

``--markdown PATH`` writes the table as markdown: into ``PATH`` between the lines
``<!-- reproduce_time: begin -->`` and ``<!-- reproduce_time: end -->`` when it holds them,
else into a new file ``PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

QUIET_TARGET_S = 120.0
BUSY_RATIO_TARGET = 2.0
BEGIN = "<!-- reproduce_time: begin -->"
END = "<!-- reproduce_time: end -->"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the times were measured: CPU, usable CPUs, versions, date."""
    import torch

    import adampx
    from adampx.experiments.pool import available_cpus

    return {
        "cpu": cpu_model(),
        "usable_cpus": available_cpus(),
        "online_cpus": os.cpu_count(),
        "system": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "adampx": adampx.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_suite(reproduce_args: list[str], out: Path, log: Path) -> float:
    """Wall seconds of one ``adampx reproduce`` into ``out`` (its stderr into ``log``)."""
    command = [sys.executable, "-m", "adampx", "reproduce", *reproduce_args, "--out", str(out)]
    start = time.perf_counter()
    with log.open("w") as err:
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=err, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(command)} exited with {done.returncode}:\n{tail}")
    return seconds


def processes(count: int) -> str:
    return f"{count} busy process{'' if count == 1 else 'es'}"


def start_busy(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` single-threaded CPU-bound processes, spinning before this returns."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(1.0)  # past the interpreter's start: spinning
    for p in procs:
        if p.poll() is not None:
            raise SystemExit(f"a busy process exited with {p.returncode}")
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def numbers(out: Path) -> list[dict[str, Any]]:
    """The suite's runs without their timings (what must not depend on the load)."""
    runs = json.loads((out / "results.json").read_text())["runs"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


def table(rows: list[tuple[str, float]], markdown: bool) -> str:
    """The results as aligned text or as markdown."""
    quiet = rows[0][1]
    lines = []
    for label, seconds in rows:
        ratio = seconds / quiet
        if label == "quiet":
            target, met = f"≤ {QUIET_TARGET_S:g} s", seconds <= QUIET_TARGET_S
        else:
            target, met = f"≤ {BUSY_RATIO_TARGET:g} × quiet", ratio <= BUSY_RATIO_TARGET
        lines.append((label, f"{seconds:.1f}", f"{ratio:.2f}", target, "yes" if met else "NO"))
    header = ("run", "wall s", "× quiet", "target", "met")
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|---|---:|---:|---|---|"]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    out = [f"{header[0]:<28}{header[1]:>9}{header[2]:>9}  {header[3]:<16}{header[4]}"]
    out += [f"{a:<28}{b:>9}{c:>9}  {d:<16}{e}" for a, b, c, d, e in lines]
    return "\n".join(out)


def report(info: dict[str, Any], rows: list[tuple[str, float]], same: bool | None) -> str:
    """Machine, command, table and the numbers check, as text."""
    lines = [
        f"machine: {info['cpu']}, {info['usable_cpus']} CPUs usable ({info['online_cpus']} "
        f"online), {info['system']}; Python {info['python']}, torch {info['torch']}, adampx "
        f"{info['adampx']}; {info['date']}",
        f"command: python -m adampx reproduce {' '.join(info['args'])}".rstrip()
        + f" ({info['runs']} runs)",
        "",
        table(rows, markdown=False),
    ]
    if same is not None:
        lines.append(f"\nsame numbers quiet and busy: {'yes' if same else 'NO'}")
    return "\n".join(lines)


def markdown(info: dict[str, Any], rows: list[tuple[str, float]], same: bool | None) -> str:
    """The same as markdown, for docs/results.md."""
    args = " ".join(info["args"])
    lines = [
        f"`python -m adampx reproduce{' ' + args if args else ''}` ({info['runs']} runs), "
        f"measured by `benchmarks/reproduce_time.py` on {info['cpu']} ({info['usable_cpus']} "
        f"CPUs usable), {info['system']}, Python {info['python']}, torch {info['torch']}, "
        f'adampx {info["adampx"]}, {info["date"]}. "busy": while {info["busy"]} '
        "single-threaded CPU-bound processes ran beside it.",
        "",
        table(rows, markdown=True),
    ]
    if same is not None:
        lines += ["", f"Same numbers quiet and busy: {'yes' if same else 'no'}."]
    return "\n".join(lines)


def write_markdown(path: Path, text: str) -> None:
    """Between the markers of an existing ``path``, else into a new file."""
    block = f"{BEGIN}\n{text}\n{END}"
    if not path.exists():
        path.write_text(block + "\n")
        return
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} exists without the lines {BEGIN} and {END}: not overwritten")
    head, rest = doc.split(BEGIN, 1)
    path.write_text(head + block + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=2, help="busy processes (default 2)")
    parser.add_argument("--quiet-only", action="store_true", help="time the quiet run only")
    parser.add_argument("--out", type=Path, help="keep the suites' results in OUT/{quiet,busy}")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    parser.add_argument("reproduce_args", nargs="*", help="options for adampx reproduce")
    args = parser.parse_args(argv)
    if args.busy < 1:
        parser.error(f"--busy must be at least 1, got {args.busy}")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists: choose a new folder")
    info = machine()
    info.update(args=args.reproduce_args, busy=args.busy)
    with tempfile.TemporaryDirectory(prefix="reproduce_time-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"quiet: python -m adampx reproduce {' '.join(args.reproduce_args)}", flush=True)
        rows = [("quiet", run_suite(args.reproduce_args, root / "quiet", root / "quiet.log"))]
        info["runs"] = len(numbers(root / "quiet"))
        same = None
        if not args.quiet_only:
            busy = start_busy(args.busy)
            print(f"busy: {processes(args.busy)}, pids {[p.pid for p in busy]}", flush=True)
            try:
                seconds = run_suite(args.reproduce_args, root / "busy", root / "busy.log")
            finally:
                stop(busy)
            print(f"busy processes stopped: {[p.pid for p in busy]}", flush=True)
            rows.append((f"busy ({processes(args.busy)})", seconds))
            same = numbers(root / "quiet") == numbers(root / "busy")
        print()
        print(report(info, rows, same))
        if args.markdown is not None:
            write_markdown(args.markdown, markdown(info, rows, same))
            print(f"\nmarkdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
