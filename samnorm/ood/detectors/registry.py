"""The scorers by name: the one list of scorer names and the one way to spell them.

A name is matched ignoring case, ``-`` and ``_`` (``"max_logit"``, ``"Max-Logit"`` and
``"maxlogit"`` all name MaxLogit): :func:`canonical_name` is that rule, used by :func:`scorer_class`,
:func:`make_scorer`, the CLI and the plots' axis labels.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors.base import Scorer
from samnorm.ood.detectors.features import KNN, Mahalanobis, ViM
from samnorm.ood.detectors.gradnorm import GradNorm
from samnorm.ood.detectors.logits import MSP, ODIN, Energy, MaxLogit
from samnorm.ood.detectors.rank import RankFeat, RankWeight
from samnorm.ood.detectors.react import ReAct

__all__ = ["SCORERS", "canonical_name", "check_scorer_options", "make_scorer", "scorer_class"]


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


SCORERS: dict[str, type[Scorer]] = {
    _key(cls.name): cls
    for cls in (MSP, MaxLogit, Energy, ODIN, ReAct, GradNorm, RankFeat, RankWeight, Mahalanobis, KNN, ViM)
}
"""Scorer classes by lower-case name, for :func:`make_scorer` and :func:`samnorm.ood.evaluate`."""


def canonical_name(name: str) -> str:
    """The scorer's own spelling of ``name`` (case, ``-`` and ``_`` ignored); ``ValueError``
    naming the choices if no scorer has that name.

    Example:
        >>> canonical_name("max_logit"), canonical_name("RANK-FEAT")
        ('MaxLogit', 'RankFeat')
    """
    return scorer_class(name).name


def scorer_class(name: str) -> type[Scorer]:
    """The scorer class of a name (case, ``-`` and ``_`` ignored); ``ValueError`` if unknown.

    Example:
        >>> scorer_class("Max-Logit").__name__
        'MaxLogit'
    """
    if not isinstance(name, str):
        raise TypeError(f"a scorer name must be a string, got {type(name).__name__}")
    cls = SCORERS.get(_key(name))
    if cls is None:
        raise ValueError(f"unknown scorer {name!r}; choose from {sorted(c.name for c in SCORERS.values())}")
    return cls


def check_scorer_options(name: str, options: Mapping[str, Any]) -> None:
    """``ValueError`` unless every key of ``options`` is a keyword of the named scorer.

    Example:
        >>> check_scorer_options("rankfeat", {"blocks": (-2, -1), "method": "power"})
        >>> check_scorer_options("msp", {"temprature": 2.0})
        Traceback (most recent call last):
        ...
        ValueError: scorer MSP has no option 'temprature'; its options: temperature
    """
    cls = scorer_class(name)
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    for key in options:
        if key not in known:
            raise ValueError(f"scorer {cls.name} has no option {key!r}; its options: {', '.join(known) or 'none'}")


def make_scorer(name: str, model: nn.Module | ModelAdapter, **kwargs: Any) -> Scorer:
    """Build a scorer by name (case, ``-`` and ``_`` ignored), e.g. ``"max_logit"``, ``"ReAct"``;
    ``kwargs`` are its options (``ValueError`` naming the valid ones for a misspelt one).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> adapter = ModelAdapter(net, embed=torch.nn.Flatten(), blocks=[torch.nn.Identity()],
        ...                        pool=lambda h: h, fc=net[1])
        >>> make_scorer("energy", adapter, temperature=2.0)
        Energy(temperature=2.0)
    """
    check_scorer_options(name, kwargs)
    return scorer_class(name)(model, **kwargs)
