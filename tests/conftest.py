"""Shared test settings."""

import os

import torch
from hypothesis import settings

# Two cores on CI: keep torch from oversubscribing when pytest runs in one process.
torch.set_num_threads(min(2, os.cpu_count() or 1))

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
