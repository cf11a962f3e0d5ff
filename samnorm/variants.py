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

:func:`make` builds any of them (or plain SAM) by name, for ablations.

Every class takes the training loops of :class:`~samnorm.SAM`: ``opt.step(closure)`` runs the closure
as often as the step needs (twice or once); in the two-step form :attr:`~IntervalSAM.is_sam_step`
(a Python bool, no device sync) says whether to run the second pass, and ``second_step()``,
``step()`` or ``scaler.step(opt)`` finishes the step. :class:`OnePassSAM`'s ``first_step()`` comes
before the forward pass.

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

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .optim import SAM, all_reduce_mean, check_nonnegative, is_distributed
from .sam import fsdp
from .select import Selection

__all__ = ["IntervalSAM", "LookSAM", "OnePassSAM", "VARIANTS", "make"]

_VARIANT_KEY = "sam_variant"  # state_dict key next to SAM's own "sam"


class _Variant(SAM):
    """What the variants share: a step counter, named flat vectors over the perturbed tensors, and
    their extra state under ``"sam_variant"`` in the state dict."""

    _SLOTS: tuple[str, ...] = ()  # names of the flat vectors a variant keeps
    _NAME = ""  # its name in VARIANTS, saved with its state

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0  # completed steps (descents)
        self._vec: _Vectors | None = None

    def _vectors(self) -> _Vectors:
        params = self.perturbed_parameters()
        if self._vec is None or not self._vec.fits(params):
            self._vec = _Vectors(params, self._SLOTS)
        return self._vec

    @torch.no_grad()
    def _descend(self, amp: tuple | None, closure_mode: bool) -> None:
        # every path ends here: second_step(), step() after first_step, step(closure), scaler.step.
        # Restore w first: _before_descent reads only .grad, and if it raises, w must not stay at w + e
        self.restore()
        self._before_descent()
        super()._descend(amp, closure_mode)
        self.steps += 1

    def _before_descent(self) -> None:
        """What a variant does with the gradients just before the base optimizer's step."""

    def _variant_state(self) -> dict[str, Any]:
        return {"name": self._NAME, "steps": self.steps}

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])

    def state_dict(self) -> dict[str, Any]:
        """:meth:`SAM.state_dict` plus the variant's settings, step count and kept vectors under
        ``"sam_variant"``."""
        state = super().state_dict()
        state[_VARIANT_KEY] = self._variant_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`SAM.load_state_dict` plus the variant's state. A resume: the saved step count
        and settings (``k``, ``alpha``, ``direction``) replace the constructor's. A state dict of
        another variant is refused (``ValueError``); a plain SAM one loads and keeps these."""
        state_dict = dict(state_dict)
        variant = state_dict.pop(_VARIANT_KEY, None)
        if variant is not None and variant.get("name") != self._NAME:
            raise ValueError(
                f"the state dict was saved by the {variant.get('name')!r} SAM variant, and this is "
                f"{type(self).__name__} ({self._NAME!r}): build the same variant "
                "(samnorm.variants.make(name, ...)) to load it"
            )
        super().load_state_dict(state_dict)
        if variant is not None:
            self._load_variant_state(variant)

    def _saved(self, name: str) -> list[torch.Tensor] | None:
        return None if self._vec is None else [v.clone() for v in self._vec.views(name)]

    def _restore_saved(self, name: str, tensors: list[torch.Tensor] | None) -> None:
        if tensors is not None:
            self._vectors().set(name, tensors)


class IntervalSAM(_Variant):
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

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        k: int = 4,
        **kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (a SAM step every k steps), got {k!r}")
        super().__init__(base_optimizer, perturb, **kwargs)
        self.k = k

    @property
    def is_sam_step(self) -> bool:
        """Whether the current step (begun or not, not yet finished) is a SAM step."""
        return self.steps % self.k == 0

    @torch.no_grad()
    def first_step(self, loss: torch.Tensor | None = None, zero_grad: bool = False) -> None:
        """SAM's ascent on SAM steps; on plain steps ``loss.backward()`` (if a loss is given)."""
        if self.is_sam_step:
            super().first_step(loss, zero_grad)
            return
        if self._perturbed is not None:
            raise RuntimeError("first_step called twice without second_step: call second_step() first")
        if loss is not None:
            with torch.enable_grad():
                loss.backward()  # every parameter: this gradient is the descent's
        self._perturbed = []  # a step is begun, with nothing to restore: SAM's descent is the plain step

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """As :meth:`SAM.step`; ``step(closure)`` on a plain step runs the closure once (BatchNorm
        statistics and DDP's all-reduce as in a plain step) and returns its loss."""
        if closure is None or self.is_sam_step or self._perturbed is not None:
            return super().step(closure)
        self._refuse_unscale_before_closure()
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        # SAM's step with a closure after first_step: the base step through GradScaler's skip,
        # closure mode because GradScaler checked the gradients before this closure replaced them
        # (its flag is stale). The closure has run: the one handed over only returns its loss.
        return super().step(lambda: loss)

    @contextlib.contextmanager
    def first_pass(self, model: nn.Module) -> Iterator[None]:
        """SAM's first-pass context on SAM steps; nothing on plain steps (DDP must all-reduce)."""
        with super().first_pass(model) if self.is_sam_step else contextlib.nullcontext():
            yield

    _NAME = "interval"

    def _variant_state(self) -> dict[str, Any]:
        return {**super()._variant_state(), "k": self.k}

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        super()._load_variant_state(state)
        self.k = int(state["k"])

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

    _SLOTS = ("g", "gv", "tmp")  # first-pass gradient, stored g_v, scratch

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        check_nonnegative("alpha", alpha)
        super().__init__(base_optimizer, perturb, k=k, **kwargs)
        self.alpha = float(alpha)
        self._has_g = False

    def _ascend(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # the first-pass gradient g, kept for g_v (before the ascent consumes it)
        vec = self._vectors()
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
        vec = self._vectors()
        vec.load("tmp", [p.grad for p in vec.params])  # g_s
        gg, gs = vec.dot("g", "g"), vec.dot("g", "tmp")
        coef = torch.where(gg > 0, gs / gg, 0.0)
        vec.axpy("tmp", "g", -coef)  # tmp = g_s - coef * g
        finite = torch.isfinite(vec.dot("tmp", "tmp"))
        vec.select("gv", finite, "tmp")

    def _add_gv(self) -> None:
        vec = self._vectors()
        have = [i for i, p in enumerate(vec.params) if p.grad is not None]
        vec.load("tmp", [p.grad for p in vec.params])
        g_norm, gv_norm = vec.dot("tmp", "tmp").sqrt(), vec.dot("gv", "gv").sqrt()
        coef = torch.where(gv_norm > 0, self.alpha * g_norm / gv_norm, 0.0)
        vec.scale_into("tmp", "gv", coef)  # tmp = coef * g_v
        torch._foreach_add_([fsdp.local(vec.params[i].grad) for i in have], [vec.view("tmp", i) for i in have])

    _NAME = "looksam"

    def _variant_state(self) -> dict[str, Any]:
        return {**super()._variant_state(), "alpha": self.alpha, "gv": self._saved("gv")}

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        super()._load_variant_state(state)
        self.alpha = float(state["alpha"])
        self._restore_saved("gv", state.get("gv"))


class OnePassSAM(_Variant):
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

    _SLOTS = ("d", "tmp")  # direction="grad": the kept gradient, scratch

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        direction: str = "momentum",
        **kwargs: Any,
    ) -> None:
        if direction not in ("momentum", "grad"):
            raise ValueError(f"direction must be 'momentum' or 'grad', got {direction!r}")
        super().__init__(base_optimizer, perturb, **kwargs)
        if direction == "momentum":
            _check_keeps_momentum(base_optimizer)
        self.direction = direction

    def _directions(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.steps == 0:
            return [None] * len(params)
        if self.direction == "grad":
            vec = self._vectors()
            return [vec.view("d", i) for i in range(len(params))]
        # no buffer yet (every step so far skipped by GradScaler, or a tensor without gradient
        # so far): that tensor is not perturbed, as at step 0
        states = [self.state.get(p, {}) for p in params]
        return [s.get("momentum_buffer", s.get("exp_avg")) for s in states]

    @torch.no_grad()
    def first_step(self, loss: torch.Tensor | None = None, zero_grad: bool = False) -> None:
        """The ascent along ``d``; call it *before* the forward pass, without a loss."""
        if loss is not None:
            raise ValueError(
                "OnePassSAM takes its ascent from the optimizer's state: call first_step() before "
                "the forward pass, without a loss, then run one forward/backward and second_step()"
            )
        if self._perturbed is not None:
            raise RuntimeError("first_step called twice without second_step: call second_step() first")
        params = self.perturbed_parameters()
        pairs = [(p, d) for p, d in zip(params, self._directions(params)) if d is not None]
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
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _before_descent(self) -> None:
        if self.direction == "grad":  # keep g_t, unless it is not finite
            vec = self._vectors()
            vec.load("tmp", [p.grad for p in vec.params])
            vec.select("d", torch.isfinite(vec.dot("tmp", "tmp")), "tmp")

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """``step(closure)``: the ascent, ``closure`` once at ``w + e`` (parameters restored if it
        raises), the descent; returns the loss. ``step()`` after :meth:`first_step` and your
        backward finishes the step, as for :class:`~samnorm.SAM`."""
        if closure is not None and self._perturbed is None:
            self._refuse_unscale_before_closure()
            self.first_step()
        return super().step(closure)  # after first_step SAM runs the closure once, in second_pass

    @contextlib.contextmanager
    def first_pass(self, model: nn.Module) -> Iterator[None]:
        """Nothing: the one pass is the descent's, so DDP must all-reduce it."""
        yield

    @contextlib.contextmanager
    def second_pass(self, model: nn.Module) -> Iterator[None]:
        """Restore the parameters if the block raises; BatchNorm statistics are updated as usual."""
        with self._restoring_on_error():
            yield

    _NAME = "onepass"

    def _variant_state(self) -> dict[str, Any]:
        return {**super()._variant_state(), "direction": self.direction, "d": self._saved("d")}

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        super()._load_variant_state(state)
        self.direction = str(state["direction"])
        self._restore_saved("d", state.get("d"))

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


class _Vectors:
    """Named vectors shaped like a fixed list of tensors, flat per device in float32 (float64 when a
    tensor is float64): a norm or a dot product is one kernel per device, loading gradients one
    ``_foreach_copy_``. DTensor parameters (FSDP2): the vectors hold this rank's shards, and a dot
    product is summed over the shards."""

    def __init__(self, params: list[torch.Tensor], names: tuple[str, ...]) -> None:
        self.params = list(params)
        self._ids = [id(p) for p in self.params]
        self._shard_sum = fsdp.shard_sum(self.params)
        shards = [fsdp.local(p) for p in self.params]
        acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
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
                for i, v in zip(idx, flat.split(sizes)):
                    views[i] = v.view(shards[i].shape)
                self.flats[name].append(flat)
            self._views[name] = views

    def fits(self, params: list[torch.Tensor]) -> bool:
        return [id(p) for p in params] == self._ids

    def view(self, name: str, i: int) -> torch.Tensor:
        return self._views[name][i]

    def views(self, name: str) -> list[torch.Tensor]:
        return self._views[name]

    def load(self, name: str, tensors: list[torch.Tensor | None]) -> None:
        """Copy ``tensors`` (aligned with the parameters; ``None`` counts as zeros) into ``name``."""
        views = self._views[name]
        have = [i for i, t in enumerate(tensors) if t is not None]
        missing = [views[i] for i, t in enumerate(tensors) if t is None]
        dense = [t.to_dense() if t.is_sparse else fsdp.local(t) for t in (tensors[i] for i in have)]
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
        torch._foreach_copy_(self._views[name], [t.to(v.device) for t, v in zip(tensors, self._views[name])])

    def dot(self, a: str, b: str) -> torch.Tensor:
        """``<a, b>`` over every tensor, on the first device."""
        first = self.flats[a][0].device
        parts = [torch.dot(x, y).to(first) for x, y in zip(self.flats[a], self.flats[b])]
        total = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        return total if self._shard_sum is None else self._shard_sum(total)

    def axpy(self, out: str, x: str, coef: torch.Tensor) -> None:
        """``out += coef * x``."""
        for o, v in zip(self.flats[out], self.flats[x]):
            o.addcmul_(v, coef.to(o.device, o.dtype))

    def scale_into(self, out: str, x: str, coef: torch.Tensor) -> None:
        """``out = coef * x``."""
        for o, v in zip(self.flats[out], self.flats[x]):
            torch.mul(v, coef.to(o.device, o.dtype), out=o)

    def select(self, out: str, keep: torch.Tensor, new: str) -> None:
        """``out = new`` where ``keep`` (a device bool) is True, else unchanged: no host sync."""
        for o, n in zip(self.flats[out], self.flats[new]):
            o.copy_(torch.where(keep.to(o.device), n, o))

    def all_reduce_mean(self, name: str) -> None:
        if self._shard_sum is not None:  # shards of FSDP2's gradients, already averaged over the ranks
            return
        for flat, reduced in zip(self.flats[name], all_reduce_mean(self.flats[name])):
            flat.copy_(reduced)


#: the names :func:`make` accepts, with the class each builds
VARIANTS: dict[str, type[SAM]] = {
    "sam": SAM,
    "interval": IntervalSAM,
    "looksam": LookSAM,
    "onepass": OnePassSAM,
}


def make(
    name: str,
    base_optimizer: Optimizer,
    perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
    **kwargs: Any,
) -> SAM:
    """Build plain SAM or a variant by name (for ablations): ``"sam"``, ``"interval"``,
    ``"looksam"`` or ``"onepass"``; ``kwargs`` go to the class (``rho``, ``k``, ``alpha``,
    ``direction``, ...).

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
