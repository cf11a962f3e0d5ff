"""GSAM (Zhuang et al. 2022, surrogate-gap guided SAM) as one small variant file.

SAM's two passes; with ``g`` the gradient at ``w`` and ``g_p`` the gradient at ``w + e`` over the
perturbed tensors, as whole vectors, the descent gradient is

    ``g_p - alpha * g_orth``,   ``g_orth = g - (<g, g_p> / <g_p, g_p>) g_p``

(``g_orth = g`` when ``g_p = 0``): the component of ``g`` orthogonal to ``g_p`` points along the
surrogate gap's gradient, and descending against it (``-alpha``) lowers the gap while keeping the
perturbed loss's descent. ``alpha=0`` is SAM. Tensors outside the selection descend with their
``g_p``, as in :class:`~samnorm.sam.variants.LookSAM`; under ``torch.distributed`` ``g`` is averaged
across ranks so that every replica applies the same correction (under FSDP2 it already is, and
the dot products sum over the shards: :mod:`samnorm.sam.fsdp`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    >>> opt = GSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5, alpha=0.3)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = model(torch.ones(2, 4)).pow(2).mean()
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    >>> opt.param_groups[0]["alpha"]
    0.3
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from ..select import Selection
from . import fsdp
from .functional import is_distributed
from .variant import Variant

__all__ = ["GSAM"]


class GSAM(Variant):
    """Surrogate-gap guided SAM (see the module docstring).

    Args:
        base_optimizer, perturb: as for :class:`~samnorm.SAM`.
        alpha: the weight of the surrogate-gap correction (``param_groups[i]["alpha"]``, so a
            scheduler may drive it); the paper's values lie in [0.01, 0.3].
        **kwargs: :class:`~samnorm.SAM`'s (``rho``, ``adaptive``, ...).
    """

    NAME = "gsam"
    SETTINGS: ClassVar[dict[str, Any]] = {"alpha": 0.3}
    alpha: float  # a GroupSetting (Variant.__init_subclass__): every group's value
    SLOTS = ("g", "gp")  # first-pass gradient, perturbed gradient

    def __init__(
        self,
        base_optimizer: Optimizer,
        perturb: nn.Module | Selection | Iterable[torch.Tensor] | None = None,
        *,
        alpha: float = 0.3,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_optimizer, perturb, alpha=alpha, **kwargs)

    def _ascend(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        vec = self.vectors()  # keep g before the ascent consumes it
        given = {id(p): g for p, g in pairs}
        vec.load("g", [given.get(id(p)) for p in vec.params])
        if is_distributed():
            vec.all_reduce_mean("g")
        super()._ascend(pairs)

    def _before_descent(self) -> None:
        alpha = self.alpha
        if not alpha:
            return
        vec = self.vectors()
        have = [i for i, p in enumerate(vec.params) if p.grad is not None]
        vec.load("gp", [p.grad for p in vec.params])
        gpgp, ggp = vec.dot("gp", "gp"), vec.dot("g", "gp")
        coef = torch.where(gpgp > 0, ggp / gpgp, 0.0)
        # gp <- gp - alpha * (g - coef * gp) = (1 + alpha * coef) gp - alpha g
        vec.scale_into("gp", "gp", 1 + alpha * coef)
        vec.axpy("gp", "g", torch.full_like(coef, -alpha))
        grads = [fsdp.local(g) for g in (vec.params[i].grad for i in have) if g is not None]
        torch._foreach_copy_(grads, [vec.view("gp", i) for i in have])
