"""Shared test settings and the backend runs that the parity tests repeat every test over."""

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# Without a GPU, the ``triton`` backend's kernels run in Triton's interpreter on CPU tensors
# (tests/test_triton.py). The interpreter is chosen when a kernel is defined, at the
# backend's first step, so it is switched on here, before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import adampx
from adampx.backends.cpu import large, small

# The tests use tiny tensors, where threads only cost: on a shared 2-core machine two torch
# threads made some tests ten times slower than one.
torch.set_num_threads(1)

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every backend that can run here, plus two runs of the ``cpu`` backend with its sizes made
# tiny, so that the tests' small models take the routes that large models take:
# "cpu-per-tensor" (each tested tensor on its own, in row blocks of about 24 elements) and
# "cpu-chunks" (the small tensors in chunks of a few tensors). "default" forces nothing.
# Not "triton" where it runs in Triton's interpreter (milliseconds per program: the parity
# suite would take hours); tests/test_triton.py runs it on models made for it.
_MATRIX = [n for n in adampx.backends.available() if n != "triton" or torch.cuda.is_available()]
BACKEND_RUNS = ["default", *_MATRIX, "cpu-per-tensor", "cpu-chunks"]


@contextlib.contextmanager
def backend_run(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every step inside takes the backend run ``name`` (see :data:`BACKEND_RUNS`)."""
    if name == "default":
        yield
        return
    if name == "cpu-per-tensor":
        monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)
        monkeypatch.setattr(large, "BLOCK_ELEMENTS", 24)
        name = "cpu"
    elif name == "cpu-chunks":
        monkeypatch.setattr(small, "CHUNK_ELEMENTS", 100)
        name = "cpu"
    with adampx.backends.force(name):
        yield


@pytest.fixture(params=BACKEND_RUNS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A test that uses this fixture runs once per backend run of :data:`BACKEND_RUNS`:
    once per backend that can run here (``adampx.backends.available()``), forced with
    ``adampx.backends.force``, once as a user gets it ("default"), and twice more on the
    ``cpu`` backend with its sizes made tiny. A backend that does not run a test's options
    must refuse them with a clear error (:func:`step_or_refusal`)."""
    with backend_run(request.param, monkeypatch):
        yield request.param


def refuses(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the backend forced here refuses the options of ``optimizer``'s first group:
    only the eager math (``eager``, ``foreach``) and the C kernel (``cpu-kernel``) run the
    cautious mask; torch's fused kernels, which the ``cpu`` backend runs on, have no
    Nesterov Adam and no SGD without a momentum buffer."""
    forced = adampx.backends.forced()
    if forced is None or forced.NAME in ("eager", "foreach", "cpu-kernel"):
        return False
    if not isinstance(optimizer, (adampx.AdamP, adampx.SGDP)):
        return False
    group = optimizer.param_groups[0]
    if group["caution"]:
        return True
    if forced.NAME != "cpu":
        return False
    if isinstance(optimizer, adampx.AdamP):
        return bool(group["nesterov"])
    return group["momentum"] == 0


def step_or_refusal(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()``; True if it stepped, False if the forced backend refused the
    options, as :func:`refuses` says it must (its error then names the option)."""
    if refuses(optimizer):
        refusal = r"cannot run (AdamP with nesterov|SGDP with mom|caution=True)"
        with pytest.raises(ValueError, match=refusal):
            optimizer.step()
        return False
    optimizer.step()
    return True
