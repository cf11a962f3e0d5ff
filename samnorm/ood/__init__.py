"""OOD detection toolkit: scores, scorers, metrics and the evaluation harness.

Convention everywhere: a higher score means more in-distribution.

- :mod:`samnorm.ood.metrics`: ``auroc``, ``fpr_at_tpr``, ``aupr_in``, ``aupr_out``,
  ``ood_metrics`` under named conventions (``CONVENTIONS``).
- :mod:`samnorm.ood.scores`: ``msp``, ``max_logit``, ``energy``, ``odin`` on logits,
  ``head_grad_norm`` (GradNorm's closed form) on features and logits.
- :class:`ModelAdapter`: how a classifier splits into features and head.
- :mod:`samnorm.ood.detectors`: scorers with ``fit`` / ``score`` / ``score_loader``: MSP,
  MaxLogit, Energy, ODIN, ReAct, GradNorm, RankFeat, RankWeight, Mahalanobis, KNN, ViM; by name
  with :func:`make_scorer` / :func:`scorer_class` (:func:`canonical_name` is the spelling rule).
- :func:`evaluate` (:mod:`samnorm.ood.harness`): tables of FPR95 / AUROC / AUPR-In / AUPR-Out per
  OOD set.
- :func:`evaluate_datasets` (:mod:`samnorm.ood.sharded`): the same on datasets, sharded across
  ``torch.distributed`` ranks, unreadable images left out and listed.
- :mod:`samnorm.ood.svd`: the rank-1 arithmetic behind RankFeat (:func:`rank1`, :func:`remove_rank1`).

Example:
    >>> from samnorm.ood import auroc
    >>> auroc([2.0, 3.0], [1.0, 2.0])
    0.875
"""

from samnorm.ood import metrics, scores
from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors import (
    KNN,
    MSP,
    ODIN,
    SCORERS,
    Energy,
    GradNorm,
    Mahalanobis,
    MaxLogit,
    NotFittedError,
    OutputScorer,
    RankFeat,
    RankWeight,
    ReAct,
    Scorer,
    ViM,
    canonical_name,
    check_scorer_options,
    make_scorer,
    scorer_class,
)
from samnorm.ood.harness import OODResults, evaluate
from samnorm.ood.metrics import (
    CONVENTIONS,
    Convention,
    OODMetrics,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    ood_metrics,
)
from samnorm.ood.scores import energy, max_logit, msp, odin
from samnorm.ood.sharded import Evaluation, evaluate_datasets
from samnorm.ood.svd import rank1, remove_rank1
from samnorm.utils.deprecation import alias_module

# The harness was the module samnorm.ood.evaluate, shadowed by the function: the old path stays
# importable (with a warning) without a file that would rebind the package's `evaluate`.
alias_module("samnorm.ood.evaluate", "samnorm.ood.harness")

__all__ = [
    "CONVENTIONS",
    "KNN",
    "MSP",
    "ODIN",
    "SCORERS",
    "Convention",
    "Energy",
    "Evaluation",
    "GradNorm",
    "Mahalanobis",
    "MaxLogit",
    "ModelAdapter",
    "NotFittedError",
    "OODMetrics",
    "OODResults",
    "OutputScorer",
    "RankFeat",
    "RankWeight",
    "ReAct",
    "Scorer",
    "ViM",
    "aupr_in",
    "aupr_out",
    "auroc",
    "canonical_name",
    "check_scorer_options",
    "energy",
    "evaluate",
    "evaluate_datasets",
    "fpr_at_tpr",
    "make_scorer",
    "max_logit",
    "metrics",
    "msp",
    "odin",
    "ood_metrics",
    "rank1",
    "remove_rank1",
    "scorer_class",
    "scores",
]
