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

The model is put in eval mode while a scorer runs and restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from samnorm.ood import scores as S
from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.rankfeat import Method, check_method, remove_rank1

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
    "RankFeat",
    "RankWeight",
    "ReAct",
    "Scorer",
    "ViM",
    "check_scorer_options",
    "make_scorer",
    "scorer_class",
]

Batch = tuple[Tensor, Optional[Tensor]]
Outputs = tuple[Tensor, Tensor, Optional[Tensor]]  # features, logits, labels
Passes = Callable[[], Iterator[Outputs]]


class NotFittedError(ValueError):
    """A scorer that needs ID statistics was used before ``fit``."""


# ---------------------------------------------------------------------------- data plumbing
def _split_batch(batch: Any) -> Batch:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    raise TypeError(
        f"a loader must yield image tensors or (images, labels) pairs, got {type(batch).__name__}"
    )


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[1].dim() == 1
        and data[0].dim() > 1
        and data[0].shape[0] == data[1].shape[0]
    )


def _iter_batches(data: Any, batch_size: int) -> Iterator[Batch]:
    """``(inputs, labels or None)`` batches from a loader, a tensor pair or a tensor."""
    if isinstance(data, Tensor) or _is_pair(data):
        x, y = (data, None) if isinstance(data, Tensor) else data
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], None if y is None else y[i : i + batch_size]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a DataLoader, an iterable of batches, an (images, labels) pair or a "
            f"tensor, got {type(data).__name__}"
        )
    for batch in data:
        yield _split_batch(batch)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- base
class Scorer:
    """Base class: a post-hoc OOD scorer bound to one model (higher score = more ID).

    Subclasses set ``name``, ``needs_fit`` and ``uses_outputs``, and implement ``_fit`` and
    ``_from_outputs`` (when they score from features and logits) or ``_score_inputs``.

    Example:
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
    #: whether the score is a function of the plain forward's (features, logits)
    uses_outputs: bool = True
    #: how many times ``fit`` reads its data
    fit_passes: ClassVar[int] = 1

    def __init__(self, model: Union[nn.Module, ModelAdapter]) -> None:
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
        if not self._fitted:
            raise NotFittedError(
                f"{self.name} needs statistics of ID training data: call .fit(id_train_loader) "
                "(or .fit_features(features, labels)) before scoring"
            )

    # ------------------------------------------------------------ fitting
    def fit(self, data: Any = None, *, batch_size: int = 256) -> "Scorer":
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
            for x, y in _iter_batches(data, batch_size):
                x = adapter.prepare(x)
                feats, logits = adapter.features_and_logits(x)
                yield feats, logits, None if y is None else y.to(x.device)

        with _eval_mode(self.model), torch.no_grad():
            self._fit(passes)
        self._fitted = True
        return self

    def fit_features(
        self, features: Tensor, labels: Optional[Tensor] = None, *, batch_size: int = 8192
    ) -> "Scorer":
        """Fit from precomputed ``(N, D)`` penultimate features (and ``(N,)`` labels)."""
        if not self.needs_fit:
            return self
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError("features must be an (N, D) tensor of penultimate features")
        if features.shape[1] != self.adapter.num_features:
            raise ValueError(
                f"features have D={features.shape[1]}, the model's head expects "
                f"{self.adapter.num_features}"
            )
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

    def _fit(self, passes: Passes) -> None:
        raise NotImplementedError  # only scorers with needs_fit = True are fitted

    # ------------------------------------------------------------ scoring
    def score(self, inputs: Tensor) -> Tensor:
        """Scores ``(B,)`` of one batch, in at least float32 (the inputs go to the model's device
        and parameter dtype, see :meth:`ModelAdapter.prepare`)."""
        self._check_fitted()
        with _eval_mode(self.model):
            x = self.adapter.prepare(inputs)
            if not self.uses_outputs:
                return self._score_inputs(x)
            with torch.no_grad():
                return self._from_outputs(*self.adapter.features_and_logits(x))

    def score_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        """Scores from the plain forward's ``(B, D)`` features and ``(B, K)`` logits."""
        if not self.uses_outputs:
            raise TypeError(f"{self.name} does not score from features and logits; call score(inputs)")
        self._check_fitted()
        with torch.no_grad():
            return self._from_outputs(features, logits)

    def score_loader(self, loader: Iterable[Any]) -> Tensor:
        """Scores of every sample a loader yields (``(images, labels)`` or images), on the CPU."""
        parts = [self.score(x).detach().cpu() for x, _ in _iter_batches(loader, 256)]
        if not parts:
            raise ValueError("the loader yielded no samples")
        return torch.cat(parts)

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        raise NotImplementedError  # uses_outputs scorers implement it

    def _score_inputs(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError  # scorers with uses_outputs = False implement it

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict[str, Any]:
        return {}


# ---------------------------------------------------------------------------- logit scores
class _Tempered(Scorer):
    """A scorer with one ``temperature`` T applied to the logits (default 1)."""

    def __init__(self, model: Union[nn.Module, ModelAdapter], temperature: float = 1.0) -> None:
        super().__init__(model)
        self.temperature = S.check_temperature(temperature)

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


class MSP(_Tempered):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    Example:
        >>> MSP(model).score(images)  # doctest: +SKIP
    """

    name = "MSP"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.msp(logits, self.temperature)

class MaxLogit(Scorer):
    """Maximum logit (Hendrycks et al., "Scaling OOD detection...", ICML 2022).

    Example:
        >>> MaxLogit(model).score(images)  # doctest: +SKIP
    """

    name = "MaxLogit"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.max_logit(logits)


class Energy(_Tempered):
    """Energy score ``T logsumexp(logits / T)`` (Liu et al., NeurIPS 2020).

    Example:
        >>> Energy(model, temperature=1.0).score(images)  # doctest: +SKIP
    """

    name = "Energy"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.energy(logits, self.temperature)

class ODIN(Scorer):
    """ODIN (Liang et al., ICLR 2018): MSP at temperature T, optionally of perturbed inputs.

    With ``epsilon=0`` (the RankFeat evaluation) it shares the plain forward pass; with
    ``epsilon > 0`` it needs a gradient w.r.t. the inputs (see :func:`samnorm.ood.scores.odin`).

    Example:
        >>> ODIN(model, temperature=1000.0, epsilon=0.0014).score(images)  # doctest: +SKIP
    """

    name = "ODIN"

    def __init__(
        self,
        model: Union[nn.Module, ModelAdapter],
        temperature: float = 1000.0,
        epsilon: float = 0.0,
        input_std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(model)
        self.temperature, self.epsilon = S.check_temperature(temperature), float(epsilon)
        if not (self.epsilon >= 0 and np.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a finite number >= 0 (0 disables the step), got {epsilon}")
        self.input_std = input_std
        self.uses_outputs = self.epsilon == 0.0

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.msp(logits, self.temperature)

    def _score_inputs(self, inputs: Tensor) -> Tensor:
        return S.odin(self.adapter.logits, inputs, temperature=self.temperature,
                      epsilon=self.epsilon, input_std=self.input_std)

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "epsilon": self.epsilon}


# ---------------------------------------------------------------------------- ReAct
class _Reservoir:
    """Seeded uniform sample (without replacement) of at most ``capacity`` streamed values.

    Every value gets a random key; the sample is the ``capacity`` smallest keys, so it is exact
    (all values) until ``capacity`` is exceeded. Compaction is amortised: it runs when twice the
    capacity has accumulated, and values whose key exceeds the current cut are dropped at once.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.count = 0
        self.cut = float("inf")

    def add(self, values: Tensor) -> None:
        values = values.detach().reshape(-1).cpu()
        keys = torch.rand(values.numel(), generator=self.gen, dtype=torch.float64)
        keep = keys < self.cut
        self.keys.append(keys[keep])
        self.values.append(values[keep])
        self.count += int(keep.sum())
        if self.count > 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        keys, values = torch.cat(self.keys), torch.cat(self.values)
        if keys.numel() > self.capacity:
            keys, idx = torch.topk(keys, self.capacity, largest=False)
            values = values[idx]
            self.cut = float(keys.max())
        self.keys, self.values, self.count = [keys], [values], keys.numel()

    def sample(self) -> Tensor:
        self._compact()
        return self.values[0]


class ReAct(Scorer):
    """ReAct (Sun, Guo & Li, NeurIPS 2021): clip penultimate activations at ``c``, then Energy.

    ``c`` is the ``percentile``-th percentile (0-100, numpy's linear interpolation) of all ID
    activation values seen by ``fit``, or ``threshold`` when given (no fit needed). Beyond
    ``max_values`` activation values the percentile is taken on a seeded uniform subsample of
    that size, so ImageNet-size fits stay in memory.

    Example:
        >>> ReAct(model, percentile=90).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "ReAct"
    needs_fit = True

    def __init__(
        self,
        model: Union[nn.Module, ModelAdapter],
        percentile: float = 90.0,
        threshold: Optional[float] = None,
        temperature: float = 1.0,
        max_values: int = 2**24,
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100] (90 = the ReAct default), got {percentile}")
        if max_values < 1:
            raise ValueError(f"max_values must be positive, got {max_values}")
        self.percentile, self.temperature = float(percentile), S.check_temperature(temperature)
        self.max_values, self.seed = int(max_values), seed
        self.threshold = None if threshold is None else float(threshold)
        self._fitted = threshold is not None

    def _fit(self, passes: Passes) -> None:
        reservoir = _Reservoir(self.max_values, self.seed)
        for feats, _, _ in passes():
            reservoir.add(feats)
        values = reservoir.sample()
        if values.numel() == 0:
            raise ValueError("ReAct.fit got no samples")
        # float64 for numpy, which has no bfloat16
        self.threshold = float(np.percentile(values.double().numpy(), self.percentile))

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        clipped = features.clamp(max=self.threshold)
        return S.energy(self.adapter.head(clipped, S.widen(features.dtype)), self.temperature)

    def _params(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "threshold": self.threshold}


# ---------------------------------------------------------------------------- GradNorm
class GradNorm(_Tempered):
    """GradNorm (Huang, Geng & Li, NeurIPS 2021): L1 norm of the last layer's weight gradient.

    The loss is ``KL(uniform || softmax(z / T))`` for one sample, ``z = W h + b``. Its gradient
    w.r.t. ``z`` is ``(softmax(z / T) - 1/K) / T``, so the gradient w.r.t. ``W`` is the outer
    product ``(softmax(z / T) - 1/K) h^T / T`` and its entry-wise L1 norm factorises:
    ``||softmax(z / T) - 1/K||_1 * ||h||_1 / T``. That is the per-sample gradient of the paper's
    batch-size-1 code, for a whole batch in O(B (K + D)) memory, with no backward pass, and the
    same for any batch size.

    Example:
        >>> GradNorm(model).score(images)  # doctest: +SKIP
    """

    name = "GradNorm"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        t = self.temperature
        probs = torch.softmax(logits.to(S.widen(logits.dtype)) / t, dim=1)
        h_norm = features.to(S.widen(features.dtype)).abs().sum(dim=1)  # a half-precision sum may overflow
        return (probs - 1.0 / probs.shape[1]).abs().sum(dim=1) * h_norm / t

# ---------------------------------------------------------------------------- RankFeat / RankWeight
class RankFeat(Scorer):
    """RankFeat (Song, Sebe & Wang, NeurIPS 2022): remove the rank-1 component of a block's
    output, run the rest of the network, score with Energy.

    ``blocks`` are indices into the adapter's blocks (negative from the end); several indices
    average the logits of each removal, as RankFeat's best BiT variant: for a ResNetV2, ``-1`` is
    "block 4", ``-2`` "block 3 then block 4", ``(-2, -1)`` both. For ViT / T2T-ViT, ``-1`` edits
    the tokens after the last block, before the final norm. ``method="power"`` uses ``iters``
    steps of seeded power iteration (stopping per sample at ``tol``) instead of the full SVD
    (:mod:`samnorm.ood.rankfeat`).

    Example:
        >>> RankFeat(model, blocks=(-2, -1), method="power").score(images)  # doctest: +SKIP
    """

    name = "RankFeat"
    uses_outputs = False

    def __init__(
        self,
        model: Union[nn.Module, ModelAdapter],
        blocks: Union[int, Sequence[int]] = -1,
        method: Method = "svd",
        iters: int = 20,
        tol: float = 1e-6,
        seed: int = 0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(model)
        indices = [blocks] if isinstance(blocks, int) else list(blocks)
        if not indices:
            raise ValueError("blocks must name at least one block index")
        self.blocks = sorted({self.adapter.block_index(i) for i in indices})
        if len(self.blocks) != len(indices):
            raise ValueError(f"blocks {indices} name the same block twice")
        check_method(method, iters, tol)
        self.method, self.iters, self.tol, self.seed = method, iters, float(tol), seed
        self.temperature = S.check_temperature(temperature)

    def _score_inputs(self, inputs: Tensor) -> Tensor:
        a = self.adapter
        with torch.no_grad():
            hidden, done, total = a.embed(inputs), 0, 0.0
            for index in self.blocks:  # the clean prefix is shared by all removals
                hidden = a.run_blocks(hidden, done, index + 1)
                done = index + 1
                edited = remove_rank1(hidden, self.method, iters=self.iters, tol=self.tol, seed=self.seed)
                feats = a.pool(a.run_blocks(edited, done))
                total = total + a.head(feats, S.widen(feats.dtype))
            return S.energy(total / len(self.blocks), self.temperature)

    def _params(self) -> dict[str, Any]:
        return {"blocks": tuple(self.blocks), "method": self.method}


class RankWeight(Scorer):
    """RankWeight (Song, Sebe & Wang, TPAMI 2024): remove the rank-1 component of one deep
    weight matrix, once, on a copy of the model, then score the copy with ``then``.

    ``layer`` is a module name (``model.get_submodule``); by default the last module of the last
    block with a weight of >= 2 dimensions (e.g. the last conv of BiT's block 4, ``mlp.fc2`` of a
    ViT's last block). Convolution kernels are seen as ``out x (in * kh * kw)`` matrices; the SVD
    runs in float64. ``then`` builds the scorer run on the edited copy (default Energy; the
    paper also combines it with ReAct: ``then=ReAct``). The original model is not modified.

    Example:
        >>> RankWeight(model, then=ReAct).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "RankWeight"
    uses_outputs = False

    def __init__(
        self,
        model: Union[nn.Module, ModelAdapter],
        layer: Optional[str] = None,
        then: Optional[Callable[[nn.Module], Scorer]] = None,
    ) -> None:
        # the copy is re-adapted with from_model, so a custom adapter's closures (which would still
        # point at the original) are never used; DDP / compile wrappers are looked through
        edited = copy.deepcopy(ModelAdapter.from_model(model).model)
        self.layer = layer if layer is not None else self._default_layer(ModelAdapter.from_model(edited))
        try:
            weight = edited.get_submodule(self.layer).weight
        except AttributeError as err:
            raise ValueError(f"layer {self.layer!r} is not a module with a weight in the model") from err
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            raise ValueError(f"layer {self.layer!r} has no weight matrix (needs >= 2 dimensions)")
        with torch.no_grad():
            matrix = weight.detach().double().flatten(1)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            weight.copy_((matrix - s[0] * torch.outer(u[:, 0], vh[0])).view_as(weight))
        self.sigma1 = float(s[0])
        self.inner = (then or Energy)(edited)
        self.adapter = self.inner.adapter
        self.needs_fit = self.inner.needs_fit  # type: ignore[misc]
        self._fitted = True

    @staticmethod
    def _default_layer(adapter: ModelAdapter) -> str:
        names = {id(m): n for n, m in adapter.model.named_modules()}
        last_block = adapter.blocks[-1]
        candidates = [
            names[id(m)]
            for m in last_block.modules()
            if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() >= 2 and id(m) in names
        ]
        if not candidates:
            raise ValueError("the last block has no weight matrix; pass layer='<module name>'")
        return candidates[-1]

    @property
    def is_fitted(self) -> bool:
        """True once the inner scorer can score."""
        return self.inner.is_fitted

    def fit(self, data: Any = None, *, batch_size: int = 256) -> "RankWeight":
        """Fit the inner scorer (``then``) on the edited copy; a no-op for Energy."""
        self.inner.fit(data, batch_size=batch_size)
        return self

    def fit_features(
        self, features: Tensor, labels: Optional[Tensor] = None, *, batch_size: int = 8192
    ) -> "RankWeight":
        """Fit the inner scorer from features of the *edited* copy (see ``fit_features``)."""
        self.inner.fit_features(features, labels, batch_size=batch_size)
        return self

    def score(self, inputs: Tensor) -> Tensor:
        """Scores ``(B,)`` of the inner scorer on the edited copy."""
        return self.inner.score(inputs)

    def _params(self) -> dict[str, Any]:
        return {"layer": self.layer, "then": self.inner}


# ---------------------------------------------------------------------------- feature statistics
class Mahalanobis(Scorer):
    """Mahalanobis distance to the closest class mean with a tied covariance (Lee et al.,
    NeurIPS 2018; without input pre-processing or feature ensembles).

    ``fit`` needs labels; it streams class means and the pooled within-class scatter in float64
    (no feature bank, numerically stable pairwise updates). The covariance gets
    ``jitter * trace / D`` on its diagonal (relative, so scale-free) and is factorised by
    Cholesky. Score: ``-min_c (h - mu_c)^T Sigma^-1 (h - mu_c)``. Classes absent from the fit
    data are ignored.

    Example:
        >>> Mahalanobis(model).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "Mahalanobis"
    needs_fit = True

    def __init__(self, model: Union[nn.Module, ModelAdapter], jitter: float = 1e-6) -> None:
        super().__init__(model)
        if not jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.jitter = float(jitter)

    def _fit(self, passes: Passes) -> None:
        k, d = self.adapter.num_classes, self.adapter.num_features
        means = counts = scatter = None  # float64, on the device of the features
        for feats, _, labels in passes():
            if labels is None:
                raise ValueError("Mahalanobis.fit needs class labels: pass (images, labels) batches")
            f, y = feats.double(), labels.to(feats.device).long()
            if y.numel() == 0:
                continue
            if y.min() < 0 or y.max() >= k:
                raise ValueError(f"labels must be class indices in [0, {k}), got {y.min()}..{y.max()}")
            if scatter is None:
                means, counts = f.new_zeros(k, d), f.new_zeros(k)
                scatter = f.new_zeros(d, d)  # pooled within-class scatter
            # Chan et al.'s pairwise update: scatter around the batch's class means, plus the
            # shift between batch and running means; E[hh^T] - mu mu^T would cancel
            # catastrophically when features vary little around a large mean
            cls, inv, cnt = torch.unique(y, return_inverse=True, return_counts=True)
            cnt = cnt.double()
            batch_means = f.new_zeros(len(cls), d).index_add_(0, inv, f) / cnt[:, None]
            centred = f - batch_means[inv]
            delta = batch_means - means[cls]
            total = counts[cls] + cnt
            scatter += centred.T @ centred + (delta * (counts[cls] * cnt / total)[:, None]).T @ delta
            means[cls] += delta * (cnt / total)[:, None]
            counts[cls] = total
        if counts is None or counts.sum() < 2:
            raise ValueError("Mahalanobis.fit needs at least 2 labelled samples")
        present = counts > 0
        means = means[present]
        cov = scatter / counts.sum()
        cov += torch.eye(d, dtype=torch.float64, device=cov.device) * (self.jitter * cov.trace() / d)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info != 0:
            raise ValueError(f"the covariance is not positive definite; raise jitter (now {self.jitter})")
        self.classes = torch.nonzero(present).reshape(-1)
        self.means, self.chol = means, chol
        # whitened class means: distances become squared Euclidean norms
        self.white_means = torch.linalg.solve_triangular(chol, means.T, upper=False).T

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        chol, m = self.chol.to(features.device), self.white_means.to(features.device)
        z = torch.linalg.solve_triangular(chol, features.double().T, upper=False).T
        dist = (z * z).sum(1, keepdim=True) - 2.0 * z @ m.T + (m * m).sum(1)
        return -dist.amin(dim=1)

    def _params(self) -> dict[str, Any]:
        return {"jitter": self.jitter}


class KNN(Scorer):
    """Deep k-nearest neighbours (Sun et al., ICML 2022): minus the distance from the normalised
    feature to its k-th nearest normalised ID training feature.

    The bank keeps a seeded random ``fraction`` of the fit samples (the paper uses 1% of
    ImageNet), optionally in ``bank_dtype`` (e.g. ``torch.float16``) and on ``bank_device``
    (e.g. ``"cpu"`` for a GPU model: only chunks are then copied to the GPU while scoring).
    Search is exact and chunked: ``chunk_size`` bank rows at a time, keeping a running top-k;
    the k-th distance is then recomputed in float64.

    Example:
        >>> KNN(model, k=50).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "KNN"
    needs_fit = True

    def __init__(
        self,
        model: Union[nn.Module, ModelAdapter],
        k: int = 50,
        fraction: float = 1.0,
        chunk_size: int = 16384,
        bank_dtype: Optional[torch.dtype] = None,
        bank_device: Optional[Union[str, torch.device]] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.k, self.fraction, self.chunk_size = k, float(fraction), int(chunk_size)
        self.bank_dtype, self.seed = bank_dtype, seed
        self.bank_device = None if bank_device is None else torch.device(bank_device)

    @staticmethod
    def _normalize(features: Tensor) -> Tensor:
        return features / torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(1e-12)

    def _fit(self, passes: Passes) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        parts = []
        for feats, _, _ in passes():
            z = self._normalize(feats.float())
            if self.fraction < 1.0:
                z = z[(torch.rand(z.shape[0], generator=gen) < self.fraction).to(z.device)]
            parts.append(z.to(self.bank_device or z.device, self.bank_dtype or z.dtype))
        bank = torch.cat(parts) if parts else torch.empty(0)
        if bank.shape[0] < self.k:
            raise ValueError(f"k={self.k} exceeds the {bank.shape[0]} samples kept in the bank")
        self.bank = bank

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        q = self._normalize(features.float())
        bank = self.bank  # may live elsewhere (bank_device): only chunks travel
        best = q.new_full((q.shape[0], 0), -2.0)
        best_idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for start in range(0, bank.shape[0], self.chunk_size):
            sims = q @ bank[start : start + self.chunk_size].to(q.device, q.dtype).T
            idx = torch.arange(start, start + sims.shape[1], device=q.device).expand_as(sims)
            best, pos = torch.cat([best, sims], 1).topk(min(self.k, best.shape[1] + sims.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx], 1).gather(1, pos)
        kth = bank[best_idx[:, -1].to(bank.device)].to(q.device, torch.float64)
        return -torch.linalg.vector_norm(q.double() - kth, dim=1)

    def _params(self) -> dict[str, Any]:
        return {"k": self.k, "fraction": self.fraction}


class ViM(Scorer):
    """Virtual-logit matching (Wang et al., CVPR 2022): Energy minus ``alpha`` times the norm of
    the feature's residual outside the ``dim``-dimensional principal space of ID features.

    Features are centred at ``u = -pinv(W) b``; the principal space is spanned by the top ``dim``
    eigenvectors of the second moment of ``h - u`` (the paper's
    ``EmpiricalCovariance(assume_centered=True)``); ``alpha`` = mean max logit / mean residual
    norm on the fit data. ``dim`` defaults to the paper's choices: 1000 for D >= 2048, 512 for
    D >= 768, else D // 2. ``fit`` reads the data twice (statistics, then ``alpha``), streaming
    in float64.

    Example:
        >>> ViM(model).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "ViM"
    needs_fit = True
    fit_passes = 2

    def __init__(self, model: Union[nn.Module, ModelAdapter], dim: Optional[int] = None) -> None:
        super().__init__(model)
        d = self.adapter.num_features
        if dim is None:
            dim = 1000 if d >= 2048 else 512 if d >= 768 else d // 2
        if not isinstance(dim, int) or not 0 < dim < d:
            raise ValueError(f"dim must be an int in (0, {d}) for {d}-dimensional features, got {dim!r}")
        self.dim = dim
        w, b = self.adapter.fc_weight.detach().double().cpu(), self.adapter.fc_bias
        # the origin where all logits are zero; without a bias it is 0
        self.origin = torch.zeros(d, dtype=torch.float64)
        if b is not None:
            self.origin = -(torch.linalg.pinv(w) @ b.detach().double().cpu())

    def _fit(self, passes: Passes) -> None:
        second, n = None, 0  # float64, on the device of the features
        for feats, _, _ in passes():
            x = feats.double() - self.origin.to(feats.device)
            if second is None:
                second = x.T @ x
            else:
                second += x.T @ x
            n += x.shape[0]
        if second is None or n == 0:
            raise ValueError("ViM.fit got no samples")
        d = self.adapter.num_features
        _, vecs = torch.linalg.eigh(second / n)  # ascending eigenvalues
        self.residual = vecs[:, : d - self.dim].contiguous()
        max_logit = norm = 0.0
        for feats, logits, _ in passes():
            max_logit += float(logits.double().amax(dim=1).sum())
            norm += float(self._residual_norm(feats).sum())
        if norm == 0.0:
            raise ValueError("the ID features have no residual outside the principal space; lower dim")
        self.alpha = max_logit / norm

    def _residual_norm(self, features: Tensor) -> Tensor:
        origin, residual = self.origin.to(features.device), self.residual.to(features.device)
        return torch.linalg.vector_norm((features.double() - origin) @ residual, dim=1)

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.energy(logits.double()) - self.alpha * self._residual_norm(features)

    def _params(self) -> dict[str, Any]:
        return {"dim": self.dim}


# ---------------------------------------------------------------------------- registry
#: Scorer classes by lower-case name, for :func:`make_scorer` and :func:`samnorm.ood.evaluate`.
SCORERS: dict[str, type[Scorer]] = {
    cls.name.lower(): cls
    for cls in (MSP, MaxLogit, Energy, ODIN, ReAct, GradNorm, RankFeat, RankWeight, Mahalanobis, KNN, ViM)
}


def scorer_class(name: str) -> type[Scorer]:
    """The scorer class of a name (case, ``-`` and ``_`` ignored); ``ValueError`` if unknown.

    Example:
        >>> scorer_class("Max-Logit").__name__
        'MaxLogit'
    """
    key = name.lower().replace("_", "").replace("-", "") if isinstance(name, str) else name
    if key not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {sorted(c.name for c in SCORERS.values())}")
    return SCORERS[key]


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


def make_scorer(name: str, model: Union[nn.Module, ModelAdapter], **kwargs: Any) -> Scorer:
    """Build a scorer by name (case, ``-`` and ``_`` ignored), e.g. ``"max_logit"``, ``"ReAct"``;
    ``kwargs`` are its options (``ValueError`` naming the valid ones for a misspelt one).

    Example:
        >>> make_scorer("energy", model, temperature=1.0)  # doctest: +SKIP
        Energy(temperature=1.0)
    """
    check_scorer_options(name, kwargs)
    return scorer_class(name)(model, **kwargs)
