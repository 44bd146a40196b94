"""Shared test settings."""

import os

import torch
from hypothesis import settings

# The tests use tiny tensors, where threads only cost: on a shared 2-core machine two torch
# threads made some tests ten times slower than one.
torch.set_num_threads(1)

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def force_eager_math(monkeypatch) -> None:
    """Make every tensor skip the CPU fused kernels, so the eager per-tensor / multi-tensor
    math runs (as on accelerators, for tensor subclasses and for unusual layouts)."""
    import adampx._torch_fused

    monkeypatch.setattr(adampx._torch_fused, "supported", lambda *args, **kwargs: False)


def force_per_tensor(monkeypatch) -> None:
    """Make the CPU default path step every tested tensor on its own, as it steps large ones
    (by default tensors as small as the tests' take ``adampx._small_tensors``)."""
    import adampx._small_tensors

    monkeypatch.setattr(adampx._small_tensors, "SMALL_ELEMENTS", 0)


def force_small_blocks(monkeypatch, block_elements: int = 24) -> None:
    """Make the CPU default path step every tested tensor on its own and cut it into row
    blocks of about ``block_elements`` elements (one row where a row is longer), as it
    steps and cuts large ones (AdamP's projected tensors; SGDP's are stepped whole)."""
    import adampx._torch_fused

    force_per_tensor(monkeypatch)
    monkeypatch.setattr(adampx._torch_fused, "BLOCK_ELEMENTS", block_elements)


def force_small_chunks(monkeypatch, chunk_elements: int = 100) -> None:
    """Make the CPU default path's small tested tensors (``adampx._small_tensors``) come in
    chunks of about ``chunk_elements`` elements, so that a model spans several."""
    import adampx._small_tensors

    monkeypatch.setattr(adampx._small_tensors, "CHUNK_ELEMENTS", chunk_elements)


def force_flat_step(monkeypatch, bucket_elements: int = 100) -> None:
    """Make the CPU tensors that qualify take the flat multi-tensor step of
    ``adampx._flat_step`` (what CUDA tensors take), in buckets of about ``bucket_elements``
    elements so that a model spans several buckets, with the padded segment reductions that
    CUDA tensors get."""
    import adampx._flat_step
    import adampx._segments
    import adampx._torch_fused

    monkeypatch.setattr(adampx._segments, "SEGMENT_REDUCE_DEVICES", ())
    monkeypatch.setattr(adampx._torch_fused, "adamp_", adampx._flat_step.adamp_)
    monkeypatch.setattr(adampx._torch_fused, "sgdp_", adampx._flat_step.sgdp_)
    monkeypatch.setattr(adampx._flat_step, "BUCKET_ELEMENTS", bucket_elements)
