"""SAM in the loop of timm's ``train.py`` (``pip install 'samnorm[models]'``).

Without accumulation timm's own pieces are enough, since ``step()`` after ``first_step`` finishes a
SAM step, also through a GradScaler::

    loss = loss_fn(model(x), y)
    sam.first_step(loss_scaler._scaler.scale(loss))      # ascent (the scale keeps fp16 finite)
    with sam.second_pass(model):
        loss2 = loss_fn(model(x), y)
    loss_scaler(loss2, optimizer, clip_grad=1.0, parameters=model.parameters())

``optimizer`` may be the SAM, ``Lookahead(SAM(...))`` or ``SAM(Lookahead(...))``; with a GradScaler in
this hand-written form use ``SAM(Lookahead(...))``: GradScaler skips an inf step of ``Lookahead(SAM)``
without reaching SAM, which leaves the weights perturbed (:func:`sam_step` restores them). With
accumulation, :func:`sam_step` runs one step over a window of micro-batches the way ``train.py``
does (``need_update`` on the last), with the ascent and the descent on the same micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from . import find_sam, require, sam_passes

require("timm", "models")
from timm.utils import dispatch_clip_grad  # noqa: E402

__all__ = ["find_sam", "sam_step"]

B = TypeVar("B")


def sam_step(
    optimizer: Any,
    model: nn.Module,
    forward: Callable[[B], torch.Tensor],
    batches: Sequence[B],
    *,
    loss_scaler: Any = None,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    parameters: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One SAM step of timm's training loop over the micro-batches of one update.

    Args:
        optimizer: a :class:`samnorm.SAM`, or timm's ``Lookahead`` around one, or a SAM around a
            ``Lookahead``.
        model: the model (for DDP's ``no_sync`` and frozen BatchNorm statistics in the second pass).
        forward: ``batch -> loss``, under autocast and divided by ``len(batches)`` as in timm's
            ``_forward`` (called twice per micro-batch).
        batches: the micro-batches of this update (one without accumulation).
        loss_scaler: timm's ``NativeScaler`` (``None`` for fp32/bf16).
        clip_grad, clip_mode, parameters: timm's clipping (``--clip-grad``/``--clip-mode``), applied
            to the descent gradient.

    Returns the first-pass loss of the last micro-batch (what timm logs). The gradients are
    zeroed after the step (they must be at the start of the next).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
        >>> from samnorm import SAM
        >>> sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
        >>> xs = torch.randn(8, 3).chunk(2)
        >>> loss = sam_step(sam, model, lambda x: model(x).pow(2).mean() / 2, xs,
        ...                 clip_grad=1.0, parameters=model.parameters())
    """
    if not batches:
        raise ValueError("sam_step needs at least one micro-batch")
    sam = find_sam(optimizer)
    scaler = None if loss_scaler is None else loss_scaler._scaler  # NativeScaler's GradScaler
    parameters = None if parameters is None else list(parameters)
    if clip_grad is not None and parameters is None:
        raise ValueError("clip_grad needs parameters=model.parameters(), as in timm's loop")

    def forward_backward(batch: B) -> torch.Tensor:
        loss = forward(batch)
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss

    for i, batch in enumerate(batches):
        loss = sam_passes(sam, model, batch, forward_backward, last=i == len(batches) - 1)
    # the rest is NativeScaler's need_update branch (timm's non-scaler branch without a scaler)
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
        # Lookahead(SAM): GradScaler skips a step with an inf through Lookahead, which never reaches
        # SAM, so the weights would stay at w + e; a step that ran has restored already (no-op).
        sam.restore()
    else:
        optimizer.step()
    sam.zero_grad(set_to_none=True)
    return loss
