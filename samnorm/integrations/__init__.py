"""SAM inside the trainers people already run: one small module per framework.

- ``samnorm.integrations.transformers``: :class:`SAMTrainer`, a ``transformers.Trainer``
  (``pip install 'samnorm[transformers]'``);
- ``samnorm.integrations.accelerate``: ``sam_backward`` for an ``accelerate`` loop
  (``pip install 'samnorm[accelerate]'``);
- ``samnorm.integrations.timm``: timm's train-script loop, ``NativeScaler`` and ``Lookahead``
  (``pip install 'samnorm[models]'``);
- ``samnorm.integrations.lightning``: ``sam_training_step`` for Lightning's manual optimization
  (``pip install 'samnorm[lightning]'``).

This package itself imports no framework; each module imports its own, and says which extra to
install when it is missing. What they share lives here: :func:`find_sam` (reach the SAM inside a
framework's optimizer wrapper) and :func:`sam_passes` (the passes of a SAM step over an accumulation
window, whatever does the forward and backward, through :func:`samnorm.sam.protocol.run_passes`).
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from ..sam.optimizer import SAM
from ..sam.protocol import begin_window, run_passes

__all__ = ["find_sam", "require", "sam_passes"]

B = TypeVar("B")

# The attributes under which wrappers keep the optimizer they wrap: accelerate's
# AcceleratedOptimizer and Lightning's LightningOptimizer (``optimizer``/``_optimizer``), timm's
# Lookahead (``_base_optimizer``).
_WRAPPED = ("optimizer", "_optimizer", "_base_optimizer")


def require(module: str, extra: str) -> ModuleType:
    """Import a framework, or raise an ImportError that names the extra to install.

    Example:
        >>> require("torch", "dev").__name__
        'torch'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this samnorm integration needs {module}: pip install 'samnorm[{extra}]'") from err


def find_sam(optimizer: Any) -> SAM:
    """The :class:`~samnorm.SAM` inside a framework's optimizer wrapper (or ``optimizer`` itself).

    Follows accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer`` and timm's
    ``Lookahead`` (``Lookahead(SAM(...))``), nested in any order.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
        >>> find_sam(sam) is sam
        True
    """
    seen = optimizer
    for _ in range(8):  # wrappers nest a few levels at most; a cycle must not hang
        inner = next((getattr(seen, a) for a in _WRAPPED if getattr(seen, a, None) is not None), None)
        if inner is None:
            # unwrap first: a LightningOptimizer is an instance of its optimizer's class too
            if isinstance(seen, SAM):
                return seen
            break
        seen = inner
    raise TypeError(
        f"expected a samnorm.SAM optimizer (possibly wrapped by accelerate, Lightning or timm's "
        f"Lookahead), got {type(optimizer).__name__}: build it as "
        "samnorm.SAM(torch.optim.SGD(model.parameters(), lr=...), model, rho=...)"
    )


# Micro-batches of the accumulation window under way, per SAM: their later passes run once the
# first is done over the whole window, at its last micro-batch.
_PENDING: weakref.WeakKeyDictionary[SAM, list[Any]] = weakref.WeakKeyDictionary()


def sam_passes(
    sam: SAM,
    model: nn.Module,
    batch: B,
    forward_backward: Callable[[B], torch.Tensor],
    *,
    last: bool = True,
) -> torch.Tensor:
    """The passes of a SAM step (:meth:`SAM.passes <samnorm.SAM.passes>`) for one micro-batch of an
    accumulation window, through :func:`samnorm.sam.protocol.run_passes`; returns its first-pass loss.

    ``forward_backward(batch)`` computes the loss, calls the framework's backward on it (with the
    framework's loss scaling and accumulation division) and returns the loss. Every micro-batch
    gets the step's first pass at once, accumulating into ``.grad``, and is kept. At the window's
    ``last`` micro-batch the first pass is closed (SAM's ascent along the accumulated gradient),
    then the step's later passes run over every kept micro-batch (SAM's second, at the perturbed
    point; none for :class:`~samnorm.sam.variants.OnePassSAM` or a plain step of
    :class:`~samnorm.sam.variants.IntervalSAM`). The parameters are then where the descent pass left
    them and ``.grad`` holds the descent gradient of the whole window: the framework's usual
    clipping and ``optimizer.step()`` finish the step (restore, then the base optimizer).

    Gradients present when a window starts are dropped if zeroed (``zero_grad(set_to_none=False)``),
    refused if left over (:func:`samnorm.sam.protocol.begin_window`). Under DDP only the window's last backward of a
    descent pass all-reduces; BatchNorm statistics move in the first pass only.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
        >>> sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1)
        >>> def forward_backward(x):
        ...     loss = model(x).pow(2).mean() / 2  # two micro-batches per step
        ...     loss.backward()
        ...     return loss
        >>> xs = torch.randn(4, 3).chunk(2)
        >>> _ = sam_passes(sam, model, xs[0], forward_backward, last=False)
        >>> _ = sam_passes(sam, model, xs[1], forward_backward, last=True)
        >>> sam.second_step(zero_grad=True)  # what a framework's optimizer.step() does
    """
    pending = _PENDING.get(sam)
    if pending is None:
        begin_window(sam)
        pending = _PENDING[sam] = []
    one_pass = len(sam.passes()) == 1
    try:
        with sam.abandon_on_error(), sam.pass_context(0, model, last_micro_batch=last):
            loss = forward_backward(batch)
    except BaseException:
        del _PENDING[sam]  # an aborted window must not leak into the next one
        raise
    pending.append(batch)
    if not last:
        return loss
    del _PENDING[sam]
    sam.end_pass(0)
    if not one_pass:
        run_passes(sam, model, pending, forward_backward, backward=False, start=1)
    return loss
