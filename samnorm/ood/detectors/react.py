"""ReAct (Sun, Guo & Li, NeurIPS 2021): Energy of clipped penultimate activations."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from samnorm.ood import scores as S
from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors.base import OutputScorer, Passes

__all__ = ["ReAct"]


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


class ReAct(OutputScorer):
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
        model: nn.Module | ModelAdapter,
        percentile: float = 90.0,
        threshold: float | None = None,
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
