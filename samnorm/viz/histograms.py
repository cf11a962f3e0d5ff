"""Comparing samples of a per-sample quantity (scores, gradient norms): checked 1-D arrays, the
overlap coefficient of two samples and histograms on shared edges.

Used by the diagnostics (:mod:`samnorm.diagnostics`) and the figures (:mod:`samnorm.viz.plots`);
imports nothing else of samnorm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["finite_1d", "histograms", "overlap_coefficient"]


def finite_1d(values: Any, what: str = "values") -> np.ndarray:
    """``values`` (a sequence, numpy array or tensor) as a float64 1-D array; ``ValueError`` naming
    ``what`` if it is empty, not 1-D, or holds NaN/inf.

    Example:
        >>> finite_1d([1, 2])
        array([1., 2.])
    """
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains {int((~np.isfinite(array)).sum())} NaN/inf values; drop them first")
    return array


def _shared_edges(arrays: Iterable[np.ndarray], bins: int) -> np.ndarray:
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    arrays = list(arrays)
    low = min(float(a.min()) for a in arrays)
    high = max(float(a.max()) for a in arrays)
    if high == low:  # all values equal: one bin around them
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, int(bins) + 1)


def _rice_bins(n: int) -> int:
    """Rice's rule ``ceil(2 n^(1/3))``, within [5, 200]: enough bins for the sample, not more."""
    return int(min(200, max(5, math.ceil(2 * n ** (1 / 3)))))


def overlap_coefficient(a: Any, b: Any, *, bins: int | None = None) -> float:
    """Overlap of two empirical distributions, ``sum_bins min(P_a(bin), P_b(bin))``, in [0, 1].

    Both samples are binned on the same equal-width bins spanning their union; 1 means the
    histograms coincide, 0 that they share no bin. It estimates ``integral min(f_a, f_b)``. The estimate
    depends on the bins (too many bins for the sample size drive it towards 0): ``bins=None`` takes
    Rice's rule ``ceil(2 n^(1/3))`` on the smaller sample (5 to 200 bins), so two comparisons with the
    same sample sizes use the same bins; pass ``bins`` to fix them.

    Example:
        >>> overlap_coefficient([0.0, 1.0], [0.0, 1.0])
        1.0
    """
    a, b = finite_1d(a, "a"), finite_1d(b, "b")
    edges = _shared_edges((a, b), _rice_bins(min(a.size, b.size)) if bins is None else bins)
    fa = np.histogram(a, edges)[0] / a.size
    fb = np.histogram(b, edges)[0] / b.size
    return float(np.minimum(fa, fb).sum())


def histograms(values: Mapping[str, Any], *, bins: int = 50) -> dict[str, Any]:
    """Histograms of several samples on shared edges: ``{"edges": [...], "counts": {name: [...]}}``.

    Example:
        >>> h = histograms({"ID": [0.0, 1.0], "OOD": [0.5]}, bins=2)
        >>> h["counts"]
        {'ID': [1, 1], 'OOD': [0, 1]}
    """
    arrays = {name: finite_1d(v, f"values[{name!r}]") for name, v in values.items()}
    if not arrays:
        raise ValueError("values is empty")
    edges = _shared_edges(arrays.values(), bins)
    return {
        "edges": edges.tolist(),
        "counts": {name: np.histogram(a, edges)[0].tolist() for name, a in arrays.items()},
    }
