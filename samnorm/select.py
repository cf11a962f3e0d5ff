"""Selectors: pick the parameters that SAM perturbs.

SAM-ON perturbs only normalization layers. Public implementations pick them *by name* ("norm" or "bn"
in the parameter name), which selects nothing on BiT ResNetv2 (its GroupNorms are called ``gn1``,
``norm1``... depending on the version) and selects containers such as ``ConvNormAct`` by accident.
samnorm selects by *module type*, recognising torch's norm bases and timm's norm classes (by class
name and module, so timm is never imported here).

Example:
    >>> import torch.nn as nn
    >>> from samnorm.select import norm_layers, by_name
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> sel = norm_layers(model)
    >>> len(sel), sel.numel()
    (2, 16)
    >>> len(sel | by_name(model, r"^3\\."))
    4
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "PerturbedSet",
    "Selection",
    "all_params",
    "bias_ids",
    "by_name",
    "by_type",
    "is_norm_layer",
    "norm_layers",
    "register_norm_type",
    "unwrap_ddp",
]

# torch's norm bases: every BatchNorm/SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm and
# their subclasses (timm's GroupNormAct, LayerNorm2d, BatchNormAct2d, ... subclass these).
_TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.GroupNorm,
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
    )
    if t is not None
)

# timm norm classes that subclass only nn.Module, matched by class name inside a ``timm`` module so
# that recognising them never imports timm. Containers (ConvNormAct, NormMlpClassifierHead) do not
# match: they hold a norm layer, which is selected on its own.
_TIMM_NORM_NAME = re.compile(
    r"^((RmsNorm|SimpleNorm|EvoNorm|FilterResponseNorm|FrozenBatchNorm)\w*|GlobalResponseNorm)$"
)

_registered_types: list[type[nn.Module]] = []


def register_norm_type(*types: type[nn.Module]) -> None:
    """Treat these module types (and their subclasses) as normalization layers from now on.

    Example:
        >>> import torch.nn as nn
        >>> class MyNorm(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.scale = nn.Parameter(torch.ones(4))
        >>> register_norm_type(MyNorm)
        >>> len(norm_layers(nn.Sequential(MyNorm())))
        1
    """
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register_norm_type expects nn.Module subclasses, got {t!r}")
        if t not in _registered_types:
            _registered_types.append(t)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (torch, timm or registered type).

    Example:
        >>> is_norm_layer(nn.GroupNorm(2, 4)), is_norm_layer(nn.Conv2d(1, 1, 1))
        (True, False)
    """
    if isinstance(module, _TORCH_NORM_TYPES):
        return True
    if _registered_types and isinstance(module, tuple(_registered_types)):
        return True
    for cls in type(module).__mro__:
        if cls.__module__.startswith("timm.") and _TIMM_NORM_NAME.match(cls.__name__):
            return True
    return False


@dataclass(frozen=True)
class _Entry:
    name: str  # parameter name, "" when unknown
    param: nn.Parameter
    module: str  # owning module's name, "" when unknown
    kind: str  # owning module's class name, "Parameter" when unknown


class Selection:
    """An ordered set of parameters (no duplicates) with their names and owning module types.

    Iterating yields the parameters, so a Selection can be passed wherever torch expects an iterable
    of parameters. Selections combine with ``|`` (union), ``&`` (intersection) and ``-`` (difference);
    ``len`` counts tensors and :meth:`numel` counts elements. ``print(sel)`` gives a summary per
    module type.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> sel = all_params(model) - norm_layers(model)
        >>> sel.names()
        ['0.weight', '0.bias']
    """

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        seen: set[int] = set()
        self._entries: list[_Entry] = []
        for e in entries:
            if id(e.param) not in seen:  # tied weights appear once
                seen.add(id(e.param))
                self._entries.append(e)

    @classmethod
    def from_params(cls, params: Iterable[torch.Tensor]) -> Selection:
        """Wrap a plain iterable of parameters (names unknown).

        Example:
            >>> len(Selection.from_params(nn.Linear(2, 2).parameters()))
            2
        """
        entries = []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"expected parameters (tensors), got {type(p).__name__}")
            entries.append(_Entry("", p, "", "Parameter"))  # type: ignore[arg-type]
        return cls(entries)

    def __iter__(self) -> Iterator[nn.Parameter]:
        return (e.param for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, param: object) -> bool:
        return any(e.param is param for e in self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def names(self) -> list[str]:
        """Parameter names, in selection order ("" where a name is unknown)."""
        return [e.name for e in self._entries]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs, like ``nn.Module.named_parameters``."""
        return ((e.name, e.param) for e in self._entries)

    def numel(self) -> int:
        """Total number of elements over the selected tensors."""
        return sum(e.param.numel() for e in self._entries)

    def _ids(self) -> set[int]:
        return {id(e.param) for e in self._entries}

    def _check(self, other: object) -> Selection:
        if not isinstance(other, Selection):
            raise TypeError(
                f"can only combine a Selection with a Selection, got {type(other).__name__}; "
                "wrap plain parameters with Selection.from_params(...)"
            )
        return other

    def __or__(self, other: Selection) -> Selection:
        return Selection([*self._entries, *self._check(other)._entries])

    def __and__(self, other: Selection) -> Selection:
        ids = self._check(other)._ids()
        return Selection(e for e in self._entries if id(e.param) in ids)

    def __sub__(self, other: Selection) -> Selection:
        ids = self._check(other)._ids()
        return Selection(e for e in self._entries if id(e.param) not in ids)

    def summary(self) -> str:
        """One line per owning module type: layers, tensors and elements.

        Example:
            >>> print(norm_layers(nn.Sequential(nn.LayerNorm(3), nn.LayerNorm(3))).summary())
            Selection: 2 layers, 4 tensors, 12 elements
              LayerNorm: 2 layers, 4 tensors, 12 elements
        """
        per_kind: dict[str, tuple[set[str], int, int]] = {}
        for e in self._entries:
            mods, tensors, elems = per_kind.get(e.kind, (set(), 0, 0))
            mods.add(e.module or str(id(e.param)))
            per_kind[e.kind] = (mods, tensors + 1, elems + e.param.numel())
        layers = sum(len(m) for m, _, _ in per_kind.values())
        lines = [f"Selection: {layers} layers, {len(self)} tensors, {self.numel():,} elements"]
        for kind, (mods, tensors, elems) in sorted(per_kind.items()):
            lines.append(f"  {kind}: {len(mods)} layers, {tensors} tensors, {elems:,} elements")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _check_module(model: object, fn: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects an nn.Module, got {type(model).__name__}")
    return model


def _select(
    model: nn.Module,
    keep_module: Callable[[nn.Module], bool],
    keep_param: Callable[[str], bool] = lambda name: True,
    trainable: bool = True,
) -> Selection:
    entries = []
    for mname, module in model.named_modules():
        if not keep_module(module):
            continue
        # recurse=False: a norm layer's activation/drop children are not part of the norm.
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if (p.requires_grad or not trainable) and keep_param(full):
                # "" stands for an unknown owner (from_params), so the root module gets a name
                entries.append(_Entry(full, p, mname or "<root>", type(module).__name__))
    return Selection(entries)


def norm_layers(model: nn.Module) -> Selection:
    """The trainable parameters of every normalization layer of ``model`` (SAM-ON's selection).

    Recognises torch's ``_BatchNorm`` (incl. SyncBatchNorm), ``_InstanceNorm``, ``GroupNorm``,
    ``LayerNorm``, ``RMSNorm``; timm's subclasses of those and its RmsNorm*, SimpleNorm*, EvoNorm*,
    FilterResponseNorm* and GlobalResponseNorm; and types added with :func:`register_norm_type`.

    Example:
        >>> sel = norm_layers(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)))
        >>> sel.names()
        ['1.weight', '1.bias']
    """
    return _select(_check_module(model, "norm_layers"), is_norm_layer)


def by_type(model: nn.Module, *types: type[nn.Module] | str) -> Selection:
    """Parameters of modules that are instances of ``types`` (classes, or class names as strings,
    which match any class of that name in the module's MRO, so timm types need no import).

    Example:
        >>> len(by_type(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear))
        2
    """
    if not types:
        raise ValueError("by_type needs at least one module type, e.g. by_type(model, nn.Linear)")
    classes = tuple(t for t in types if isinstance(t, type))
    names = {t for t in types if isinstance(t, str)}
    bad = [t for t in types if not isinstance(t, (type, str))]
    if bad:
        raise TypeError(f"by_type expects module classes or class names, got {bad!r}")

    def keep(m: nn.Module) -> bool:
        return isinstance(m, classes) or any(c.__name__ in names for c in type(m).__mro__)

    return _select(_check_module(model, "by_type"), keep)


def by_name(model: nn.Module, pattern: str | re.Pattern[str]) -> Selection:
    """Parameters whose full name matches the regular expression ``pattern`` (``re.search``).

    Example:
        >>> by_name(nn.Sequential(nn.Linear(2, 2)), r"bias$").names()
        ['0.bias']
    """
    regex = re.compile(pattern)
    return _select(_check_module(model, "by_name"), lambda m: True, lambda n: bool(regex.search(n)))


def all_params(model: nn.Module) -> Selection:
    """Every trainable parameter of ``model`` (plain SAM's selection).

    Example:
        >>> len(all_params(nn.Linear(3, 1)))
        2
    """
    return _select(_check_module(model, "all_params"), lambda m: True)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise).

    Example:
        >>> m = nn.Linear(2, 2); unwrap_ddp(m) is m
        True
    """
    inner = getattr(model, "module", None) if hasattr(model, "no_sync") else None
    return inner if isinstance(inner, nn.Module) else model


class PerturbedSet:
    """What SAM perturbs, resolved from its ``perturb`` argument against the parameters the base
    optimizer owns (``owned()``, read again when the parameter groups change).

    - ``None``: every owned parameter, at every step (``add_param_group`` included);
    - an ``nn.Module`` (SAM-ON): its normalization layers' parameters *that require grad and are
      owned*, at every step: a norm layer unfrozen later and added with ``add_param_group`` is
      perturbed from then on, one frozen later (``requires_grad=False``) no longer is;
    - a :class:`Selection` or iterable of parameters: exactly those.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> _ = model[1].requires_grad_(False)
        >>> groups = [list(model[0].parameters())]
        >>> sel = PerturbedSet(model, lambda: [p for g in groups for p in g], allow_empty=True)
        >>> len(sel.params())
        0
        >>> _ = model[1].requires_grad_(True); groups.append(list(model[1].parameters()))
        >>> len(sel.params())
        2
    """

    def __init__(self, perturb: object, owned: Callable[[], list[torch.Tensor]], *, allow_empty: bool = False) -> None:
        self._owned = owned
        self.module: nn.Module | None = None
        self.fixed: list[torch.Tensor] | None = None
        self.named: list[tuple[str, torch.Tensor]] = []
        self._cache: tuple[tuple[tuple[int, ...], tuple[bool, ...]] | tuple[()], list[torch.Tensor]] = ((), [])
        if perturb is None:
            return
        if isinstance(perturb, nn.Module):
            self.module = unwrap_ddp(perturb)
            candidates = _select(self.module, is_norm_layer, trainable=False)
            self.named = list(candidates.named_parameters())
            sel: Selection = Selection(e for e in candidates._entries if e.param.requires_grad)
            what = f"{type(perturb).__name__} has no normalization layer with trainable parameters"
        elif isinstance(perturb, Selection):
            sel, what = perturb, "the selection is empty"
            self.named = list(perturb.named_parameters())
        elif isinstance(perturb, torch.Tensor):
            raise TypeError("perturb takes an iterable of parameters, not a single tensor: [p]")
        elif isinstance(perturb, Iterable):
            sel, what = Selection.from_params(perturb), "the parameter list is empty"
        else:
            raise TypeError(
                "perturb must be None (plain SAM), an nn.Module (its norm layers, SAM-ON), a "
                f"Selection or an iterable of parameters; got {type(perturb).__name__}"
            )
        if not sel and not allow_empty:
            raise ValueError(
                f"nothing to perturb: {what}. Pass perturb=None for plain SAM, or choose parameters "
                "with samnorm.select (by_type, by_name, ...)"
            )
        owned_ids = {id(p) for p in owned()}
        foreign = [n or f"tensor{tuple(p.shape)}" for n, p in sel.named_parameters() if id(p) not in owned_ids]
        if foreign:
            raise ValueError(
                f"{len(foreign)} perturbed parameter(s) are not optimized by the base optimizer "
                f"(e.g. {foreign[:3]}); build the base optimizer over model.parameters() or "
                "narrow the selection"
            )
        if self.module is None:
            self.fixed = list(sel)

    @property
    def everything(self) -> bool:
        """Whether every owned parameter is perturbed (``perturb=None``)."""
        return self.module is None and self.fixed is None

    def params(self) -> list[torch.Tensor]:
        """The tensors to perturb now (a cheap check per call; re-resolved when groups or
        ``requires_grad`` flags changed)."""
        if self.fixed is not None:
            return list(self.fixed)
        owned = self._owned()
        if self.module is None:
            return owned
        key = (tuple(map(id, owned)), tuple([p.requires_grad for _, p in self.named]))  # a list: no generator frames
        if self._cache[0] != key:
            ids = set(key[0])
            self._cache = (key, [p for _, p in self.named if p.requires_grad and id(p) in ids])
        return list(self._cache[1])


def bias_ids(perturb: object, model: nn.Module | None) -> set[int]:
    """ids of the tensors named ``*bias`` in ``perturb`` (a :class:`Selection`) and ``model`` (ASAM
    with ``normalize_bias=False`` leaves them ``T = 1``); ``ValueError`` when no names are known.

    Example:
        >>> m = nn.Linear(2, 2); bias_ids(None, m) == {id(m.bias)}
        True
    """
    named: list[tuple[str, torch.Tensor]] = []
    if isinstance(perturb, Selection):
        named += perturb.named_parameters()
    if model is not None:
        named += list(unwrap_ddp(model).named_parameters())
    if not named:
        raise ValueError(
            "normalize_bias=False recognises biases by name: pass perturb=model, a Selection "
            "(samnorm.select) or model=..."
        )
    return {id(p) for n, p in named if n.rsplit(".", 1)[-1] == "bias"}
