"""GradNorm (Huang, Geng & Li, NeurIPS 2021): the norm of the last layer's gradient, in closed form."""

from __future__ import annotations

from torch import Tensor

from samnorm.ood import scores as S
from samnorm.ood.detectors.base import TemperedScorer

__all__ = ["GradNorm"]


class GradNorm(TemperedScorer):
    """GradNorm (Huang, Geng & Li, NeurIPS 2021): L1 norm of the last layer's weight gradient.

    The loss is ``KL(uniform || softmax(z / T))`` for one sample, ``z = W h + b``. Its gradient
    w.r.t. ``z`` is ``(softmax(z / T) - 1/K) / T``, so the gradient w.r.t. ``W`` is the outer
    product ``(softmax(z / T) - 1/K) h^T / T`` and its entry-wise L1 norm factorises:
    ``||softmax(z / T) - 1/K||_1 * ||h||_1 / T`` (:func:`samnorm.ood.scores.head_grad_norm`, also
    behind :func:`samnorm.diagnostics.fc_grad_norm`). That is the per-sample gradient of the
    paper's batch-size-1 code, for a whole batch in O(B (K + D)) memory, with no backward pass,
    and the same for any batch size.

    Example:
        >>> GradNorm(model).score(images)  # doctest: +SKIP
    """

    name = "GradNorm"

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.head_grad_norm(features, logits, temperature=self.temperature)
