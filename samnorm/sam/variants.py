"""Cheaper sharpness-aware steps on the same wrapper: every-k ascent, LookSAM and one-pass ascent.

A SAM(-ON) step costs two forward/backward passes. These siblings of :class:`samnorm.SAM` keep its
selection (SAM-ON), its grouped ascent, its bit-exact restore and its non-finite guard, and spend
fewer passes:

- :class:`IntervalSAM` (``k``): a SAM step every ``k`` steps, plain base-optimizer steps in between
  (Composer's ``interval``); ``k=1`` is :class:`~samnorm.SAM`.
- :class:`LookSAM` (``k``, ``alpha``; Liu et al. 2022): as above, and the in-between steps reuse the
  sharpness component of the last SAM gradient.
- :class:`OnePassSAM` (``direction``; MSAM, Becker et al. 2024): the perturbation comes from the
  optimizer's momentum (or the previous step's gradient) of the selected tensors, so every step
  costs one forward/backward.
- :class:`~samnorm.sam.gsam.GSAM` (``alpha``; Zhuang et al. 2022): SAM's two passes, the descent
  gradient corrected by the surrogate gap's direction.

Their settings (``k``, ``alpha``, ``direction``) live in the parameter groups like ``rho``, so a
scheduler may drive them. :func:`make` builds any of them (or plain SAM) by name, for ablations,
from the registry (:mod:`samnorm.sam.registry`); :data:`VARIANTS` is a view of it. A new variant is
one small file over :class:`~samnorm.sam.variant.Variant`.

Every class takes the training loops of :class:`~samnorm.SAM`: ``opt.step(closure)`` and
:func:`samnorm.sam.protocol.run_passes` run as many passes as :meth:`~samnorm.SAM.passes` says (two
or one); in the two-step form :attr:`~samnorm.SAM.is_sam_step` (a Python bool, no device sync) says
whether to run the second pass, and ``second_step()``, ``step()`` or ``scaler.step(opt)`` finishes
the step. :class:`OnePassSAM`'s ``first_step()`` comes before the forward pass.

Tried and dropped (not measured; reasons of design):

- LookSAM with per-tensor norms (pytorch_optimizer's LookSAM normalises each tensor on its own): the
  paper's formula uses whole-vector norms, and one global norm matches the ascent's.
- MSAM's "stay perturbed between steps" trick (parameters live at ``w + e`` and the update is
  shifted): it saves copying the *selected* tensors each step (0.2 % of a ResNet-50's elements
  under SAM-ON) but leaves perturbed weights in every evaluation and checkpoint.
- ``+m`` as the one-pass direction (along the accumulated gradient): MSAM's algorithm and code use
  ``-m``, and an untested sign flip of a published method is no option to offer;
  ``direction="grad"`` is the gradient-signed one-pass choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from ..select import Selection
from . import fsdp, registry
from .functional import is_distributed
from .gsam import GSAM
from .optimizer import SAM
from .protocol import ASCENT, DESCENT_PERTURBED, ONE_PASS, PLAIN, Pass
from .variant import Variant

__all__ = ["GSAM", "VARIANTS", "IntervalSAM", "LookSAM", "OnePassSAM", "Variant", "make"]


class IntervalSAM(Variant):
    """SAM every ``k`` steps, plain base-optimizer steps in between.

    Steps ``0, k, 2k, ...`` (counted as they finish) are SAM steps exactly as in
    :class:`~samnorm.SAM`; the others are the base optimizer's step on the gradient at ``w``,
    with one forward/backward. ``k=1`` is :class:`~samnorm.SAM`.

    Args:
        base_optimizer, perturb: as for :class:`~samnorm.SAM`.
        k: the interval (an int >= 1).
        **kwargs: the other arguments of :class:`~samnorm.SAM` (``rho``, ``adaptive``, ...).

    Two-step form: :meth:`first_step` on a plain step runs ``loss.backward()`` over every parameter
    (loss path) or keeps the ``.grad`` you computed (``zero_grad`` is then ignored: that gradient is
    the descent's); skip the second pass when :attr:`is_sam_step` is False, then finish with
    ``second_step()`` or ``step()`` as for SAM. ``first_pass(model)`` is a no-op on plain steps, so
    DDP all-reduces their only backward.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> opt = IntervalSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2, rho=0.5)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> loss_fn = nn.CrossEntropyLoss()
        >>> for _ in range(3):
        ...     with opt.first_pass(model):
        ...         loss = loss_fn(model(x), y)
        ...     opt.first_step(loss)                      # ascent, or a plain full backward
        ...     if opt.is_sam_step:
        ...         with opt.second_pass(model):
        ...             loss_fn(model(x), y).backward()
        ...     opt.second_step(zero_grad=True)
        >>> opt.steps
        3
    """

    NAME = "interval"
    SETTINGS: ClassVar[dict[str, Any]] = {"k": 4}
    k: int  # a GroupSetting (Variant.__init_subclass__): every group's value

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        k: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_optimizer, perturb, k=k, **kwargs)

    def _check_setting(self, key: str, value: Any) -> Any:
        if key == "k":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"k must be an int >= 1 (a SAM step every k steps), got {value!r}")
            return value
        return super()._check_setting(key, value)

    def _step_passes(self) -> tuple[Pass, ...]:
        return (ASCENT, DESCENT_PERTURBED) if self.steps % self.k == 0 else (PLAIN,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, {super().__repr__()})"


class LookSAM(IntervalSAM):
    """LookSAM (Liu et al. 2022): SAM every ``k`` steps, its sharpness component reused in between.

    Over the perturbed tensors (the norm layers under SAM-ON), with ``g`` the gradient at ``w`` and
    ``g_s`` the gradient at ``w + e``, all as whole vectors:

    - SAM step: ``g_v = g_s - (<g, g_s> / <g, g>) g`` (the part of ``g_s`` orthogonal to ``g``; ``g_s``
      itself when ``g = 0``) is stored, then the step is :class:`~samnorm.SAM`'s;
    - plain step: ``g <- g + alpha * ||g|| / ||g_v|| * g_v`` (nothing added while ``g_v = 0``), then
      the base optimizer's step.

    The other tensors take their plain gradient on plain steps: the first pass of
    ``first_step(loss)`` has no gradient for them, and the ascent acts through the selection. The
    update is homogeneous in ``g`` and ``g_s``, so scaled (GradScaler) and unscaled gradients give
    the same step; a non-finite ``g_v`` keeps the previous one. Under ``torch.distributed`` the
    stored ``g`` is averaged across ranks so that every replica adds the same ``g_v``. ``alpha=0``
    is :class:`IntervalSAM`. Arithmetic in float32 (float64 for float64 tensors), flat per device;
    memory: three such vectors the size of the selection (45k elements for a ResNet-50 under SAM-ON,
    three copies of the model with ``perturb=None``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2, alpha=0.7)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(torch.ones(2, 4)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(3):
        ...     loss = opt.step(closure)               # two passes on steps 0 and 2, one on step 1
    """

    NAME = "looksam"
    SETTINGS: ClassVar[dict[str, Any]] = {"k": 5, "alpha": 0.7}
    alpha: float  # a GroupSetting (Variant.__init_subclass__): every group's value
    SLOTS = ("g", "gv", "tmp")  # first-pass gradient, stored g_v, scratch
    SAVED = ("gv",)

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_optimizer, perturb, k=k, alpha=alpha, **kwargs)
        self._has_g = False

    def _ascend(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # the first-pass gradient g, kept for g_v (before the ascent consumes it)
        vec = self.vectors()
        given = {id(p): g for p, g in pairs}
        vec.load("g", [given.get(id(p)) for p in vec.params])
        if is_distributed():
            vec.all_reduce_mean("g")
        self._has_g = True
        super()._ascend(pairs)

    def _before_descent(self) -> None:
        if self.is_sam_step and self._has_g:
            self._store_gv()
        elif not self.is_sam_step and self.alpha:
            self._add_gv()
        self._has_g = False

    def _store_gv(self) -> None:
        vec = self.vectors()
        vec.load("tmp", [p.grad for p in vec.params])  # g_s
        gg, gs = vec.dot("g", "g"), vec.dot("g", "tmp")
        coef = torch.where(gg > 0, gs / gg, 0.0)
        vec.axpy("tmp", "g", -coef)  # tmp = g_s - coef * g
        finite = torch.isfinite(vec.dot("tmp", "tmp"))
        vec.select("gv", finite, "tmp")

    def _add_gv(self) -> None:
        vec = self.vectors()
        have = [i for i, p in enumerate(vec.params) if p.grad is not None]
        vec.load("tmp", [p.grad for p in vec.params])
        g_norm, gv_norm = vec.dot("tmp", "tmp").sqrt(), vec.dot("gv", "gv").sqrt()
        coef = torch.where(gv_norm > 0, self.alpha * g_norm / gv_norm, 0.0)
        vec.scale_into("tmp", "gv", coef)  # tmp = coef * g_v
        grads = [fsdp.local(g) for g in (vec.params[i].grad for i in have) if g is not None]
        torch._foreach_add_(grads, [vec.view("tmp", i) for i in have])


class OnePassSAM(Variant):
    """One-pass ascent (MSAM, Becker et al. 2024): the direction needs no extra backward.

    Step ``t``, over the perturbed tensors (the norm layers under SAM-ON), with ``d`` a whole vector:

    1. :meth:`first_step` (before the forward, no loss): ``w <- w + e`` with ``e = rho * d / ||d||``
       (ASAM: ``rho * T^2 d / ||T d||``), ``w`` saved, where

       - ``direction="momentum"`` (MSAM): ``d = -m``, ``m`` the base optimizer's momentum as the
         previous step left it (SGD's ``momentum_buffer``, Adam's ``exp_avg``, with whatever they
         fold in, such as SGD's weight decay). ``m`` accumulates gradients, so ``e`` points along
         the *update* direction: MSAM's perturbation ``w - rho v / ||v||`` (its algorithm 1 and
         official code, ``v`` accumulating gradients as PyTorch's buffer does);
       - ``direction="grad"``: ``d = g_{t-1}``, the gradient the previous step descended with:
         SAM's ascent with a gradient one step old.

       No ``d`` yet (step 0, or every step so far skipped by ``GradScaler``, so the optimizer
       keeps no momentum yet) or ``d = 0``: ``e = 0``, a plain step; a non-finite ``||d||`` skips
       the ascent as in :class:`~samnorm.SAM`. An optimizer that never keeps a momentum (SGD
       without momentum, Adagrad) is refused at construction for ``direction="momentum"``.
    2. your one forward/backward at ``w + e``: the gradient ``g_t`` of every parameter.
    3. :meth:`second_step`: restore ``w`` (a bit-exact copy), then the base optimizer's step with
       ``g_t``; ``direction="grad"`` keeps ``g_t`` of the perturbed tensors (unless not finite).

    So a step costs one forward/backward plus the ascent's few kernels over the selection. Either
    ``d`` is identical on every DDP replica (they come from all-reduced gradients), so the single
    pass syncs as usual: :meth:`first_pass` adds no ``no_sync`` and :meth:`second_pass` does not
    freeze BatchNorm statistics (they are updated at ``w + e``, there being no other pass).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> opt = OnePassSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> for _ in range(2):
        ...     opt.first_step()                            # w -= rho * m / ||m|| (0 at step 0)
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.second_step(zero_grad=True)             # restore w, SGD's step
    """

    NAME = "onepass"
    SETTINGS: ClassVar[dict[str, Any]] = {"direction": "momentum"}
    direction: str  # a GroupSetting (Variant.__init_subclass__): every group's value
    SLOTS = ("d", "tmp")  # direction="grad": the kept gradient, scratch
    SAVED = ("d",)

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        direction: str = "momentum",
        **kwargs: Any,
    ) -> None:
        super().__init__(base_optimizer, perturb, direction=direction, **kwargs)
        if self.direction == "momentum":
            _check_keeps_momentum(base_optimizer)

    def _check_setting(self, key: str, value: Any) -> Any:
        if key != "direction":
            return super()._check_setting(key, value)
        if value not in ("momentum", "grad"):
            raise ValueError(f"direction must be 'momentum' or 'grad', got {value!r}")
        if value == "momentum" and self.__dict__.get("base_optimizer") is not None:  # set later, e.g. by a scheduler
            _check_keeps_momentum(self.base_optimizer)
        return value

    def _step_passes(self) -> tuple[Pass, ...]:
        return (ONE_PASS,)

    def _directions(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.steps == 0:
            return [None] * len(params)
        if self.direction == "grad":
            vec = self.vectors()
            return [vec.view("d", i) for i in range(len(params))]
        # no buffer yet (every step so far skipped by GradScaler, or a tensor without gradient
        # so far): that tensor is not perturbed, as at step 0
        states = [self.state.get(p, {}) for p in params]
        return [s.get("momentum_buffer", s.get("exp_avg")) for s in states]

    def _ascend_before_forward(self) -> None:
        params = self.perturbed_parameters()
        pairs = [(p, d) for p, d in zip(params, self._directions(params), strict=True) if d is not None]
        # MSAM's d = -m: the momentum is negated in place around the ascent and back (a sign flip
        # is exact), which spares a copy of it. SAM's per-tensor path may zero non-finite entries
        # of d in place (nan_to_num_): the identity for a healthy run's finite momentum.
        flip = [d for _, d in pairs] if self.direction == "momentum" else []
        if flip:
            torch._foreach_neg_(flip)
        try:
            self._ascend(pairs)
        finally:
            if flip:
                torch._foreach_neg_(flip)

    def _before_descent(self) -> None:
        if self.direction == "grad":  # keep g_t, unless it is not finite
            vec = self.vectors()
            vec.load("tmp", [p.grad for p in vec.params])
            vec.select("d", torch.isfinite(vec.dot("tmp", "tmp")), "tmp")

    def __repr__(self) -> str:
        return f"OnePassSAM(direction={self.direction!r}, {super().__repr__()})"


def _check_keeps_momentum(optimizer: Optimizer) -> None:
    """``direction="momentum"`` reads SGD's/RMSprop's ``momentum_buffer`` or an Adam-type
    ``exp_avg`` (optimizers with ``betas``): refuse, at construction, an optimizer that keeps none."""
    if isinstance(optimizer, (torch.optim.SGD, torch.optim.RMSprop)):
        ok = all(g.get("momentum", 0) > 0 for g in optimizer.param_groups)
    else:
        ok = "betas" in optimizer.defaults
    if not ok:
        raise ValueError(
            f"direction='momentum': {type(optimizer).__name__} keeps no momentum buffer (SGD and "
            "RMSprop need momentum > 0 in every parameter group; Adam-type optimizers keep "
            "exp_avg); use OnePassSAM(..., direction='grad')"
        )


#: the names :func:`make` accepts, with the class each builds: a view of :mod:`samnorm.sam.registry`
VARIANTS: Mapping[str, type[SAM]] = registry.RegistryView(
    lambda kind: kind.name in registry.schedules(), registry.Kind.load
)
"""The schedules by name (``"sam"``, ``"interval"``, ``"looksam"``, ``"onepass"``, ``"gsam"``), each
to its class: a live view of :mod:`samnorm.sam.registry`, so a kind registered later appears here."""


def make(
    name: str,
    base_optimizer: Optimizer,
    perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
    **kwargs: Any,
) -> SAM:
    """Build plain SAM or a variant by name (for ablations): ``"sam"``, ``"interval"``,
    ``"looksam"``, ``"onepass"``, ``"gsam"`` or a registered one; ``kwargs`` go to the class
    (``rho``, ``k``, ``alpha``, ``direction``, ...).

    Every result trains with ``opt.step(closure)``, which runs the closure as often as its step
    needs.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> make("looksam", torch.optim.SGD(model.parameters(), lr=0.1), model, k=4, rho=0.5).k
        4
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown SAM variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name](base_optimizer, perturb, **kwargs)
