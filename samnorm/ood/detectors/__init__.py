"""Model-level OOD scorers with one shape: ``fit`` on ID data (when needed), then ``score``.

Every scorer is built on a model (anything :meth:`ModelAdapter.from_model` understands, or a
:class:`ModelAdapter`), returns a 1-D tensor with **higher = more in-distribution**, and has

- ``fit(data)``: ID training data as a DataLoader (or any re-iterable of ``(images, labels)``
  batches), an ``(images, labels)`` pair of tensors, or an image tensor; a no-op for scorers
  without statistics. ``fit_features(features, labels)`` fits from precomputed penultimate
  features instead. Fitting streams batch by batch: statistics are accumulated, never the
  feature bank, except KNN whose bank *is* the model (subsample it with ``fraction``).
- ``score(inputs)``: one batch; ``score_loader(loader)``: a whole loader, on the CPU.
- ``score_outputs(features, logits)`` for scorers that only need the plain forward pass
  (``uses_outputs``), so :func:`samnorm.ood.evaluate` runs the network once per batch for all
  of them.

The model is put in eval mode while a scorer runs and restored afterwards. One module per family:

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
