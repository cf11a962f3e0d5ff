"""Every private torch internal samnorm relies on, in one place; tests/test_compat.py checks each
against the installed torch so that a torch upgrade that moves one fails there, not in training.

- ``GradScaler``'s per-optimizer record (``_per_optimizer_states``), which ``GradScaler.update``
  reads to back the scale off: a skipped SAM step must land there to count;
- the frame of ``GradScaler.step``: the documented hook for optimizers that handle scaling
  (``_step_supports_amp_scaling``) hands them ``grad_scale``/``found_inf`` but not the scaler;
- ``torch._amp_foreach_non_finite_check_and_unscale_``, the kernel ``GradScaler.unscale_`` uses;
- accelerate's ``AcceleratedOptimizer`` frame and its ``gradient_state.num_steps``;
- ``Optimizer._opt_called`` (what LR schedulers check) and ``Optimizer._patch_step_function``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler, OptState

__all__ = [
    "accelerate_accumulation_steps",
    "adopt_unscaled_state",
    "calling_grad_scaler",
    "is_unscaled",
    "mark_stepped",
    "record_found_inf",
    "repatch_step",
    "step_unless_found_inf",
    "unscale_and_check_",
]


def calling_grad_scaler(optimizer: object, depth: int = 12) -> GradScaler | None:
    """The ``GradScaler`` whose ``step(optimizer)`` is running, looked up in the caller frames
    (wrappers such as accelerate's patched step may sit in between)."""
    frame: FrameType | None = sys._getframe(1).f_back
    for _ in range(depth):
        if frame is None:
            return None
        scaler = frame.f_locals.get("self")
        if isinstance(scaler, GradScaler) and frame.f_locals.get("optimizer") is optimizer:
            return scaler
        frame = frame.f_back
    return None


def accelerate_accumulation_steps(depth: int = 12) -> int:
    """``gradient_accumulation_steps`` of the accelerate ``AcceleratedOptimizer.step`` that is
    calling, or 1 (also when accelerate is not imported: it is never imported here). Such a step
    runs on the window's last micro-batch only, so a closure it passes sees that micro-batch only."""
    module = sys.modules.get("accelerate.optimizer")
    if module is None:
        return 1
    frame: FrameType | None = sys._getframe(1).f_back
    for _ in range(depth):
        if frame is None:
            return 1
        wrapper = frame.f_locals.get("self")
        if isinstance(wrapper, module.AcceleratedOptimizer):
            return int(wrapper.gradient_state.num_steps)
        frame = frame.f_back
    return 1


def record_found_inf(scaler: GradScaler, optimizer: object, found_inf: torch.Tensor) -> None:
    """Make ``found_inf`` (float32, > 0 means skipped) the inf record ``scaler.update()`` reads for
    ``optimizer`` (replacing the record of ``GradScaler``'s own check, which it includes)."""
    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {found_inf.device: found_inf}


def adopt_unscaled_state(scaler: GradScaler, source: object, target: object) -> bool:
    """If ``scaler.unscale_(source)`` ran this iteration, record it as ``unscale_(target)`` (the
    two optimizers share their gradients: SAM and its base optimizer). Returns whether ``target``'s
    gradients are now unscaled."""
    states = scaler._per_optimizer_states
    source_unscaled = states[id(source)]["stage"] is OptState.UNSCALED
    if source_unscaled and states[id(target)]["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            "scaler.unscale_() was called on both SAM and its base optimizer since the last "
            "update(): they share their gradients, which are now divided by the scale twice. "
            "Call unscale_ on one of them"
        )
    if source_unscaled and states[id(target)]["stage"] is OptState.READY:
        states[id(target)] = states.pop(id(source))
    return states[id(target)]["stage"] is OptState.UNSCALED


def is_unscaled(scaler: GradScaler, *optimizers: object) -> bool:
    """Whether ``scaler.unscale_`` ran on any of ``optimizers`` since the last ``update()``."""
    states = scaler._per_optimizer_states
    return any(id(o) in states and states[id(o)]["stage"] is OptState.UNSCALED for o in optimizers)


def unscale_and_check_(params: Iterable[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """Multiply every ``.grad`` by ``inv_scale`` in place and add 1 to ``found_inf`` (float32, on
    its own device) if any is not finite: ``GradScaler.unscale_``'s kernel, grouped by device and
    dtype as it groups them. No host synchronisation."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = p.grad = g.coalesce()  # duplicate indices would be summed after the check
            g = g._values()
        groups[(g.device, g.dtype)].append(g)
    for (device, _), grads in groups.items():
        found = found_inf if found_inf.device == device else torch.zeros_like(found_inf, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale.to(device))
        if found is not found_inf:
            found_inf.add_(found.to(found_inf.device))


def step_unless_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` on unscaled gradients unless ``found_inf > 0``. A fused optimizer takes
    the flag itself (``grad_scale``/``found_inf`` attributes, GradScaler's contract for optimizers
    with ``_step_supports_amp_scaling``) and skips on the device; any other reads the flag on the
    host, as ``GradScaler.step`` does for it."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif not found_inf.item():
        optimizer.step()


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tell an LR scheduler attached to ``optimizer`` that its step ran (it warns otherwise)."""
    optimizer._opt_called = True  # type: ignore[attr-defined]


def repatch_step(optimizer: Any) -> None:
    """Re-install torch's step hooks after unpickling (``Optimizer.__setstate__`` does the same)."""
    optimizer._patch_step_function()
