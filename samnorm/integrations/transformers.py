"""SAM in Hugging Face's ``Trainer``: :class:`SAMTrainer` (``pip install 'samnorm[transformers]'``).

``Trainer`` runs one forward/backward per micro-batch, then clips and calls ``optimizer.step()``.
:class:`SAMTrainer` runs SAM's two passes in ``training_step`` (see
:func:`samnorm.integrations.sam_passes`): with ``gradient_accumulation_steps=k`` the ascent uses the
gradient accumulated over the k micro-batches and the descent gradient is taken at the perturbed
point over the same k micro-batches. ``max_grad_norm`` then clips that descent gradient, and
``Trainer``'s own ``optimizer.step()`` restores the weights and steps the base optimizer; the LR
scheduler, bf16/fp16 autocast and logging are ``Trainer``'s, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sam.optimizer import SAM
from ..select import Selection
from . import find_sam, require, sam_passes

# Any: transformers' own annotations would make mypy read the whole library to check this module.
_Trainer: Any = require("transformers", "transformers").Trainer

__all__ = ["SAMTrainer"]


class SAMTrainer(_Trainer):  # type: ignore[misc]  # a subclass of Any (above)
    """A ``transformers.Trainer`` whose optimizer step is a SAM step.

    Either pass a SAM (``optimizers=(samnorm.SAM(...), scheduler_or_None)``), or let the trainer
    build one around the optimizer ``TrainingArguments`` describes (``optim``, ``learning_rate``,
    ``weight_decay``).

    Args:
        rho, adaptive, eta: SAM's settings when SAMTrainer builds the SAM (see :class:`samnorm.SAM`).
        perturb: what the ascent perturbs when SAMTrainer builds the SAM: ``"norm"`` (the model's
            normalization layers, SAM-ON), ``"all"`` (plain SAM), or a
            :class:`~samnorm.select.Selection` / iterable of parameters.
        *args, **kwargs: ``transformers.Trainer``'s.

    Example:
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments("out", use_cpu=True, report_to=[], save_strategy="no",
        ...                          gradient_accumulation_steps=2, max_grad_norm=1.0)
        >>> trainer = SAMTrainer(model, args, train_dataset=data, rho=0.05)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    optimizer: torch.optim.Optimizer | None  # Trainer's attribute: None until create_optimizer

    def __init__(
        self,
        *args: Any,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        perturb: str | Selection | Any = "norm",
        **kwargs: Any,
    ) -> None:
        if isinstance(perturb, str) and perturb not in ("norm", "all"):
            raise ValueError(f"perturb must be 'norm', 'all', a Selection or parameters; got {perturb!r}")
        self.sam_kwargs: dict[str, Any] = {"rho": rho, "adaptive": adaptive, "eta": eta}
        self.sam_perturb = perturb
        super().__init__(*args, **kwargs)
        optimizer = kwargs.get("optimizers", (None, None))[0]
        if optimizer is not None:
            find_sam(optimizer)  # fail at construction, not at the first step

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Wrap the optimizer ``Trainer`` builds from ``TrainingArguments`` in a SAM."""
        if self.optimizer is not None:  # given through optimizers=(...)
            return self.optimizer
        base = super().create_optimizer(model)
        model = self.model if model is None else model
        perturb = self.sam_perturb
        if isinstance(perturb, str):
            perturb = model if perturb == "norm" else None
        sam = SAM(base, perturb, model=model, **self.sam_kwargs)
        self.optimizer = sam
        return sam

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """SAM's passes for one micro-batch; returns ``Trainer``'s loss of the unperturbed pass."""
        one_pass = super().training_step
        return sam_passes(
            find_sam(self.optimizer),
            model,
            inputs,
            lambda batch: one_pass(model, batch, num_items_in_batch),
            # Trainer sets this on the accumulation window's last micro-batch, before the step
            last=self.accelerator.gradient_state.sync_gradients,
        )
