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
framework's optimizer wrapper) and :func:`sam_passes` (SAM's two passes over an accumulation window,
whatever does the forward and backward).
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from ..optim import SAM

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
        raise ImportError(
            f"this samnorm integration needs {module}: pip install 'samnorm[{extra}]'"
        ) from err


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


# Micro-batches of the accumulation window under way, per SAM: their second pass runs once the
# ascent is known, at the window's last micro-batch.
_PENDING: weakref.WeakKeyDictionary[SAM, list] = weakref.WeakKeyDictionary()


def sam_passes(
    sam: SAM,
    model: nn.Module,
    batch: B,
    forward_backward: Callable[[B], torch.Tensor],
    *,
    last: bool = True,
) -> torch.Tensor:
    """SAM's two passes for one micro-batch of an accumulation window; returns its first-pass loss.

    ``forward_backward(batch)`` computes the loss, calls the framework's backward on it (with the
    framework's loss scaling and accumulation division) and returns the loss. Every micro-batch
    gets its first pass at once, accumulating into ``.grad``, and is kept. At the window's
    ``last`` micro-batch SAM ascends along the accumulated gradient (``first_step``), then runs the
    second pass of every kept micro-batch at the perturbed point. The parameters are then still
    perturbed and ``.grad`` holds the descent gradient of the whole window: the framework's usual
    clipping and ``optimizer.step()`` finish the SAM step (restore, then the base optimizer).

    Under DDP only the window's last backward all-reduces (the others run under ``no_sync``); the
    perturbed pass leaves BatchNorm running statistics alone.

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
        if any(p.grad is not None for g in sam.param_groups for p in g["params"]):
            raise ValueError(
                "gradients are already present at the start of a SAM step: they would enter the "
                "ascent. Call optimizer.zero_grad() after each optimizer.step(), and accumulate by "
                "passing each micro-batch here (last=True on the window's final one)"
            )
        pending = _PENDING[sam] = []
    try:
        with sam.first_pass(model):
            loss = forward_backward(batch)
    except BaseException:
        del _PENDING[sam]  # an aborted window must not leak into the next one
        raise
    pending.append(batch)
    if not last:
        return loss
    del _PENDING[sam]
    sam.first_step(zero_grad=True)
    if not sam.is_sam_step:
        return loss  # a plain step of IntervalSAM/LookSAM: the first pass's gradient is the descent's
    with sam.second_pass(model):
        for i, b in enumerate(pending):
            # all-reduce once, on the window's last backward
            sync = contextlib.nullcontext() if i == len(pending) - 1 else sam.first_pass(model)
            with sync:
                forward_backward(b)
    return loss
