"""One hand-written reference SAM, float64, per parameter, for every class of samnorm: plain SAM/ASAM,
IntervalSAM, LookSAM, OnePassSAM, GSAM, over an SGD-with-momentum twin. Written from the papers'
formulas with plain tensor loops (no samnorm code), so the tests compare two independent
implementations. Importable by any test (``from reference_sam import ReferenceSAM``).

The parts are public for tests that check one of them alone: ``ascent`` (the perturbation, per-tensor
rho and T, e.g. per-group settings or the functional layer), ``gradient_at`` (the gradient at w + e,
w restored), ``RefSGD`` / ``RefAdamW`` (the base optimizers' twins), ``ReferenceSAM.run`` (steps on
a model and a loss) and ``sam_sgd`` (plain SAM over momentum-free SGD, what the trainer tests compare with).
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

    def momentum_of(self, w: torch.Tensor) -> torch.Tensor | None:
        """The momentum buffer of ``w`` (None before its first step): OnePassSAM's default direction."""
        return self.buf.get(id(w))


class RefAdamW:
    """torch.optim.AdamW written out (decoupled weight decay, bias correction); state per tensor."""

    def __init__(self, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.wd, (self.b1, self.b2), self.eps = lr, weight_decay, betas, eps
        self.m: dict[int, torch.Tensor] = {}  # id(param) -> first moment
        self.v: dict[int, torch.Tensor] = {}
        self.t = 0

    def step(self, ws: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
        self.t += 1
        with torch.no_grad():
            for w, g in zip(ws, gs):
                i = id(w)
                w *= 1 - self.lr * self.wd
                self.m[i] = self.b1 * self.m.get(i, torch.zeros_like(g)) + (1 - self.b1) * g
                self.v[i] = self.b2 * self.v.get(i, torch.zeros_like(g)) + (1 - self.b2) * g * g
                mhat = self.m[i] / (1 - self.b1**self.t)
                vhat = self.v[i] / (1 - self.b2**self.t)
                w -= self.lr * mhat / (vhat.sqrt() + self.eps)

    def momentum_of(self, w: torch.Tensor) -> torch.Tensor | None:
        """The first moment of ``w`` (None before its first step): OnePassSAM's default direction."""
        return self.m.get(id(w))


def ascent(
    ds: list[torch.Tensor], rhos: list[float], ts: list[torch.Tensor | None], eps: float = 1e-12
) -> tuple[list[torch.Tensor], float]:
    """``e_i = rho_i T_i^2 d_i / (||T d|| + eps)``, the norm over every tensor given (``T_i = 1`` where
    ``ts[i]`` is None); all zero when the norm is 0 or not finite. Returns (es, the norm)."""
    ts = [torch.ones_like(d) if t is None else t for d, t in zip(ds, ts)]
    norm = math.sqrt(sum(float(((t * d) ** 2).sum()) for t, d in zip(ts, ds)))
    if norm == 0 or not math.isfinite(norm):
        return [torch.zeros_like(d) for d in ds], norm
    return [rho * t * t * d / (norm + eps) for rho, t, d in zip(rhos, ts, ds)], norm


def gradient_at(moved: list[torch.Tensor], es: list[torch.Tensor], grads: Grads) -> list[torch.Tensor]:
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


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x * y).sum()) for x, y in zip(a, b))


class ReferenceSAM:
    """The reference: ``step(params, selected, grads)`` takes one step of ``kind``.

    Args:
        kind: "sam", "interval", "looksam", "onepass" or "gsam".
        rho, adaptive, eta: the ascent (``e_i = rho T_i^2 g_i / ||T g||`` over the selected tensors).
        settings: the variant's (k, alpha, direction).
        base: the base optimizer twin.

    Example: three float64 SAM steps on the LayerNorm of ``model`` with SGD(lr=0.1)::

        ref = ReferenceSAM("sam", rho=0.05, adaptive=False, eta=0.0, base=RefSGD(0.1, 0.0, 0.0))
        ref.run(model, list(model[1].parameters()), lambda: loss_fn(model(x), y), steps=3)
    """

    def __init__(self, kind: str, rho: float, adaptive: bool, eta: float, base: RefSGD | RefAdamW, **settings) -> None:
        self.kind, self.rho, self.adaptive, self.eta, self.base = kind, rho, adaptive, eta, base
        self.k = settings.get("k", 1)
        self.alpha = settings.get("alpha", 0.0)
        self.direction = settings.get("direction", "momentum")
        self.t = 0
        self.kept: dict[int, torch.Tensor] = {}  # LookSAM's g_v, OnePassSAM's previous gradient
        self.kept_for: tuple[int, ...] = ()

    @torch.no_grad()
    def _ascent(self, sel: list[torch.Tensor], ds: list[torch.Tensor]) -> list[torch.Tensor]:
        ts = [(w.abs() + self.eta) if self.adaptive else None for w in sel]
        return ascent(ds, [self.rho] * len(sel), ts)[0]

    def run(self, model: torch.nn.Module, selected: list[torch.Tensor], loss: Callable[[], torch.Tensor], steps: int):
        """``steps`` steps on every parameter of ``model``, perturbing ``selected``; ``loss()`` is the loss."""
        params = list(model.parameters())
        for _ in range(steps):
            self.step(params, selected, lambda: list(torch.autograd.grad(loss(), params)))

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
            g = gradient_at([w for w, _ in pairs], es, grads)
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
            g = gradient_at(selected, es, grads)
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
        return [None if (m := self.base.momentum_of(w)) is None else -m for w in selected]


def sam_sgd(model: torch.nn.Module, selected: list[torch.Tensor], loss: Callable[[], torch.Tensor], *, rho, lr, steps):
    """``steps`` plain SAM steps (not adaptive) over SGD without momentum or weight decay, in place."""
    ReferenceSAM("sam", rho, adaptive=False, eta=0.0, base=RefSGD(lr, 0.0, 0.0)).run(model, selected, loss, steps)
