"""Settings that live in the parameter groups (``rho``, ``adaptive``, ``eta``, a variant's ``k``,
``alpha``, ``direction``), read and written for all groups at once through :class:`GroupSetting`, and
checked by :func:`check_nonnegative`; and the per-tensor settings of an ascent
(:func:`ascent_settings`), read from the groups through a cached index (:func:`group_index`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "GroupIndex",
    "GroupSetting",
    "ascent_settings",
    "check_nonnegative",
    "check_setting",
    "fill_group_defaults",
    "group_index",
    "group_settings",
    "summary",
]


class GroupSetting:
    """A descriptor: ``opt.rho`` is every group's ``rho`` (``ValueError`` if they differ);
    ``opt.rho = v`` checks ``v`` (``opt._check_setting``) and sets it in every group and in the
    defaults (groups added later get it).

    Example:
        >>> import torch
        >>> from samnorm import SAM
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> sam = SAM(torch.optim.SGD([w], lr=0.1), [w], rho=0.1)
        >>> sam.rho = 0.2; sam.param_groups[0]["rho"]
        0.2
    """

    def __init__(self, doc: str = "") -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, opt: Any, owner: type | None = None) -> Any:
        if opt is None:
            return self
        values = {g[self.key] for g in opt.param_groups} or {opt.defaults[self.key]}
        if len(values) > 1:
            raise ValueError(f"{self.key} differs between parameter groups; read opt.param_groups[i][{self.key!r}]")
        return values.pop()

    def __set__(self, opt: Any, value: Any) -> None:
        value = opt._check_setting(self.key, value)
        opt.defaults[self.key] = value
        for g in opt.param_groups:
            g[self.key] = value


def check_nonnegative(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number >= 0 (a hyper-
    parameter such as rho or eta; bools are refused).

    Example:
        >>> check_nonnegative("rho", 0.05)
        >>> check_nonnegative("rho", -1)
        Traceback (most recent call last):
        ValueError: rho must be a finite number >= 0, got -1
    """
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_setting(key: str, value: Any) -> Any:
    """SAM's own group setting ``key`` checked and converted: ``adaptive`` a bool, ``rho``/``eta``
    a float >= 0 (what :class:`~samnorm.SAM`'s ``_check_setting`` hook does; variants add theirs).

    Example:
        >>> check_setting("adaptive", 1), check_setting("rho", 1)
        (True, 1.0)
    """
    if key == "adaptive":
        return bool(value)
    check_nonnegative(key, value)
    return float(value)


def fill_group_defaults(groups: list[dict[str, Any]], defaults: dict[str, Any], keys: Iterable[str]) -> None:
    """Give every group in ``groups`` the ``defaults`` of ``keys`` that it lacks (a group added by
    the base optimizer, or a state dict saved before per-group settings).

    Example:
        >>> groups = [{"params": [], "rho": 0.1}, {"params": []}]
        >>> fill_group_defaults(groups, {"rho": 0.5}, ["rho"]); [g["rho"] for g in groups]
        [0.1, 0.5]
    """
    for g in groups:
        for key in keys:
            g.setdefault(key, defaults[key])


GroupIndex = tuple[tuple[tuple[int, int], ...], dict[int, int]]
"""``(signature of the groups, {id(param): index of its group})``: what :func:`group_index` caches."""


def group_index(groups: list[dict[str, Any]], cache: GroupIndex) -> GroupIndex:
    """``cache`` while the groups' parameter lists are unchanged, else the index rebuilt (a step
    costs no dict rebuild unless ``add_param_group`` or a load replaced a list).

    Example:
        >>> w = torch.ones(1)
        >>> group_index([{"params": [w]}], ((), {}))[1] == {id(w): 0}
        True
    """
    signature = tuple((id(g["params"]), len(g["params"])) for g in groups)
    if cache[0] == signature:
        return cache
    return signature, {id(p): i for i, g in enumerate(groups) for p in g["params"]}


def group_settings(group: dict[str, Any]) -> tuple[float, bool, float]:
    """A parameter group's ``(rho, adaptive, eta)``, checked: a scheduler may have written them.

    Example:
        >>> group_settings({"rho": 0.1, "adaptive": 0, "eta": 0.01})
        (0.1, False, 0.01)
    """
    rho, eta = group["rho"], group["eta"]
    check_nonnegative('param_group["rho"]', rho)
    check_nonnegative('param_group["eta"]', eta)
    return float(rho), bool(group["adaptive"]), float(eta)


def ascent_settings(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    groups: list[dict[str, Any]],
    group_of: dict[int, int],
    plain: set[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[float | None]]:
    """The lists :func:`~samnorm.sam.functional.perturb_` takes for the ascent over ``pairs``
    (``(parameter, gradient)``): each tensor's group ``rho``, and its ``eta`` where the group is
    adaptive and the tensor's id is not in ``plain`` (biases under ``normalize_bias=False``), else
    ``None``.

    Example:
        >>> w, g = torch.ones(1), torch.zeros(1)
        >>> group = {"params": [w], "rho": 0.1, "adaptive": True, "eta": 0.01}
        >>> ascent_settings([(w, g)], [group], {id(w): 0}, set())[2:]
        ([0.1], [0.01])
    """
    settings = [group_settings(g) for g in groups]
    params, grads, rhos, etas = [], [], [], []
    for p, g in pairs:
        rho, adaptive, eta = settings[group_of[id(p)]]
        params.append(p)
        grads.append(g)
        rhos.append(rho)
        etas.append(eta if adaptive and id(p) not in plain else None)
    return params, grads, rhos, etas


def summary(groups: list[dict[str, Any]]) -> tuple[str, str]:
    """``(kind, rho)`` of a SAM's groups for its ``repr``: ``"ASAM"`` if every group is adaptive,
    else ``"SAM"``; the one ``rho``, or each group's.

    Example:
        >>> summary([{"rho": 0.1, "adaptive": False}, {"rho": 0.2, "adaptive": True}])
        ('SAM', 'per group [0.1, 0.2]')
    """
    rhos = sorted({g["rho"] for g in groups})
    kind = "ASAM" if all(g["adaptive"] for g in groups) else "SAM"
    return kind, str(rhos[0]) if len(rhos) == 1 else f"per group {rhos}"
