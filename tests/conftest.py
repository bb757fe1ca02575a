"""Shared pytest configuration: hypothesis profiles and a fixed torch seed per test."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI machines are shared and slow: no per-example deadline, a moderate number of examples by default.
settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield
