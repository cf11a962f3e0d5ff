"""Settings that live in the parameter groups (``rho``, ``adaptive``, ``eta``, a variant's ``k``,
``alpha``, ``direction``), read and written for all groups at once through :class:`GroupSetting`, and
checked by :func:`check_nonnegative`."""

from __future__ import annotations

from typing import Any

__all__ = ["GroupSetting", "check_nonnegative"]


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
