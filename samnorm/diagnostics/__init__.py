"""Diagnostics: see why fine-tuning works on your own model and data.

- :mod:`samnorm.diagnostics.quantities`: per-sample FC-layer gradient norm, max logit and scorer scores
  for ID and OOD loaders, and their distribution summaries (AUROC, overlap, histograms).
- :mod:`samnorm.diagnostics.theory`: estimates of L and M, the terms of the appendix's eq. 12, and a
  SAM-ON run that puts measured loss / energy changes next to eq. 12 / eq. 15.
- ``samnorm diagnose`` (:mod:`samnorm.diagnostics.cli`): plots and a JSON summary in one command;
  :func:`write_report` writes the same files from result dicts computed in a script.

Example:
    >>> from samnorm.diagnostics import collect_sets, summarize                  # doctest: +SKIP
    >>> results = collect_sets(model, id_loader, {"textures": textures_loader})  # doctest: +SKIP
    >>> summarize(results)["max_logit"]["sets"]["textures"]["auroc"]           # doctest: +SKIP
"""

from samnorm.diagnostics.cli import write_report
from samnorm.diagnostics.quantities import (
    collect,
    collect_sets,
    fc_grad_norm,
    histograms,
    max_logit,
    overlap_coefficient,
    per_sample_quantities,
    summarize,
)
from samnorm.diagnostics.theory import (
    Eq12Bound,
    PowerIteration,
    StepReport,
    estimate_M,
    estimate_smoothness,
    hessian_spectral_norm,
    per_sample_grad_sq_norms,
    sam_on_bound_check,
)

__all__ = [
    "collect",
    "collect_sets",
    "fc_grad_norm",
    "histograms",
    "max_logit",
    "overlap_coefficient",
    "per_sample_quantities",
    "summarize",
    "Eq12Bound",
    "PowerIteration",
    "StepReport",
    "estimate_M",
    "estimate_smoothness",
    "hessian_spectral_norm",
    "per_sample_grad_sq_norms",
    "sam_on_bound_check",
    "write_report",
]
