"""The one lazy-import helper: a package's ``__getattr__``/``__dir__`` (PEP 562) that import a name's module
on first use, so ``import samnorm`` stays cheap (no timm, no torchvision until a name needs them)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to the submodule
    (relative to ``package``) that defines it; ``submodules`` are imported when named. A looked-up
    value is cached in the package's globals, so later look-ups skip ``__getattr__``.

    Example:
        >>> __getattr__, __dir__ = lazy_exports("samnorm.data", {"Jigsaw": "pseudo_ood"})
        >>> __getattr__("Jigsaw").__module__
        'samnorm.data.pseudo_ood'
    """
    names = dict(exports)
    subs = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        elif name in subs:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        vars(importlib.import_module(package))[name] = value  # cache: later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *names, *subs})

    return __getattr__, __dir__
