"""Per-sample quantities behind the paper's figures, and summaries of their distributions.

The appendix (figures 3-14) compares, for ID and OOD data, before and after fine-tuning: the scores of
post-hoc OOD scorers, the norm of the FC-layer gradient and the maximum logit. This module computes
them for any classifier that :class:`samnorm.ood.ModelAdapter` can split into features and a linear
head, and summarises each quantity per OOD set (AUROC, overlap coefficient, histograms).

Results are plain nested dicts, ``results[set_name][quantity] -> 1-D numpy array``, so that the plots
(:mod:`samnorm.viz.plots`), the JSON summary and user code all read the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samnorm.ood.adapter import ModelAdapter  # the OOD toolkit owns the feature/head split
from samnorm.ood.metrics import auroc  # one AUROC for the whole library (ties count half)
from samnorm.ood.scores import check_temperature, head_grad_norm, max_logit  # max_logit re-exported
from samnorm.utils.nn import batches, eval_mode
from samnorm.viz.histograms import finite_1d, histograms, overlap_coefficient  # re-exported

__all__ = [
    "Target",
    "collect",
    "collect_sets",
    "fc_grad_norm",
    "histograms",
    "max_logit",
    "overlap_coefficient",
    "per_sample_quantities",
    "summarize",
]

Target = Literal["label", "pred", "uniform"]
"""The class the gradient-norm loss uses: the label, the prediction (eq. 13) or uniform (GradNorm's loss)."""
#: A scorer: a callable ``inputs -> (B,) scores`` or an object with ``score(inputs)`` (samnorm.ood).
Scorer = Callable[[Tensor], Tensor] | Any
Results = Mapping[str, Mapping[str, Any]]

_TARGETS = ("label", "pred", "uniform")


def _linear_weight_bias(fc: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(K, D) weight and (K,) bias of a linear head: nn.Linear or a 1x1 convolution (BiT heads)."""
    weight = getattr(fc, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"fc must be a linear layer with a .weight tensor (nn.Linear or a 1x1 nn.Conv2d), got {type(fc).__name__}"
        )
    if isinstance(fc, nn.Conv2d):
        if fc.kernel_size != (1, 1) or fc.groups != 1:
            raise TypeError(
                f"fc is a Conv2d with kernel {fc.kernel_size} and groups={fc.groups}; only a 1x1, "
                "groups=1 convolution is a linear head"
            )
        weight = weight.flatten(1)
    elif weight.dim() != 2:
        raise TypeError(f"fc.weight must be 2-D (K, D), got shape {tuple(weight.shape)}")
    bias = getattr(fc, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


def _target_distribution(logits: Tensor, target: Target | Tensor, labels: Tensor | None) -> Tensor:
    """(B, K) target distribution t of the cross-entropy whose FC gradient is measured."""
    batch, classes = logits.shape
    if isinstance(target, Tensor):
        if target.dim() == 1:
            labels, target = target, "label"
        elif target.shape == logits.shape and target.is_floating_point():
            return target.to(logits.dtype)
        else:
            raise ValueError(
                f"a target tensor must be (B,) class indices or a (B, K) = {tuple(logits.shape)} "
                f"float distribution, got shape {tuple(target.shape)}"
            )
    if target == "uniform":
        return torch.full_like(logits, 1.0 / classes)
    if target == "pred":
        return F.one_hot(logits.argmax(dim=1), classes).to(logits.dtype)
    if target == "label":
        if labels is None:
            raise ValueError("target='label' needs labels=; pass them or use target='pred'")
        labels = torch.as_tensor(labels, device=logits.device)
        if labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(f"labels must be ({batch},) integers, got {labels.dtype} {tuple(labels.shape)}")
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(
                f"labels must lie in [0, {classes}), got range [{int(labels.min())}, {int(labels.max())}]; "
                "OOD folders have no valid class labels: use target='pred' or 'uniform' for them"
            )
        return F.one_hot(labels.long(), classes).to(logits.dtype)
    raise ValueError(f"target must be one of {_TARGETS} or a tensor, got {target!r}")


def fc_grad_norm(
    features: Tensor,
    fc: nn.Module,
    *,
    target: Target | Tensor = "pred",
    labels: Tensor | None = None,
    p: float = 2.0,
    include_bias: bool = True,
    temperature: float = 1.0,
) -> Tensor:
    """Per-sample norm of the gradient of the cross-entropy w.r.t. the final linear layer, vectorised.

    For sample ``i`` with features ``h_i``, logits ``z_i = W h_i + b``, ``q_i = softmax(z_i / T)`` and
    target distribution ``t_i``, the gradient of ``CE(z_i / T, t_i)`` is ``dW = (q_i - t_i) h_i^T / T``
    and ``db = (q_i - t_i) / T``: a rank-one matrix, so its entry-wise ``p``-norm is
    ``||q_i - t_i||_p * (||h_i||_p^p + 1)^(1/p) / T`` (the ``+ 1`` is the bias column). No backward pass:
    :func:`samnorm.ood.scores.head_grad_norm`, the formula of the GradNorm scorer too.

    Targets: ``"label"`` (CE with ``labels``), ``"pred"`` (CE with the predicted class, the loss of the
    appendix's eq. 13), ``"uniform"`` (KL(uniform || softmax), the loss of GradNorm), or a tensor of
    class indices ``(B,)`` or distributions ``(B, K)``. GradNorm's score is
    ``fc_grad_norm(h, fc, target="uniform", p=1, include_bias=False)``. ``p=2`` (default) is the
    Frobenius norm of Assumption 2.

    Example:
        >>> fc = torch.nn.Linear(4, 3)
        >>> fc_grad_norm(torch.randn(5, 4), fc, target="uniform", p=1).shape
        torch.Size([5])
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(
            f"features must be a (B, D) tensor of penultimate features, got "
            f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}"
        )
    weight, bias = _linear_weight_bias(fc)
    if features.shape[1] != weight.shape[1]:
        raise ValueError(f"features have D={features.shape[1]} but fc expects {weight.shape[1]} inputs")
    check_temperature(temperature)  # before the target: a bad argument is named first
    if not (p >= 1):
        raise ValueError(f"p must be >= 1 (a norm), got {p}")
    with torch.no_grad():
        dtype = torch.promote_types(weight.dtype, torch.float32)  # no fp16/bf16 softmax differences
        h = features.to(dtype)
        logits = F.linear(h, weight.to(dtype), None if bias is None else bias.to(dtype))
        t = _target_distribution(logits, target, labels)
        return head_grad_norm(
            h, logits, t, p=p, include_bias=include_bias and bias is not None, temperature=temperature
        )


def _adapter(model: Any) -> Any:
    """A feature/head split of ``model``: a ModelAdapter as is, else ``ModelAdapter.from_model``."""
    if all(hasattr(model, name) for name in ("features_and_logits", "fc")):
        return model
    return ModelAdapter.from_model(model)


def _score(scorer: Scorer, inputs: Tensor, features: Tensor, logits: Tensor) -> Tensor:
    """One scorer's ``(B,)`` scores, from the shared forward pass when the scorer can use it."""
    if getattr(scorer, "uses_outputs", False) and hasattr(scorer, "score_outputs"):
        scores = scorer.score_outputs(features, logits)  # samnorm.ood scorers: no second forward
    else:
        fn = getattr(scorer, "score", scorer)
        if not callable(fn):
            raise TypeError(f"a scorer must be callable or have .score(inputs), got {type(scorer).__name__}")
        scores = fn(inputs)
    scores = torch.as_tensor(scores).detach()
    if scores.dim() != 1 or scores.shape[0] != inputs.shape[0]:
        raise ValueError(f"scorer returned shape {tuple(scores.shape)}, expected ({inputs.shape[0]},)")
    return scores


def per_sample_quantities(
    model: Any,
    inputs: Tensor,
    *,
    labels: Tensor | None = None,
    scorers: Mapping[str, Scorer] | None = None,
    target: Target = "pred",
    p: float = 2.0,
    include_bias: bool = True,
) -> dict[str, Tensor]:
    """FC gradient norm, max logit and each scorer's score for one batch (one forward pass).

    ``model`` is a classifier that :meth:`samnorm.ood.ModelAdapter.from_model` recognises, or a
    ModelAdapter. Scorers are :mod:`samnorm.ood` scorers (those that score from features and logits
    reuse this pass), objects with ``score(inputs)``, or callables ``inputs -> (B,)``. Returns
    ``{"grad_norm", "max_logit", **scorer names}``, each a ``(B,)`` float32 tensor on the CPU.

    Example:
        >>> q = per_sample_quantities(model, images, scorers={"energy": energy_scorer})  # doctest: +SKIP
        >>> sorted(q)                                                                    # doctest: +SKIP
        ['energy', 'grad_norm', 'max_logit']
    """
    reserved = {"grad_norm", "max_logit"} & set(scorers or {})
    if reserved:
        raise ValueError(f"scorer names {sorted(reserved)} clash with built-in quantities; rename them")
    adapter = _adapter(model)
    with torch.no_grad():
        features, logits = adapter.features_and_logits(inputs)
        out = {
            "grad_norm": fc_grad_norm(
                features, adapter.fc, target=target, labels=labels, p=p, include_bias=include_bias
            ),
            "max_logit": max_logit(logits),
        }
    for name, scorer in (scorers or {}).items():
        out[name] = _score(scorer, inputs, features, logits)
    return {name: value.detach().float().cpu() for name, value in out.items()}


def collect(
    model: Any,
    loader: Iterable[Any],
    *,
    scorers: Mapping[str, Scorer] | None = None,
    target: Target = "pred",
    p: float = 2.0,
    include_bias: bool = True,
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`per_sample_quantities` over a loader, concatenated into 1-D numpy arrays.

    The loader yields ``(images, labels)`` or images; ``target="label"`` uses its labels. Scorers that
    need fitting (Mahalanobis, ReAct, ...) must be fitted on ID data before. ``max_samples`` stops early.
    The model is switched to eval mode for the pass and restored afterwards.

    Example:
        >>> q = collect(model, id_loader, scorers={"msp": msp_scorer})  # doctest: +SKIP
        >>> q["grad_norm"].shape                                       # doctest: +SKIP
        (1000,)
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples}")
    adapter = _adapter(model)
    module = model if isinstance(model, nn.Module) else getattr(adapter, "model", None)
    parts: dict[str, list[Tensor]] = {}
    seen = 0
    with eval_mode(module) if isinstance(module, nn.Module) else contextlib.nullcontext():
        for inputs, labels in batches(loader):
            if max_samples is not None:
                inputs = inputs[: max_samples - seen]
                labels = None if labels is None else labels[: max_samples - seen]
            if device is not None:
                inputs = inputs.to(device)
                labels = None if labels is None else labels.to(device)
            values = per_sample_quantities(
                adapter,
                inputs,
                labels=labels if target == "label" else None,
                scorers=scorers,
                target=target,
                p=p,
                include_bias=include_bias,
            )
            for name, value in values.items():
                parts.setdefault(name, []).append(value)
            seen += inputs.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    if not seen:
        raise ValueError("the loader yielded no samples; check the folder / dataset")
    return {name: torch.cat(chunks).numpy() for name, chunks in parts.items()}


def collect_sets(
    model: Any,
    id_loader: Iterable[Any],
    ood_loaders: Mapping[str, Iterable[Any]],
    *,
    id_name: str = "ID",
    **kwargs: Any,
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`collect` for the ID loader and every OOD loader: ``results[set][quantity] -> array``.

    Keyword arguments go to :func:`collect`. With ``target="label"`` the OOD sets use the predicted
    class instead (they have no valid labels).

    Example:
        >>> results = collect_sets(model, id_loader, {"textures": tex_loader})  # doctest: +SKIP
        >>> summarize(results, id_name="ID")["max_logit"]["textures"]["auroc"]  # doctest: +SKIP
        0.87
    """
    if id_name in ood_loaders:
        raise ValueError(f"OOD set name {id_name!r} clashes with id_name; rename one of them")
    if not ood_loaders:
        raise ValueError("ood_loaders is empty: give at least one OOD set")
    results = {id_name: collect(model, id_loader, **kwargs)}
    ood_kwargs = dict(kwargs)
    if ood_kwargs.get("target") == "label":
        ood_kwargs["target"] = "pred"
    for name, loader in ood_loaders.items():
        results[name] = collect(model, loader, **ood_kwargs)
    return results


def summarize(
    results: Results,
    *,
    id_name: str = "ID",
    quantities: Iterable[str] | None = None,
    bins: int = 50,
    overlap_bins: int | None = None,
) -> dict[str, Any]:
    """Per-quantity, per-OOD-set separation of ID and OOD: a JSON-ready dict.

    ``summary[quantity]["sets"][ood] = {"auroc", "overlap", "mean", "std", "n"}`` (ID first under
    ``id_name``) and ``summary[quantity]["histogram"]``. AUROC treats ID as positive and a higher value as
    more in-distribution (the library's convention): 0.5 is no separation, below 0.5 means OOD data has
    the larger values (as the CE gradient norm often does). ``overlap`` is :func:`overlap_coefficient`
    with ``bins=overlap_bins``; ``bins`` is the number of histogram bins stored.

    Example:
        >>> s = summarize({"ID": {"max_logit": [3.0, 4.0]}, "noise": {"max_logit": [1.0, 2.0]}})
        >>> s["max_logit"]["sets"]["noise"]["auroc"]
        1.0
    """
    if id_name not in results:
        raise ValueError(f"id_name {id_name!r} is not a set of results (sets: {sorted(results)})")
    if len(results) < 2:
        raise ValueError("results need the ID set and at least one OOD set")
    id_results = results[id_name]
    names = list(id_results) if quantities is None else list(quantities)
    summary: dict[str, Any] = {}
    for quantity in names:
        per_set = {}
        for set_name, values in results.items():
            if quantity not in values:
                raise ValueError(f"set {set_name!r} has no quantity {quantity!r} (has {sorted(values)})")
            per_set[set_name] = finite_1d(values[quantity], f"results[{set_name!r}][{quantity!r}]")
        id_values = per_set[id_name]
        sets = {id_name: _moments(id_values)}
        for set_name, ood_values in per_set.items():
            if set_name == id_name:
                continue
            sets[set_name] = {
                **_moments(ood_values),
                "auroc": float(auroc(id_values, ood_values)),
                "overlap": overlap_coefficient(id_values, ood_values, bins=overlap_bins),
            }
        summary[quantity] = {"sets": sets, "histogram": histograms(per_set, bins=bins)}
    return summary


def _moments(values: np.ndarray) -> dict[str, float]:
    return {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std())}
