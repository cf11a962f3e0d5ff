"""SAM in PyTorch Lightning's manual optimization (``pip install 'samnorm[lightning]'``).

Lightning's automatic optimization calls ``optimizer.step(closure)``, which SAM runs twice: that
works in fp32 and bf16 without accumulation. With ``accumulate_grad_batches > 1`` the closure would
see one micro-batch of the window, and with ``precision="16-mixed"`` Lightning calls the closure
itself and then ``step()`` without one: SAM refuses both with an error naming this module. Here,
with ``self.automatic_optimization = False``, :func:`sam_training_step` runs the SAM step through
Lightning's optimizer wrapper, so ``trainer.global_step`` advances (``max_steps`` stops training),
the precision plugin scales (16-mixed) or autocasts (bf16) both passes, and the ascent and descent
use the same micro-batches of an accumulation window::

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = ...

        def configure_optimizers(self):
            return samnorm.SAM(torch.optim.SGD(self.parameters(), lr=0.1), self.net, rho=0.05)

        def training_step(self, batch, batch_idx):
            loss = sam_training_step(self, batch, batch_idx, lambda b: loss_fn(self.net(b[0]), b[1]),
                                     accumulate_grad_batches=2)
            if loss is not None:  # a step was taken
                self.lr_schedulers().step()   # if configure_optimizers returns a scheduler
                self.log("train_loss", loss)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import torch

from ..sam.optimizer import SAM
from . import find_sam, require

pl = require("pytorch_lightning", "lightning")

__all__ = ["sam_training_step"]

B = TypeVar("B")

# micro-batches of the window under way, per SAM; both passes run at the window's end
_WINDOWS: weakref.WeakKeyDictionary[SAM, list[Any]] = weakref.WeakKeyDictionary()


def sam_training_step(
    module: Any,
    batch: B,
    batch_idx: int,
    loss_fn: Callable[[B], torch.Tensor],
    *,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    optimizer: Any = None,
) -> torch.Tensor | None:
    """Call from ``training_step`` under manual optimization: one SAM step per window of batches.

    Args:
        module: the ``LightningModule`` (``automatic_optimization = False``).
        batch, batch_idx: ``training_step``'s arguments.
        loss_fn: ``batch -> loss`` computed with the module (called twice per micro-batch).
        accumulate_grad_batches: micro-batches per step; the last batch of an epoch closes a
            shorter window, as Lightning's own accumulation does.
        gradient_clip_val: clip the descent gradient to this total norm (unscaled first under
            16-mixed); Lightning's own ``gradient_clip_val`` is for automatic optimization only.
        optimizer: the ``LightningOptimizer`` around the SAM; default ``module.optimizers()``.

    Returns the mean first-pass loss of the window when this call stepped, ``None`` otherwise.
    Each pass's gradients are zeroed before it starts.
    """
    if module.automatic_optimization:
        raise ValueError(
            "sam_training_step is for manual optimization: set self.automatic_optimization = False "
            "in the LightningModule's __init__"
        )
    if not (isinstance(accumulate_grad_batches, int) and accumulate_grad_batches >= 1):
        raise ValueError(f"accumulate_grad_batches must be an int >= 1, got {accumulate_grad_batches!r}")
    opt = module.optimizers() if optimizer is None else optimizer
    sam = find_sam(opt)
    window = _WINDOWS.setdefault(sam, [])
    window.append(batch)
    end_of_epoch = batch_idx + 1 >= module.trainer.num_training_batches
    if len(window) < accumulate_grad_batches and not end_of_epoch:
        return None
    del _WINDOWS[sam]

    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    last = len(sam.passes()) - 1

    def run(i: int, own_context: bool) -> torch.Tensor:  # pass i over the window, accumulating into .grad
        sam.zero_grad()
        losses = []
        for j, b in enumerate(window):
            with sam.pass_context(i, module, last_micro_batch=j == len(window) - 1) if own_context else nullcontext():
                loss = loss_fn(b) / len(window)
                module.manual_backward(loss)
            losses.append(loss.detach())
        if i == last and gradient_clip_val is not None:
            if scaler is not None:
                scaler.unscale_(sam)
            torch.nn.utils.clip_grad_norm_(module.parameters(), gradient_clip_val)
        return torch.stack(losses).sum()

    if scaler is not None:
        # 16-mixed: the plugin calls the closure itself, then GradScaler.step(sam) without one,
        # which finishes a step begun here (and skips it on an inf in any pass)
        sam.begin_step()
        losses = []
        with sam.abandon_on_error():
            for i in range(last):
                losses.append(run(i, own_context=True))
                sam.end_pass(i)
        opt.step(closure=lambda: losses.append(run(last, own_context=True)))
        return losses[0]
    # fp32/bf16: the plugin hands the closure to SAM.step, which runs it once per pass
    # (samnorm.sam.protocol.run_passes, in each pass's context)
    passes = iter(range(last + 1))
    loss: torch.Tensor | None = opt.step(closure=lambda: run(next(passes), own_context=False))
    return loss
