"""Diagnostics: see why fine-tuning works on your own model and data.

- :mod:`samnorm.diagnostics.quantities`: per-sample FC-layer gradient norm, max logit and scorer scores
  for ID and OOD loaders, and their distribution summaries (AUROC, overlap, histograms).
- :mod:`samnorm.diagnostics.theory`: estimates of L and M, the terms of the appendix's eq. 12, and a
  SAM-ON run that puts measured loss / energy changes next to eq. 12 / eq. 15.
- ``samnorm diagnose`` (:mod:`samnorm.diagnostics.cli`): plots and a JSON summary in one command;
  :func:`write_report` writes the same files from result dicts computed in a script.

Names load on first use (PEP 562): ``samnorm diagnose --help`` imports ``samnorm.diagnostics.cli``,
which must not pull in torch through this package.

Example:
    >>> from samnorm.diagnostics import collect_sets, summarize                  # doctest: +SKIP
    >>> results = collect_sets(model, id_loader, {"textures": textures_loader})  # doctest: +SKIP
    >>> summarize(results)["max_logit"]["sets"]["textures"]["auroc"]           # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from samnorm.utils.lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS = {
    **{
        name: "quantities"
        for name in (
            "collect",
            "collect_sets",
            "fc_grad_norm",
            "histograms",
            "max_logit",
            "overlap_coefficient",
            "per_sample_quantities",
            "summarize",
        )
    },
    **{
        name: "theory"
        for name in (
            "Eq12Bound",
            "PowerIteration",
            "StepReport",
            "estimate_M",
            "estimate_smoothness",
            "hessian_spectral_norm",
            "per_sample_grad_sq_norms",
            "sam_on_bound_check",
        )
    },
    "write_report": "cli",
}

__all__ = [
    "Eq12Bound",
    "PowerIteration",
    "StepReport",
    "collect",
    "collect_sets",
    "estimate_M",
    "estimate_smoothness",
    "fc_grad_norm",
    "hessian_spectral_norm",
    "histograms",
    "max_logit",
    "overlap_coefficient",
    "per_sample_grad_sq_norms",
    "per_sample_quantities",
    "sam_on_bound_check",
    "summarize",
    "write_report",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
