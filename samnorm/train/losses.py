"""The fine-tuning loss: cross-entropy on ID images plus a weighted term on pseudo-OOD images.

``L = CE(f(x_id), y) + lambda * L_ood``, where ``L_ood`` drives the pseudo-OOD logits toward low
confidence while the cross-entropy keeps the ID accuracy. Three OOD terms, for logits ``f`` with ``K``
classes (means are over the batch):

* ``"uniform"`` (Outlier Exposure, Hendrycks et al. 2019), the default: cross-entropy to the uniform
  distribution, ``mean_x [ logsumexp_k f_k(x) - (1/K) sum_k f_k(x) ]``. Its minimum, ``log K``, is reached
  exactly at flat logits, so it needs no margin to tune, which makes it the safe default;
  ``lambda = 0.5`` as in Outlier Exposure.
* ``"energy"`` (energy-margin, Liu et al. 2020): with the free energy ``E(x) = -T logsumexp(f(x) / T)``
  (:func:`free_energy`),
  ``mean_id relu(E(x_id) - m_in)^2 + mean_ood relu(m_out - E(x_ood))^2``; ``lambda = 0.1``,
  ``m_in = -25``, ``m_out = -7`` as published for CIFAR-10. The margins depend on the model and the
  number of classes: read them off your pretrained model's ID energies before relying on them.
* ``"maxlogit"``: the max-logit gap ``mean_x [ max_k f_k(x) - (1/K) sum_k f_k(x) ]``, which lowers the
  maximum logit of pseudo-OOD inputs, the quantity that bounds the energy-score change in the paper's
  analysis (appendix eq. 15); shift-invariant and bounded below by 0; ``lambda = 0.5``.

Example:
    >>> import torch
    >>> loss_fn = SFTLoss()  # uniform-target OOD term, weight 0.5
    >>> terms = loss_fn(torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), torch.randn(4, 10))
    >>> terms.total.shape, bool(terms.total >= terms.ce)
    (torch.Size([]), True)
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "OOD_LOSSES",
    "LossTerms",
    "SFTLoss",
    "energy",
    "energy_margin",
    "free_energy",
    "max_logit_gap",
    "uniform_ce",
]

OOD_LOSSES: dict[str, float] = {"uniform": 0.5, "energy": 0.1, "maxlogit": 0.5}
"""The OOD terms by name, with their default weights lambda and sources (see the module docstring): the one
list of loss names (``SFTLoss``, the recipe and the CLI choices read it)."""


def _check_logits(logits: Tensor, name: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a (batch, classes) tensor of logits, got {shape}")


def uniform_ce(logits: Tensor) -> Tensor:
    """Cross-entropy to the uniform distribution: ``mean_x [logsumexp_k f_k - mean_k f_k]`` (>= log K).

    Example:
        >>> round(float(uniform_ce(torch.zeros(3, 5))), 4)  # flat logits: the minimum, log 5
        1.6094
    """
    _check_logits(logits, "logits")
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


def free_energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample free energy ``E(x) = -T logsumexp(f(x) / T)`` (low for ID, high for OOD): the
    quantity the energy-margin loss bounds. The OOD *score* :func:`samnorm.ood.energy` is its
    negative, ``+T logsumexp`` (higher = more ID).

    Example:
        >>> free_energy(torch.zeros(1, 4)).item() == -torch.log(torch.tensor(4.0)).item()
        True
    """
    _check_logits(logits, "logits")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Deprecated alias of :func:`free_energy` (``-T logsumexp``), renamed because
    :func:`samnorm.ood.energy` is the opposite sign.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     bool(energy(torch.zeros(1, 4)) == free_energy(torch.zeros(1, 4)))
        True
    """
    warnings.warn(
        "samnorm.train.losses.energy is renamed samnorm.train.losses.free_energy (it returns -T logsumexp, "
        "the opposite sign of the OOD score samnorm.ood.energy)",
        DeprecationWarning,
        stacklevel=2,
    )
    return free_energy(logits, temperature)


def energy_margin(
    logits_id: Tensor, logits_ood: Tensor, m_in: float = -25.0, m_out: float = -7.0, temperature: float = 1.0
) -> Tensor:
    """Liu et al.'s energy-margin loss: ``mean relu(E_id - m_in)^2 + mean relu(m_out - E_ood)^2``.

    Example:
        >>> float(energy_margin(torch.full((2, 3), 30.0), torch.zeros(2, 3)))  # both margins met
        0.0
    """
    if m_in >= m_out:
        raise ValueError(f"m_in ({m_in}) must be below m_out ({m_out}): ID energies are the low ones")
    e_in, e_out = free_energy(logits_id, temperature), free_energy(logits_ood, temperature)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


def max_logit_gap(logits: Tensor) -> Tensor:
    """Max-logit gap ``mean_x [max_k f_k - mean_k f_k]`` (0 exactly when the logits are flat).

    Example:
        >>> float(max_logit_gap(torch.tensor([[2.0, 0.0, 1.0]])))
        1.0
    """
    _check_logits(logits, "logits")
    return (logits.max(dim=1).values - logits.mean(dim=1)).mean()


class LossTerms(NamedTuple):
    """The loss and its parts: ``total = ce + weight * ood`` (``ood`` is 0 without pseudo-OOD logits)."""

    total: Tensor
    ce: Tensor
    ood: Tensor


class SFTLoss(nn.Module):
    """Cross-entropy on ID plus ``ood_weight`` times the chosen OOD term (see the module docstring).

    Args:
        ood_loss: ``"uniform"`` (default), ``"energy"`` or ``"maxlogit"``.
        ood_weight: lambda; ``None`` takes the term's published default (0.5, 0.1, 0.5).
        m_in, m_out, temperature: energy-margin parameters (only for ``"energy"``).
        label_smoothing: passed to the ID cross-entropy (0: none).

    Example:
        >>> loss_fn = SFTLoss("energy", m_in=-10.0, m_out=-2.0)
        >>> logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
        >>> t = loss_fn(logits, y, torch.randn(8, 5))
        >>> torch.allclose(t.total, t.ce + 0.1 * t.ood)
        True
    """

    def __init__(
        self,
        ood_loss: str = "uniform",
        ood_weight: float | None = None,
        m_in: float = -25.0,
        m_out: float = -7.0,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if ood_loss not in OOD_LOSSES:
            raise ValueError(f"unknown ood_loss {ood_loss!r}: choose one of {sorted(OOD_LOSSES)}")
        weight = OOD_LOSSES[ood_loss] if ood_weight is None else float(ood_weight)
        if weight < 0:
            raise ValueError(f"ood_weight must be >= 0, got {weight}")
        if ood_loss == "energy" and m_in >= m_out:
            raise ValueError(f"m_in ({m_in}) must be below m_out ({m_out}): ID energies are the low ones")
        self.ood_loss, self.ood_weight = ood_loss, weight
        self.m_in, self.m_out, self.temperature = m_in, m_out, temperature
        self.label_smoothing = label_smoothing

    def ood_term(self, logits_id: Tensor, logits_ood: Tensor) -> Tensor:
        """The unweighted OOD term for these logits."""
        if self.ood_loss == "uniform":
            return uniform_ce(logits_ood)
        if self.ood_loss == "maxlogit":
            return max_logit_gap(logits_ood)
        return energy_margin(logits_id, logits_ood, self.m_in, self.m_out, self.temperature)

    def forward(self, logits_id: Tensor, targets: Tensor, logits_ood: Tensor | None = None) -> LossTerms:
        _check_logits(logits_id, "logits_id")
        ce = F.cross_entropy(logits_id, targets, label_smoothing=self.label_smoothing)
        if logits_ood is None or logits_ood.shape[0] == 0:
            return LossTerms(ce, ce.detach(), torch.zeros((), device=ce.device, dtype=ce.dtype))
        _check_logits(logits_ood, "logits_ood")
        if logits_ood.shape[1] != logits_id.shape[1]:
            raise ValueError(
                f"logits_ood has {logits_ood.shape[1]} classes but logits_id has {logits_id.shape[1]}: "
                "score both with the same model"
            )
        ood = self.ood_term(logits_id, logits_ood)
        return LossTerms(ce + self.ood_weight * ood, ce.detach(), ood.detach())

    def extra_repr(self) -> str:
        return f"ood_loss={self.ood_loss!r}, ood_weight={self.ood_weight}"
