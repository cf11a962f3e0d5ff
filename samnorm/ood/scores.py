"""Logit-based OOD scores (higher = more in-distribution), as functions of a ``(B, K)`` logit tensor.

``msp`` (Hendrycks & Gimpel, ICLR 2017), ``max_logit`` (Hendrycks et al., ICML 2022), ``energy``
(Liu et al., NeurIPS 2020) and ``odin`` (Liang et al., ICLR 2018; temperature scaling plus an
optional gradient-sign input perturbation). pytorch-ood's ``MaxSoftmax``, ``MaxLogit`` and
``EnergyBased`` return the negatives of these.

Scores are computed in at least float32 (float64 stays float64): half-precision logits would
round nearby MSPs to the same value and create ties that are not in the model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["energy", "head_grad_norm", "max_logit", "msp", "odin"]


def _check_logits(logits: Tensor) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(
            f"logits must have shape (batch, classes) with at least one class, got "
            f"{tuple(logits.shape)}; a single sample is logits.unsqueeze(0)"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    return logits.to(widen(logits.dtype))


def widen(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` promoted to at least float32 (float16/bfloat16 -> float32; float64 kept).

    Example:
        >>> widen(torch.bfloat16), widen(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float; ``ValueError`` unless positive and finite."""
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def _warn_if_overflowed(scores: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """Warn when finite logits gave non-finite scores: the temperature overflowed ``logits / T``.

    Checked only for ``T != 1`` (at ``T = 1`` the formulas cannot overflow finite logits), so the
    usual call adds no device synchronisation.
    """
    if temperature != 1.0 and not bool(torch.isfinite(scores).all()) and bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(scores)).sum())
        warnings.warn(
            f"temperature {temperature:g} makes {bad} of {scores.numel()} scores non-finite (logits / T overflows "
            f"{logits.dtype}); use a larger temperature",
            RuntimeWarning,
            stacklevel=3,
        )
    return scores


def msp(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Maximum softmax probability ``max_k softmax(logits / T)_k``, shape ``(B,)``.

    Computed as ``1 / sum_k exp(z_k - max z)``: no overflow, and exact where ``logsumexp``
    would round ``max + log(sum)`` back to ``max`` (logits near the float32 limit).
    With ``temperature=1000`` this is ODIN without input perturbation.

    Example:
        >>> msp(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
        tensor([0.5000, 1.0000])
    """
    t = check_temperature(temperature)
    z = _check_logits(logits) / t
    return _warn_if_overflowed(torch.exp(z - z.amax(dim=1, keepdim=True)).sum(dim=1).reciprocal(), logits, t)


def max_logit(logits: Tensor) -> Tensor:
    """Maximum logit ``max_k logits_k``, shape ``(B,)``.

    Example:
        >>> max_logit(torch.tensor([[1.0, 3.0], [2.0, -1.0]]))
        tensor([3., 2.])
    """
    return _check_logits(logits).amax(dim=1)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)``, shape ``(B,)`` (stable for any logits).

    Example:
        >>> energy(torch.tensor([[0.0, 0.0]]))
        tensor([0.6931])
    """
    t = check_temperature(temperature)
    return _warn_if_overflowed(t * torch.logsumexp(_check_logits(logits) / t, dim=1), logits, t)


def head_grad_norm(
    features: Tensor,
    logits: Tensor,
    target: Tensor | None = None,
    *,
    p: float = 1.0,
    include_bias: bool = False,
    temperature: float = 1.0,
) -> Tensor:
    """Per-sample entry-wise ``p``-norm of the gradient of ``CE(logits / T, target)`` w.r.t. the
    final linear layer ``z = W h (+ b)`` that produced ``logits`` from ``features``, shape ``(B,)``.

    The gradient is ``dW = (q - t) h^T / T`` (and ``db = (q - t) / T``), ``q = softmax(z / T)``:
    a rank-one matrix, so its norm factorises as ``||q - t||_p * (||h||_p^p + [bias])^(1/p) / T``,
    the ``+ 1`` being the bias column when ``include_bias``. No backward pass, and the same for any
    batch size. ``target`` is a ``(B, K)`` distribution; ``None`` is the uniform one, the loss
    ``KL(uniform || q)`` of GradNorm (Huang, Geng & Li, NeurIPS 2021), whose score is this with
    the defaults (``p=1``, no bias). Computed in at least float32 (a half-precision sum of
    ``|h|`` may overflow).

    Example:
        >>> h, z = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0, 0.0]])
        >>> head_grad_norm(h, z)  # flat logits: q equals the uniform target
        tensor([0.])
        >>> head_grad_norm(h, z, torch.tensor([[1.0, 0.0, 0.0]]))  # |q - t|_1 = 4/3, |h|_1 = 3
        tensor([4.])
    """
    t = check_temperature(temperature)
    if not p >= 1:
        raise ValueError(f"p must be >= 1 (a norm), got {p}")
    z = _check_logits(logits)
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != z.shape[0]:
        raise ValueError(f"features must be a ({z.shape[0]}, D) tensor matching the logits")
    h = features.to(widen(features.dtype))
    q = torch.softmax(z / t, dim=1)
    delta = q - 1.0 / z.shape[1] if target is None else q - target.to(q.dtype)
    delta_norm = torch.linalg.vector_norm(delta, ord=p, dim=1) / t
    if math.isinf(p):
        h_norm = torch.linalg.vector_norm(h, ord=p, dim=1)
        return delta_norm * (h_norm.clamp(min=1.0) if include_bias else h_norm)
    h_norm = h.abs().pow(p).sum(dim=1)
    if include_bias:
        h_norm = h_norm + 1.0
    return delta_norm * (h_norm if p == 1 else h_norm.pow(1.0 / p))


def odin(
    logits_or_model: Tensor | Callable[[Tensor], Tensor],
    inputs: Tensor | None = None,
    *,
    temperature: float = 1000.0,
    epsilon: float = 0.0,
    input_std: Sequence[float] | None = None,
) -> Tensor:
    """ODIN score: MSP at temperature ``T``, optionally of inputs moved to raise that MSP.

    ``odin(logits)`` is ``msp(logits, T)`` (ODIN without perturbation, as in the RankFeat
    evaluation). ``odin(model, inputs, epsilon=eps)`` first moves the inputs:
    ``x' = x - eps * sign(grad_x CE(model(x) / T, argmax))`` (the paper's
    ``x - eps * sign(-grad log S_yhat(x; T))``), then returns ``msp(model(x'), T)``. The sign step
    is taken per sample (the loss is summed over the batch), so the score does not depend on the
    batch size. When ``inputs`` are normalised by a per-channel ``std``, pass ``input_std`` to
    make the step ``eps`` in pixel units, as the paper's code does (the step is divided by
    ``std``). Put the model in eval mode first: the gradient pass would otherwise update
    BatchNorm statistics.

    Example:
        >>> odin(torch.tensor([[2.0, 0.0]]), temperature=1.0)
        tensor([0.8808])
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
        >>> odin(net, torch.rand(2, 3, 2, 2), temperature=1000.0, epsilon=0.002).shape
        torch.Size([2])
    """
    t = check_temperature(temperature)
    epsilon = float(epsilon)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0 (0 disables the step), got {epsilon}")
    if isinstance(logits_or_model, Tensor):
        if inputs is not None or epsilon > 0:
            raise ValueError("odin(logits) cannot perturb inputs; call odin(model, inputs, epsilon=...) instead")
        return msp(logits_or_model, t)
    if not callable(logits_or_model):
        raise TypeError(f"odin takes logits or a model, got {type(logits_or_model).__name__}")
    model = logits_or_model
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise TypeError("odin(model, inputs): inputs must be a floating-point tensor of images")
    if epsilon == 0.0:
        with torch.no_grad():
            return msp(model(inputs), t)
    # the gradient must be computable even when the caller runs under no_grad / inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.detach().clone().requires_grad_(True)
        logits = _check_logits(model(x)) / t
        loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    step = grad.sign()
    if input_std is not None:
        std = torch.as_tensor(input_std, dtype=step.dtype, device=step.device).reshape(-1)
        if step.dim() < 2 or std.numel() not in (1, step.shape[1]):
            raise ValueError(
                f"input_std needs one value per channel ({step.shape[1] if step.dim() > 1 else '?'}), got {std.numel()}"
            )
        step = step / std.reshape(1, -1, *([1] * (step.dim() - 2)))
    with torch.no_grad():
        return msp(model(inputs.detach() - epsilon * step), t)
