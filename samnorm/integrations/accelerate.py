"""SAM in an ``accelerate`` training loop (``pip install 'samnorm[accelerate]'``).

``accelerator.prepare`` wraps the SAM in an ``AcceleratedOptimizer``; :func:`sam_backward` takes
the place of ``accelerator.backward(loss)`` and runs SAM's two passes, and the loop's usual
``optimizer.step()`` finishes the SAM step (restore, then the base optimizer; through the
GradScaler under fp16). Inside ``accelerator.accumulate(model)`` the ascent uses the gradient of
the whole window and the descent gradient is taken on the same micro-batches::

    model, optimizer, loader, scheduler = accelerator.prepare(model, sam, loader, scheduler)
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = sam_backward(accelerator, optimizer, model, lambda b: loss_fn(model(b[0]), b[1]), (x, y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

``find_sam(optimizer)`` reaches the SAM itself (for ``first_step``/``second_step`` by hand).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from . import find_sam, require, sam_passes

require("accelerate", "accelerate")

__all__ = ["find_sam", "sam_backward"]

B = TypeVar("B")


def sam_backward(
    accelerator: Any,
    optimizer: Any,
    model: nn.Module,
    loss_fn: Callable[[B], torch.Tensor],
    batch: B,
) -> torch.Tensor:
    """SAM's two passes in place of ``accelerator.backward(loss_fn(batch))``; returns that loss.

    Args:
        accelerator: the ``accelerate.Accelerator``; its ``backward`` scales the loss (fp16) and
            divides it by ``gradient_accumulation_steps``, in both passes alike.
        optimizer: the prepared optimizer (an ``AcceleratedOptimizer`` around a :class:`samnorm.SAM`).
        model: the prepared model.
        loss_fn: computes the loss of a batch with ``model`` (called twice per batch).
        batch: this micro-batch; it is kept until the window's last micro-batch, whose call runs
            the second pass of the whole window.

    After the call on the window's last micro-batch the parameters are perturbed and hold the
    descent gradient; ``optimizer.step()`` must follow (after clipping, if any).

    Example:
        >>> from accelerate import Accelerator  # doctest: +SKIP
        >>> loss = sam_backward(accelerator, optimizer, model, lambda b: model(**b).loss, batch)  # doctest: +SKIP
        >>> optimizer.step()  # doctest: +SKIP
    """

    def forward_backward(b: B) -> torch.Tensor:
        loss = loss_fn(b)
        accelerator.backward(loss)
        return loss

    return sam_passes(find_sam(optimizer), model, batch, forward_backward, last=accelerator.sync_gradients)
