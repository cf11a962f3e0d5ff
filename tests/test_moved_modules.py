"""Old import paths of moved modules (issue 19): each still works, warns naming the new path, at the caller's line."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import samnorm.ood
from samnorm.utils.deprecation import alias_module, moved_module_getattr

# (old path, new path, a public name it held)
MOVED = [
    ("samnorm.plots", "samnorm.viz.plots", "plot_summary"),
    ("samnorm.figures", "samnorm.viz.figures", "save_png"),
    ("samnorm.distributions", "samnorm.viz.histograms", "overlap_coefficient"),
    ("samnorm.ood.rankfeat", "samnorm.ood.svd", "remove_rank1"),
    ("samnorm.ood.evaluate", "samnorm.ood.harness", "OODResults"),
    ("samnorm.cli_common", "samnorm.cli.common", "UsageError"),
    ("samnorm.demo.select", "samnorm.demo.tuning", "select_hyperparameters"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED, ids=[m[0] for m in MOVED])
def test_old_path_imports_the_same_object_and_warns_naming_the_new_path(old, new, name):
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=rf"^{old} is deprecated: import {name} from {new}$") as caught:
        exec(compile(f"from {old} import {name}", "user.py", "exec"), namespace)
    assert namespace[name] is getattr(importlib.import_module(new), name)
    assert caught[0].filename == "user.py"  # the user's line, not the shim's


@pytest.mark.parametrize(("old", "new", "name"), MOVED, ids=[m[0] for m in MOVED])
def test_old_path_star_import_and_private_names_forward(old, new, name):
    target = importlib.import_module(new)
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=new):
        exec(f"from {old} import *", namespace)
    assert {n: namespace[n] for n in target.__all__} == {n: getattr(target, n) for n in target.__all__}
    with pytest.raises(AttributeError, match=rf"'{old}' \(moved to '{new}'\) has no attribute 'nope'"):
        _ = importlib.import_module(old).nope


def test_rankfeat_private_chunk_size_reads_through_the_old_path():
    with pytest.warns(DeprecationWarning, match="samnorm.ood.svd"):
        from samnorm.ood.rankfeat import _CPU_CHUNK_BYTES
    assert _CPU_CHUNK_BYTES == importlib.import_module("samnorm.ood.svd")._CPU_CHUNK_BYTES


def test_dunder_lookups_of_the_import_system_neither_warn_nor_exist():
    getattr_ = moved_module_getattr("samnorm.plots", "samnorm.viz.plots")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dunder in ("__path__", "__wrapped__", "__test__"):
            with pytest.raises(AttributeError):
                getattr_(dunder)


def test_ood_evaluate_stays_the_function_whatever_is_imported_first():
    # A fresh interpreter: the old module path imported before the package attribute is read.
    code = (
        "import warnings; warnings.simplefilter('error');"
        "import samnorm.ood.evaluate, importlib, samnorm.ood.harness as h;"
        "print(samnorm.ood.evaluate is h.evaluate, type(importlib.import_module('samnorm.ood.evaluate')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "module"]
    assert samnorm.ood.evaluate is importlib.import_module("samnorm.ood.harness").evaluate


def test_alias_module_registers_once():
    first = sys.modules["samnorm.ood.evaluate"]
    assert alias_module("samnorm.ood.evaluate", "samnorm.ood.harness") is first
