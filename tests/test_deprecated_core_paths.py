"""Old import paths of the optimizer core (issue 19: samnorm.optim and samnorm.variants moved into
samnorm.sam): each public name still imports, is the same object, and warns at the caller's line
naming its new home."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys

import pytest
import torch

import samnorm

# (old path, public name, new home): every public name the old module held
MOVED = [
    ("samnorm.optim", "SAM", "samnorm.sam.optimizer"),
    ("samnorm.optim", "disable_running_stats", "samnorm.sam.optimizer"),
    ("samnorm.optim", "perturb_", "samnorm.sam.functional"),
    ("samnorm.optim", "restore_", "samnorm.sam.functional"),
    ("samnorm.optim", "all_reduce_mean", "samnorm.sam.functional"),
    ("samnorm.optim", "is_distributed", "samnorm.sam.functional"),
    ("samnorm.optim", "check_nonnegative", "samnorm.sam.settings"),
    *[
        ("samnorm.variants", name, "samnorm.sam.variants")
        for name in ("GSAM", "VARIANTS", "IntervalSAM", "LookSAM", "OnePassSAM", "Variant", "make")
    ],
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{m[0]}.{m[1]}" for m in MOVED])
def test_old_path_imports_the_same_object_and_warns_naming_its_new_home(old, name, new):
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=rf"^{old} is deprecated: import {name} from {new}$") as caught:
        exec(compile(f"from {old} import {name}", "user.py", "exec"), namespace)
    assert namespace[name] is getattr(importlib.import_module(new), name)
    assert caught[0].filename == "user.py"  # the user's line, not the shim's


@pytest.mark.parametrize(
    ("old", "new"), [("samnorm.optim", "samnorm.sam.optimizer"), ("samnorm.variants", "samnorm.sam.variants")]
)
def test_star_import_and_unknown_names(old, new):
    target = importlib.import_module(new)
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=old):
        exec(f"from {old} import *", namespace)
    assert {n: namespace[n] for n in target.__all__} == {n: getattr(target, n) for n in target.__all__}
    with pytest.raises(AttributeError, match=rf"'{old}' \(moved to '[\w.]+'\) has no attribute 'nope'"):
        _ = importlib.import_module(old).nope


def test_public_names_of_the_old_modules_are_all_forwarded():
    """The list above is every public name the modules held before the move (their __all__ and the
    functions the README named), so no name of the old paths is left behind."""
    variants = importlib.import_module("samnorm.sam.variants")
    assert {n for o, n, _ in MOVED if o == "samnorm.variants"} == set(variants.__all__)
    assert {"SAM", "disable_running_stats"} == set(importlib.import_module("samnorm.sam.optimizer").__all__)
    assert {"perturb_", "restore_", "all_reduce_mean", "is_distributed"} == set(
        importlib.import_module("samnorm.sam.functional").__all__
    )


def test_a_sam_pickled_under_the_old_path_loads():
    w = torch.nn.Parameter(torch.ones(2))
    sam = samnorm.SAM(torch.optim.SGD([w], lr=0.1), [w], rho=0.2)
    data = pickle.dumps(sam, protocol=0)  # protocol 0 writes the class path as text
    assert b"samnorm.sam.optimizer\nSAM" in data
    old = data.replace(b"samnorm.sam.optimizer\nSAM", b"samnorm.optim\nSAM")
    with pytest.warns(DeprecationWarning, match="samnorm.sam.optimizer"):
        loaded = pickle.loads(old)
    assert type(loaded) is samnorm.SAM and loaded.rho == 0.2


def test_the_package_itself_raises_no_deprecation_warning():
    """The public API, the variants' registry and the integrations load with deprecation warnings as errors."""
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning);"
        "import torch, samnorm, samnorm.integrations;"
        "from samnorm.sam import registry;"
        "[registry.KINDS[k].load() for k in registry.KINDS];"
        "print(samnorm.SAM.__module__, samnorm.IntervalSAM.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["samnorm.sam.optimizer", "samnorm.sam.variants"]
