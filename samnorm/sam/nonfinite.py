"""The bookkeeping of ascents skipped for a non-finite gradient norm, without host synchronisation."""

from __future__ import annotations

import warnings

import torch

__all__ = ["NonFinite"]

_MESSAGE = (
    "SAM: the first-pass gradient norm was not finite, so the ascent was skipped for that step "
    "(counted in SAM.nonfinite_steps; warned once). With fp16 use a GradScaler (scaler.step(sam) "
    "or second_step(scaler=...)): it then skips the whole step."
)


class NonFinite:
    """A device counter of skipped ascents, the current step's flag, and a warning given once.

    The count lives on the device; an asynchronous copy to a (pinned) host tensor is read at the
    next :meth:`poll`, so the warning costs no synchronisation.

    Example:
        >>> book = NonFinite()
        >>> book.record(torch.tensor(False)); book.count, bool(book.current)
        (1, True)
    """

    def __init__(self, count: int = 0) -> None:
        self.total: torch.Tensor | None = torch.tensor(count) if count else None
        self.current: torch.Tensor | None = None  # this step's flag (True: skipped), until the descent
        self._seen: torch.Tensor | None = None  # host copy of total
        self._warned = False

    def record(self, finite: torch.Tensor) -> None:
        """Count this step's ascent as skipped unless ``finite`` (a device bool)."""
        bad = (~finite).to(torch.int64)
        if self.total is None:
            self.total = torch.zeros((), dtype=torch.int64, device=bad.device)
        elif self.total.device != bad.device:  # e.g. loaded from a checkpoint on CPU
            self.total = self.total.to(bad.device)
        self.total += bad
        self.current = ~finite
        if self._seen is None:
            self._seen = torch.zeros((), dtype=torch.int64, pin_memory=bad.device.type == "cuda")
        self._seen.copy_(self.total, non_blocking=True)

    def poll(self, stacklevel: int) -> None:
        """Warn once if a step was skipped; ``stacklevel`` points the warning at the user's call."""
        if self._warned or self._seen is None:
            return
        if int(self._seen) > 0:  # a host tensor: no device synchronisation
            self._warned = True
            warnings.warn(_MESSAGE, RuntimeWarning, stacklevel=stacklevel + 1)

    @property
    def count(self) -> int:
        """How many ascents were skipped (reading it syncs)."""
        return 0 if self.total is None else int(self.total)
