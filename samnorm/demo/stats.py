"""Statistics of the demo and the ablation: means over seeds and paired differences with intervals.

Arms fine-tuned with the same seed see the same batches and pseudo-OOD images, so the difference of
two arms is taken seed by seed (paired) and summarised by its mean and a confidence interval: the
Student-t interval of the mean of the paired differences (:func:`t_interval`) and, as a check that
needs no normality, the percentile bootstrap of the same mean (:func:`bootstrap_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["bootstrap_interval", "differences", "mean_std", "paired", "t_interval"]


def t_interval(values: Sequence[float] | npt.NDArray[np.float64], level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` and its two-sided Student-t confidence interval (NaN bounds for one value).

    Example:
        >>> r = t_interval([1.0, 2.0, 3.0])
        >>> round(r["mean"], 3), round(r["low"], 3), round(r["high"], 3)
        (2.0, -0.484, 4.484)
    """
    from scipy.stats import t as student

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean, n = float(x.mean()), len(x)
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "sd": 0.0, "n": n}
    sd = float(x.std(ddof=1))
    half = float(student.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Mean of ``values`` and the percentile-bootstrap interval of the mean (resampling with replacement).

    Example:
        >>> r = bootstrap_interval([0.1, 0.2, 0.3, 0.4])
        >>> 0.1 <= r["low"] <= r["mean"] <= r["high"] <= 0.4
        True
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": len(x)}


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """``a - b`` run by run (runs in the same order, e.g. the same seeds), with :func:`t_interval`.

    Example:
        >>> paired([3.0, 4.0], [1.0, 2.0])["mean"]
        2.0
    """
    if len(a) != len(b):
        raise ValueError(f"paired runs need as many values on each side, got {len(a)} and {len(b)}")
    return t_interval(np.subtract(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)), level)


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, (*prefix, str(k)))
    else:
        yield prefix, float(tree)


def _set_leaf(tree: dict[str, Any], path: tuple[str, ...], value: float) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def mean_std(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Element-wise mean and sample standard deviation (ddof=1; 0 for one run) of nested dicts.

    Example:
        >>> mean_std([{"a": 1.0}, {"a": 3.0}])
        ({'a': 2.0}, {'a': 1.4142135623730951})
    """
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    columns = [dict(_leaves(r)) for r in runs]
    for path in columns[0]:
        values = np.array([c[path] for c in columns], dtype=np.float64)
        _set_leaf(mean, path, float(values.mean()))
        _set_leaf(std, path, float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return mean, std


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> float:
    for key in path:
        tree = tree[key]
    return float(tree)  # type: ignore[arg-type]


def differences(report: Mapping[str, Any], level: float = 0.95) -> dict[str, Any]:
    """Paired differences of a demo report: each arm minus SGD and minus the pretrained model.

    For every scorer's average FPR95 and AUROC, and the ID accuracy: ``{arm: {"vs_sgd": {...},
    "vs_pretrained": {...}}}``, each entry a :func:`t_interval` over the seeds (against SGD, seed by
    seed; against the pretrained model, one fixed value, the interval is that of the arm's mean).
    """
    arms = report["arms"]
    out: dict[str, Any] = {}
    paths = {s: {m: ("metrics", s, "average", m) for m in ("FPR95", "AUROC")} for s in report["pretrained"]["metrics"]}
    for arm, res in arms.items():
        seeds = list(res["seeds"])
        out[arm] = {}
        for other in ("pretrained", "sgd"):
            if other == arm or (other == "sgd" and other not in arms):
                continue

            def diff(path: Sequence[str]) -> dict[str, float]:
                mine = [_get(res["seeds"][s], path) for s in seeds]
                ref = (
                    [_get(arms["sgd"]["seeds"][s], path) for s in seeds]
                    if other == "sgd"
                    else [_get(report["pretrained"], path)] * len(seeds)
                )
                return paired(mine, ref, level)

            cmp: dict[str, Any] = {s: {m: diff(p) for m, p in ms.items()} for s, ms in paths.items()}
            cmp["id_accuracy"] = diff(("id_accuracy",))
            out[arm][f"vs_{other}"] = cmp
    return out
