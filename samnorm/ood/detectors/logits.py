"""Scorers of the logits alone: MSP, MaxLogit, Energy and ODIN (see :mod:`samnorm.ood.scores`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from samnorm.ood import scores as S
from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors.base import OutputScorer, TemperedScorer

__all__ = ["MSP", "ODIN", "Energy", "MaxLogit"]


class MSP(TemperedScorer):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    Example:
        >>> MSP(model).score(images)  # doctest: +SKIP
    """

    name = "MSP"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.msp(logits, self.temperature)


class MaxLogit(OutputScorer):
    """Maximum logit (Hendrycks et al., "Scaling OOD detection...", ICML 2022).

    Example:
        >>> MaxLogit(model).score(images)  # doctest: +SKIP
    """

    name = "MaxLogit"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.max_logit(logits)


class Energy(TemperedScorer):
    """Energy score ``T logsumexp(logits / T)`` (Liu et al., NeurIPS 2020).

    Example:
        >>> Energy(model, temperature=1.0).score(images)  # doctest: +SKIP
    """

    name = "Energy"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.energy(logits, self.temperature)


class ODIN(OutputScorer):
    """ODIN (Liang et al., ICLR 2018): MSP at temperature T, optionally of perturbed inputs.

    With ``epsilon=0`` (the RankFeat evaluation) it shares the plain forward pass; with
    ``epsilon > 0`` it needs a gradient w.r.t. the inputs (see :func:`samnorm.ood.scores.odin`).

    Example:
        >>> ODIN(model, temperature=1000.0, epsilon=0.0014).score(images)  # doctest: +SKIP
    """

    name = "ODIN"

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        temperature: float = 1000.0,
        epsilon: float = 0.0,
        input_std: Sequence[float] | None = None,
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
        if self.uses_outputs:
            return super()._score_inputs(inputs)
        return S.odin(
            self.adapter.logits, inputs, temperature=self.temperature, epsilon=self.epsilon, input_std=self.input_std
        )

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "epsilon": self.epsilon}
