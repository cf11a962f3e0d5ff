"""One registry of SAM kinds: the recipe's ``optimizer`` and ``variant`` choices, the CLI's
``--optimizer`` choices and :data:`samnorm.sam.variants.VARIANTS` all read it.

A :class:`Kind` is a name, the class it builds (a dotted path, imported on first use, so that this
module, and ``samnorm --help`` with it, imports no torch), the constructor defaults and whether it
perturbs the norm layers only (SAM-ON). Two sorts:

- *ascents* (``norm_only`` True or False): which parameters, SAM or ASAM, which radius
  (``"sam-on"``, ``"asam-on"``, ``"sam"``, ``"asam"``);
- *schedules* (``norm_only=None``, combined with any ascent): how the passes are spent
  (``"interval"``, ``"looksam"``, ``"onepass"``, ``"gsam"``; ``"sam"`` is plain SAM's).

Example:
    >>> sorted(ascents())
    ['asam', 'asam-on', 'sam', 'sam-on']
    >>> KINDS["sam-on"].defaults["rho"], KINDS["looksam"].defaults["k"]
    (0.5, 5)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Kind", "RegistryView", "ascents", "register", "schedules"]


@dataclass(frozen=True)
class Kind:
    """A SAM kind. ``cls``: ``"module.Class"``; ``load()`` imports it."""

    name: str
    cls: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    norm_only: bool | None = None  # True: SAM-ON; False: every parameter; None: a schedule

    def load(self) -> type:
        """The class (imported now)."""
        module, _, attr = self.cls.rpartition(".")
        cls: type = getattr(importlib.import_module(module), attr)
        return cls


KINDS: dict[str, Kind] = {}
"""Every SAM kind by name (``"sam"``, ``"interval"``, ...), in registration order; :func:`register` adds one."""


def register(kind: Kind) -> Kind:
    """Add a kind (a name taken already is refused, so a typo cannot replace a built-in).

    Example:
        >>> register(KINDS["sam"])
        Traceback (most recent call last):
        ValueError: a SAM kind named 'sam' is registered already
    """
    if kind.name in KINDS:
        raise ValueError(f"a SAM kind named {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


class RegistryView(Mapping[str, Any]):
    """A live, read-only mapping over the registry: the kinds ``keep`` accepts, as ``value(kind)``,
    then the fixed entries ``extra`` (e.g. the recipe's ``"sgd"``, no SAM at all).

    Example:
        >>> view = RegistryView(lambda k: k.norm_only is True, lambda k: k.defaults["rho"], {"sgd": None})
        >>> dict(view)
        {'sam-on': 0.5, 'asam-on': 10.0, 'sgd': None}
    """

    def __init__(
        self, keep: Callable[[Kind], bool], value: Callable[[Kind], Any], extra: Mapping[str, Any] | None = None
    ) -> None:
        self._keep, self._value, self._extra = keep, value, dict(extra or {})

    def __getitem__(self, name: str) -> Any:
        if name in self._extra:
            return self._extra[name]
        kind = KINDS.get(name)
        if kind is None or not self._keep(kind):
            raise KeyError(name)
        return self._value(kind)

    def __iter__(self) -> Iterator[str]:
        yield from (name for name, kind in KINDS.items() if self._keep(kind))
        yield from self._extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"RegistryView({sorted(self)})"


def ascents() -> list[str]:
    """Names of the ascent kinds (the recipe's ``optimizer`` and the CLI's ``--optimizer``, with ``"sgd"``)."""
    return [name for name, kind in KINDS.items() if kind.norm_only is not None]


def schedules() -> list[str]:
    """Names of the schedules (the recipe's ``variant``), plain ``"sam"`` included."""
    return [name for name, kind in KINDS.items() if kind.norm_only is None or name == "sam"]


for _kind in (
    Kind("sam-on", "samnorm.sam.optimizer.SAM", {"rho": 0.5, "adaptive": False}, norm_only=True),
    Kind("asam-on", "samnorm.sam.optimizer.SAM", {"rho": 10.0, "adaptive": True}, norm_only=True),
    Kind("sam", "samnorm.sam.optimizer.SAM", {"rho": 0.05, "adaptive": False}, norm_only=False),
    Kind("asam", "samnorm.sam.optimizer.SAM", {"rho": 0.5, "adaptive": True}, norm_only=False),
    Kind("interval", "samnorm.sam.variants.IntervalSAM", {"k": 4}),
    Kind("looksam", "samnorm.sam.variants.LookSAM", {"k": 5, "alpha": 0.7}),
    Kind("onepass", "samnorm.sam.variants.OnePassSAM", {"direction": "momentum"}),
    Kind("gsam", "samnorm.sam.gsam.GSAM", {"alpha": 0.3}),
):
    register(_kind)
