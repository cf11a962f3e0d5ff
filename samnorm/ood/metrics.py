"""OOD detection metrics: AUROC, FPR at a TPR, AUPR-In and AUPR-Out, under named conventions.

Scores follow samnorm's convention: **higher = more in-distribution**. Every function takes the ID
scores and the OOD scores as two 1-D arrays or tensors (any real dtype, computed in float64) and
runs in O(n log n): both sets are sorted once and every count comes from a binary search, so
ties are handled exactly (equal scores enter the curves together, and count half in the AUROC).

The field reports these numbers under different conventions (see :class:`Convention`); the
defaults agree with scikit-learn to rounding: ``auroc`` with ``roc_auc_score``, ``fpr_at_tpr``
with the first point of ``roc_curve(drop_intermediate=False)`` whose TPR reaches ``tpr`` (ID
positive), ``aupr_in`` / ``aupr_out`` with ``average_precision_score``. The OpenOOD conventions
read the FPR on ``roc_curve``'s default curve (``drop_intermediate=True``), as OpenOOD does.

NaN scores are always rejected; ``+-inf`` scores too (a ``ValueError``, as scikit-learn does),
unless ``allow_inf=True``: then they rank above / below every finite score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "CONVENTIONS",
    "Convention",
    "OODMetrics",
    "aupr_in",
    "aupr_out",
    "auroc",
    "check_tpr",
    "fpr_at_tpr",
    "ood_metrics",
    "resolve_convention",
]

Scores = np.ndarray | torch.Tensor | Sequence[float]
Positive = Literal["id", "ood"]
Point = Literal["first", "closest"]
AuprMethod = Literal["average_precision", "trapezoid"]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_drop(point: str, drop_intermediate: Any) -> None:
    if not isinstance(drop_intermediate, bool):
        raise TypeError(f"drop_intermediate must be True or False, got {drop_intermediate!r}")
    if drop_intermediate and point != "first":
        raise ValueError("drop_intermediate=True goes with point='first' (roc_curve's first point)")


@dataclass(frozen=True)
class Convention:
    """How a table's FPR and AUPR are defined (the AUROC is the same under all of them).

    - ``positive``: the class whose TPR is fixed for the FPR. ``"id"``: FPR = fraction of OOD
      samples accepted when a fraction ``tpr`` of ID samples is kept. ``"ood"``: FPR = fraction of
      ID samples rejected when a fraction ``tpr`` of OOD samples is caught.
    - ``point``: ``"first"`` ROC point whose TPR is ``>= tpr`` (scikit-learn, OpenOOD,
      pytorch-ood), or the ``"closest"`` point to ``tpr`` (the ``fpr_and_fdr_at_recall`` of the
      GradNorm/RankFeat code; among equally close points the one with the higher TPR).
    - ``aupr``: ``"average_precision"`` (step-wise, scikit-learn's ``average_precision_score``,
      RankFeat code) or ``"trapezoid"`` (``sklearn.metrics.auc(recall, precision)`` over
      ``precision_recall_curve``, as OpenOOD and pytorch-ood).
    - ``drop_intermediate`` (with ``point="first"``): search the first point among those
      ``sklearn.metrics.roc_curve`` keeps by default (``drop_intermediate=True`` drops points in
      the middle of a straight segment), as OpenOOD does. It only matters under ties: when a
      run of tied scores makes the segment through the point reaching ``tpr`` straight, the
      point is dropped and the FPR is read at the segment's end (a higher FPR). Without ties
      every segment is vertical or horizontal and the FPR is the same.

    Example:
        >>> CONVENTIONS["pytorch_ood"].positive
        'ood'
        >>> Convention("mine", point="closest").describe()
        'mine: ID positive, FPR at the ROC point closest to the target TPR, AUPR = average precision'
    """

    name: str
    positive: Positive = "id"
    point: Point = "first"
    aupr: AuprMethod = "average_precision"
    drop_intermediate: bool = False

    def __post_init__(self) -> None:
        _check_choice("positive", self.positive, ("id", "ood"))
        _check_choice("point", self.point, ("first", "closest"))
        _check_choice("aupr", self.aupr, ("average_precision", "trapezoid"))
        _check_drop(self.point, self.drop_intermediate)

    def describe(self) -> str:
        """One line naming the convention, for table captions."""
        point = (
            "the first ROC point whose TPR reaches the target"
            if self.point == "first"
            else ("the ROC point closest to the target TPR")
        )
        if self.drop_intermediate:
            point += " (among the points roc_curve keeps by default)"
        aupr = "average precision" if self.aupr == "average_precision" else "trapezoid rule"
        return f"{self.name}: {self.positive.upper()} positive, FPR at {point}, AUPR = {aupr}"


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention("samnorm", "id", "first", "average_precision"),
        Convention("openood_v1.5", "id", "first", "trapezoid", drop_intermediate=True),
        Convention("openood", "ood", "first", "trapezoid", drop_intermediate=True),
        Convention("pytorch_ood", "ood", "first", "trapezoid"),
        Convention("rankfeat", "id", "closest", "average_precision"),
    )
}
"""Named conventions. ``"samnorm"`` is the default everywhere."""


def _as_scores(scores: Scores, name: str, allow_inf: bool = False) -> np.ndarray:
    """Validated float64 copy (or view) of a 1-D score vector."""
    if isinstance(scores, torch.Tensor):
        if scores.is_complex():
            raise TypeError(f"{name} must be real-valued, got a complex tensor")
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(scores)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be real numbers, got an array of dtype {arr.dtype}")
        arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one score per sample), got shape {arr.shape}; "
            "pass scores.reshape(-1) if every entry is a sample"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty: the metrics need at least one ID and one OOD score")
    nan = np.isnan(arr)
    if nan.any():
        raise ValueError(
            f"{name} contains {int(nan.sum())} NaN scores (first at index {int(nan.argmax())}); "
            "fix the scorer or drop those samples"
        )
    if not allow_inf:
        inf = np.isinf(arr)
        if inf.any():
            raise ValueError(
                f"{name} contains {int(inf.sum())} infinite scores (first at index {int(inf.argmax())}): a scorer "
                "overflowed (e.g. a tiny temperature); fix the scorer, or, calling the metrics from Python, pass "
                "allow_inf=True if +-inf scores are meant (they rank above / below every finite score)"
            )
    return arr


class _Sorted:
    """ID and OOD scores sorted ascending, once, for all metrics of one comparison."""

    def __init__(self, id_scores: Scores, ood_scores: Scores, allow_inf: bool = False) -> None:
        self.id = np.sort(_as_scores(id_scores, "id_scores", allow_inf))
        self.ood = np.sort(_as_scores(ood_scores, "ood_scores", allow_inf))

    def oriented(self, positive: Positive) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives), ascending, with higher = more positive."""
        _check_choice("positive", positive, ("id", "ood"))
        if positive == "id":
            return self.id, self.ood
        # OOD positive: the outlier score is -score; negating reverses the order
        return -self.ood[::-1], -self.id[::-1]


def _groups(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and size of each run of equal values in an ascending array."""
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    sizes = np.diff(np.r_[starts, pos.size])
    return starts, sizes


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    # P(pos > neg) + P(pos == neg) / 2 = 1 - (sum_j left_j + right_j) / (2 n_pos n_neg), where
    # left/right count the positives below / not above each negative; int64 sums are exact
    left = np.searchsorted(pos, neg, "left").sum(dtype=np.int64)
    right = np.searchsorted(pos, neg, "right").sum(dtype=np.int64)
    return 1.0 - float(left + right) / (2.0 * pos.size * neg.size)


def _first_tpr_count(n_pos: int, tpr: float) -> int:
    """Smallest k with k / n_pos >= tpr, by the same float64 division as scikit-learn."""
    k = min(max(int(np.ceil(tpr * n_pos)), 0), n_pos)
    while k > 0 and (k - 1) / n_pos >= tpr:
        k -= 1
    while k / n_pos < tpr:
        k += 1
    return k


def _fpr_first(pos: np.ndarray, neg: np.ndarray, tpr: float) -> float:
    k = _first_tpr_count(pos.size, tpr)
    if k == 0:  # the ROC curve's first point (0, 0) already has TPR >= tpr
        return 0.0
    # TPR first reaches tpr at the threshold of the k-th largest positive; FP = negatives >= it
    threshold = pos[pos.size - k]
    return float(neg.size - np.searchsorted(neg, threshold, "left")) / neg.size


def _fpr_first_kept(pos: np.ndarray, neg: np.ndarray, tpr: float) -> float:
    # sklearn's roc_curve: one point per distinct score (descending), then, by default, every
    # point where neither count changes its step (second difference zero) is dropped, except
    # the ends; (0, 0) is prepended and the first point with TPR >= tpr is read
    values = np.unique(np.concatenate([pos, neg]))[::-1]
    tps = (pos.size - np.searchsorted(pos, values, "left")).astype(np.float64)
    fps = (neg.size - np.searchsorted(neg, values, "left")).astype(np.float64)
    if values.size > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps = tps[keep], fps[keep]
    tpr_curve, fpr_curve = np.r_[0.0, tps] / pos.size, np.r_[0.0, fps] / neg.size
    return float(fpr_curve[np.argmax(tpr_curve >= tpr)])


def _fpr_closest(pos: np.ndarray, neg: np.ndarray, tpr: float) -> float:
    # The reference (fpr_and_fdr_at_recall) walks the distinct thresholds down to the first with
    # full recall and takes the last one at minimal |recall - tpr|. Among thresholds sharing a
    # recall (a positive score group g and the negative-only thresholds below it) that is the one
    # just above the next lower positive group, so FP = negatives > that group's score.
    starts, _ = _groups(pos)
    values = pos[starts]
    n_neg = neg.size
    recall = (pos.size - starts) / pos.size  # per group, ascending score = descending recall
    distance = np.abs(recall - tpr)
    best = int(np.argmin(distance))  # first minimum = highest recall, as the reference
    if best == 0:  # lowest group: full recall, reached at its own threshold
        fp = n_neg - np.searchsorted(neg, values[0], "left")
    else:
        fp = n_neg - np.searchsorted(neg, values[best - 1], "right")
    # thresholds above every positive (recall 0) exist when some negative beats the top positive
    if neg[-1] > values[-1] and tpr < distance[best]:
        fp = n_neg - np.searchsorted(neg, values[-1], "right")
    return float(fp) / n_neg


def _aupr(pos: np.ndarray, neg: np.ndarray, method: AuprMethod) -> float:
    _check_choice("method", method, ("average_precision", "trapezoid"))
    starts, sizes = _groups(pos)
    values = pos[starts]
    tp = (pos.size - starts).astype(np.float64)  # positives >= group score
    fp = (neg.size - np.searchsorted(neg, values, "left")).astype(np.float64)
    precision = tp / (tp + fp)
    if method == "average_precision":
        # recall only moves at positive groups: AP = sum_g (size_g / P) * precision_g
        return float(np.dot(sizes, precision) / pos.size)
    # trapezoid from the PR point just above each group (or the curve's start (recall 0,
    # precision 1) above everything) to the group's own point
    tp_above = tp - sizes
    fp_above = (neg.size - np.searchsorted(neg, values, "right")).astype(np.float64)
    total_above = tp_above + fp_above
    precision_above = np.divide(tp_above, total_above, out=np.ones_like(tp), where=total_above > 0)
    return float(np.dot(sizes, precision + precision_above) / (2.0 * pos.size))


def check_tpr(tpr: float) -> float:
    """``tpr`` as a float; ``ValueError`` unless a fraction in [0, 1].

    Example:
        >>> check_tpr(0.95)
        0.95
    """
    tpr = float(tpr)
    if not 0.0 <= tpr <= 1.0:
        raise ValueError(f"tpr must be a fraction in [0, 1] (0.95 for FPR95), got {tpr}")
    return tpr


def _fpr(data: _Sorted, tpr: float, positive: Positive, point: Point, drop_intermediate: bool = False) -> float:
    _check_choice("point", point, ("first", "closest"))
    _check_drop(point, drop_intermediate)
    pos, neg = data.oriented(positive)
    fpr = _fpr_closest if point == "closest" else _fpr_first_kept if drop_intermediate else _fpr_first
    return fpr(pos, neg, check_tpr(tpr))


def auroc(id_scores: Scores, ood_scores: Scores, *, allow_inf: bool = False) -> float:
    """Area under the ROC curve: P(ID score > OOD score), ties counting half.

    The same under every convention (and equal to ``roc_auc_score`` with ID as class 1).

    Example:
        >>> auroc([3.0, 2.0, 1.0], [1.0, 0.0])
        0.9166666666666666
    """
    data = _Sorted(id_scores, ood_scores, allow_inf)
    return _auroc(data.id, data.ood)


def fpr_at_tpr(
    id_scores: Scores,
    ood_scores: Scores,
    tpr: float = 0.95,
    *,
    positive: Positive = "id",
    point: Point = "first",
    drop_intermediate: bool = False,
    allow_inf: bool = False,
) -> float:
    """False positive rate where the true positive rate reaches ``tpr`` (FPR95 by default).

    Default: ID positive, the first ROC point with TPR >= ``tpr``, i.e. the fraction of OOD
    samples still accepted when ``tpr`` of the ID samples are kept (``roc_curve`` of
    scikit-learn with ``drop_intermediate=False``). ``positive="ood"`` swaps the roles (the
    fraction of ID samples rejected when ``tpr`` of the OOD samples are caught: OpenOOD main,
    pytorch-ood); ``point="closest"`` takes the ROC point closest to ``tpr`` (RankFeat code).
    ``drop_intermediate=True`` searches only the points ``roc_curve`` keeps by default, as
    OpenOOD (see :class:`Convention`; it differs only under ties).

    Example:
        >>> fpr_at_tpr([5.0, 4.0, 3.0, 2.0], [4.5, 1.0], tpr=1.0)
        0.5
        >>> fpr_at_tpr([5.0, 4.0, 3.0, 2.0], [4.5, 1.0], tpr=1.0, positive="ood")
        0.75
        >>> ties = [2.0, 1.0, 0.0], [2.0, 1.0, 2.0, 0.0]
        >>> fpr_at_tpr(*ties, tpr=0.5), fpr_at_tpr(*ties, tpr=0.5, drop_intermediate=True)
        (0.75, 1.0)
    """
    return _fpr(_Sorted(id_scores, ood_scores, allow_inf), tpr, positive, point, drop_intermediate)


def aupr_in(
    id_scores: Scores, ood_scores: Scores, *, method: AuprMethod = "average_precision", allow_inf: bool = False
) -> float:
    """Area under the precision-recall curve with ID as the positive class (AUPR-In).

    ``method="average_precision"`` equals ``average_precision_score``; ``"trapezoid"`` equals
    ``sklearn.metrics.auc(recall, precision)`` over ``precision_recall_curve`` (OpenOOD,
    pytorch-ood).

    Example:
        >>> aupr_in([3.0, 1.0], [2.0, 0.0])
        0.8333333333333333
    """
    data = _Sorted(id_scores, ood_scores, allow_inf)
    return _aupr(*data.oriented("id"), method)


def aupr_out(
    id_scores: Scores, ood_scores: Scores, *, method: AuprMethod = "average_precision", allow_inf: bool = False
) -> float:
    """Area under the precision-recall curve with OOD as the positive class, scored by ``-score``.

    Example:
        >>> aupr_out([3.0, 1.0], [2.0, 0.0])
        0.8333333333333333
    """
    data = _Sorted(id_scores, ood_scores, allow_inf)
    return _aupr(*data.oriented("ood"), method)


@dataclass(frozen=True)
class OODMetrics:
    """All metrics of one ID-vs-OOD comparison, with the convention they were computed under.

    Example:
        >>> m = ood_metrics([3.0, 2.0, 1.0], [1.5, 0.0])
        >>> m.as_dict()["AUROC"], m.convention.name
        (0.8333333333333334, 'samnorm')
    """

    fpr: float
    auroc: float
    aupr_in: float
    aupr_out: float
    tpr: float
    convention: Convention
    n_id: int
    n_ood: int

    @property
    def fpr_name(self) -> str:
        """Column name of the FPR, e.g. ``"FPR95"`` for ``tpr=0.95``."""
        return f"FPR{self.tpr * 100:g}"

    def as_dict(self) -> dict[str, float]:
        """``{"FPR95": ..., "AUROC": ..., "AUPR-In": ..., "AUPR-Out": ...}`` as fractions."""
        return {
            self.fpr_name: self.fpr,
            "AUROC": self.auroc,
            "AUPR-In": self.aupr_in,
            "AUPR-Out": self.aupr_out,
        }


def resolve_convention(convention: str | Convention) -> Convention:
    """A :class:`Convention` by name (or as given); ``ValueError`` naming the choices otherwise.

    Example:
        >>> resolve_convention("rankfeat").point
        'closest'
    """
    if isinstance(convention, Convention):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {sorted(CONVENTIONS)} or a Convention")
    return CONVENTIONS[convention]


def ood_metrics(
    id_scores: Scores,
    ood_scores: Scores,
    *,
    tpr: float = 0.95,
    convention: str | Convention = "samnorm",
    allow_inf: bool = False,
) -> OODMetrics:
    """FPR at ``tpr``, AUROC, AUPR-In and AUPR-Out in one pass (the scores are sorted once).

    ``convention`` is a name from :data:`CONVENTIONS` (``"samnorm"``, ``"openood_v1.5"``,
    ``"openood"``, ``"pytorch_ood"``, ``"rankfeat"``) or a :class:`Convention`.

    Example:
        >>> m = ood_metrics([3.0, 2.0, 1.0], [1.5, 0.0], convention="pytorch_ood")
        >>> round(m.fpr, 3), m.fpr_name
        (0.333, 'FPR95')
    """
    conv = resolve_convention(convention)
    data = _Sorted(id_scores, ood_scores, allow_inf)
    return OODMetrics(
        fpr=_fpr(data, tpr, conv.positive, conv.point, conv.drop_intermediate),
        auroc=_auroc(data.id, data.ood),
        aupr_in=_aupr(*data.oriented("id"), conv.aupr),
        aupr_out=_aupr(*data.oriented("ood"), conv.aupr),
        tpr=float(tpr),
        convention=conv,
        n_id=int(data.id.size),
        n_ood=int(data.ood.size),
    )
