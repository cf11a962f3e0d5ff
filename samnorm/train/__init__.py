"""Fine-tuning: the recipe (:func:`finetune` with :class:`FinetuneConfig`) and its loss (:class:`SFTLoss`).

- :mod:`samnorm.train.recipe`: :func:`finetune` (SAM-ON and pseudo-OOD images, checkpoints and exact
  resumption, DDP), its configuration and result, and the errors it raises.
- :mod:`samnorm.train.losses`: cross-entropy on ID images plus a weighted term on pseudo-OOD images.

Names load on first use (PEP 562): ``import samnorm.train.losses`` does not import the recipe.

Example:
    >>> from samnorm.train import FinetuneConfig, SFTLoss
    >>> FinetuneConfig().optimizer, SFTLoss().ood_loss
    ('sam-on', 'uniform')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from samnorm.utils.lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "CHECKPOINT_NAME",
            "DEFAULTS_0_1_0",
            "OPTIMIZERS",
            "RECIPE_OOD_WEIGHTS",
            "RECIPE_TRANSFORMS",
            "DivergedError",
            "FinetuneConfig",
            "FinetuneResult",
            "Interrupted",
            "finetune",
        ),
        "recipe",
    ),
    **dict.fromkeys(
        ("OOD_LOSSES", "LossTerms", "SFTLoss", "energy_margin", "free_energy", "max_logit_gap", "uniform_ce"),
        "losses",
    ),
}

__all__ = [
    "CHECKPOINT_NAME",
    "DEFAULTS_0_1_0",
    "OOD_LOSSES",
    "OPTIMIZERS",
    "RECIPE_OOD_WEIGHTS",
    "RECIPE_TRANSFORMS",
    "DivergedError",
    "FinetuneConfig",
    "FinetuneResult",
    "Interrupted",
    "LossTerms",
    "SFTLoss",
    "energy_margin",
    "finetune",
    "free_energy",
    "max_logit_gap",
    "uniform_ce",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .losses import OOD_LOSSES, LossTerms, SFTLoss, energy_margin, free_energy, max_logit_gap, uniform_ce
    from .recipe import (
        CHECKPOINT_NAME,
        DEFAULTS_0_1_0,
        OPTIMIZERS,
        RECIPE_OOD_WEIGHTS,
        RECIPE_TRANSFORMS,
        DivergedError,
        FinetuneConfig,
        FinetuneResult,
        Interrupted,
        finetune,
    )

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ("losses", "recipe"))
