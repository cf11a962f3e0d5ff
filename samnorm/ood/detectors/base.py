"""The scorer interface: ``fit`` on ID data (when needed), then ``score``; higher = more ID.

:class:`Scorer` is the abstract base of every scorer; :class:`OutputScorer` the base of those whose
score is a function of the plain forward pass's penultimate features and logits (so
:func:`samnorm.ood.evaluate` runs the network once per batch for all of them). Data handling is
:mod:`samnorm.utils.nn`'s; the model split is :class:`~samnorm.ood.adapter.ModelAdapter`'s.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from samnorm.ood import scores as S
from samnorm.ood.adapter import ModelAdapter
from samnorm.utils.nn import batches, eval_mode

__all__ = ["NotFittedError", "OutputScorer", "Outputs", "Passes", "Scorer", "TemperedScorer"]

Outputs = tuple[Tensor, Tensor, Tensor | None]
"""One batch of the fit data as a scorer's ``_fit`` sees it: ``(features, logits, labels or None)``."""
Passes = Callable[[], Iterator[Outputs]]
"""``passes()`` starts one pass over the fit data, yielding :data:`Outputs` per batch."""


class NotFittedError(ValueError):
    """A scorer that needs ID statistics was used before ``fit``."""


class Scorer(abc.ABC):
    """Abstract base: a post-hoc OOD scorer bound to one model (higher score = more ID).

    Every scorer is built on a model (anything :meth:`ModelAdapter.from_model` understands, or a
    :class:`ModelAdapter`), returns a 1-D tensor, and has

    - ``fit(data)``: ID training data as a DataLoader (or any re-iterable of ``(images, labels)``
      batches), an ``(images, labels)`` pair of tensors, or an image tensor; a no-op for scorers
      without statistics. ``fit_features(features, labels)`` fits from precomputed penultimate
      features instead. Fitting streams batch by batch: statistics are accumulated, never the
      feature bank, except KNN whose bank *is* the model (subsample it with ``fraction``).
    - ``score(inputs)``: one batch; ``score_loader(loader)``: a whole loader, on the CPU.

    The model is in eval mode while a scorer runs and restored afterwards. A subclass sets
    ``name`` and implements :meth:`_score_inputs`; one with ``needs_fit = True`` also implements
    :meth:`_fit` (checked when the class is defined). One with ``needs_labels = True`` (Mahalanobis)
    gets labels in every batch of ``_fit``: ``fit`` refuses data without them.

    Example:
        >>> from samnorm.ood import Energy
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(),
        ...                           torch.nn.Linear(5, 3))
        >>> adapter = ModelAdapter(net, embed=torch.nn.Flatten(), blocks=[net[1:3]],
        ...                        pool=lambda h: h, fc=net[3])
        >>> Energy(adapter).score(torch.rand(4, 3, 2, 2)).shape
        torch.Size([4])
    """

    name: ClassVar[str] = "scorer"
    #: whether ``score`` needs statistics from ``fit`` first
    needs_fit: ClassVar[bool] = False
    #: whether ``fit`` needs class labels (checked here, for every batch, before ``_fit`` sees it)
    needs_labels: ClassVar[bool] = False
    #: whether the score is a function of the plain forward's (features, logits)
    uses_outputs: bool = False
    #: how many times ``fit`` reads its data
    fit_passes: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.needs_fit and cls._fit is Scorer._fit:
            raise TypeError(f"{cls.__name__} sets needs_fit = True but does not implement _fit")
        if cls.needs_labels and not cls.needs_fit:
            raise TypeError(f"{cls.__name__} sets needs_labels = True but not needs_fit: labels are only read by fit")

    def __init__(self, model: nn.Module | ModelAdapter) -> None:
        self.adapter = ModelAdapter.from_model(model)
        self._fitted = not self.needs_fit

    @property
    def model(self) -> nn.Module:
        """The model this scorer runs."""
        return self.adapter.model

    @property
    def is_fitted(self) -> bool:
        """True once the scorer can score."""
        return self._fitted

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"{self.name} needs statistics of ID training data: call .fit(id_train_loader) "
                "(or .fit_features(features, labels)) before scoring"
            )

    # ------------------------------------------------------------ fitting
    def fit(self, data: Any = None, *, batch_size: int = 256) -> Scorer:
        """Fit on ID training data (a no-op for scorers without statistics); returns ``self``."""
        if not self.needs_fit:
            return self
        if data is None:
            raise ValueError(f"{self.name}.fit needs ID training data (a DataLoader or tensors)")
        if self.fit_passes > 1 and iter(data) is data:
            raise TypeError(
                f"{self.name} reads its fit data {self.fit_passes} times; pass a DataLoader, a list "
                "of batches or an (images, labels) pair, not a one-shot iterator"
            )
        adapter = self.adapter

        def passes() -> Iterator[Outputs]:
            for x, y in batches(data, batch_size):
                self._check_labels(y)
                x = adapter.prepare(x)
                feats, logits = adapter.features_and_logits(x)
                yield feats, logits, None if y is None else y.to(x.device)

        with eval_mode(self.model), torch.no_grad():
            self._fit(passes)
        self._fitted = True
        return self

    def fit_features(self, features: Tensor, labels: Tensor | None = None, *, batch_size: int = 8192) -> Scorer:
        """Fit from precomputed ``(N, D)`` penultimate features (and ``(N,)`` labels)."""
        if not self.needs_fit:
            return self
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError("features must be an (N, D) tensor of penultimate features")
        if features.shape[1] != self.adapter.num_features:
            raise ValueError(
                f"features have D={features.shape[1]}, the model's head expects {self.adapter.num_features}"
            )
        self._check_labels(labels)
        if labels is not None and labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        adapter, device = self.adapter, self.adapter.placement()[0]
        dtype = S.widen(torch.promote_types(features.dtype, adapter.fc_weight.dtype))

        def passes() -> Iterator[Outputs]:
            for i in range(0, features.shape[0], batch_size):
                f = features[i : i + batch_size].to(device)
                logits = adapter.head(f, dtype)  # the features' own precision, at least float32
                yield f, logits, None if labels is None else labels[i : i + batch_size].to(device)

        with torch.no_grad():
            self._fit(passes)
        self._fitted = True
        return self

    def _check_labels(self, labels: Tensor | None) -> None:
        if labels is None and self.needs_labels:
            raise ValueError(f"{self.name}.fit needs class labels: pass (images, labels) batches")

    def _fit(self, passes: Passes) -> None:
        """Compute the statistics from ``passes`` (scorers with ``needs_fit = True``)."""
        raise TypeError(f"{self.name} has no statistics to fit")

    # ------------------------------------------------------------ scoring
    def score(self, inputs: Tensor) -> Tensor:
        """Scores ``(B,)`` of one batch, in at least float32 (the inputs go to the model's device
        and parameter dtype, see :meth:`ModelAdapter.prepare`)."""
        self._check_fitted()
        with eval_mode(self.model):
            return self._score_inputs(self.adapter.prepare(inputs))

    @abc.abstractmethod
    def _score_inputs(self, inputs: Tensor) -> Tensor:
        """Scores of a prepared batch, the model in eval mode."""

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        """Scores from the plain forward's ``(B, D)`` features and ``(B, K)`` logits
        (:class:`OutputScorer` only)."""
        raise TypeError(f"{self.name} does not score from features and logits; call score(inputs)")

    def score_loader(self, loader: Iterable[Any]) -> Tensor:
        """Scores of every sample a loader yields (``(images, labels)`` or images), on the CPU."""
        parts = [self.score(x).detach().cpu() for x, _ in batches(loader, 256)]
        if not parts:
            raise ValueError("the loader yielded no samples")
        return torch.cat(parts)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict[str, Any]:
        return {}


class OutputScorer(Scorer):
    """A scorer whose score is a function of the plain forward's ``(features, logits)``:
    subclasses implement :meth:`_from_outputs`, and :meth:`score_outputs` lets a harness share one
    forward pass between several of them.

    Example:
        >>> from samnorm.ood import MaxLogit
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> adapter = ModelAdapter(net, embed=torch.nn.Flatten(), blocks=[torch.nn.Identity()],
        ...                        pool=lambda h: h, fc=net[1])
        >>> MaxLogit(adapter).score_outputs(torch.zeros(1, 4), torch.tensor([[1.0, 5.0, 2.0]]))
        tensor([5.])
    """

    uses_outputs: bool = True

    def _score_inputs(self, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return self._from_outputs(*self.adapter.features_and_logits(inputs))

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        if not self.uses_outputs:
            return super().score_outputs(features, logits)
        self._check_fitted()
        with torch.no_grad():
            return self._from_outputs(features, logits)

    @abc.abstractmethod
    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        """Scores ``(B,)`` from ``(B, D)`` features and ``(B, K)`` logits."""


class TemperedScorer(OutputScorer):
    """An output scorer with one ``temperature`` T applied to the logits (default 1)."""

    def __init__(self, model: nn.Module | ModelAdapter, temperature: float = 1.0) -> None:
        super().__init__(model)
        self.temperature = S.check_temperature(temperature)

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}
