"""SAM's handshake with ``torch.amp.GradScaler``: one module for every path that meets a scaler.

``GradScaler.step(sam)`` hands an optimizer with ``_step_supports_amp_scaling`` the scale and its
inf flag (as the ``grad_scale``/``found_inf`` attributes, for the call) instead of unscaling and
skipping itself: SAM unscales, joins the flag of its own ascent and skips the whole step on an inf.
Where an integration holds the scaler it passes it explicitly (:func:`scaled_step`); under a bare
``scaler.step(sam)`` the scaler is found in the calling frame (:func:`samnorm.sam._compat.calling_grad_scaler`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from . import _compat

__all__ = [
    "Handshake",
    "base_step",
    "drop_handshake",
    "handshake",
    "refuse_unscale_before_closure",
    "scaled_step",
    "step_skipping_inf",
    "take_handshake",
]

Handshake = tuple[Any, Any]
"""``(grad_scale, found_inf)`` that ``GradScaler.step`` set on the optimizer (``None`` outside it)."""


def take_handshake(optimizer: Optimizer) -> Handshake | None:
    """The ``(grad_scale, found_inf)`` GradScaler.step set on ``optimizer`` for this call, or None."""
    state = optimizer.__dict__
    return (state.get("grad_scale"), state["found_inf"]) if "found_inf" in state else None


@contextlib.contextmanager
def handshake(optimizer: Optimizer) -> Iterator[Handshake | None]:
    """:func:`take_handshake` for a step; the attributes are dropped if the step raises (GradScaler
    removes them only after a step that returned), so that the next step does not see them."""
    taken = take_handshake(optimizer)
    try:
        yield taken
    except BaseException:
        drop_handshake(optimizer)
        raise


def drop_handshake(optimizer: Optimizer) -> None:
    """Remove the attributes (GradScaler removes them only after a step that returned)."""
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.__dict__.pop("found_inf", None)


def scaled_step(scaler: Any, sam: Optimizer, base: Optimizer) -> None:
    """``scaler.step(sam)`` with one fused unscale-and-check pass (honouring an earlier
    ``scaler.unscale_`` of ``sam`` or of its ``base``, which share the gradients). The scaler is
    handed over explicitly (no lookup in the calling frames). ``scaler`` None or disabled:
    ``sam.step()``."""
    if scaler is None or not scaler.is_enabled():
        sam.step()
        return
    if not _compat.adopt_unscaled_state(scaler, base, sam):
        scaler.unscale_(sam)
    sam.__dict__[_HELD] = scaler
    try:
        scaler.step(sam)
    finally:
        sam.__dict__.pop(_HELD, None)


_HELD = "_samnorm_scaler"  # the scaler scaled_step hands over for the duration of its step


def _scaler_of(sam: Optimizer) -> Any:
    """The GradScaler running ``step(sam)``: the one handed over, else found in the calling frames."""
    return sam.__dict__.get(_HELD) or _compat.calling_grad_scaler(sam, depth=16)


def refuse_unscale_before_closure(sam: Optimizer, base: Optimizer) -> None:
    """``scaler.unscale_`` before ``scaler.step(opt, closure)`` divided gradients the closure then
    replaces, and GradScaler would hand over no scale for the new ones: refuse it."""
    scaler = _scaler_of(sam) if "found_inf" in sam.__dict__ else None
    if scaler is not None and _compat.is_unscaled(scaler, base, sam):
        drop_handshake(sam)
        raise ValueError(
            "scaler.unscale_() before scaler.step(optimizer, closure): the closure computes the "
            "gradients inside the step, so there is nothing to unscale yet. Use the two-pass "
            "form to clip: first_step(scaler.scale(loss)), the second backward, "
            "scaler.unscale_(optimizer), clip, then scaler.step(optimizer)"
        )


def step_skipping_inf(
    sam: Optimizer,
    base: Optimizer,
    params: list[torch.Tensor],
    handshake: Handshake,
    first_nonfinite: torch.Tensor | None,
    trust_found_inf: bool,
) -> None:
    """The base step under ``GradScaler.step(sam)``: unscale (unless ``scaler.unscale_`` did), join
    the inf flags of every pass, skip the base step if any is set and report the result to the
    scaler so that ``update()`` backs off. ``trust_found_inf``: GradScaler checked the gradients the
    descent uses (False in closure mode, where the closure replaced them after its check)."""
    grad_scale, found_inf = handshake
    scaler = _scaler_of(sam)
    # scaler.unscale_(base) leaves SAM's own record READY, so GradScaler handed over the scale as if
    # nothing were unscaled; the gradients are shared, so they must not be divided again.
    if trust_found_inf and scaler is not None and _compat.adopt_unscaled_state(scaler, base, sam):
        grad_scale = None
    if isinstance(grad_scale, torch.Tensor):
        device = grad_scale.device
    elif isinstance(found_inf, torch.Tensor):
        device = found_inf.device
    else:
        device = next((p.device for p in params), torch.device("cpu"))
    found = torch.zeros((), dtype=torch.float32, device=device)
    if grad_scale is not None:
        unscale = torch.as_tensor(grad_scale, device=device).double().reciprocal().float()
        _compat.unscale_and_check_(params, unscale, found)
    if trust_found_inf and isinstance(found_inf, torch.Tensor):
        found += found_inf.to(device)  # GradScaler's own check (or unscale_) of these gradients
    if first_nonfinite is not None:
        found += first_nonfinite.to(device, torch.float32)
    if scaler is not None:
        _compat.record_found_inf(scaler, sam, found)
    _compat.step_unless_found_inf(base, found)


def base_step(
    sam: Optimizer,
    base: Optimizer,
    handshake: Handshake | None,
    first_nonfinite: torch.Tensor | None,
    trust_found_inf: bool,
) -> None:
    """The descent's base step: ``base.step()`` outside ``GradScaler.step(sam)`` (``handshake``
    None), else :func:`step_skipping_inf` over every parameter of ``base``."""
    if handshake is None:
        base.step()
        return
    params = [p for g in base.param_groups for p in g["params"]]
    step_skipping_inf(sam, base, params, handshake, first_nonfinite, trust_found_inf=trust_found_inf)
