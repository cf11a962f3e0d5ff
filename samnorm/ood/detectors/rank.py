"""RankFeat and RankWeight (Song, Sebe & Wang, NeurIPS 2022 / TPAMI 2024): remove a rank-1
component (of a block's output, or of one weight matrix), then score with Energy."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from samnorm.ood import scores as S
from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors.base import Scorer
from samnorm.ood.detectors.logits import Energy
from samnorm.ood.svd import Method, check_method, remove_rank1

__all__ = ["RankFeat", "RankWeight"]


class RankFeat(Scorer):
    """RankFeat (Song, Sebe & Wang, NeurIPS 2022): remove the rank-1 component of a block's
    output, run the rest of the network, score with Energy.

    ``blocks`` are indices into the adapter's blocks (negative from the end); several indices
    average the logits of each removal, as RankFeat's best BiT variant: for a ResNetV2, ``-1`` is
    "block 4", ``-2`` "block 3 then block 4", ``(-2, -1)`` both. For ViT / T2T-ViT, ``-1`` edits
    the tokens after the last block, before the final norm. ``method="power"`` uses ``iters``
    steps of seeded power iteration (stopping per sample at ``tol``) instead of the full SVD
    (:mod:`samnorm.ood.svd`).

    Example:
        >>> RankFeat(model, blocks=(-2, -1), method="power").score(images)  # doctest: +SKIP
    """

    name = "RankFeat"
    uses_outputs = False

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        blocks: int | Sequence[int] = -1,
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
            hidden, done, total = a.embed(inputs), 0, None
            for index in self.blocks:  # the clean prefix is shared by all removals
                hidden = a.run_blocks(hidden, done, index + 1)
                done = index + 1
                edited = remove_rank1(hidden, self.method, iters=self.iters, tol=self.tol, seed=self.seed)
                feats = a.pool(a.run_blocks(edited, done))
                logits = a.head(feats, S.widen(feats.dtype))
                total = logits if total is None else total + logits
            assert total is not None  # blocks is not empty (checked in __init__)
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
        model: nn.Module | ModelAdapter,
        layer: str | None = None,
        then: Callable[[nn.Module], Scorer] | None = None,
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
        super().__init__(self.inner.adapter)  # the edited copy's adapter, shared with the inner scorer
        self.needs_fit = self.inner.needs_fit  # type: ignore[misc]

    @staticmethod
    def _default_layer(adapter: ModelAdapter) -> str:
        names = {id(m): n for n, m in adapter.model.named_modules()}
        last_block = adapter.blocks[-1]
        candidates = [
            names[id(m)]
            for m in last_block.modules()
            if isinstance(w := getattr(m, "weight", None), Tensor) and w.dim() >= 2 and id(m) in names
        ]
        if not candidates:
            raise ValueError("the last block has no weight matrix; pass layer='<module name>'")
        return candidates[-1]

    @property
    def is_fitted(self) -> bool:
        """True once the inner scorer can score."""
        return self.inner.is_fitted

    def fit(self, data: Any = None, *, batch_size: int = 256) -> RankWeight:
        """Fit the inner scorer (``then``) on the edited copy; a no-op for Energy."""
        self.inner.fit(data, batch_size=batch_size)
        return self

    def fit_features(self, features: Tensor, labels: Tensor | None = None, *, batch_size: int = 8192) -> RankWeight:
        """Fit the inner scorer from features of the *edited* copy (see ``fit_features``)."""
        self.inner.fit_features(features, labels, batch_size=batch_size)
        return self

    def _score_inputs(self, inputs: Tensor) -> Tensor:
        return self.inner.score(inputs)  # the inner scorer on the edited copy

    def _params(self) -> dict[str, Any]:
        return {"layer": self.layer, "then": self.inner}
