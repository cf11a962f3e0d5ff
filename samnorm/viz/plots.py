"""Figures of the kind in the paper's appendix, from plain arrays (matplotlib, Agg, imported lazily).

Every function takes plain data, returns a :class:`matplotlib.figure.Figure` and, with ``path=``, also
writes it as PNG (``figsize * dpi`` pixels exactly). Figures are built without pyplot, so nothing is
kept in a global figure registry and no display is needed.

Data layout shared with :mod:`samnorm.diagnostics`: ``results[set_name][quantity] -> 1-D array``, with
the ID set under ``id_name`` and every other key an OOD set. Convention: higher = more in-distribution.

- :func:`plot_distributions`: one quantity, ID vs each OOD set (appendix figures 3-7, one panel).
- :func:`plot_before_after`: the same, before vs after fine-tuning, side by side (figures 3-7).
- :func:`plot_grad_norm_max_logit`: FC gradient norm and max logit, ID vs OOD (figures 8-14).
- :func:`plot_image_grid`: a grid of images, e.g. pseudo-OOD examples (figures 1-2); from
  :mod:`samnorm.viz.figures`.
- :func:`plot_summary`: one page with every quantity and an AUROC table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from samnorm.viz.figures import new_figure, plot_image_grid, save_png  # plot_image_grid re-exported

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "QUANTITY_LABELS",
    "plot_before_after",
    "plot_distributions",
    "plot_grad_norm_max_logit",
    "plot_image_grid",
    "plot_summary",
]

QUANTITY_LABELS = {"grad_norm": "FC-layer gradient norm", "max_logit": "maximum logit"}
"""Axis labels by quantity name (the diagnostics' built-ins; add your own). Scorer names of samnorm.ood
(any case, "-" and "_" ignored) read "<Scorer> score"; other names are shown as given."""
_ID_COLOR = "#1f77b4"
_OOD_COLORS = ("#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _label(quantity: str) -> str:
    if quantity in QUANTITY_LABELS:
        return QUANTITY_LABELS[quantity]
    from samnorm.ood.detectors.registry import canonical_name

    try:
        return f"{canonical_name(quantity)} score"
    except ValueError:  # not a scorer's name: shown as given
        return quantity


def _id_label(id_name: str) -> str:
    return id_name if id_name == "ID" else f"{id_name} (ID)"


def _split_sets(values: Mapping[str, Any], id_name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from samnorm.viz.histograms import finite_1d

    if id_name not in values:
        raise ValueError(f"id_name {id_name!r} is not among the sets {sorted(values)}; pass id_name=")
    arrays = {name: finite_1d(v, f"values[{name!r}]") for name, v in values.items()}
    id_values = arrays.pop(id_name)
    if not arrays:
        raise ValueError("need at least one OOD set besides the ID set")
    return id_values, arrays


def _edges(arrays: Sequence[np.ndarray], bins: int, clip: float) -> np.ndarray:
    """Shared bin edges over the central ``1 - 2*clip`` of the pooled values (tails would squash bars)."""
    pooled = np.concatenate(arrays)
    low, high = np.quantile(pooled, [clip, 1.0 - clip]) if clip > 0 else (pooled.min(), pooled.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


def _metrics(id_values: np.ndarray, ood_values: np.ndarray) -> tuple[float, float]:
    from samnorm.ood.metrics import auroc
    from samnorm.viz.histograms import overlap_coefficient

    return float(auroc(id_values, ood_values)), overlap_coefficient(id_values, ood_values)


def _draw(
    ax: Axes,
    id_values: np.ndarray,
    ood: Mapping[str, np.ndarray],
    *,
    id_name: str,
    quantity: str,
    edges: np.ndarray,
    legend: bool = True,
) -> list[tuple[float, float]]:
    """Density histograms of ID and each OOD set on ``ax``; returns (AUROC, overlap) per OOD set."""
    metrics = []
    bins = edges.tolist()  # the same edges, as the sequence matplotlib's signature names
    id_label = f"{_id_label(id_name)}, n={id_values.size}"
    ax.hist(id_values, bins=bins, density=True, histtype="stepfilled", color=_ID_COLOR, alpha=0.35, label=id_label)
    ax.hist(id_values, bins=bins, density=True, color=_ID_COLOR, histtype="step", linewidth=1.4)
    for i, (name, values) in enumerate(ood.items()):
        color = _OOD_COLORS[i % len(_OOD_COLORS)]
        auroc, overlap = _metrics(id_values, values)
        metrics.append((auroc, overlap))
        label = f"{name}, n={values.size}: AUROC {100 * auroc:.1f}%, overlap {overlap:.2f}"
        ax.hist(values, bins=bins, density=True, histtype="stepfilled", color=color, alpha=0.25, label=label)
        ax.hist(values, bins=bins, density=True, color=color, histtype="step", linewidth=1.4)
    ax.set_xlabel(_label(quantity))
    ax.set_ylabel("density")
    if legend:  # below the axes: inside, it would hide the histograms it explains
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.grid(alpha=0.25)
    return metrics


def _title(base: str, metrics: list[tuple[float, float]]) -> str:
    auroc = float(np.mean([a for a, _ in metrics]))
    text = f"{base}: {'mean ' if len(metrics) > 1 else ''}AUROC {100 * auroc:.1f}%"
    # below 50% the quantity separates the sets the other way round: say so, it is not a failure
    return text + " (OOD larger)" if auroc < 0.5 else text


def plot_distributions(
    values: Mapping[str, Any],
    *,
    id_name: str = "ID",
    quantity: str = "score",
    title: str | None = None,
    bins: int = 60,
    clip: float = 0.001,
    figsize: tuple[float, float] = (7.0, 4.5),
    dpi: int = 100,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Distribution of one quantity on the ID set and each OOD set, with AUROC and overlap per set.

    ``values`` maps set names to 1-D arrays (ID under ``id_name``). Histograms share bins spanning the
    pooled values between the ``clip`` and ``1 - clip`` quantiles (``clip=0`` for the full range).
    The title reports the AUROC (mean over OOD sets when there are several).

    Example:
        >>> fig = plot_distributions({"ID": id_msp, "SUN": sun_msp}, quantity="msp", path="msp.png")  # doctest: +SKIP
    """
    id_values, ood = _split_sets(values, id_name)
    fig = new_figure(figsize, dpi)
    ax = fig.add_subplot()
    edges = _edges([id_values, *ood.values()], bins, clip)
    metrics = _draw(ax, id_values, ood, id_name=id_name, quantity=quantity, edges=edges)
    ax.set_title(title if title is not None else _title(_label(quantity), metrics))
    save_png(fig, path)
    return fig


def plot_before_after(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    id_name: str = "ID",
    quantity: str = "score",
    stage_names: tuple[str, str] = ("before fine-tuning", "after SAM-ON fine-tuning"),
    title: str | None = None,
    bins: int = 60,
    clip: float = 0.001,
    figsize: tuple[float, float] = (12.0, 4.5),
    dpi: int = 100,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """One quantity, ID vs OOD sets, before (left) and after (right) fine-tuning, on shared bins.

    ``before`` and ``after`` map set names to 1-D arrays, as in :func:`plot_distributions`. Each panel's
    title gives its AUROC, so the gain reads off the figure.

    Example:
        >>> plot_before_after({"ID": a0, "SUN": b0}, {"ID": a1, "SUN": b1}, quantity="energy",
        ...                   path="energy.png")  # doctest: +SKIP
    """
    id0, ood0 = _split_sets(before, id_name)
    id1, ood1 = _split_sets(after, id_name)
    if set(ood0) != set(ood1):
        raise ValueError(f"before and after must hold the same OOD sets, got {sorted(ood0)} and {sorted(ood1)}")
    fig = new_figure(figsize, dpi)
    axes = fig.subplots(1, 2, sharex=True)
    edges = _edges([id0, *ood0.values(), id1, *ood1.values()], bins, clip)
    for ax, stage, id_values, ood in zip(axes, stage_names, (id0, id1), (ood0, ood1), strict=True):
        metrics = _draw(ax, id_values, ood, id_name=id_name, quantity=quantity, edges=edges)
        ax.set_title(_title(f"{_label(quantity)}, {stage}", metrics), fontsize="medium")
    if title is not None:
        fig.suptitle(title)
    save_png(fig, path)
    return fig


def plot_grad_norm_max_logit(
    results: Mapping[str, Mapping[str, Any]],
    *,
    id_name: str = "ID",
    before: Mapping[str, Mapping[str, Any]] | None = None,
    ood_names: Sequence[str] | None = None,
    stage_names: tuple[str, str] = ("before fine-tuning", "after SAM-ON fine-tuning"),
    title: str | None = None,
    bins: int = 60,
    clip: float = 0.001,
    dpi: int = 100,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """FC-layer gradient norm (left) and max logit (right), ID vs OOD, like the appendix's figures 8-14.

    ``results[set]`` must hold ``"grad_norm"`` and ``"max_logit"`` (as :func:`samnorm.diagnostics.collect`
    returns). With ``before`` (same layout) a first row shows the model before fine-tuning, on the same
    bins. ``ood_names`` restricts the OOD sets (one figure per set, as in the paper). Figure size is
    12 x 4.5 inches per row.

    Example:
        >>> plot_grad_norm_max_logit(after, before=before, ood_names=["SUN"], path="sun.png")  # doctest: +SKIP
    """
    stages = ([(stage_names[0], before)] if before is not None else []) + [(stage_names[1], results)]
    fig = new_figure((12.0, 4.5 * len(stages)), dpi)
    axes = np.atleast_2d(fig.subplots(len(stages), 2, squeeze=False))
    for col, quantity in enumerate(("grad_norm", "max_logit")):
        per_stage = []
        for _, stage_results in stages:
            values = _select(stage_results, id_name, ood_names, quantity)
            per_stage.append(_split_sets(values, id_name))
        edges = _edges([a for id_v, ood in per_stage for a in (id_v, *ood.values())], bins, clip)
        for row, ((stage, _), (id_values, ood)) in enumerate(zip(stages, per_stage, strict=True)):
            ax = axes[row, col]
            metrics = _draw(ax, id_values, ood, id_name=id_name, quantity=quantity, edges=edges)
            label = _label(quantity) if len(stages) == 1 else f"{_label(quantity)}, {stage}"
            ax.set_title(_title(label, metrics), fontsize="medium")
    if title is not None:
        fig.suptitle(title)
    save_png(fig, path)
    return fig


def _select(
    results: Mapping[str, Mapping[str, Any]], id_name: str, ood_names: Sequence[str] | None, quantity: str
) -> dict[str, Any]:
    """``{set: results[set][quantity]}`` for the ID set and the chosen OOD sets."""
    names = [id_name, *(n for n in results if n != id_name)] if ood_names is None else [id_name, *ood_names]
    out = {}
    for name in names:
        if name not in results:
            raise ValueError(f"no set {name!r} in results (sets: {sorted(results)})")
        if quantity not in results[name]:
            raise ValueError(f"set {name!r} has no {quantity!r} (has {sorted(results[name])})")
        out[name] = results[name][quantity]
    return out


def plot_summary(
    results: Mapping[str, Mapping[str, Any]],
    *,
    id_name: str = "ID",
    before: Mapping[str, Mapping[str, Any]] | None = None,
    quantities: Sequence[str] | None = None,
    stage_names: tuple[str, str] = ("before fine-tuning", "after SAM-ON fine-tuning"),
    title: str = "OOD diagnostics",
    bins: int = 50,
    clip: float = 0.001,
    dpi: int = 100,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """One page: a row per quantity (ID vs all OOD sets; before | after columns) and an AUROC table.

    ``quantities`` defaults to every quantity of the ID set. The page is 8.5 inches wide per column
    (one or two) and 2.6 inches high per quantity plus the table.

    Example:
        >>> plot_summary(after, before=before, path="summary.png")  # doctest: +SKIP
    """
    names = list(results[id_name]) if quantities is None and id_name in results else list(quantities or [])
    if not names:
        raise ValueError(f"no quantities to plot: results[{id_name!r}] is missing or empty")
    stages = ([(stage_names[0], before)] if before is not None else []) + [(stage_names[1], results)]
    ood_names = [n for n in results if n != id_name]
    table_inches = 0.6 + 0.25 * len(names) * len(stages)
    fig = new_figure((8.5 * len(stages), 2.6 * len(names) + table_inches), dpi)
    grid = fig.add_gridspec(len(names) + 1, len(stages), height_ratios=[2.6] * len(names) + [table_inches])
    rows = []
    for r, quantity in enumerate(names):
        per_stage = [_split_sets(_select(res, id_name, ood_names, quantity), id_name) for _, res in stages]
        edges = _edges([a for id_v, ood in per_stage for a in (id_v, *ood.values())], bins, clip)
        for c, ((stage, _), (id_values, ood)) in enumerate(zip(stages, per_stage, strict=True)):
            ax = fig.add_subplot(grid[r, c])
            metrics = _draw(ax, id_values, ood, id_name=id_name, quantity=quantity, edges=edges, legend=False)
            ax.set_title(_title(f"{_label(quantity)}, {stage}", metrics), fontsize="medium")
            rows.append([_label(quantity), stage, *(f"{100 * a:.1f} / {o:.2f}" for a, o in metrics)])
    # one legend for the page (every panel uses the same colours); the numbers are in the table
    handles, _ = ax.get_legend_handles_labels()
    fig.legend(
        handles[: 1 + len(ood_names)],
        [_id_label(id_name), *ood_names],
        loc="outside lower center",
        ncols=1 + len(ood_names),
        frameon=False,
    )
    table_ax = fig.add_subplot(grid[len(names), :])
    table_ax.set_axis_off()
    columns = ["quantity", "model", *(f"{n}: AUROC % / overlap" for n in ood_names)]
    table = table_ax.table(cellText=rows, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    fig.suptitle(f"{title}: ID = {id_name}, higher value = more in-distribution", fontsize="large")
    save_png(fig, path)
    return fig
