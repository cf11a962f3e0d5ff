"""Old import paths of moved modules: each name forwarded to the new module with a DeprecationWarning.

A module that moved leaves at its old path a file of two lines (``__getattr__ = moved_module_getattr(
__name__, "samnorm.new.path")``); a path that cannot stay a file (it would shadow a function of its
package, as ``samnorm.ood.evaluate`` did) is registered in ``sys.modules`` by :func:`alias_module`.
The warning fires on each name looked up through the old path, at the caller's line, and names the new
path; the new module is imported on the first look-up, so importing the old path alone costs nothing.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["alias_module", "moved_module_getattr"]


def moved_module_getattr(old: str, new: str, elsewhere: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for the module ``old`` that moved to ``new``; ``elsewhere``
    maps the names of a module split in two that went to another module than ``new``.

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
        home = homes.get(name, new)
        target = importlib.import_module(home)
        if not hasattr(target, name):
            raise AttributeError(f"module {old!r} (moved to {new!r}) has no attribute {name!r}")
        warnings.warn(f"{old} is deprecated: import {name} from {home}", DeprecationWarning, stacklevel=2)
        return getattr(target, name)

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
