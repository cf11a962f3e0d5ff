"""Rank-1 components of batched feature matrices, by full SVD or by seeded power iteration.

RankFeat (Song, Sebe & Wang, NeurIPS 2022) subtracts ``s1 u1 v1^T`` from each sample's feature
matrix: a CNN block output ``(B, C, H, W)`` is seen as ``B`` matrices ``C x HW``, ViT tokens
``(B, N, C)`` as ``B`` matrices ``N x C``.

Power iteration here runs on the Gram matrix of the smaller side (``A^T A`` or ``A A^T``), which is
the same iteration as the official alternating ``u <- A v``, ``v <- A^T u`` (each step multiplies
by ``A^T A``) but reads ``A`` twice instead of twice per step. The start vector is drawn from a
seeded generator and shared by the batch, so results are deterministic and do not depend on the
batch size. The error of the top singular direction shrinks like ``(s2 / s1)^(2 k)`` after ``k``
steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["rank1", "remove_rank1"]

Method = Literal["svd", "power"]


def check_method(method: str, iters: int) -> None:
    """Raise ``ValueError`` unless ``method`` is "svd" or "power" with a positive ``iters``."""
    if method not in ("svd", "power"):
        raise ValueError(f"method must be 'svd' or 'power', got {method!r}")
    if method == "power" and (not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be a positive int for power iteration, got {iters!r}")


def _top_pair(matrices: Tensor, method: str, iters: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(left (B, M, 1), right (B, 1, N))`` whose product is the rank-1 component."""
    if not isinstance(matrices, Tensor) or matrices.dim() != 3 or not matrices.is_floating_point():
        raise ValueError(
            "matrices must be a floating-point (B, M, N) tensor, got "
            f"{tuple(matrices.shape) if isinstance(matrices, Tensor) else type(matrices).__name__}"
        )
    check_method(method, iters)
    if method == "svd":
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return u[:, :, :1] * s[:, None, :1], vh[:, :1, :]
    # iterate on the Gram matrix of the smaller side; transpose so that side is the last one
    tall = matrices.shape[1] >= matrices.shape[2]
    a = matrices if tall else matrices.transpose(1, 2)
    gram = a.transpose(1, 2) @ a  # (B, n, n), n = min(M, N)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(a.shape[2], 1, generator=gen, dtype=torch.float64)
    v = v.to(a).expand(a.shape[0], -1, -1)
    tiny = torch.finfo(a.dtype).tiny
    for _ in range(iters):
        v = gram @ v
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(tiny)
    # s1 u1 v1^T = (A v1) v1^T for the unit top right-singular vector v1 of A
    if tall:
        return a @ v, v.transpose(1, 2)
    return v, (a @ v).transpose(1, 2)


def rank1(matrices: Tensor, method: Method = "svd", *, iters: int = 20, seed: int = 0) -> Tensor:
    """The rank-1 component ``s1 u1 v1^T`` of each matrix of a ``(B, M, N)`` batch.

    ``method="svd"``: ``torch.linalg.svd`` (exact, as the official code). ``"power"``: ``iters``
    steps of power iteration from a start vector seeded by ``seed``.

    Example:
        >>> a = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])
        >>> rank1(a)
        tensor([[[3., 0.],
                 [0., 0.]]])
        >>> torch.allclose(rank1(a, "power"), rank1(a))
        True
    """
    left, right = _top_pair(matrices, method, iters, seed)
    return left @ right


def remove_rank1(
    features: Tensor, method: Method = "svd", *, iters: int = 20, seed: int = 0
) -> Tensor:
    """RankFeat's edit: ``features`` minus the rank-1 component of each sample's feature matrix.

    ``features`` is a CNN feature map ``(B, C, H, W)`` (matrices ``C x HW``) or ViT tokens
    ``(B, N, C)``; the result has the same shape.

    Example:
        >>> x = torch.rand(2, 8, 3, 3, dtype=torch.float64)
        >>> y = remove_rank1(x)  # its top singular value is x's second one
        >>> y.shape, torch.allclose(torch.linalg.svdvals(y.flatten(2))[:, 0],
        ...                         torch.linalg.svdvals(x.flatten(2))[:, 1])
        (torch.Size([2, 8, 3, 3]), True)
    """
    if not isinstance(features, Tensor) or features.dim() not in (3, 4):
        raise ValueError(
            "features must be a CNN feature map (B, C, H, W) or ViT tokens (B, N, C), got shape "
            f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}"
        )
    matrices = features.flatten(2)
    left, right = _top_pair(matrices, method, iters, seed)
    return torch.baddbmm(matrices, left, right, alpha=-1).view_as(features)  # one fused pass
