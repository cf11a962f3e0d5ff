"""Writing figures without pyplot: a Figure on an Agg canvas, its PNG written atomically, and an
image grid (matplotlib, imported lazily).

The lowest figure module: :mod:`samnorm.viz.plots` (the diagnostics' figures) and
:func:`samnorm.data.pseudo_ood.save_example_grid` build on it; it imports only :mod:`samnorm.utils.io`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from samnorm.utils.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["new_figure", "plot_image_grid", "save_png"]


def new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    """A matplotlib Figure with an Agg canvas (no pyplot, no display), ``figsize`` inches at ``dpi``.

    Example:
        >>> new_figure((2.0, 1.0), 50).get_size_inches().tolist()
        [2.0, 1.0]
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # optional dependency
        raise ImportError("plots need matplotlib: pip install 'samnorm[plots]'") from err
    if len(figsize) != 2 or min(figsize) <= 0 or dpi <= 0:
        raise ValueError(f"figsize must be two positive inches and dpi positive, got {figsize}, {dpi}")
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str] | None) -> None:
    """Write ``fig`` to ``path`` as a PNG of exactly ``figsize * dpi`` pixels, atomically, creating
    the folder; nothing when ``path`` is None."""
    if path is None:
        return
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    png = io.BytesIO()
    # no bbox_inches="tight": the file keeps exactly figsize * dpi pixels
    fig.savefig(png, dpi=fig.dpi, format="png")
    atomic_write(path, png.getvalue())


def plot_image_grid(
    images: Any,
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
    cell_inches: float = 1.5,
    dpi: int = 100,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """A grid of images, e.g. ID images and their pseudo-OOD versions (appendix figures 1-2).

    ``images`` is a ``(B, C, H, W)`` tensor or array with C = 1 or 3 and values in [0, 1] (clipped).
    ``titles`` labels each cell. The figure is ``ncols * cell_inches`` wide.

    Example:
        >>> fig = plot_image_grid(np.random.rand(6, 3, 8, 8), ncols=3, cell_inches=1.0)
        >>> len(fig.axes), fig.get_size_inches().tolist()
        (6, [3.0, 2.0])
    """
    array = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float64)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] == 0:
        raise ValueError(f"images must be (B, C, H, W) with C in (1, 3) and B >= 1, got shape {array.shape}")
    if titles is not None and len(titles) != array.shape[0]:
        raise ValueError(f"titles has {len(titles)} entries for {array.shape[0]} images")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    count = array.shape[0]
    ncols = min(ncols, count)
    nrows = -(-count // ncols)
    height = nrows * cell_inches * (1.15 if titles is not None else 1.0) + (0.4 if title else 0.0)
    fig = new_figure((ncols * cell_inches, height), dpi)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    cells = np.clip(array.transpose(0, 2, 3, 1), 0.0, 1.0)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= count:
            continue
        cell = cells[i]
        ax.imshow(cell[..., 0] if cell.shape[-1] == 1 else cell, cmap="gray", vmin=0.0, vmax=1.0)
        if titles is not None:
            ax.set_title(titles[i], fontsize="small")
    if title is not None:
        fig.suptitle(title)
    save_png(fig, path)
    return fig
