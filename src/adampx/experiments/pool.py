"""Independent jobs in worker processes, one intra-op thread each, robust to crashes and Ctrl-C.

The reproduction's runs are small models whose every op is too small to gain from torch's
intra-op threads: on a busy machine those threads wait for each other and a run slows down
a hundredfold. So each run gets one thread, and the runs go in parallel, one per worker.

:class:`Pool` starts ``jobs`` worker processes with the ``spawn`` start method (safe with
CUDA and threads; nothing is inherited but the arguments), each with ``OMP_NUM_THREADS=1``
and ``torch.set_num_threads(1)``, hands out the jobs in the order given and calls back as
each job reports progress, finishes or fails:

- a job that raises is reported with its traceback and its worker goes on;
- a worker that dies (a segfault, the OOM killer, a kill) fails its current job with the
  signal or exit status, and a fresh worker takes its place;
- Ctrl-C (``KeyboardInterrupt`` in the parent) stops every worker, waits for them, and
  re-raises. The workers ignore SIGINT themselves, so a terminal's Ctrl-C, sent to the whole
  process group, reaches the parent only; the parent stops them.
- a worker whose parent is gone exits (Linux: at once, through ``PR_SET_PDEATHSIG``;
  elsewhere at its next progress report or job).

Each worker serves its jobs with a *handler*: ``make_handler(*args)`` is called once in the
worker (a module-level function, so that spawn can pickle it) and returns
``handler(job, progress) -> result``; ``progress(info)`` sends ``info`` to the parent. If
``make_handler`` raises, every job the worker gets fails with that traceback. Jobs, results
and progress infos must pickle.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

__all__ = ["Pool", "available_cpus"]

Handler = Callable[[Any, Callable[[Any], None]], Any]
STOP_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1


def available_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """CPUs this process may use: its CPU affinity, bounded by its cgroup's CPU quota.

    The quota is cgroup v2's ``cpu.max`` (of the process's cgroup and every ancestor: the
    smallest), else cgroup v1's ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root, proc_cgroup)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def _cgroup_cpus(root: Path, proc_cgroup: Path) -> int | None:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.strip("/")
        if controllers == "":  # v2: this cgroup and its ancestors
            parts = relative.split("/") if relative else []
            for depth in range(len(parts) + 1):
                quota = _v2_quota(root.joinpath(*parts[:depth], "cpu.max"))
                if quota is not None:
                    quotas.append(quota)
        elif "cpu" in controllers.split(","):
            base = root / controllers
            for folder in (base / relative, base):
                quota = _v1_quota(folder)
                if quota is not None:
                    quotas.append(quota)
                    break
    return max(1, math.ceil(min(quotas))) if quotas else None


def _v2_quota(path: Path) -> float | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1])


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


# ---------------------------------------------------------------------------- the worker


def _worker(
    conn: Connection, parent: int, make_handler: Callable[..., Handler], args: tuple[Any, ...]
) -> None:
    """A worker's life: one thread, ignore Ctrl-C, serve jobs until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (see the docstring)
    _die_with_parent()
    if os.getppid() != parent:  # it died before the kernel was told
        return
    import torch

    torch.set_num_threads(1)

    def send(message: tuple[Any, ...]) -> None:
        if os.getppid() != parent:
            os._exit(1)  # orphaned: nobody reads the results any more
        try:
            conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            os._exit(1)

    handler: Handler | None = None
    setup_error = ""
    try:
        handler = make_handler(*args)
    except Exception:  # every job fails with the reason, and the suite goes on
        setup_error = traceback.format_exc()
    while True:
        try:
            job = conn.recv()
        except (EOFError, ConnectionResetError):
            return
        if job is None:
            return
        if handler is None:
            send(("failed", setup_error))
            continue
        try:
            result = handler(job, lambda info: send(("progress", info)))
        except Exception:
            send(("failed", traceback.format_exc()))
        else:
            send(("done", result))


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


# ---------------------------------------------------------------------------- the parent


@dataclass
class _Slot:
    """One worker process and the job it runs."""

    index: int
    process: Any
    conn: Connection
    job: Any = None
    busy: bool = False


@contextmanager
def _spawn_environment() -> Iterator[None]:
    """While a worker starts: one OpenMP/MKL thread, and SIGINT ignored (inherited through
    exec, so that the worker ignores a terminal's Ctrl-C from its first instruction)."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def describe_exit(exitcode: int | None) -> str:
    """Words for a worker's exit status (negative: killed by that signal)."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with status {exitcode}"


class Pool:
    """Run jobs in ``jobs`` spawned single-threaded workers (see the module docstring).

    Args:
        jobs: worker processes (at least 1).
        make_handler: module-level function; ``make_handler(*args)`` runs once per worker
            and returns the ``handler(job, progress)`` that serves its jobs.
        args: its arguments (picklable).
    """

    def __init__(self, jobs: int, make_handler: Callable[..., Handler], args: tuple[Any, ...]):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.make_handler = make_handler
        self.args = args
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [s.process.pid for s in self._slots if s.process.is_alive()]

    def _start(self, index: int) -> _Slot:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_worker,
            args=(child_end, os.getpid(), self.make_handler, self.args),
            name=f"adampx-worker-{index}",
            daemon=False,  # a daemon may not start processes (DataLoader workers); _stop ends it
        )
        with _spawn_environment():
            process.start()
        child_end.close()
        return _Slot(index, process, parent_end)

    def run(
        self,
        jobs: Sequence[Any],
        *,
        on_done: Callable[[Any, Any], None],
        on_failed: Callable[[Any, str], None],
        on_start: Callable[[int, Any], None] | None = None,
        on_progress: Callable[[int, Any, Any], None] | None = None,
    ) -> None:
        """Run every job; call ``on_start(worker, job)``, ``on_progress(worker, job, info)``,
        ``on_done(job, result)`` or ``on_failed(job, error)`` as they happen (in this
        process). Returns when every job is done or failed; Ctrl-C stops the workers and
        re-raises."""
        queue = list(jobs)
        queue.reverse()  # pop() from the end hands them out in order
        try:
            self._slots = []
            for i in range(min(self.jobs, len(queue))):  # each kept as it starts: a Ctrl-C
                self._slots.append(self._start(i))  # between two starts stops the first
            for slot in self._slots:
                self._hand_out(slot, queue, on_start)
            while any(s.busy for s in self._slots):
                self._serve(queue, on_done, on_failed, on_start, on_progress)
        finally:
            self._stop()

    def _hand_out(
        self, slot: _Slot, queue: list[Any], on_start: Callable[[int, Any], None] | None
    ) -> None:
        if not queue:
            slot.busy, slot.job = False, None
            return
        slot.job, slot.busy = queue.pop(), True
        try:
            slot.conn.send(slot.job)
        except OSError:
            pass  # the worker died: its sentinel fails the job
        if on_start is not None:
            on_start(slot.index, slot.job)

    def _serve(
        self,
        queue: list[Any],
        on_done: Callable[[Any, Any], None],
        on_failed: Callable[[Any, str], None],
        on_start: Callable[[int, Any], None] | None,
        on_progress: Callable[[int, Any, Any], None] | None,
    ) -> None:
        busy = [s for s in self._slots if s.busy]
        ready = wait([s.conn for s in busy] + [s.process.sentinel for s in busy])
        for position, slot in enumerate(list(self._slots)):
            if not slot.busy or (slot.conn not in ready and slot.process.sentinel not in ready):
                continue
            while slot.busy and slot.conn.poll():
                try:
                    kind, payload = slot.conn.recv()
                except (EOFError, ConnectionResetError, OSError):  # it is exiting
                    slot.process.join(STOP_TIMEOUT_S)
                    break
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(slot.index, slot.job, payload)
                    continue
                if kind == "done":
                    on_done(slot.job, payload)
                else:
                    on_failed(slot.job, payload)
                self._hand_out(slot, queue, on_start)
            if not slot.process.is_alive():
                slot.process.join()
                if slot.busy:  # died in the middle of a job
                    on_failed(
                        slot.job,
                        f"the worker process running it {describe_exit(slot.process.exitcode)}",
                    )
                    slot.busy = False
                slot.conn.close()
                fresh = self._start(slot.index) if queue else None
                if fresh is not None:
                    self._slots[position] = fresh
                    self._hand_out(fresh, queue, on_start)

    def _stop(self) -> None:
        """End every worker: ask the idle ones to stop, terminate the rest, wait for all."""
        for slot in self._slots:
            if slot.process.is_alive():
                if slot.busy:
                    slot.process.terminate()
                else:
                    try:
                        slot.conn.send(None)
                    except OSError:
                        slot.process.terminate()
        for slot in self._slots:
            slot.process.join(STOP_TIMEOUT_S)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        self._slots = []
