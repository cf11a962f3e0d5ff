"""SAM: sharpness-aware minimization as a wrapper around any torch optimizer.

One step of SAM (Foret et al. 2021) with the SAM-ON selection (Mueller et al. 2023):

1. ascent, over the *selected* tensors ``i`` only, each in a parameter group ``g(i)``::

       e_i = rho_g(i) * T_i^2 * g_i / (||T g|| + eps),   ||T g||^2 = sum_i ||T_i * g_i||^2

   ``g`` is the gradient of the loss alone (the base optimizer's weight decay does not enter the
   ascent); ``T_i = 1`` for SAM, ``T_i = |w_i| + eta_g(i)`` elementwise for ASAM (Kwon et al. 2021;
   ``T_i = 1`` for biases with ``normalize_bias=False``). The norm is one global L2 norm over every
   selected tensor whatever its group; each group's ``rho`` scales its own ``e``. Then ``w <- w + e``;
2. descent: restore the saved ``w`` (a copy, bit-exact, never ``(w + e) - e``) and let the wrapped
   optimizer step with the gradient taken at ``w + e``.

The step never synchronises host and device (the norm, the non-finite guard and the skip counter are
device tensors), except under ``GradScaler`` with a base optimizer that is not fused, where the
skip decision reads one flag as ``GradScaler.step`` itself does.

The layout is torch.optim's: the arithmetic lives in functions over tensor lists,
:func:`~samnorm.sam.functional.perturb_` and :func:`~samnorm.sam.functional.restore_`
(:mod:`samnorm.sam.functional`). :class:`SAM` only orchestrates: it collects the parameters,
gradients and per-group settings, keeps the backups and buffers between steps, and hooks into
``step``, ``GradScaler`` and ``state_dict``; the mechanics live in the modules beside it
(:mod:`~samnorm.sam.protocol`: the passes, their contexts and driver, the closure and two-step
plans; :mod:`~samnorm.sam.amp`: GradScaler; :mod:`~samnorm.sam.settings`: the group settings;
:mod:`~samnorm.sam.state`: state dict and pickle; :mod:`~samnorm.sam.nonfinite`: skipped ascents;
:mod:`~samnorm.sam.wrapper`: the groups and state shared with the base optimizer).

A step is a sequence of passes (:meth:`SAM.passes`, run by :func:`samnorm.sam.protocol.run_passes`),
then :meth:`SAM.step`. Variants (:mod:`samnorm.sam.variant`) change the passes and the hooks
``_step_passes``, ``_ascend``, ``_ascend_before_forward``, ``_before_descent`` and ``_after_descent``;
``step`` itself is never overridden (torch wraps it at class level for its step hooks, which would
then fire twice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..select import PerturbedSet, Selection, bias_ids
from . import _compat, amp
from .functional import Saved, all_reduce_mean, is_distributed, perturb_, restore_
from .nonfinite import NonFinite
from .protocol import (
    ASCENT,
    DESCENT_PERTURBED,
    Pass,
    PassContexts,
    Phase,
    ascent_gradients,
    begin_first_pass,
    disable_running_stats,
    refuse_closure_step,
    run_closure,
)
from .settings import GroupSetting, ascent_settings, check_nonnegative, check_setting, group_index, summary
from .state import load_record, pickled, record, unpickle
from .wrapper import WrappedOptimizer, check_base

__all__ = ["SAM", "disable_running_stats"]

# The errors of a step taken out of order, each naming the fix
_OVERRIDES_STEP = (
    "{} overrides SAM.step: torch wraps step at class level for its step hooks, so they would fire "
    "twice per step. Override the step's hooks instead (_step_passes, _ascend_before_forward, "
    "_before_descent, _after_descent; see samnorm.sam.variant.Variant)"
)
_STEP_UNDER_WAY = (
    "a SAM step is already under way (first_step called twice, or run_passes without "
    "step()): finish it with step()/second_step(), or abandon it with restore()"
)
_FIRST_STEP_TWICE = (
    "first_step called twice without second_step: the parameters are still perturbed; "
    "call second_step() (or restore()) first"
)
_MID_STEP_STATE = (
    "state_dict() between first_step and second_step would save perturbed parameters "
    "alongside it; call it after second_step()"
)


class SAM(WrappedOptimizer, PassContexts):
    """Sharpness-aware minimization around an optimizer instance, perturbing selected parameters.

    Args:
        base_optimizer: the optimizer that takes the descent step (SGD, AdamW, anything). SAM shares
            its ``param_groups`` and ``state``, so LR schedulers attach to either object.
        perturb: what the ascent perturbs: ``None``, every parameter of ``base_optimizer`` (SAM); an
            ``nn.Module``, its normalization layers that require grad and that the base optimizer owns
            *at each step* (SAM-ON, :class:`~samnorm.select.PerturbedSet`: ``add_param_group`` is
            followed); a :class:`~samnorm.select.Selection` or parameters of ``base_optimizer``.
        rho: radius of the ascent step (``||e|| = rho``; for ASAM ``||e / T|| = rho``).
        adaptive: ASAM, with ``T = |w| + eta`` elementwise.
        eta: ASAM's offset, so parameters at 0 are still perturbed (official ASAM uses 0.01).
            ``rho``, ``adaptive`` and ``eta`` are defaults for the base optimizer's parameter
            groups: a group may set its own, and a scheduler may change ``group["rho"]``.
        eps: added to the gradient norm before dividing.
        normalize_bias: ASAM only. ``False``: tensors named ``*bias`` keep ``T = 1``, as the
            official ASAM code and SAM-ON's ``ASAM_BN`` do (names from ``perturb``/``model``).
        foreach: ``None``/``True``: the grouped multi-tensor path; ``False``: a per-tensor loop
            (same results).
        sync_first_pass: under ``torch.distributed``, average the perturbed tensors' first-pass
            gradients across ranks before the ascent. By default each replica perturbs with its own
            (as google-research/sam does; no all-reduce). FSDP2 always averages (:mod:`~samnorm.sam.fsdp`).
        model: the model, so that :meth:`step` can run the first pass without DDP's all-reduce
            and the second without updating BatchNorm statistics (default: ``perturb`` if a module).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> loss_fn = nn.CrossEntropyLoss()
        >>> opt.first_step(loss_fn(model(x), y))          # grads of the LayerNorm only, then w += e
        >>> loss_fn(model(x), y).backward()               # gradient at the perturbed point
        >>> opt.second_step(zero_grad=True)               # restore w, then SGD's step
    """

    _step_supports_amp_scaling = True  # GradScaler.step hands SAM the scale and flag (see amp.py)
    _GROUP_KEYS: tuple[str, ...] = ("rho", "adaptive", "eta")  # settings kept in every param group
    _settings: Mapping[str, Any] = MappingProxyType({})  # a variant's (k, alpha, ...), set before __init__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            raise TypeError(_OVERRIDES_STEP.format(cls.__name__))

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-12,
        normalize_bias: bool = True,
        foreach: bool | None = None,
        sync_first_pass: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        check_base(base_optimizer)
        for name, value in (("rho", rho), ("eta", eta), ("eps", eps)):
            check_nonnegative(name, value)
        super().__init__(
            base_optimizer, {"rho": float(rho), "adaptive": bool(adaptive), "eta": float(eta), **self._settings}
        )
        self.eps = float(eps)
        self.normalize_bias = bool(normalize_bias)
        self.foreach = foreach
        self.sync_first_pass = bool(sync_first_pass)
        self._perturb = PerturbedSet(perturb, self._owned)
        self.model = model if model is not None else perturb if isinstance(perturb, nn.Module) else None
        self._bias_ids = set() if self.normalize_bias else bias_ids(perturb, self.model)
        self._phase = Phase.IDLE
        self._saved: Saved = []  # (params, backups) lists of what the ascent moved
        self._buffers: dict[Any, Any] = {}  # perturb_'s backups and flat buffers, kept between steps
        self._nonfinite = NonFinite()
        self._group_of: tuple[tuple[tuple[int, int], ...], dict[int, int]] = ((), {})
        self.last_grad_norm: torch.Tensor | None = None

    def perturbed_parameters(self) -> list[torch.Tensor]:
        """The parameters the ascent perturbs now (resolved at each call, see ``perturb``)."""
        return self._perturb.params()

    # rho, adaptive and eta live in the parameter groups; these read and set all groups at once
    rho = GroupSetting("The ascent radius of every parameter group (set: all groups).")
    adaptive = GroupSetting("Whether every parameter group uses ASAM (set: all groups).")
    eta = GroupSetting("ASAM's offset of every parameter group (set: all groups).")

    def _check_setting(self, key: str, value: Any) -> Any:
        """A group setting, checked and converted (variants add theirs)."""
        return check_setting(key, value)

    # ------------------------------------------------------------------ the protocol
    @property
    def phase(self) -> Phase:
        """Where the step stands (:class:`~samnorm.sam.protocol.Phase`): IDLE, BEGUN or PERTURBED."""
        return self._phase

    def passes(self) -> tuple[Pass, ...]:
        """The forward/backward passes of the current step (begun or not, not yet finished), each
        a :class:`~samnorm.sam.protocol.Pass`: SAM's ascent at ``w``, then its descent at ``w + e``.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
            >>> len(SAM(torch.optim.SGD(model.parameters(), lr=0.1), model).passes())
            2
        """
        return self._step_passes()

    def _step_passes(self) -> tuple[Pass, ...]:
        return (ASCENT, DESCENT_PERTURBED)

    @property
    def is_sam_step(self) -> bool:
        """Whether the current step perturbs (a pass at ``w + e``; False on the plain steps of
        IntervalSAM and LookSAM), no device sync; :meth:`passes` says more."""
        return any(p.at == "w+e" for p in self.passes())

    def begin_step(self) -> None:
        """Begin a step (the driver calls it before the first pass); a step whose first pass is at
        ``w + e`` (:class:`~samnorm.sam.variants.OnePassSAM`) takes its ascent here."""
        if self._phase is not Phase.IDLE:
            raise RuntimeError(_STEP_UNDER_WAY)
        self._phase = Phase.BEGUN
        self._nonfinite.current = None
        if self.passes()[0].at == "w+e":
            with torch.no_grad():
                self._ascend_before_forward()

    def _ascend_before_forward(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}: a first pass at w + e needs _ascend_before_forward")

    @torch.no_grad()
    def end_pass(self, index: int, loss: torch.Tensor | None = None, *, zero_grad: bool = True) -> None:
        """Close pass ``index`` of the step: after an ascent pass, perturb (from ``loss``'s gradient
        of the perturbed tensors, or from their ``.grad``) and zero the gradients (set to ``None``)
        unless ``zero_grad=False``; after a descent pass, nothing."""
        if self.passes()[index].use != "ascent":
            return
        zero_missing = self.sync_first_pass and is_distributed()
        try:
            pairs = ascent_gradients(self.perturbed_parameters(), loss, zero_missing=zero_missing, owned=self._owned())
        except ValueError:
            self.restore()
            raise
        self._restore_weights()  # a later ascent starts again from w
        self._ascend(pairs)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the two-step form
    @torch.no_grad()
    def first_step(self, loss: torch.Tensor | None = None, zero_grad: bool = False) -> None:
        """Begin a step and close its first pass: for SAM the ascent, perturbing the selected
        parameters by ``e`` and saving their values.

        Args:
            loss: differentiated with respect to the perturbed parameters *only* (skipping every
                other weight-gradient product; :func:`~samnorm.sam.protocol.ascent_gradients`).
                ``None``: the ``.grad`` of the caller's own backward (micro-batches accumulated).
            zero_grad: zero all gradients afterwards (set to ``None``), ready for the second pass.

        A non-finite gradient norm skips the ascent (:attr:`nonfinite_steps`, a warning once).
        """
        if self._phase is not Phase.IDLE:
            raise RuntimeError(_FIRST_STEP_TWICE)
        self._nonfinite.poll(stacklevel=3)
        begin_first_pass(self, loss, zero_grad=zero_grad)

    def _ascend(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:  # under no_grad
        self._group_of = group_index(self.param_groups, self._group_of)
        plain = set() if self.normalize_bias else self._bias_ids  # T = 1 under ASAM
        params, grads, rhos, etas = ascent_settings(pairs, self.param_groups, self._group_of[1], plain)
        if not params:
            self._nonfinite.current = None
            return
        grads = all_reduce_mean(grads) if self.sync_first_pass else grads
        norm, self._saved = perturb_(
            params, grads, rhos=rhos, etas=etas, eps=self.eps, foreach=self.foreach, state=self._buffers
        )
        self._phase = Phase.PERTURBED
        self.last_grad_norm = norm
        self._nonfinite.record(torch.isfinite(norm))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back into the perturbed parameters (bit-exact) and abandon the step
        (after ``first_step``, for example when the second pass raised)."""
        self._restore_weights()
        self._phase = Phase.IDLE

    def _restore_weights(self) -> None:
        if self._phase is Phase.PERTURBED:
            restore_(self._saved, foreach=self.foreach)
            self._saved = []
            self._phase = Phase.BEGUN

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Descent: restore the saved values, then run the base optimizer's step (as :meth:`step`
        without a closure does after :meth:`first_step`).

        Args:
            zero_grad: zero all gradients (set to ``None``) after the step.
            scaler: a ``torch.amp.GradScaler``: the step goes through ``scaler.step(sam)`` (then
                ``scaler.update()`` as usual); ``scaler.unscale_`` before it (to clip) is honoured.
        """
        if self._phase is Phase.IDLE:
            raise RuntimeError("second_step called without first_step: call first_step() first")
        amp.scaled_step(scaler, self, self.base_optimizer)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        self._nonfinite.poll(stacklevel=3)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """Finish the step begun by :meth:`first_step` or :func:`~samnorm.sam.protocol.run_passes`
        (restore ``w``, then the base optimizer's step), or run the whole step with ``closure``
        (zero grads, forward, backward, return loss): it runs once per pass, the first pass's loss
        is returned (:func:`~samnorm.sam.protocol.run_closure`). Under ``GradScaler.step(sam)``
        an inf/NaN in any pass skips the whole step and the scaler backs off (:mod:`~samnorm.sam.amp`).

        Example:
            >>> model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
            >>> opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
            >>> def closure():
            ...     opt.zero_grad()
            ...     loss = model(torch.ones(2, 3)).pow(2).mean()
            ...     loss.backward()
            ...     return loss
            >>> loss = opt.step(closure)
            >>> opt.first_step(model(torch.ones(2, 3)).pow(2).mean())   # the two-pass form
            >>> model(torch.ones(2, 3)).pow(2).mean().backward()
            >>> opt.step()
        """
        with amp.handshake(self) as handshake:  # set by GradScaler.step(sam) for this call
            if self._phase is Phase.IDLE:
                refuse_closure_step(self, closure)
                self._zeroed = False  # a zero_grad in the closure then tells it from one adding gradients
            loss = None if closure is None else run_closure(self, closure)
            self._descend(handshake, closure_mode=closure is not None)
        return loss

    @torch.no_grad()
    def _descend(self, handshake: amp.Handshake | None, closure_mode: bool) -> None:
        """Restore ``w``, then the base optimizer's step (through the AMP skip when scaled)."""
        try:
            self._restore_weights()
            self._before_descent()
            amp.base_step(self, self.base_optimizer, handshake, self._nonfinite.current, not closure_mode)
        finally:
            self._phase = Phase.IDLE
            self._nonfinite.current = None
            self._zeroed = False
        self._after_descent()
        _compat.mark_stepped(self)  # what an LR scheduler attached to SAM checks

    def _before_descent(self) -> None:
        """Hook: after ``w`` is restored, before the base optimizer's step (``.grad`` is the descent's)."""

    def _after_descent(self) -> None:
        """Hook: after the base optimizer's step."""

    @property
    def nonfinite_steps(self) -> int:
        """How many steps skipped the ascent for a non-finite gradient norm (reading it syncs)."""
        return self._nonfinite.count

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus SAM's settings and base class under ``"sam"``."""
        if self._phase is not Phase.IDLE:
            raise RuntimeError(_MID_STEP_STATE)
        return {**self.base_optimizer.state_dict(), "sam": record(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (or a plain base-optimizer state dict).
        One saved around another base optimizer class is refused (``ValueError``)."""
        count = load_record(self, state_dict)
        self._link()  # load_state_dict replaces the base's param_groups and state objects
        if count is not None:
            self._nonfinite = NonFinite(count)

    def __getstate__(self) -> dict[str, Any]:
        if self._phase is not Phase.IDLE:
            raise RuntimeError("cannot copy or pickle SAM between first_step and second_step")
        return pickled(self.__dict__)

    def __setstate__(self, saved: dict[str, Any]) -> None:
        fields, selection = unpickle(saved)  # any release's pickle
        super().__setstate__(fields)
        if selection != ():
            self._perturb = PerturbedSet(selection, self._owned)

    def __repr__(self) -> str:
        kind, rho = summary(self.param_groups)
        what = "all parameters" if self._perturb.everything else f"{len(self.perturbed_parameters())} selected tensors"
        return f"{kind}(rho={rho}, perturb={what}, base={self.base_optimizer!r})"
