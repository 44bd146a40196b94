"""``adampx reproduce`` in parallel workers: the pool, crashes, Ctrl-C, orphans, ``--jobs``.

The pool tests run real spawned workers on the jobs of ``tests/pool_handlers.py``; the suite
tests run the command line (in this process, or as a subprocess where a signal is sent) on
tiny settings. That the parallel numbers equal a one-process run's is tested in
``tests/test_reproduce.py`` (``test_parallel_workers_give_the_numbers_of_one_process``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import pool_handlers
from adampx.__main__ import main
from adampx.experiments import runner
from adampx.experiments.pool import Pool, available_cpus
from adampx.experiments.runner import _curve_path

TOYS = ["--tasks", "toy2d"]
CLASSIFY = ["--tasks", "classification", "--optimizers", "SGD", "SGDP", "--epochs", "1"]


def run_pool(jobs: int, make_handler: Any, args: tuple[Any, ...], items: list[Any]) -> Any:
    """Run ``items``; returns the done results, the failures and the progress by job."""
    done: dict[Any, Any] = {}
    failed: dict[Any, str] = {}
    progress: dict[Any, list[Any]] = {}
    started: list[Any] = []
    Pool(jobs, make_handler, args).run(
        items,
        on_start=lambda worker, job: started.append(job),
        on_progress=lambda worker, job, info: progress.setdefault(job, []).append(info),
        on_done=lambda job, result: done.setdefault(job, result),
        on_failed=lambda job, error: failed.setdefault(job, error),
    )
    return started, done, failed, progress


# ---------------------------------------------------------------------------- the pool


def test_pool_workers_have_one_thread_and_survive_failures() -> None:
    jobs = [
        ("info", 0), ("square", 3), ("raise", 1), ("exit", 3), ("square", 4), ("kill", 0),
        ("square", 5), ("info", 1),
    ]  # fmt: skip
    started, done, failed, progress = run_pool(2, pool_handlers.make_handler, ("t",), jobs)
    assert sorted(started) == sorted(jobs)  # each job handed out once
    assert set(done) | set(failed) == set(jobs) and not set(done) & set(failed)
    assert {job: done[job] for job in done if job[0] == "square"} == {
        ("square", v): v * v for v in (3, 4, 5)
    }
    for job in (("info", 0), ("info", 1)):
        # one intra-op thread, one OpenMP thread, Ctrl-C left to the parent
        assert done[job] == {"tag": "t", "threads": 1, "omp": "1", "sigint_ignored": True}
        assert progress[job] == [job]
    assert "ValueError: job 1 raised" in failed[("raise", 1)]
    assert failed[("exit", 3)] == "the worker process running it exited with status 3"
    assert failed[("kill", 0)] == "the worker process running it killed by SIGKILL"


def test_pool_with_a_handler_that_cannot_be_made_fails_every_job() -> None:
    _, done, failed, _ = run_pool(1, pool_handlers.broken_handler, (), [("square", 1), ("x", 2)])
    assert done == {}
    assert set(failed) == {("square", 1), ("x", 2)}
    for error in failed.values():
        assert "RuntimeError: this handler cannot be made" in error


def test_pool_refuses_zero_jobs() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0, pool_handlers.make_handler, ("t",))


# ---------------------------------------------------------------------------- --jobs default


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, 8),  # no cgroup files: the affinity
        ({"cpu.max": "max 100000"}, 8),  # v2, no limit
        ({"cpu.max": "250000 100000"}, 3),  # 2.5 CPUs: rounded up
        ({"cpu.max": "max 100000", "job/cpu.max": "100000 100000"}, 1),  # the child's quota
        ({"cpu.max": "200000 100000", "job/cpu.max": "max 100000"}, 2),  # an ancestor's
        ({"cpu.max": "5000000 100000"}, 8),  # a quota above the affinity
    ],
)
def test_available_cpus_cgroup_v2(
    files: dict[str, str], expected: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for name, text in files.items():
        write(tmp_path / "cgroup" / name, text)
    write(tmp_path / "self", "0::/job\n")
    assert available_cpus(tmp_path / "cgroup", tmp_path / "self") == expected


@pytest.mark.parametrize(("quota", "expected"), [("-1", 4), ("150000", 2), ("50000", 1)])
def test_available_cpus_cgroup_v1(
    quota: str, expected: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    write(tmp_path / "cgroup" / "cpu,cpuacct" / "cpu.cfs_quota_us", quota)
    write(tmp_path / "cgroup" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    write(tmp_path / "self", "4:memory:/x\n2:cpu,cpuacct:/\n")
    assert available_cpus(tmp_path / "cgroup", tmp_path / "self") == expected


def test_default_jobs_is_the_usable_cpus_on_the_cpu_one_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "available_cpus", lambda: 6)
    assert runner.default_jobs(torch.device("cpu")) == 6
    assert runner.default_jobs(torch.device("cuda", 0)) == 1


# ---------------------------------------------------------------------------- a failing run


def load(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_run_that_fails_is_recorded_the_others_finish_and_resume_retries_it(
    jobs: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    failing = "toy2d/GD momentum 0.9"
    # a folder where the run's curve file goes: writing it fails, in the worker
    _curve_path(out, failing).mkdir(parents=True)
    capsys.readouterr()
    assert main(["reproduce", *TOYS, "--jobs", jobs, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"1 run(s) failed ({failing})" in err and "--resume" in err
    results = load(out)
    assert len(results["runs"]) == 5 and failing not in {r["run_id"] for r in results["runs"]}
    (failure,) = results["failed"]
    assert failure["run_id"] == failing and failure["task"] == "toy2d"
    assert "IsADirectoryError" in failure["error"]
    report = (out / "report.md").read_text()
    assert "## Failed runs" in report and f"`{failing}`: IsADirectoryError" in report

    _curve_path(out, failing).rmdir()
    other = "2" if jobs == "1" else "1"  # --resume whatever --jobs was
    assert main(["reproduce", *TOYS, "--jobs", other, "--out", str(out), "--resume"]) == 0
    resumed = load(out)
    assert resumed["failed"] == []
    assert [r["run_id"] for r in resumed["runs"]] == [r["run_id"] for r in results["runs"][:2]] + [
        failing
    ] + [r["run_id"] for r in results["runs"][2:]]  # in the suite's order
    kept = {r["run_id"]: r for r in resumed["runs"]}
    for r in results["runs"]:
        assert kept[r["run_id"]] == r  # untouched, timings too


# ---------------------------------------------------------------------------- signals


def reproduce_process(out: Path, *args: str) -> subprocess.Popen[str]:
    """``adampx reproduce`` in its own session (a terminal's process group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "adampx", "reproduce", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def children(pid: int) -> dict[int, str]:
    """Child processes of ``pid`` and their start times (to tell a reused pid)."""
    kids: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            kids[int(child)] = start_time(int(child))
    return kids


def start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def running(pid: int, started: str) -> bool:
    """Whether ``pid`` is still that process and not a zombie (an exited one)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and start_time(pid) == started


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def finished_runs(out: Path) -> int:
    try:
        return len(load(out)["runs"])
    except (OSError, json.JSONDecodeError):
        return 0


def workers_of(proc: subprocess.Popen[str]) -> dict[int, str]:
    """The worker processes (and the resource tracker) of ``proc``, once two are up."""
    kids: dict[int, str] = {}

    def two_workers() -> bool:
        kids.update(children(proc.pid))
        return sum("spawn_main" in cmdline(k) for k in kids) >= 2

    wait_for(two_workers, 60, "two workers")
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)"
)


@needs_proc
def test_ctrl_c_stops_every_worker_and_keeps_finished_runs(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    args = [*CLASSIFY, "--seeds", "0", "1", "2", "--jobs", "2"]  # 12 runs: some left to stop
    proc = reproduce_process(out, *args)
    try:
        kids = workers_of(proc)
        wait_for(lambda: finished_runs(out) >= 1, 120, "a finished run")
        kids.update(children(proc.pid))
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    wait_for(lambda: not any(running(k, t) for k, t in kids.items()), 10, "no child left")
    kept = load(out)
    assert 1 <= len(kept["runs"]) < 12 and kept["failed"] == []
    assert not (out / "report.md").exists()

    for r in kept["runs"]:  # whole records of finished runs, their curves written
        assert r["run_id"].startswith("classification/") and r["steps"] > 0
        assert (out / r["curve"]).is_file()


@needs_proc
def test_workers_end_when_the_parent_is_killed(tmp_path: Path) -> None:
    proc = reproduce_process(tmp_path / "out", *CLASSIFY, "--seeds", "0", "--jobs", "2")
    kids: dict[int, str] = {}
    try:
        kids = workers_of(proc)
        proc.kill()  # SIGKILL: no chance to stop them
        proc.wait(timeout=30)
        wait_for(lambda: not any(running(k, t) for k, t in kids.items()), 20, "no orphan")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, started in kids.items():
            if running(pid, started):
                os.kill(pid, signal.SIGKILL)


def test_jobs_under_torchrun_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group starts
    capsys.readouterr()
    assert main(["reproduce", *TOYS, "--jobs", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "torchrun" in err
    assert not (tmp_path / "out").exists()
