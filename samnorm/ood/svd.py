"""Rank-1 components of batched feature matrices, by full SVD or by seeded power iteration.

RankFeat (Song, Sebe & Wang, NeurIPS 2022) subtracts ``s1 u1 v1^T`` from each sample's feature
matrix: a CNN block output ``(B, C, H, W)`` is seen as ``B`` matrices ``C x HW``, ViT tokens
``(B, N, C)`` as ``B`` matrices ``N x C``.

Power iteration is the official alternating ``u <- A v / |A v|``, ``v <- A^T u / |A^T u|``
(RankFeat's ``power_iteration``), with three changes: the start vector comes from a seeded
generator (shared by the batch), so results are deterministic; each sample stops on its own once
its unit vector ``v`` moves by at most ``tol`` in every entry (``iters`` is the cap), so results do
not depend on the batch size or composition; and on the CPU the batch is processed in chunks of
about 1 MiB, so each chunk's matrices stay in cache across the steps (memory-bound
matrix-vector products) and while the chunk's result is written: the whole removal reads the
features from memory once. The error of the top singular direction shrinks like ``(s2 / s1)^(2 k)``
after ``k`` steps; when it stops early, the remaining error is about ``tol * r^2 / (1 - r^2)``
with ``r = s2 / s1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

__all__ = ["rank1", "remove_rank1"]

Method = Literal["svd", "power"]


_CPU_CHUNK_BYTES = 1 << 20  # per-chunk working set on the CPU: fits a core's L2 cache


def check_method(method: str, iters: int, tol: float = 0.0) -> None:
    """Raise ``ValueError`` unless ``method`` is "svd" or "power" with a positive ``iters``."""
    if method not in ("svd", "power"):
        raise ValueError(f"method must be 'svd' or 'power', got {method!r}")
    if method == "power" and (not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be a positive int for power iteration, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (0 always runs iters steps), got {tol!r}")


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _pairs(matrices: Tensor, method: str, iters: int, tol: float, seed: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """``(rows, left (b, M, 1), right (b, 1, N))`` per chunk of the batch, ``left @ right`` being
    the rank-1 component of ``matrices[rows]``. With "power", a chunk's matrices are still in
    cache when the caller uses them right after the pair is yielded."""
    check_method(method, iters, tol)
    if method == "svd":
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        yield slice(None), u[:, :, :1] * s[:, None, :1], vh[:, :1, :]
        return
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(matrices.shape[2], 1, generator=gen, dtype=torch.float64).to(matrices)
    per_matrix = max(1, matrices[0].numel() * matrices.element_size())
    on_cpu = matrices.device.type == "cpu"
    chunk = max(1, _CPU_CHUNK_BYTES // per_matrix) if on_cpu else matrices.shape[0]
    for first in range(0, matrices.shape[0], chunk):
        rows = slice(first, first + chunk)
        part = matrices[rows]
        v = start.expand(part.shape[0], -1, -1)
        done = torch.zeros(part.shape[0], 1, 1, dtype=torch.bool, device=part.device)
        for _ in range(iters):
            new = _unit(part.transpose(1, 2) @ _unit(part @ v))
            moved = (new - v).abs().amax(dim=1, keepdim=True)
            v = torch.where(done, v, new)  # a converged sample keeps its vector
            done = done | (moved <= tol)
            if bool(done.all()):
                break
        # s1 u1 v1^T = (A v1) v1^T for the unit top right-singular vector v1
        yield rows, part @ v, v.transpose(1, 2)


def _per_chunk(
    matrices: Tensor, combine: Callable[..., Tensor], method: str, iters: int, tol: float, seed: int
) -> Tensor:
    """``combine(part, left, right[, out=])`` over the chunks of :func:`_pairs`, one result.

    Half-precision input is computed in float32 and the result cast back: ``linalg.svd`` has no
    float16/bfloat16 kernels, power iteration loses the top direction in them, and the removal
    cancels most of each entry. Autocast is switched off for the same reason (it would run the
    power iteration's products in half precision).
    """
    if not isinstance(matrices, Tensor) or matrices.dim() != 3 or not matrices.is_floating_point():
        raise ValueError(
            "matrices must be a floating-point (B, M, N) tensor, got "
            f"{tuple(matrices.shape) if isinstance(matrices, Tensor) else type(matrices).__name__}"
        )
    wide, device_type = torch.promote_types(matrices.dtype, torch.float32), matrices.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if wide != matrices.dtype or autocast:
        with torch.autocast(device_type, enabled=False):
            return _per_chunk(matrices.to(wide), combine, method, iters, tol, seed).to(matrices.dtype)
    pairs = _pairs(matrices, method, iters, tol, seed)
    if torch.is_grad_enabled() and matrices.requires_grad:  # out= does not record gradients
        return torch.cat([combine(matrices[rows], left, right) for rows, left, right in pairs])
    out = torch.empty(matrices.shape, dtype=matrices.dtype, device=matrices.device)
    for rows, left, right in pairs:
        combine(matrices[rows], left, right, out=out[rows])  # written while the chunk is hot
    return out


def _product(part: Tensor, left: Tensor, right: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.bmm(left, right, out=out)


def _difference(part: Tensor, left: Tensor, right: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.addcmul(part, left, right, value=-1, out=out)


def rank1(matrices: Tensor, method: Method = "svd", *, iters: int = 20, tol: float = 1e-6, seed: int = 0) -> Tensor:
    """The rank-1 component ``s1 u1 v1^T`` of each matrix of a ``(B, M, N)`` batch.

    ``method="svd"``: ``torch.linalg.svd`` (exact, as the official code). ``"power"``: at most
    ``iters`` steps of power iteration from a start vector seeded by ``seed``, stopping per sample
    once the singular vector moves by at most ``tol`` (``tol=0``: always ``iters`` steps).

    Example:
        >>> a = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])
        >>> rank1(a)
        tensor([[[3., 0.],
                 [0., 0.]]])
        >>> torch.allclose(rank1(a, "power"), rank1(a), atol=1e-6)  # stopped at tol=1e-6
        True
    """
    return _per_chunk(matrices, _product, method, iters, tol, seed)


def remove_rank1(
    features: Tensor, method: Method = "svd", *, iters: int = 20, tol: float = 1e-6, seed: int = 0
) -> Tensor:
    """RankFeat's edit: ``features`` minus the rank-1 component of each sample's feature matrix.

    ``features`` is a CNN feature map ``(B, C, H, W)`` (matrices ``C x HW``) or ViT tokens
    ``(B, N, C)``; the result has the same shape and dtype (float16/bfloat16 features are
    processed in float32, also under autocast). ``method``, ``iters``, ``tol``, ``seed``: as
    :func:`rank1`.

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
    return _per_chunk(features.flatten(2), _difference, method, iters, tol, seed).view_as(features)
