"""Old import paths of moved modules: each name forwarded to the new module with a DeprecationWarning.

A module that moved leaves at its old path a file of two lines (``__getattr__ = moved_module_getattr(
__name__, "samnorm.new.path")``); a path that cannot stay a file (it would shadow a function of its
package, as ``samnorm.ood.evaluate`` did) is registered in ``sys.modules`` by :func:`alias_module`.
The warning fires on each name looked up through the old path, at the caller's line, and names the new
path; the new module is imported on the first look-up, so importing the old path alone costs nothing.
A name that was renamed (``recipe.save_atomic`` is ``io.atomic_save``) forwards with
:func:`renamed_getattr`, or through ``moved_module_getattr``'s ``elsewhere`` as ``"module:new_name"``.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["alias_module", "moved_module_getattr", "renamed_getattr"]


def moved_module_getattr(old: str, new: str, elsewhere: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for the module ``old`` that moved to ``new``; ``elsewhere``
    maps the names of a module split in two that went to another module than ``new`` (``"module"``),
    or were renamed there (``"module:new_name"``).

    Example:
        >>> import warnings
        >>> getattr_ = moved_module_getattr("samnorm.plots", "samnorm.viz.plots")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     f = getattr_("plot_summary")
        >>> f.__module__, str(caught[0].message)
        ('samnorm.viz.plots', 'samnorm.plots is deprecated: import plot_summary from samnorm.viz.plots')
    """
    homes = dict(elsewhere or {})

    def __getattr__(name: str) -> Any:
        # Dunder look-ups come from the import system and introspection (__path__, __wrapped__), not
        # from user code: no warning, and no such attribute. __all__ is a user's `import *`.
        if name.startswith("__") and name != "__all__":
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        if name == "__all__":  # `from old import *`: the names the old module exported, wherever they went
            names = getattr(importlib.import_module(new), "__all__", [])
            warnings.warn(f"{old} is deprecated: import from {new}", DeprecationWarning, stacklevel=2)
            return sorted({*names, *homes})
        home, _, new_name = homes.get(name, new).partition(":")
        target = importlib.import_module(home)
        if not hasattr(target, new_name or name):
            raise AttributeError(f"module {old!r} (moved to {new!r}) has no attribute {name!r}")
        what = f"{old}.{name}" if new_name else old
        warnings.warn(f"{what} is deprecated: import {new_name or name} from {home}", DeprecationWarning, stacklevel=2)
        return getattr(target, new_name or name)

    return __getattr__


def renamed_getattr(module: str, renamed: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for the names of ``module`` that were renamed: ``renamed`` maps
    an old name to its new home, ``"module:new_name"``; looking one up warns and returns the new object.

    Example:
        >>> import warnings
        >>> getattr_ = renamed_getattr("samnorm.train.recipe", {"save_atomic": "samnorm.utils.io:atomic_save"})
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     f = getattr_("save_atomic")
        >>> f.__name__, str(caught[0].message)
        ('atomic_save', 'samnorm.train.recipe.save_atomic is deprecated: import atomic_save from samnorm.utils.io')
    """
    homes = {old: spec.partition(":") for old, spec in renamed.items()}

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, _, new_name = homes[name]
        warnings.warn(f"{module}.{name} is deprecated: import {new_name} from {home}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), new_name)

    return __getattr__


def alias_module(old: str, new: str) -> types.ModuleType:
    """Register in ``sys.modules`` a module ``old`` whose names forward to ``new`` (with a warning).

    For an old path that no file may hold; ``from old import name`` then works and warns. Registering
    twice returns the first alias.

    Example:
        >>> import warnings
        >>> alias = alias_module("samnorm.ood.evaluate", "samnorm.ood.harness")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     from samnorm.ood.evaluate import OODResults
        >>> OODResults.__module__, caught[0].category.__name__
        ('samnorm.ood.harness', 'DeprecationWarning')
    """
    if old in sys.modules:
        return sys.modules[old]
    module = types.ModuleType(old, f"Deprecated: moved to {new}.")
    module.__dict__["__getattr__"] = moved_module_getattr(old, new)  # PEP 562 reads it from there
    sys.modules[old] = module
    return module
