"""Shared test settings (small thread pool, deterministic seeds, hypothesis profiles) and the fixtures
every module shares (the factories behind them are in helpers.py).

Hypothesis profiles (pick one with ``--hypothesis-profile=NAME`` or ``HYPOTHESIS_PROFILE=NAME``):

- ``ci`` (the default, and what ``.ci/run`` selects): derandomized, so every run of
  ``python -m pytest -q`` draws the same examples and a pass or a failure reproduces exactly;
  no example database (a git-ignored database would make a fresh machine differ from this one).
- ``deep``: random draws, ten times the examples, the database on: for hunting new failing cases
  locally. Add what it finds as an ``@example`` so CI keeps checking it.
"""

import os

import pytest
import torch
from helpers import png_folder, train_args
from hypothesis import HealthCheck, settings

# Two cores on CI: intra-op threads only add contention for the tiny tensors used here.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

_COMMON = dict(
    deadline=None,  # timing on a shared 2-core machine is noise, not a property
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("deep", max_examples=250, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """12 grayscale PNGs in 3 class folders (read-only: copy before changing)."""
    return png_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="session")
def finished_run(image_folder, tmp_path_factory):
    """The output folder of a finished 3-step ``samnorm finetune`` run on ``image_folder`` (read-only)."""
    pytest.importorskip("timm")
    from samnorm.cli import main

    out = tmp_path_factory.mktemp("finished")
    assert main(train_args(image_folder, out)) == 0
    return out
