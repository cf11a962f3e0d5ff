"""Old import paths of moved modules (issue 19): each still works, warns naming the new path, at the caller's line."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings

import pytest

import samnorm.ood
from samnorm.utils.deprecation import alias_module, moved_module_getattr, renamed_getattr

# (old path, new path, a public name it held)
MOVED = [
    ("samnorm.plots", "samnorm.viz.plots", "plot_summary"),
    ("samnorm.figures", "samnorm.viz.figures", "save_png"),
    ("samnorm.distributions", "samnorm.viz.histograms", "overlap_coefficient"),
    ("samnorm.ood.rankfeat", "samnorm.ood.svd", "remove_rank1"),
    ("samnorm.ood.evaluate", "samnorm.ood.harness", "OODResults"),
    ("samnorm.cli_common", "samnorm.cli.common", "UsageError"),
    ("samnorm.demo.select", "samnorm.demo.tuning", "select_hyperparameters"),
    ("samnorm.recipe", "samnorm.train.recipe", "finetune"),
    ("samnorm.losses", "samnorm.train.losses", "SFTLoss"),
    ("samnorm.io", "samnorm.utils.io", "atomic_write"),
    ("samnorm.nn_utils", "samnorm.utils.nn", "batches"),
]
# names of a split module that went elsewhere: the recipe's OOD evaluation of datasets, beside the harness
SPLIT = [
    ("samnorm.recipe", "samnorm.ood.sharded", "evaluate_datasets"),
    ("samnorm.recipe", "samnorm.ood.sharded", "Evaluation"),
]
# (old module, old name, new module, new name): names that were renamed
RENAMED = [
    ("samnorm.recipe", "save_atomic", "samnorm.utils.io", "atomic_save"),
    ("samnorm.train.recipe", "save_atomic", "samnorm.utils.io", "atomic_save"),
    ("samnorm.demo.data", "batches", "samnorm.demo.data", "chunks"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED + SPLIT, ids=[f"{m[0]}.{m[2]}" for m in MOVED + SPLIT])
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(f"from {old} import *", namespace)
    assert caught and all(issubclass(w.category, DeprecationWarning) for w in caught)
    assert str(caught[0].message) == f"{old} is deprecated: import from {new}"
    assert {n: namespace[n] for n in target.__all__} == {n: getattr(target, n) for n in target.__all__}
    with pytest.raises(AttributeError, match=rf"'{old}' \(moved to '{new}'\) has no attribute 'nope'"):
        _ = importlib.import_module(old).nope


def test_star_import_of_a_split_module_still_gives_the_names_that_went_elsewhere():
    # `from samnorm.recipe import *` gave evaluate_datasets and save_atomic before the split: it still does.
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning) as caught:
        exec(compile("from samnorm.recipe import *", "user.py", "exec"), namespace)
    for _, new, name in SPLIT:
        assert namespace[name] is getattr(importlib.import_module(new), name)
    assert namespace["save_atomic"] is importlib.import_module("samnorm.utils.io").atomic_save
    assert namespace["finetune"] is importlib.import_module("samnorm.train.recipe").finetune
    assert str(caught[0].message) == "samnorm.recipe is deprecated: import from samnorm.train.recipe"
    assert all(w.filename == "user.py" for w in caught)


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


@pytest.mark.parametrize(("old", "name", "new", "new_name"), RENAMED, ids=[f"{r[0]}.{r[1]}" for r in RENAMED])
def test_renamed_name_is_the_new_object_and_warns_once_naming_it(old, name, new, new_name):
    namespace: dict[str, object] = {}
    message = rf"^{old}\.{name} is deprecated: import {new_name} from {new}$"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(f"from {old} import {name}", "user.py", "exec"), namespace)
    assert namespace[name] is getattr(importlib.import_module(new), new_name)
    assert [(w.category, w.filename) for w in caught] == [(DeprecationWarning, "user.py")]  # once, the user's line
    assert re.match(message, str(caught[0].message))
    assert name not in importlib.import_module(old).__dict__  # the old name is gone from the module itself


def test_renamed_getattr_refuses_other_names():
    with pytest.raises(AttributeError, match=r"'samnorm\.train\.recipe' has no attribute 'nope'"):
        _ = importlib.import_module("samnorm.train.recipe").nope
    getattr_ = renamed_getattr("m", {"old": "samnorm.utils.io:atomic_save"})
    with pytest.raises(AttributeError, match="'m' has no attribute '__path__'"):
        getattr_("__path__")


def test_recipe_private_helpers_forward_from_the_old_path():
    with pytest.warns(DeprecationWarning, match="samnorm.train.recipe"):
        from samnorm.recipe import _build_optimizer
    assert _build_optimizer is importlib.import_module("samnorm.train.recipe")._build_optimizer


def test_packages_re_export_the_moved_names():
    import samnorm.ood.sharded
    import samnorm.train
    import samnorm.train.losses
    import samnorm.train.recipe

    for name in samnorm.train.__all__:
        home = samnorm.train.recipe if name in samnorm.train.recipe.__all__ else samnorm.train.losses
        assert getattr(samnorm.train, name) is getattr(home, name)
    assert set(samnorm.train.__all__) == {*samnorm.train.recipe.__all__, *samnorm.train.losses.__all__} - {"energy"}
    assert samnorm.ood.evaluate_datasets is samnorm.ood.sharded.evaluate_datasets
    assert samnorm.ood.Evaluation is samnorm.ood.sharded.Evaluation


def test_the_loss_module_imports_without_the_recipe_and_nothing_warns():
    # samnorm.train loads its names lazily: the loss (a core module) does not pull in the training loop.
    code = (
        "import sys, warnings; warnings.simplefilter('error');"
        "import samnorm.train.losses, samnorm.utils.nn, samnorm.utils.io, samnorm.ood;"
        "print('samnorm.train.recipe' in sys.modules, [m for m in ('timm', 'torchvision') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "[]"]
