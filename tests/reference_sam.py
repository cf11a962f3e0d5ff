"""One hand-written reference SAM, float64, per parameter, for every class of samnorm: plain SAM/ASAM,
IntervalSAM, LookSAM, OnePassSAM, GSAM, over an SGD-with-momentum twin. Written from the papers'
formulas with plain tensor loops (no samnorm code), so the tests compare two independent
implementations. Importable by any test (``from reference_sam import ReferenceSAM``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Grads = Callable[[], list[torch.Tensor]]  # the window's gradient at the current weights


class RefSGD:
    """torch.optim.SGD written out: momentum, dampening 0, weight decay, nesterov off; state per tensor."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.buf: dict[int, torch.Tensor] = {}  # id(param) -> momentum buffer

    def step(self, ws: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for w, g in zip(ws, gs):
                d = g + self.wd * w
                if self.momentum:
                    b = self.buf.get(id(w))
                    self.buf[id(w)] = d.clone() if b is None else self.momentum * b + d
                    d = self.buf[id(w)]
                w -= self.lr * d


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x * y).sum()) for x, y in zip(a, b))


class ReferenceSAM:
    """The reference: ``step(params, selected, grads)`` takes one step of ``kind``.

    Args:
        kind: "sam", "interval", "looksam", "onepass" or "gsam".
        rho, adaptive, eta: the ascent (``e_i = rho T_i^2 g_i / ||T g||`` over the selected tensors).
        settings: the variant's (k, alpha, direction).
        base: the base optimizer twin.
    """

    def __init__(self, kind: str, rho: float, adaptive: bool, eta: float, base: RefSGD, **settings) -> None:
        self.kind, self.rho, self.adaptive, self.eta, self.base = kind, rho, adaptive, eta, base
        self.k = settings.get("k", 1)
        self.alpha = settings.get("alpha", 0.0)
        self.direction = settings.get("direction", "momentum")
        self.t = 0
        self.kept: dict[int, torch.Tensor] = {}  # LookSAM's g_v, OnePassSAM's previous gradient
        self.kept_for: tuple[int, ...] = ()

    @torch.no_grad()
    def _ascent(self, sel: list[torch.Tensor], ds: list[torch.Tensor]) -> list[torch.Tensor]:
        ts = [(w.abs() + self.eta) if self.adaptive else torch.ones_like(w) for w in sel]
        norm = math.sqrt(sum(float(((t * d) ** 2).sum()) for t, d in zip(ts, ds)))
        if norm == 0 or not math.isfinite(norm):
            return [torch.zeros_like(w) for w in sel]
        return [self.rho * t * t * d / (norm + 1e-12) for t, d in zip(ts, ds)]

    def step(self, params: list[torch.Tensor], selected: list[torch.Tensor], grads: Grads) -> None:
        ids = tuple(id(p) for p in selected)
        if ids != self.kept_for:  # the selection changed: the kept vectors start again from zero
            self.kept, self.kept_for = {}, ids
        sam_step = self.kind in ("sam", "gsam", "onepass") or self.t % self.k == 0
        at = {id(p): i for i, p in enumerate(params)}
        if self.kind == "onepass":
            ds = self._onepass_directions(selected)
            pairs = [(w, d) for w, d in zip(selected, ds) if d is not None]
            es = self._ascent([w for w, _ in pairs], [d for _, d in pairs])
            g = self._at([w for w, _ in pairs], es, grads)
            if self.direction == "grad":
                self.kept = {id(w): g[at[id(w)]].clone() for w in selected}
        elif not sam_step:
            g = grads()
            if self.kind == "looksam" and self.alpha and self.kept:
                gsel = [g[at[id(w)]] for w in selected]
                gv = [self.kept[id(w)] for w in selected]
                gvn = math.sqrt(_dot(gv, gv))
                if gvn > 0:
                    coef = self.alpha * math.sqrt(_dot(gsel, gsel)) / gvn
                    for w, v in zip(selected, gv):
                        g[at[id(w)]] = g[at[id(w)]] + coef * v
        else:
            g0 = grads()
            g0sel = [g0[at[id(w)]] for w in selected]
            es = self._ascent(selected, g0sel)
            g = self._at(selected, es, grads)
            gp = [g[at[id(w)]] for w in selected]
            if self.kind == "looksam":
                gg = _dot(g0sel, g0sel)
                coef = _dot(g0sel, gp) / gg if gg > 0 else 0.0
                self.kept = {id(w): s - coef * g0 for w, s, g0 in zip(selected, gp, g0sel)}
            if self.kind == "gsam":
                pp = _dot(gp, gp)
                coef = _dot(g0sel, gp) / pp if pp > 0 else 0.0
                for w, s, g0 in zip(selected, gp, g0sel):
                    g[at[id(w)]] = s - self.alpha * (g0 - coef * s)
        self.base.step(params, g)
        self.t += 1

    def _onepass_directions(self, selected: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.t == 0:
            return [None] * len(selected)
        if self.direction == "grad":
            return [self.kept.get(id(w), torch.zeros_like(w)) for w in selected]
        return [None if id(w) not in self.base.buf else -self.base.buf[id(w)] for w in selected]

    @staticmethod
    def _at(moved: list[torch.Tensor], es: list[torch.Tensor], grads: Grads) -> list[torch.Tensor]:
        """The gradient at w + e (then w restored exactly)."""
        saved = [w.detach().clone() for w in moved]
        with torch.no_grad():
            for w, e in zip(moved, es):
                w += e
        g = grads()
        with torch.no_grad():
            for w, s in zip(moved, saved):
                w.copy_(s)
        return g
