"""Shared test settings: small thread pool, deterministic seeds, hypothesis without deadlines."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Two cores on CI: intra-op threads only add contention for the tiny tensors used here.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile(
    "samnorm",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "samnorm"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
