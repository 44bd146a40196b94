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
