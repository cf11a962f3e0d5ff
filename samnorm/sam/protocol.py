"""The step protocol: what each forward/backward pass of a SAM step is for, and one driver that runs them.

A SAM-type optimizer says, for the step under way, which passes it needs (:meth:`SAM.passes
<samnorm.SAM.passes>`, a tuple of :class:`Pass`), and :func:`run_passes` runs them: every training
loop (``SAM.step(closure)``, :func:`samnorm.train.recipe.finetune`, :func:`samnorm.integrations.sam_passes`
and so the transformers, accelerate and timm integrations, and the Lightning helper) goes through it,
so the number of passes, the BatchNorm statistics and DDP's all-reduce follow one rule:

- SAM: an *ascent* pass at ``w`` (BatchNorm statistics updated, no DDP all-reduce), then the
  *descent* pass at ``w + e`` (statistics frozen, all-reduced);
- :class:`~samnorm.sam.variants.IntervalSAM`/:class:`~samnorm.sam.variants.LookSAM` on plain steps: one
  descent pass at ``w``; :class:`~samnorm.sam.variants.OnePassSAM`: one descent pass at ``w + e`` (its
  ascent comes before, from the optimizer's state);
- BatchNorm running statistics move in the step's first pass only, so once per step for every class.

The phases of a step (:class:`Phase`): ``IDLE`` (no step begun, parameters at ``w``), ``BEGUN`` (a
step begun, nothing perturbed), ``PERTURBED`` (parameters at ``w + e``, ``w`` saved). After
:func:`run_passes` the parameters are at the descent pass's point and ``.grad`` holds the descent
gradient: the loop clips if it wants and calls ``optimizer.step()``, which restores ``w`` and steps.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from samnorm import SAM
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    >>> sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1)
    >>> [(p.at, p.use) for p in sam.passes()]
    [('w', 'ascent'), ('w+e', 'descent')]
    >>> losses = run_passes(sam, model, [torch.randn(8, 3)], lambda x: model(x).pow(2).mean())
    >>> sam.step(); int(model[1].num_batches_tracked)      # BatchNorm moved once
    1
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import nn

from . import _compat, amp, fsdp

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import SAM

__all__ = [
    "ASCENT",
    "DESCENT_PERTURBED",
    "ONE_PASS",
    "PLAIN",
    "Pass",
    "PassContexts",
    "Phase",
    "ascent_gradients",
    "begin_first_pass",
    "begin_window",
    "disable_running_stats",
    "pass_context",
    "refuse_closure_step",
    "run_closure",
    "run_passes",
]

B = TypeVar("B")


class Phase(enum.Enum):
    """Where a SAM step stands (:attr:`SAM.phase <samnorm.SAM.phase>`)."""

    IDLE = "idle"  # no step begun; parameters at w
    BEGUN = "begun"  # a step begun, nothing perturbed (a plain step, or an ascent that moved nothing)
    PERTURBED = "perturbed"  # parameters at w + e, w saved


@dataclass(frozen=True)
class Pass:
    """One forward/backward pass of a step.

    Attributes:
        at: where the parameters are during the pass: ``"w"`` or ``"w+e"`` (perturbed).
        use: ``"ascent"``: its gradient (of the perturbed tensors only) sets the next perturbation;
            ``"descent"``: its gradient (of every parameter) is the base optimizer's.
        update_bn: whether BatchNorm running statistics update (the step's first pass only).
        sync: whether DDP all-reduces its gradients (descent passes; SAM's ``sync_first_pass``
            averages an ascent's own few gradients instead).
    """

    at: Literal["w", "w+e"]
    use: Literal["ascent", "descent"]
    update_bn: bool
    sync: bool


ASCENT = Pass(at="w", use="ascent", update_bn=True, sync=False)
"""SAM's first pass: at w, for the ascent."""
DESCENT_PERTURBED = Pass(at="w+e", use="descent", update_bn=False, sync=True)
"""SAM's second pass: at w + e, for the descent."""
PLAIN = Pass(at="w", use="descent", update_bn=True, sync=True)
"""A plain step's only pass (IntervalSAM/LookSAM between SAM steps)."""
ONE_PASS = Pass(at="w+e", use="descent", update_bn=True, sync=True)
"""OnePassSAM's only pass, at the w + e its ascent set before the forward."""


@contextlib.contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged inside the block (SAM's perturbed pass).

    In training mode the layers still normalise with the batch statistics; only the running mean,
    variance and batch counter are left alone, so they keep describing the unperturbed weights.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> with disable_running_stats(bn):
        ...     _ = bn(torch.randn(8, 3))
        >>> bn.running_mean.abs().sum().item(), int(bn.num_batches_tracked)
        (0.0, 0)
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # training forward then passes no running buffers
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@contextlib.contextmanager
def pass_context(step_pass: Pass, model: nn.Module, *, last_micro_batch: bool = True) -> Iterator[None]:
    """Context of ``step_pass`` over one micro-batch: DDP's ``no_sync`` unless the pass syncs and
    this is the window's last micro-batch; BatchNorm statistics frozen unless it updates them.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> with pass_context(DESCENT_PERTURBED, bn):
        ...     _ = bn(torch.randn(8, 3))
        >>> int(bn.num_batches_tracked)
        0
    """
    with contextlib.ExitStack() as stack:
        no_sync = getattr(model, "no_sync", None)  # DDP's
        if (not step_pass.sync or not last_micro_batch) and no_sync is not None:
            stack.enter_context(no_sync())
        if not step_pass.update_bn:
            stack.enter_context(disable_running_stats(model))
        yield


class PassContexts:
    """The contexts a hand-written loop wraps each pass in, for a SAM-type optimizer (a base of
    :class:`~samnorm.SAM`, which gives :meth:`passes` and :meth:`restore`)."""

    def passes(self) -> tuple[Pass, ...]:
        """The passes of the current step (:meth:`SAM.passes <samnorm.SAM.passes>`)."""
        raise NotImplementedError

    def restore(self) -> None:
        """Restore ``w`` and abandon the step (:meth:`SAM.restore <samnorm.SAM.restore>`)."""
        raise NotImplementedError

    def pass_context(
        self, index: int, model: nn.Module, *, last_micro_batch: bool = True
    ) -> contextlib.AbstractContextManager[None]:
        """Context of pass ``index`` over one micro-batch (:func:`~samnorm.sam.protocol.pass_context`):
        DDP's ``no_sync`` unless the pass syncs and this is the window's last micro-batch; BatchNorm
        statistics frozen unless it updates them."""
        return pass_context(self.passes()[index], model, last_micro_batch=last_micro_batch)

    @contextlib.contextmanager
    def abandon_on_error(self) -> Iterator[None]:
        """Restore ``w`` and abandon the step (:meth:`restore`) if the block raises, then re-raise."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    @contextlib.contextmanager
    def first_pass(self, model: nn.Module) -> Iterator[None]:
        """Context of the step's first forward/backward (:meth:`pass_context` of pass 0): for SAM
        no DDP all-reduce (``no_sync``; ``sync_first_pass=True`` averages the perturbed tensors'
        gradients, far less than DDP's all-reduce of every gradient)."""
        with self.pass_context(0, model):
            yield

    @contextlib.contextmanager
    def second_pass(self, model: nn.Module) -> Iterator[None]:
        """Context of the step's last forward/backward (for SAM at ``w + e``, BatchNorm statistics
        frozen, see :func:`disable_running_stats`); if the block raises, ``w`` is restored."""
        with self.abandon_on_error(), self.pass_context(len(self.passes()) - 1, model):
            yield


def run_passes(
    sam: SAM,
    model: nn.Module,
    batches: Sequence[B],
    fn: Callable[[B], Any],
    *,
    backward: Callable[[torch.Tensor], Any] | Literal[False] | None = None,
    loss_of: Callable[[Any], torch.Tensor] | None = None,
    start: int = 0,
    fresh: bool = True,
) -> list[Any]:
    """Run the passes of ``sam``'s current step over the micro-batches ``batches``; return
    ``fn``'s outputs of the first pass run, one per micro-batch.

    Args:
        sam: a :class:`~samnorm.SAM` (or variant) with no step begun (``start=0``), or with passes
            ``0 .. start-1`` done (:meth:`SAM.end_pass <samnorm.SAM.end_pass>` called for each).
        model: the model (DDP's ``no_sync`` and BatchNorm statistics follow each :class:`Pass`).
        batches: the micro-batches of the step (gradients accumulate over them).
        fn: ``batch -> output``; the loss is ``loss_of(output)`` (default: the output itself).
        backward: ``None``: the driver differentiates the loss (an ascent over one micro-batch
            takes the gradient of the perturbed tensors only, ``torch.autograd.grad``); a callable
            ``loss -> None`` (a framework's scaled backward); ``False``: ``fn`` runs the backward.
        loss_of: picks the loss out of ``fn``'s output.
        start: the first pass to run (the earlier ones were run by the caller).
        fresh: with ``start=0``, the step starts from no gradient: gradients present are dropped
            when the optimizer zeroed them since its last step (``zero_grad(set_to_none=False)``),
            refused otherwise (:func:`begin_window`); ``False``: ``fn`` zeroes them (a closure).

    Afterwards the parameters are at the last pass's point and ``.grad`` holds the descent
    gradient: ``sam.step()`` (``optimizer.step()`` in a framework, after clipping) finishes the
    step. An error restores ``w`` and abandons the step.
    """
    if start == 0:
        begin_window(sam) if fresh else sam.begin_step()
    passes = sam.passes()
    outputs: list[Any] = []
    pick = loss_of or (lambda out: out)
    for i in range(start, len(passes)):
        ascent_by_loss = passes[i].use == "ascent" and backward is None and len(batches) == 1
        results = []
        with sam.abandon_on_error():
            for j, batch in enumerate(batches):
                with sam.pass_context(i, model, last_micro_batch=j == len(batches) - 1):
                    out = fn(batch)
                    if ascent_by_loss:
                        loss = pick(out)
                    elif backward is None:
                        pick(out).backward()
                    elif backward is not False:
                        backward(pick(out))
                results.append(out)
            sam.end_pass(i, loss if ascent_by_loss else None)
        if not outputs:
            outputs = results
    return outputs


def begin_window(sam: SAM) -> None:
    """Begin a step whose passes start from no gradient. Gradients present are dropped when
    ``sam.zero_grad`` ran since the last step (zero-filled by ``zero_grad(set_to_none=False)``: no
    device read); otherwise they are read once and refused unless all zero (left over: they would
    enter the ascent).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from samnorm import SAM
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> begin_window(sam)
        Traceback (most recent call last):
        ValueError: gradients are already present at the start of a SAM step: ...
    """
    grads = [p.grad for g in sam.param_groups for p in g["params"] if p.grad is not None]
    if grads and not sam.zeroed_since_step and any(bool(g.any()) for g in grads):
        raise ValueError(
            "gradients are already present at the start of a SAM step: they would enter the "
            "ascent. Call optimizer.zero_grad() after each optimizer.step(), and accumulate by "
            "passing each micro-batch to samnorm.integrations.sam_passes (last=True on the window's "
            "final one) or all of them to samnorm.sam.protocol.run_passes"
        )
    sam.begin_step()
    sam.zero_grad(set_to_none=True)


def begin_first_pass(sam: SAM, loss: torch.Tensor | None, *, zero_grad: bool = False) -> None:
    """:meth:`SAM.first_step <samnorm.SAM.first_step>` after its checks: begin the step and close
    its first pass by what the pass is for. An ascent: perturb from ``loss`` (or ``.grad``); a plain
    step's pass at ``w``: ``loss.backward()`` (its gradient is the descent's, kept); a first pass at
    ``w + e`` (OnePassSAM, whose ascent came from its state before the forward): nothing to
    differentiate, so a ``loss`` is refused (``ValueError``). ``zero_grad`` drops the gradients
    after an ascent or before a pass at ``w + e``.

    Example:
        >>> from samnorm import SAM
        >>> w = nn.Parameter(torch.ones(2))
        >>> sam = SAM(torch.optim.SGD([w], lr=0.1), [w])
        >>> begin_first_pass(sam, w.pow(2).sum()); sam.phase.name
        'PERTURBED'
    """
    first = sam.passes()[0]
    if first.at == "w+e" and loss is not None:
        raise ValueError(
            f"{type(sam).__name__} takes its ascent from the optimizer's state: call first_step() before the "
            "forward pass, without a loss, then run one forward/backward and second_step()"
        )
    sam.begin_step()
    if first.use == "ascent":
        sam.end_pass(0, loss, zero_grad=zero_grad)
    elif first.at == "w" and loss is not None:
        with torch.enable_grad():
            loss.backward()  # type: ignore[no-untyped-call]  # a plain step: the descent's gradient
    elif first.at == "w+e" and zero_grad:  # (a plain step's .grad is the descent's: kept)
        sam.zero_grad(set_to_none=True)


_INTEGRATIONS = (
    "samnorm.integrations.transformers.SAMTrainer, samnorm.integrations.lightning (manual "
    "optimization), samnorm.integrations.timm, samnorm.integrations.accelerate"
)
_STEP_WITHOUT_FIRST_STEP = (
    "SAM.step() without a closure finishes a step begun by first_step(), and none is begun. SAM "
    "needs two forward/backward passes per step: (1) step(closure), the closure zeroing the "
    "gradients, computing the loss, calling backward and returning the loss (it runs twice); or "
    "(2) first_step(loss), then the second forward/backward, then step() (or second_step()); or "
    "(3) samnorm.sam.protocol.run_passes(sam, model, batches, loss_fn), then step(). A "
    "framework that runs one backward per step needs samnorm's integration for it: " + _INTEGRATIONS
)
_ACCUMULATION_IN_CLOSURE = (
    "SAM.step(closure) under gradient accumulation: either the closure added its gradients to "
    "gradients already present (e.g. Lightning's accumulate_grad_batches > 1), so the ascent would "
    "use every micro-batch and the second pass only the last one; or accelerate's accumulate() "
    "skipped the step, and so the closure, on all but the last micro-batch of each window. "
    "Accumulate with the two-pass form: "
    "backward over the micro-batches, first_step(), backward over the same micro-batches, "
    "step(); in a framework use samnorm's integration (" + _INTEGRATIONS + "; for accelerate: "
    "samnorm.integrations.accelerate.sam_backward). If your closure "
    "zeroes the gradients itself, zero them with sam.zero_grad()."
)


def refuse_closure_step(sam: SAM, closure: Callable[[], torch.Tensor] | None) -> None:
    """Refuse (``ValueError``) ``sam.step(closure)`` with no step begun where it cannot run the
    whole step: without a closure, after ``scaler.unscale_`` (:func:`samnorm.sam.amp.refuse_unscale_before_closure`),
    or inside accelerate's ``accumulate()`` over several micro-batches.

    Example:
        >>> import torch
        >>> from samnorm import SAM
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> refuse_closure_step(SAM(torch.optim.SGD([w], lr=0.1), [w]), None)
        Traceback (most recent call last):
        ValueError: SAM.step() without a closure finishes a step begun by first_step(), and none is begun. ...
    """
    if closure is None:
        raise ValueError(_STEP_WITHOUT_FIRST_STEP)
    amp.refuse_unscale_before_closure(sam, sam.base_optimizer)
    if _compat.accelerate_accumulation_steps() > 1:
        raise ValueError(_ACCUMULATION_IN_CLOSURE)


def run_closure(sam: SAM, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The passes of ``sam.step(closure)``: with no step begun, ``closure`` (zero grads, forward,
    backward, return the loss) runs once per pass through :func:`run_passes` and the first pass's
    loss is returned; gradients present before it that the closure added to instead of zeroing
    them are refused (``ValueError``: the later passes could not see those micro-batches). After
    ``first_step`` it runs once, as the step's last pass. Either way the step is left to finish
    (``.grad`` holds the descent gradient).

    Example:
        >>> from samnorm import SAM
        >>> w = nn.Parameter(torch.ones(2))
        >>> sam = SAM(torch.optim.SGD([w], lr=0.1), [w])
        >>> def closure():
        ...     sam.zero_grad()
        ...     loss = w.pow(2).sum()
        ...     loss.backward()
        ...     return loss
        >>> run_closure(sam, closure).item(), sam.phase.name          # the step's first loss; step() next
        (2.0, 'PERTURBED')
    """
    model = sam.model if sam.model is not None else nn.Module()
    if sam.phase is not Phase.IDLE:  # after first_step the closure is the step's last pass
        with torch.enable_grad(), sam.abandon_on_error(), sam.pass_context(len(sam.passes()) - 1, model):
            return closure()
    present = {id(p): p.grad for g in sam.param_groups for p in g["params"] if p.grad is not None}
    calls = 0

    def call(_: None) -> torch.Tensor:
        nonlocal calls
        with torch.enable_grad():
            loss = closure()
        calls += 1
        if calls == 1 and present and not sam.zeroed_since_step and _grads_kept(sam, present):
            raise ValueError(_ACCUMULATION_IN_CLOSURE)
        return loss

    loss: torch.Tensor = run_passes(sam, model, [None], call, backward=False, fresh=False)[0]
    return loss


def _grads_kept(sam: SAM, present: dict[int, torch.Tensor | None]) -> bool:
    """Whether a parameter's ``.grad`` is still the tensor it held before the closure (added to)."""
    return any(p.grad is present.get(id(p)) for g in sam.param_groups for p in g["params"])


_REENTRANT = (
    "first_step(loss): {n} perturbed tensor(s) got no gradient from torch.autograd.grad, and the "
    "loss's graph holds reentrant activation checkpointing (torch.utils.checkpoint with "
    "use_reentrant=True), which autograd.grad cannot differentiate through. Use "
    "use_reentrant=False, or the .grad path: loss.backward(), then first_step() without a loss"
)


def ascent_gradients(
    params: list[torch.Tensor],
    loss: torch.Tensor | None,
    *,
    zero_missing: bool = False,
    owned: list[torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, gradient)`` pairs for an ascent over ``params``: ``loss``'s gradient of those
    only (``torch.autograd.grad``), or their ``.grad`` when ``loss`` is None. A parameter without
    gradient is left out (``zero_missing``: counted as zeros, so that every rank issues the same
    collectives). A loss whose graph hides parameters behind reentrant activation checkpointing is
    refused (``ValueError``), since autograd.grad cannot reach them. Under FSDP2 (DTensor
    parameters, out of autograd.grad's reach too) it runs ``loss.backward()`` instead, leaving the
    ``.grad`` of ``owned`` (default ``params``; SAM passes all of its parameters) as it was.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> [g.tolist() for _, g in ascent_gradients([w], (3 * w).sum())]
        [[3.0, 3.0]]
    """
    if loss is None:
        pairs = [(p, p.grad) for p in params]
    else:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("first_step(loss=...) needs a scalar loss tensor")
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not require grad: compute it with autograd enabled (not under "
                "torch.no_grad()) from the model's output"
            )
        wanted = [p for p in params if p.requires_grad]
        grads: Sequence[torch.Tensor | None] = ()
        if any(fsdp.is_dtensor(p) for p in wanted):  # FSDP2: autograd.grad cannot reach the shards
            grads = fsdp.backward_grads(loss, params if owned is None else owned, wanted)
        elif wanted:
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        pairs = list(zip(wanted, grads, strict=True))
        missing = sum(g is None for g in grads)
        if missing and _reentrant_checkpoint_in(loss):
            raise ValueError(_REENTRANT.format(n=missing))
    if zero_missing:
        return [(p, torch.zeros_like(p) if g is None else g) for p, g in pairs if p.requires_grad]
    return [(p, g) for p, g in pairs if g is not None]


def _reentrant_checkpoint_in(loss: torch.Tensor) -> bool:
    """Whether ``loss``'s autograd graph holds a reentrant ``torch.utils.checkpoint`` node (walked
    only when a parameter got no gradient)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "CheckpointFunction" in type(fn).__name__:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False
