"""Figures and the sample comparisons behind them (matplotlib imported lazily, only by the figures).

- :mod:`samnorm.viz.plots`: the appendix's figures from plain arrays (score distributions, before vs
  after, gradient norm vs max logit, a one-page summary).
- :mod:`samnorm.viz.figures`: the lowest layer, a pyplot-free Figure, its PNG written atomically and an
  image grid.
- :mod:`samnorm.viz.histograms`: checked 1-D samples, their overlap coefficient and histograms on shared
  edges (numpy only).
"""

__all__: list[str] = []  # the submodules are the API: nothing here, so importing it loads no figure code
