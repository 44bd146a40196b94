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


def force_small_blocks(monkeypatch, block_elements: int = 24) -> None:
    """Make the CPU default path cut its tensors into row blocks of about
    ``block_elements`` elements (one row where a row is longer), as it cuts large ones
    (AdamP's projected tensors; SGDP's are stepped whole)."""
    import adampx._torch_fused

    monkeypatch.setattr(adampx._torch_fused, "BLOCK_ELEMENTS", block_elements)


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
