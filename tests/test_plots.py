"""samnorm.viz.plots: files written, non-empty, of the expected pixel size; titles carry the metrics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from samnorm.viz import plots

matplotlib_image = pytest.importorskip("matplotlib.image")


def _results(seed, shift):
    rng = np.random.default_rng(seed)
    return {
        "ID": {"grad_norm": rng.gamma(3, 1, 300), "max_logit": rng.normal(8, 2, 300), "msp": rng.beta(5, 1, 300)},
        "far": {
            "grad_norm": rng.gamma(2, 1, 200),
            "max_logit": rng.normal(6 - shift, 2, 200),
            "msp": rng.beta(2, 2, 200),
        },
        "near": {"grad_norm": rng.gamma(2.5, 1, 100), "max_logit": rng.normal(7, 2, 100), "msp": rng.beta(3, 1, 100)},
    }


def _pixels(path):
    """(height, width) of a PNG, after checking it holds a picture, not a blank canvas."""
    image = matplotlib_image.imread(path)
    assert path.stat().st_size > 0 and (image[..., :3] < 0.9).mean() > 0.01
    return image.shape[:2]


def test_plot_distributions_writes_png_of_figsize_times_dpi_with_auroc_in_title(tmp_path):
    res = _results(0, 1.0)
    values = {name: r["max_logit"] for name, r in res.items()}
    path = tmp_path / "sub" / "dist.png"
    fig = plots.plot_distributions(values, quantity="max_logit", figsize=(6, 4), dpi=50, path=path)
    assert _pixels(path) == (200, 300)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "maximum logit" and ax.get_ylabel() == "density"
    mean = np.mean(
        [
            roc_auc_score(np.r_[np.ones(300), np.zeros(values[n].size)], np.r_[values["ID"], values[n]])
            for n in ("far", "near")
        ]
    )
    assert f"mean AUROC {100 * mean:.1f}%" in ax.get_title()
    reversed_title = plots.plot_distributions({"ID": [0.0, 1.0], "far": [5.0, 6.0]}, dpi=20).axes[0].get_title()
    assert reversed_title.endswith("AUROC 0.0% (OOD larger)")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "ID, n=300" and labels[1].startswith("far, n=200: AUROC")


def test_plot_before_after_and_grad_norm_max_logit_sizes(tmp_path):
    before, after = _results(1, 0.0), _results(2, 2.0)
    pick = lambda r, q: {name: v[q] for name, v in r.items()}  # noqa: E731
    fig = plots.plot_before_after(
        pick(before, "msp"), pick(after, "msp"), quantity="msp", dpi=40, path=tmp_path / "ba.png"
    )
    assert _pixels(tmp_path / "ba.png") == (180, 480)
    assert "before" in fig.axes[0].get_title() and "after" in fig.axes[1].get_title()
    plots.plot_grad_norm_max_logit(after, before=before, ood_names=["far"], dpi=40, path=tmp_path / "gm.png")
    assert _pixels(tmp_path / "gm.png") == (360, 480)  # two rows of 12 x 4.5 inches
    fig = plots.plot_grad_norm_max_logit(after, dpi=40, path=tmp_path / "gm1.png")
    assert _pixels(tmp_path / "gm1.png") == (180, 480) and len(fig.axes) == 2


def test_plot_summary_one_page_with_table(tmp_path):
    before, after = _results(3, 0.0), _results(4, 2.0)
    fig = plots.plot_summary(after, before=before, quantities=["max_logit", "msp"], dpi=30, path=tmp_path / "s.png")
    # 2 columns x 8.5 in wide; 2 rows x 2.6 in + table (0.6 + 0.25 * 2 quantities * 2 stages) high
    assert _pixels(tmp_path / "s.png") == (round(30 * (5.2 + 1.6)), 30 * 17)
    assert len(fig.axes) == 5  # four panels and the table
    plots.plot_summary(after, dpi=30, path=tmp_path / "s1.png")  # every quantity, one column
    assert _pixels(tmp_path / "s1.png")[1] == round(30 * 8.5)


def test_plot_image_grid(tmp_path):
    images = np.random.default_rng(0).random((5, 1, 8, 8))
    plots.plot_image_grid(images, ncols=3, dpi=40, cell_inches=2.0, path=tmp_path / "g.png")
    assert _pixels(tmp_path / "g.png") == (160, 240)  # 2 rows x 3 columns of 2-inch cells
    with pytest.raises(ValueError, match="C in"):
        plots.plot_image_grid(np.zeros((2, 2, 8, 8)))
    with pytest.raises(ValueError, match="titles"):
        plots.plot_image_grid(images, titles=["a"])


def test_plots_reject_bad_input():
    res = _results(5, 0.0)
    with pytest.raises(ValueError, match="id_name"):
        plots.plot_distributions({"a": [1.0], "b": [2.0]})
    with pytest.raises(ValueError, match="OOD set"):
        plots.plot_distributions({"ID": [1.0]})
    with pytest.raises(ValueError, match="same OOD sets"):
        plots.plot_before_after({"ID": [1.0], "a": [2.0]}, {"ID": [1.0], "b": [2.0]})
    with pytest.raises(ValueError, match="no set 'nope'"):
        plots.plot_grad_norm_max_logit(res, ood_names=["nope"])
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_distributions({"ID": [1.0, np.nan], "a": [2.0]})


def test_importing_plots_and_diagnostics_loads_neither_matplotlib_nor_timm():
    code = (
        "import sys, samnorm.viz.plots, samnorm.diagnostics; "
        "print([m for m in ('matplotlib', 'timm', 'torchvision') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
