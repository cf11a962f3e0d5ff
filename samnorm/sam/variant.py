"""The public base of SAM variants: a step counter, settings in the parameter groups, named flat
vectors over the perturbed tensors, and their state in the state dict.

A variant is one small file (see :mod:`samnorm.sam.gsam`): subclass :class:`Variant` and override

- ``_step_passes()``: the passes of the current step (:mod:`samnorm.sam.protocol`; ``self.steps``
  counts the finished steps), e.g. ``(ASCENT, DESCENT_PERTURBED)`` or ``(PLAIN,)``;
- ``_ascend(pairs)``: sees the ascent's ``(parameter, gradient)`` pairs (call ``super()._ascend``
  to perturb); ``_ascend_before_forward()``: the ascent of a step whose first pass is at ``w + e``;
- ``_before_descent()``: after ``w`` is restored, with the descent gradient in ``.grad``;
- ``SETTINGS``: ``{name: default}`` kept in every parameter group (schedulers may drive them),
  ``SLOTS``: names of flat vectors (``self.vectors()``) kept between steps, ``SAVED``: those saved in
  the state dict;

then register it (:func:`samnorm.sam.registry.register`) to make it a recipe/CLI choice.
:meth:`~samnorm.SAM.step` is never overridden (torch's step hooks would fire twice).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from ..select import Selection
from . import fsdp
from .functional import accumulation_dtype, all_reduce_mean
from .optimizer import SAM
from .settings import GroupSetting

__all__ = ["Variant", "Vectors"]

_VARIANT_KEY = "sam_variant"  # state_dict key next to SAM's own "sam"


class Variant(SAM):
    """Base of the SAM variants (see the module docstring for the hooks).

    Args:
        base_optimizer, perturb: as for :class:`~samnorm.SAM`.
        **kwargs: the variant's ``SETTINGS`` (stored in every parameter group), then
            :class:`~samnorm.SAM`'s arguments.

    Example:
        >>> from samnorm.sam.protocol import PLAIN
        >>> class Plain(Variant):                      # never perturbs: the base optimizer's steps
        ...     NAME = "plain-doc"
        ...     def _step_passes(self):
        ...         return (PLAIN,)
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> Plain(torch.optim.SGD(model.parameters(), lr=0.1), model).passes()[0].at
        'w'
    """

    NAME = ""  # its name in the registry, saved with its state
    SETTINGS: ClassVar[dict[str, Any]] = {}  # per-group settings and their defaults
    SLOTS: tuple[str, ...] = ()  # names of the flat vectors a variant keeps
    SAVED: tuple[str, ...] = ()  # the vectors saved in the state dict

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        self._settings = {key: self._check_setting(key, kwargs.pop(key, d)) for key, d in self.SETTINGS.items()}
        self._GROUP_KEYS = SAM._GROUP_KEYS + tuple(self.SETTINGS)
        super().__init__(base_optimizer, perturb, **kwargs)
        for key, value in self._settings.items():  # one value for every group (another SAM may have left one)
            setattr(self, key, value)
        self.steps = 0  # completed steps (descents)
        self._vec: Vectors | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for key in cls.SETTINGS:  # opt.k reads and sets every group's k, as opt.rho does
            if not isinstance(cls.__dict__.get(key), GroupSetting):
                setting = GroupSetting(f"The variant's {key!r} of every parameter group (set: all groups).")
                setting.__set_name__(cls, key)
                setattr(cls, key, setting)

    def vectors(self) -> Vectors:
        """The flat vectors (``SLOTS``) over the perturbed tensors, rebuilt when those change."""
        params = self.perturbed_parameters()
        if self._vec is None or not self._vec.fits(params):
            self._vec = Vectors(params, self.SLOTS)
        return self._vec

    def _after_descent(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` (the settings travel in ``param_groups``) plus the step count and
        the ``SAVED`` vectors under ``"sam_variant"``."""
        state = super().state_dict()
        saved = {name: None if self._vec is None else [v.clone() for v in self._vec.views(name)] for name in self.SAVED}
        state[_VARIANT_KEY] = {"name": self.NAME, "steps": self.steps, **saved}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`SAM.load_state_dict` plus the variant's state: the saved step count, settings and
        vectors replace the constructor's (a state dict from before the settings moved into
        ``param_groups`` keeps them under ``"sam_variant"``: loaded too). A state dict of another
        variant is refused (``ValueError``); a plain SAM one loads and keeps these."""
        state_dict = dict(state_dict)
        variant = state_dict.pop(_VARIANT_KEY, None)
        if variant is not None and variant.get("name") != self.NAME:
            raise ValueError(
                f"the state dict was saved by the {variant.get('name')!r} SAM variant, and this is "
                f"{type(self).__name__} ({self.NAME!r}): build the same variant "
                "(samnorm.sam.variants.make(name, ...)) to load it"
            )
        super().load_state_dict(state_dict)
        if variant is None:
            return
        self.steps = int(variant["steps"])
        for key in self.SETTINGS:
            if key in variant:  # the old layout
                setattr(self, key, variant[key])
            elif len({g[key] for g in self.param_groups}) == 1:  # later groups get the loaded value
                self.defaults[key] = self.param_groups[0][key]
        for name in self.SAVED:
            if variant.get(name) is not None:
                self.vectors().set(name, variant[name])


class Vectors:
    """Named vectors shaped like a fixed list of tensors, flat per device in float32 (float64 when a
    tensor is float64): a norm or a dot product is one kernel per device, loading gradients one
    ``_foreach_copy_``. DTensor parameters (FSDP2): the vectors hold this rank's shards, and a dot
    product is summed over the shards."""

    def __init__(self, params: list[torch.Tensor], names: tuple[str, ...]) -> None:
        self.params = list(params)
        self._ids = [id(p) for p in self.params]
        self._shard_sum = fsdp.shard_sum(self.params)
        shards = [fsdp.local(p) for p in self.params]
        acc = accumulation_dtype({p.dtype for p in params})
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i, p in enumerate(self.params):
            by_device[p.device].append(i)
        self.parts = list(by_device.values())  # parameter indices of each device
        self.flats: dict[str, list[torch.Tensor]] = {}
        self._views: dict[str, list[torch.Tensor]] = {}
        for name in names:
            self.flats[name], views = [], [torch.empty(0)] * len(self.params)
            for idx in self.parts:
                sizes = [shards[i].numel() for i in idx]
                flat = torch.zeros(sum(sizes), device=self.params[idx[0]].device, dtype=acc)
                for i, v in zip(idx, torch.split(flat, sizes), strict=True):
                    views[i] = v.view(shards[i].shape)
                self.flats[name].append(flat)
            self._views[name] = views

    def fits(self, params: list[torch.Tensor]) -> bool:
        """Whether these vectors were built for exactly ``params`` (the same tensors, in order)."""
        return [id(p) for p in params] == self._ids

    def view(self, name: str, i: int) -> torch.Tensor:
        """Vector ``name``'s part shaped like the ``i``-th parameter (a view into its flat buffer)."""
        return self._views[name][i]

    def views(self, name: str) -> list[torch.Tensor]:
        """Vector ``name`` as views shaped like the parameters."""
        return self._views[name]

    def load(self, name: str, tensors: list[torch.Tensor | None]) -> None:
        """Copy ``tensors`` (aligned with the parameters; ``None`` counts as zeros) into ``name``."""
        views = self._views[name]
        have = [i for i, t in enumerate(tensors) if t is not None]
        missing = [views[i] for i, t in enumerate(tensors) if t is None]
        dense = [t.to_dense() if t.is_sparse else fsdp.local(t) for t in tensors if t is not None]
        if have:
            torch._foreach_copy_([views[i] for i in have], dense)
        if missing:
            torch._foreach_zero_(missing)

    def set(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Load saved vectors (from a state dict), checking that they fit the parameters."""
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != [tuple(v.shape) for v in self._views[name]]:
            raise ValueError(
                f"the saved {name!r} vectors do not fit the perturbed parameters ({len(shapes)} "
                f"saved, {len(self.params)} now): load into an optimizer built on the same model "
                "and selection"
            )
        torch._foreach_copy_(
            self._views[name], [t.to(v.device) for t, v in zip(tensors, self._views[name], strict=True)]
        )

    def dot(self, a: str, b: str) -> torch.Tensor:
        """``<a, b>`` over every tensor, on the first device."""
        first = self.flats[a][0].device
        parts = [torch.dot(x, y).to(first) for x, y in zip(self.flats[a], self.flats[b], strict=True)]
        total = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        return total if self._shard_sum is None else self._shard_sum(total)

    def axpy(self, out: str, x: str, coef: torch.Tensor) -> None:
        """``out += coef * x``."""
        for o, v in zip(self.flats[out], self.flats[x], strict=True):
            o.addcmul_(v, coef.to(o.device, o.dtype))

    def scale_into(self, out: str, x: str, coef: torch.Tensor) -> None:
        """``out = coef * x``."""
        for o, v in zip(self.flats[out], self.flats[x], strict=True):
            torch.mul(v, coef.to(o.device, o.dtype), out=o)

    def select(self, out: str, keep: torch.Tensor, new: str) -> None:
        """``out = new`` where ``keep`` (a device bool) is True, else unchanged: no host sync."""
        for o, n in zip(self.flats[out], self.flats[new], strict=True):
            o.copy_(torch.where(keep.to(o.device), n, o))

    def all_reduce_mean(self, name: str) -> None:
        """Average vector ``name`` over the ranks in place (a no-op on FSDP2 shards, already averaged)."""
        if self._shard_sum is not None:  # shards of FSDP2's gradients, already averaged over the ranks
            return
        for flat, reduced in zip(self.flats[name], all_reduce_mean(self.flats[name]), strict=True):
            flat.copy_(reduced)
