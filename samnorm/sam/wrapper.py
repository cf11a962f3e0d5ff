"""An optimizer around another optimizer instance: the plumbing :class:`~samnorm.SAM` stands on.

A :class:`WrappedOptimizer` shares its base optimizer's ``param_groups``, ``state`` and ``defaults``
(the same objects, never copies), so that an LR scheduler, ``add_param_group`` and
``load_state_dict`` act on both at once; it keeps its own settings (``_GROUP_KEYS``) in every group,
with their defaults in the base's ``defaults`` so that groups added later get them too; and it
records whether ``zero_grad`` ran since the last step (:attr:`WrappedOptimizer.zeroed_since_step`),
which tells a loop that gradients present are zeros without reading them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from . import _compat
from .settings import fill_group_defaults

__all__ = ["WrappedOptimizer", "check_base"]


def check_base(base_optimizer: object) -> None:
    """Refuse (``TypeError``) anything but a torch optimizer instance that is not itself wrapped.

    Example:
        >>> check_base(torch.nn.Linear(2, 2).parameters())
        Traceback (most recent call last):
        TypeError: SAM wraps an optimizer instance, e.g. ...; got generator
    """
    if not isinstance(base_optimizer, Optimizer):
        raise TypeError(
            "SAM wraps an optimizer instance, e.g. SAM(torch.optim.SGD(model.parameters(), "
            f"lr=0.1), model); got {type(base_optimizer).__name__}"
        )
    if isinstance(base_optimizer, WrappedOptimizer):
        raise TypeError("SAM cannot wrap another SAM; wrap its base_optimizer instead")


class WrappedOptimizer(Optimizer):
    """A torch optimizer sharing the groups, state and defaults of ``base_optimizer`` (checked by
    :func:`check_base`), whose ``defaults`` gain ``defaults``; a subclass takes the step.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = WrappedOptimizer(torch.optim.SGD([w], lr=0.1), {})
        >>> opt.param_groups is opt.base_optimizer.param_groups
        True
    """

    base_optimizer: Optimizer  # set once Optimizer.__init__ has run (see add_param_group)
    _GROUP_KEYS: tuple[str, ...] = ()  # the subclass's settings kept in every param group

    def __init__(self, base_optimizer: Optimizer, defaults: Mapping[str, Any]) -> None:
        # Optimizer.__init__ sets up hooks and profiling for whatever torch version runs; its empty
        # group is replaced at once by the base optimizer's own list (shared, never copied).
        super().__init__([{"params": []}], {})
        self.base_optimizer = base_optimizer
        # the defaults join the base optimizer's, so a group added later (through either) gets them;
        # groups that set their own (SGD([{"params": ..., "rho": 0.1}])) keep them
        base_optimizer.defaults.update(defaults)
        self._link()
        self._zeroed = False

    def _link(self) -> None:
        # Shared, not copied: schedulers, add_param_group and load_state_dict stay consistent.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults
        fill_group_defaults(self.param_groups, self.defaults, self._GROUP_KEYS)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._link()  # the unpickled groups are the base's again
        _compat.repatch_step(self)  # torch's step hooks, as Optimizer.__setstate__ installs them

    def _owned(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def zeroed_since_step(self) -> bool:
        """Whether :meth:`zero_grad` ran since the last step (gradients present are then zeros)."""
        return self._zeroed

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of every parameter of the base optimizer."""
        self._zeroed = True  # step(closure) tells a zeroing closure from an accumulating one
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the base optimizer (it gets the defaults of the wrapper's settings)."""
        if "base_optimizer" not in self.__dict__:  # Optimizer.__init__'s placeholder group
            super().add_param_group(param_group)
        else:
            self.base_optimizer.add_param_group(param_group)  # base.defaults holds the wrapper's too
