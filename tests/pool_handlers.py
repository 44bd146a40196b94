"""Handlers for tests/test_experiment_parallel.py's pool tests, importable by spawned workers.

A job is ``(kind, value)``: ``"info"`` reports how the worker was set up, ``"square"``
returns ``value²``, ``"raise"`` raises, ``"exit"`` ends the process with status ``value``,
``"kill"`` kills it with SIGKILL.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any


def make_handler(tag: str) -> Callable[[tuple[str, int], Callable[[Any], None]], Any]:
    def handle(job: tuple[str, int], progress: Callable[[Any], None]) -> Any:
        kind, value = job
        if kind == "info":
            import torch

            progress(("info", value))
            return {
                "tag": tag,
                "threads": torch.get_num_threads(),
                "omp": os.environ.get("OMP_NUM_THREADS"),
                "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
            }
        if kind == "square":
            return value * value
        if kind == "raise":
            raise ValueError(f"job {value} raised")
        if kind == "exit":
            os._exit(value)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError(kind)

    return handle


def broken_handler() -> Callable[[Any, Callable[[Any], None]], Any]:
    raise RuntimeError("this handler cannot be made")
