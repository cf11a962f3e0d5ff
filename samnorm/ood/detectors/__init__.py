"""Model-level OOD scorers with one shape: ``fit`` on ID data (when needed), then ``score``
(higher = more in-distribution); the interface is :class:`~samnorm.ood.detectors.base.Scorer`'s.

One module per family:

- :mod:`~samnorm.ood.detectors.base`: the abstract :class:`Scorer` and :class:`OutputScorer`;
- :mod:`~samnorm.ood.detectors.logits`: MSP, MaxLogit, Energy, ODIN;
- :mod:`~samnorm.ood.detectors.react`: ReAct; :mod:`~samnorm.ood.detectors.gradnorm`: GradNorm;
- :mod:`~samnorm.ood.detectors.rank`: RankFeat, RankWeight;
- :mod:`~samnorm.ood.detectors.features`: Mahalanobis, KNN, ViM;
- :mod:`~samnorm.ood.detectors.registry`: the scorers by name.
"""

from samnorm.ood.detectors.base import NotFittedError, OutputScorer, Scorer, TemperedScorer
from samnorm.ood.detectors.features import KNN, Mahalanobis, ViM
from samnorm.ood.detectors.gradnorm import GradNorm
from samnorm.ood.detectors.logits import MSP, ODIN, Energy, MaxLogit
from samnorm.ood.detectors.rank import RankFeat, RankWeight
from samnorm.ood.detectors.react import ReAct
from samnorm.ood.detectors.registry import (
    SCORERS,
    canonical_name,
    check_scorer_options,
    make_scorer,
    scorer_class,
)

__all__ = [
    "KNN",
    "MSP",
    "ODIN",
    "SCORERS",
    "Energy",
    "GradNorm",
    "Mahalanobis",
    "MaxLogit",
    "NotFittedError",
    "OutputScorer",
    "RankFeat",
    "RankWeight",
    "ReAct",
    "Scorer",
    "TemperedScorer",
    "ViM",
    "canonical_name",
    "check_scorer_options",
    "make_scorer",
    "scorer_class",
]
