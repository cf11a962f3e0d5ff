"""Numerical checks of the appendix's Proposition 1 (eq. 12) and its energy-score corollary (eq. 15).

The proposition bounds one SAM-Only-norm step (eq. 4-5: perturb the normalization parameters by
``rho * g_N / ||g_N||``, then move *every* parameter by ``-h g(w')``) under L-smoothness (Assumption 1)
and a per-sample gradient bound ``||grad f_x||^2 <= M`` (Assumption 2), for ``h <= 1/L``::

    f(w+) - f(w) <= -(h/2) ||grad f(w)||^2 + L h^2 M + (1/2) h L^2 rho^2 (1 + L h)        (eq. 12)
    Delta energy <= Delta max-logit + (same right-hand side)                           (eq. 15)

This module estimates L (power iteration on Hessian-vector products) and M (max per-sample squared
gradient norm) *at the current weights*, evaluates the bound's terms, and runs a few real SAM-ON steps
with :class:`samnorm.SAM` to put the measured changes next to the bound. L and M are local estimates
(lower bounds on the global constants of the assumptions), so on a non-quadratic loss a measured
change above the bound is possible and is reported as such, not hidden.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samnorm.diagnostics.quantities import Target
from samnorm.ood.scores import energy, max_logit
from samnorm.sam.optimizer import SAM
from samnorm.utils.nn import eval_mode

__all__ = [
    "Eq12Bound",
    "PowerIteration",
    "StepReport",
    "estimate_M",
    "estimate_smoothness",
    "hessian_spectral_norm",
    "per_sample_grad_sq_norms",
    "sam_on_bound_check",
]

#: Per-sample loss: ``criterion(outputs, labels_or_None) -> (B,)``.
Criterion = Callable[[Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class PowerIteration:
    """Result of :func:`hessian_spectral_norm`.

    ``value`` is ``||H v||`` for the final unit vector ``v``: a lower bound on the spectral norm
    ``max |eigenvalue|`` of the Hessian that increases towards it. ``rayleigh`` is ``v^T H v`` (its sign
    is the sign of the dominant eigenvalue once converged).
    """

    value: float
    rayleigh: float
    iterations: int
    converged: bool


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    # reduce, not sum(): the same additions without sum's int 0 start (the sequences are never empty)
    return functools.reduce(operator.add, ((x * y).sum() for x, y in zip(xs, ys, strict=True)))


def _math_attention() -> Any:
    """Route scaled_dot_product_attention to its math kernel: the fused ones (flash, memory-efficient)
    have neither a double backward (HVPs) nor a vmap batching rule (per-sample gradients)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _hvp(pieces: Sequence[Callable[[], Tensor]], params: Sequence[Tensor], vec: Sequence[Tensor]) -> list[Tensor]:
    """Hessian of ``sum(piece())`` times ``vec``, accumulated piece by piece to bound memory."""
    out = [torch.zeros_like(p) for p in params]
    for piece in pieces:
        with _math_attention():
            loss = piece()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec, strict=True) if g is not None and g.requires_grad)
        if not isinstance(dot, Tensor):  # the piece is at most linear in params: zero Hessian
            continue
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        for acc, part in zip(out, hv, strict=True):
            if part is not None:
                acc.add_(part.detach())
    return out


def _params_list(params: Iterable[Tensor], what: str = "params") -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    chosen = list(params)  # a samnorm.select.Selection iterates over its parameters too
    if not chosen:
        raise ValueError(f"{what} is empty: choose at least one parameter tensor")
    for p in chosen:
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"every entry of {what} must be a tensor with requires_grad=True")
    return chosen


def hessian_spectral_norm(
    loss_fn: Callable[[], Tensor] | Sequence[Callable[[], Tensor]],
    params: Iterable[Tensor],
    *,
    iters: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
) -> PowerIteration:
    """Spectral norm of the Hessian of a loss w.r.t. ``params`` by power iteration on HVPs.

    ``loss_fn`` is a closure returning a scalar loss that depends on ``params`` (or a list of them whose
    sum is the loss, e.g. one per chunk of data). This is the local smoothness constant L at the current
    point. Iteration stops when ``||H v||`` changes by less than ``tol`` relatively (the error is then
    about ``sqrt(tol)`` relative in the worst case of nearly equal top eigenvalues) or after ``iters``.

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
        >>> r = hessian_spectral_norm(lambda: 0.5 * w @ A @ w, [w], tol=1e-10, iters=500)
        >>> round(r.value, 4)  # largest eigenvalue of A
        3.618
    """
    chosen = _params_list(params)
    pieces = [loss_fn] if callable(loss_fn) else list(loss_fn)
    if not pieces or not all(callable(piece) for piece in pieces):
        raise TypeError("loss_fn must be a closure returning a scalar loss, or a non-empty list of them")
    if iters < 1 or not tol >= 0:
        raise ValueError(f"iters must be >= 1 and tol >= 0, got iters={iters}, tol={tol}")
    gen = torch.Generator().manual_seed(seed)
    vec = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in chosen]
    norm = torch.sqrt(_dot(vec, vec))
    vec = [v / norm for v in vec]
    value, rayleigh = 0.0, 0.0
    for iteration in range(1, iters + 1):
        hv = _hvp(pieces, chosen, vec)
        rayleigh = float(_dot(vec, hv))
        new_value = float(torch.sqrt(_dot(hv, hv)))
        if not math.isfinite(new_value):
            raise ValueError("the Hessian-vector product is not finite; check the loss at these weights")
        if new_value == 0.0:  # the Hessian annihilates v: zero on this start (e.g. a linear loss)
            return PowerIteration(0.0, 0.0, iteration, True)
        done = abs(new_value - value) <= tol * new_value
        value = new_value
        vec = [h / new_value for h in hv]
        if done:
            return PowerIteration(value, rayleigh, iteration, True)
    return PowerIteration(value, rayleigh, iters, False)


def _ce_labels(outputs: Tensor, labels: Tensor | None) -> Tensor:
    assert labels is not None  # _objective pairs this loss with labels, given or predicted
    return F.cross_entropy(outputs, labels, reduction="none")


def _ce_uniform(outputs: Tensor, labels: Tensor | None) -> Tensor:
    return -torch.log_softmax(outputs, dim=1).mean(dim=1)


def _objective(
    model: nn.Module, inputs: Tensor, labels: Tensor | None, target: Target, criterion: Criterion | None
) -> tuple[Criterion, Tensor | None]:
    """The per-sample loss and the (fixed) labels it uses; ``"pred"`` labels are the current argmax."""
    if criterion is not None:
        return criterion, labels
    if target == "uniform":
        return _ce_uniform, None
    if target == "pred":
        with torch.no_grad():
            return _ce_labels, model(inputs).argmax(dim=1)
    if target == "label":
        if labels is None:
            raise ValueError("target='label' needs labels; pass them or use target='pred'")
        return _ce_labels, labels
    raise ValueError(f"target must be 'label', 'pred' or 'uniform', got {target!r}")


def _trainable(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    if params is None:
        return _params_list((p for p in model.parameters() if p.requires_grad), "model's trainable parameters")
    return _params_list(params)


def _chunks(n: int, chunk_size: int | None) -> list[slice]:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    step = n if chunk_size is None else chunk_size
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _check_batch(inputs: Tensor, labels: Tensor | None) -> None:
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a non-empty batch tensor (B, ...)")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape[:1] != inputs.shape[:1]):
        raise ValueError(f"labels must be a tensor with {inputs.shape[0]} entries along dim 0")


def estimate_smoothness(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    params: Iterable[Tensor] | None = None,
    target: Target = "label",
    criterion: Criterion | None = None,
    chunk_size: int | None = None,
    iters: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
) -> PowerIteration:
    """Local smoothness L of the mean loss over a batch: the Hessian's spectral norm w.r.t. ``params``.

    The loss is ``mean_i criterion(model(x_i), y_i)``; without ``criterion`` it is the cross-entropy with
    ``target`` (``"label"``, ``"pred"``: the current predictions held fixed, or ``"uniform"``).
    ``params`` defaults to every trainable parameter (the ones a SAM-ON step moves); a
    :class:`samnorm.select.Selection` or any iterable of parameters also works. ``chunk_size`` bounds
    memory: the Hessian-vector product is accumulated chunk by chunk. Call it with the model in the mode
    you want measured (``eval()`` for a deterministic loss).

    Example:
        >>> L = estimate_smoothness(model, images, labels).value  # doctest: +SKIP
    """
    _check_batch(inputs, labels)
    chosen = _trainable(model, params)
    loss_of, fixed = _objective(model, inputs, labels, target, criterion)
    n = inputs.shape[0]

    def piece(part: slice) -> Callable[[], Tensor]:
        y = None if fixed is None else fixed[part]
        return lambda: loss_of(model(inputs[part]), y).sum() / n

    pieces = [piece(part) for part in _chunks(n, chunk_size)]
    return hessian_spectral_norm(pieces, chosen, iters=iters, tol=tol, seed=seed)


def per_sample_grad_sq_norms(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    params: Iterable[Tensor] | None = None,
    target: Target = "label",
    criterion: Criterion | None = None,
    method: str = "vmap",
    chunk_size: int | None = 32,
) -> Tensor:
    """``||grad_params loss(model(x_i), y_i)||^2`` for every sample of the batch, shape ``(B,)``.

    ``method="vmap"`` uses ``torch.func`` (per-sample gradients in chunks of ``chunk_size`` samples; the
    model must be functional per sample, e.g. BatchNorm in eval mode); ``method="loop"`` runs one
    backward per sample and works for any model. Loss and ``params`` as in :func:`estimate_smoothness`.

    Example:
        >>> per_sample_grad_sq_norms(model, images, labels).max()  # doctest: +SKIP
    """
    _check_batch(inputs, labels)
    chosen = _trainable(model, params)
    loss_of, fixed = _objective(model, inputs, labels, target, criterion)
    if method == "loop":
        norms = []
        for i in range(inputs.shape[0]):
            y = None if fixed is None else fixed[i : i + 1]
            grads = torch.autograd.grad(loss_of(model(inputs[i : i + 1]), y).sum(), chosen, allow_unused=True)
            norms.append(sum(g.detach().pow(2).sum() for g in grads if g is not None))
        return torch.stack([torch.as_tensor(v, dtype=chosen[0].dtype) for v in norms])
    if method != "vmap":
        raise ValueError(f"method must be 'vmap' or 'loop', got {method!r}")
    return _vmap_grad_sq_norms(model, inputs, fixed, chosen, loss_of, chunk_size)


def _vmap_grad_sq_norms(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None,
    chosen: list[Tensor],
    loss_of: Criterion,
    chunk_size: int | None,
) -> Tensor:
    from torch.func import functional_call, grad, vmap

    chosen_ids = {id(p) for p in chosen}
    named = dict(model.named_parameters())
    selected = {name: p.detach() for name, p in named.items() if id(p) in chosen_ids}
    if len(selected) != len(chosen):
        raise ValueError("params must be parameters of model for method='vmap' (or use method='loop')")
    frozen = {name: p.detach() for name, p in named.items() if id(p) not in chosen_ids}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(sel: dict[str, Tensor], x: Tensor, y: Tensor | None) -> Tensor:
        out = functional_call(model, {**frozen, **sel}, (x.unsqueeze(0),))
        return loss_of(out, None if y is None else y.unsqueeze(0)).sum()

    in_dims = (None, 0, None if labels is None else 0)
    try:
        with _math_attention():
            grads = vmap(grad(sample_loss), in_dims=in_dims, chunk_size=chunk_size)(selected, inputs, labels)
    except RuntimeError as err:
        raise RuntimeError(
            f"per-sample gradients by torch.func failed ({err}); put the model in eval() mode or use method='loop'"
        ) from err
    return sum(g.flatten(1).pow(2).sum(dim=1) for g in grads.values())


def estimate_M(model: nn.Module, inputs: Tensor, labels: Tensor | None = None, **kwargs: Any) -> float:
    """Assumption 2's M estimated on a batch: ``max_i ||grad f_{x_i}(w)||^2`` at the current weights.

    Keyword arguments as in :func:`per_sample_grad_sq_norms`. The assumption asks for a bound over
    all weights; this is its value at ``w`` (a lower bound on the true M).

    Example:
        >>> M = estimate_M(model, images, labels, target="label")  # doctest: +SKIP
    """
    return float(per_sample_grad_sq_norms(model, inputs, labels, **kwargs).max())


@dataclass(frozen=True)
class Eq12Bound:
    """The terms of eq. 12 for step size ``h``, radius ``rho``, constants ``L``, ``M`` and
    ``grad_sq_norm = ||grad f(w)||^2``; ``total`` bounds ``f(w+) - f(w)`` when ``h <= 1/L``.

    Example:
        >>> b = Eq12Bound(h=0.1, rho=0.05, L=2.0, M=1.0, grad_sq_norm=4.0)
        >>> round(b.total, 6)  # -0.2 + 0.02 + 0.0006
        -0.1794
    """

    h: float
    rho: float
    L: float
    M: float
    grad_sq_norm: float

    def __post_init__(self) -> None:
        for name in ("h", "rho", "L", "M", "grad_sq_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.h == 0:
            raise ValueError("h (the learning rate) must be > 0")

    @property
    def descent(self) -> float:
        """``-(h/2) ||grad f(w)||^2``: the guaranteed decrease."""
        return -0.5 * self.h * self.grad_sq_norm

    @property
    def noise(self) -> float:
        """``L h^2 M``: the stochastic-gradient term."""
        return self.L * self.h**2 * self.M

    @property
    def perturbation(self) -> float:
        """``(1/2) h L^2 rho^2 (1 + L h)``: the price of the SAM perturbation."""
        return 0.5 * self.h * self.L**2 * self.rho**2 * (1.0 + self.L * self.h)

    @property
    def total(self) -> float:
        """The bound on ``f(w+) - f(w)``: the sum of the three terms."""
        return self.descent + self.noise + self.perturbation

    @property
    def step_size_ok(self) -> bool:
        """Whether ``h <= 1/L``, the proposition's condition."""
        return self.h * self.L <= 1.0

    def energy_bound(self, max_logit_change: float) -> float:
        """Eq. 15: the bound on the energy-score change given the max-logit change."""
        return self.total + max_logit_change

    def to_dict(self) -> dict[str, float | bool]:
        """All inputs and terms as a JSON-ready dict."""
        return {
            **asdict(self),
            "descent": self.descent,
            "noise": self.noise,
            "perturbation": self.perturbation,
            "total": self.total,
            "step_size_ok": self.step_size_ok,
        }


@dataclass(frozen=True)
class StepReport:
    """One SAM-ON step: measured loss change next to eq. 12, energy change next to eq. 15.

    ``energy_change`` and ``max_logit_change`` are means over each evaluated batch (``"train"`` is the
    batch the step used; other keys are the ``extra_inputs``); they are empty when the model's outputs
    are not ``(B, K)`` logits. ``slack`` is the floating-point tolerance used for ``holds``.
    """

    step: int
    loss_before: float
    loss_after: float
    bound: Eq12Bound
    energy_change: dict[str, float] = field(default_factory=dict)
    max_logit_change: dict[str, float] = field(default_factory=dict)
    slack: float = 0.0

    @property
    def loss_change(self) -> float:
        """Measured ``f(w+) - f(w)``."""
        return self.loss_after - self.loss_before

    @property
    def holds(self) -> bool:
        """Whether the measured loss change respects eq. 12."""
        return self.loss_change <= self.bound.total + self.slack

    def energy_bound(self, name: str = "train") -> float:
        """Eq. 15's bound on the energy change of batch ``name``."""
        return self.bound.energy_bound(self.max_logit_change[name])

    def energy_holds(self, name: str = "train") -> bool:
        """Whether the measured energy change of batch ``name`` respects eq. 15."""
        return self.energy_change[name] <= self.energy_bound(name) + self.slack

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of everything measured and bounded."""
        return {
            "step": self.step,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "loss_change": self.loss_change,
            "bound": self.bound.to_dict(),
            "holds": self.holds,
            "energy": {
                name: {
                    "energy_change": self.energy_change[name],
                    "max_logit_change": self.max_logit_change[name],
                    "bound": self.energy_bound(name),
                    "holds": self.energy_holds(name),
                }
                for name in self.energy_change
            },
        }


def _logit_stats(model: nn.Module, batches: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
    """Mean energy (logsumexp) and mean max logit of each batch; empty if outputs are not (B, K)."""
    stats = {}
    with torch.no_grad():
        for name, x in batches.items():
            logits = model(x)
            if logits.dim() != 2:
                return {}
            stats[name] = (float(energy(logits).mean()), float(max_logit(logits).mean()))
    return stats


def _check_bound_args(
    inputs: Tensor,
    labels: Tensor | None,
    *,
    steps: int,
    h: float,
    rho: float,
    extra_inputs: Mapping[str, Tensor] | None,
) -> None:
    _check_batch(inputs, labels)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (h > 0 and math.isfinite(h)) or not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"h must be > 0 and rho >= 0 (finite), got h={h}, rho={rho}")
    for name, x in (extra_inputs or {}).items():
        if name == "train":
            raise ValueError("'train' names the step's own batch; rename that entry of extra_inputs")
        _check_batch(x, None)


def _eq12_bound(
    model: nn.Module,
    inputs: Tensor,
    fixed: Tensor | None,
    loss_of: Criterion,
    trainable: list[Tensor],
    *,
    h: float,
    rho: float,
    L: float | None,
    M: float | None,
    chunk_size: int | None,
    power_iters: int,
    power_tol: float,
) -> Eq12Bound:
    """Eq. 12's bound at the current weights: ``||grad f||^2`` measured, ``L`` and ``M`` estimated unless given."""
    grads = torch.autograd.grad(loss_of(model(inputs), fixed).mean(), trainable, allow_unused=True)
    grad_sq = float(sum(g.pow(2).sum() for g in grads if g is not None))
    if L is None:
        L = estimate_smoothness(
            model, inputs, fixed, criterion=loss_of, chunk_size=chunk_size, iters=power_iters, tol=power_tol
        ).value
    if M is None:
        M = float(per_sample_grad_sq_norms(model, inputs, fixed, criterion=loss_of, chunk_size=chunk_size).max())
    return Eq12Bound(h=h, rho=rho, L=float(L), M=float(M), grad_sq_norm=grad_sq)


def sam_on_bound_check(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    h: float,
    rho: float,
    steps: int = 3,
    perturb: Any = "norm",
    target: Target = "pred",
    criterion: Criterion | None = None,
    L: float | None = None,
    M: float | None = None,
    extra_inputs: Mapping[str, Tensor] | None = None,
    power_iters: int = 100,
    power_tol: float = 1e-5,
    chunk_size: int | None = 32,
) -> list[StepReport]:
    """Run ``steps`` SAM-ON steps on one batch and report each step's measured changes next to the bounds.

    Each step builds ``samnorm.SAM(SGD(lr=h), perturb=perturb, rho=rho)`` (plain SGD: eq. 4-5), so the
    update is exactly the appendix's: the ``perturb`` parameters (default ``"norm"``: the model's
    normalization layers) move by ``rho g_N / ||g_N||``, then every trainable parameter descends with the
    gradient at the perturbed point. The objective ``f`` is the mean per-sample loss over the batch
    (cross-entropy with ``target``, or ``criterion``); with ``target="pred"`` the labels are the
    predictions at the start of each step, the loss of eq. 13, under which eq. 12 implies eq. 15 on this
    batch. Before each step, ``||grad f||^2`` is measured, and ``L`` and ``M`` are estimated at the
    current weights unless given. ``extra_inputs`` (e.g. ``{"ood": ood_images}``) get their energy and
    max-logit changes reported too; there the paper states eq. 15 without proof.

    The model runs in eval mode (a deterministic f; restored afterwards) and its weights are changed:
    pass a copy to keep the original. A warning is issued when ``h > 1/L``.

    Example:
        >>> reports = sam_on_bound_check(model, x, h=0.01, rho=0.05, steps=2)  # doctest: +SKIP
        >>> [(r.loss_change, r.bound.total, r.holds) for r in reports]          # doctest: +SKIP
    """
    _check_bound_args(inputs, labels, steps=steps, h=h, rho=rho, extra_inputs=extra_inputs)
    trainable = _trainable(model, None)
    eps = torch.finfo(trainable[0].dtype).eps
    reports = []
    with eval_mode(model):
        for step in range(steps):
            loss_of, fixed = _objective(model, inputs, labels, target, criterion)

            def closure() -> Tensor:
                opt.zero_grad()
                loss = loss_of(model(inputs), fixed).mean()
                loss.backward()
                return loss

            bound = _eq12_bound(
                model,
                inputs,
                fixed,
                loss_of,
                trainable,
                h=h,
                rho=rho,
                L=L,
                M=M,
                chunk_size=chunk_size,
                power_iters=power_iters,
                power_tol=power_tol,
            )
            if not bound.step_size_ok:
                warnings.warn(
                    f"step {step}: h*L = {h * bound.L:.3g} > 1, outside the proposition's condition h <= 1/L",
                    stacklevel=2,
                )
            batches = {"train": inputs, **(extra_inputs or {})}
            before = _logit_stats(model, batches)
            with torch.no_grad():
                loss_before = float(loss_of(model(inputs), fixed).mean())
            perturbed = model if isinstance(perturb, str) and perturb == "norm" else perturb
            opt = SAM(torch.optim.SGD(trainable, lr=h), perturb=perturbed, rho=rho, model=model)
            opt.step(closure)
            opt.zero_grad()
            with torch.no_grad():
                loss_after = float(loss_of(model(inputs), fixed).mean())
            after = _logit_stats(model, batches)
            reports.append(
                StepReport(
                    step=step,
                    loss_before=loss_before,
                    loss_after=loss_after,
                    bound=bound,
                    energy_change={k: after[k][0] - before[k][0] for k in before},
                    max_logit_change={k: after[k][1] - before[k][1] for k in before},
                    # float rounding of the measured values, not a modelling allowance
                    slack=16
                    * eps
                    * max(
                        [1.0, abs(loss_before), abs(loss_after)]
                        + [abs(v) for pair in (*before.values(), *after.values()) for v in pair]
                    ),
                )
            )
    return reports
