"""SAM's arithmetic as functions over tensor lists, the layout of ``torch.optim.sgd``.

:func:`perturb_` (the ascent ``w <- w + e``, see :mod:`samnorm.sam.optimizer` for the formula) and
:func:`restore_` (the bit-exact way back) pick a grouped implementation (``_multi_tensor_perturb_``:
tensors bucketed by device, dtype and group settings; small ones gathered into a persistent flat
buffer so that a hundred tiny norm-layer tensors cost a fixed number of kernels, large ones through
``torch._foreach_*`` kernels) or a per-tensor one (``_single_tensor_perturb_``), chosen by ``foreach``
as ``torch.optim.SGD`` chooses. Both apply the same operations in the same order; they differ only in
how the global norm's sum is ordered (tests/test_optim.py bounds the difference). Nothing here reads a
device value on the host. :func:`all_reduce_mean` and :func:`is_distributed` are the
``torch.distributed`` helpers the optimizer and its variants share.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from . import fsdp

__all__ = ["all_reduce_mean", "is_distributed", "perturb_", "restore_"]

# (params, backups) list pairs: what restore_ copies back
Saved = list[tuple[list[torch.Tensor], list[torch.Tensor]]]
# (gradient, direction v = T g, T or None) of one tensor
_Direction = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
_ShardSum = Callable[[torch.Tensor], torch.Tensor]
_Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]  # what torch._foreach_* take and return


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(gs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of each tensor across ranks (one all-reduce per device and dtype); ``gs`` itself
    outside ``torch.distributed`` (see :func:`is_distributed`). A DTensor (FSDP2) is one global
    value on every rank, its own mean: it is returned as it is.

    Example:
        >>> all_reduce_mean([torch.ones(2)])[0].tolist()   # a single process: unchanged
        [1.0, 1.0]
    """
    import torch.distributed as dist

    if not is_distributed():
        return gs
    plain = [g for g in gs if not fsdp.is_dtensor(g)]
    if any(g.is_sparse for g in plain):
        raise ValueError("sync_first_pass does not support sparse gradients; use sync_first_pass=False")
    reduced: dict[int, torch.Tensor] = {id(g): g for g in gs}
    for group in _by_device_and_dtype(plain).values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, v in zip(group, torch.split(flat, [g.numel() for g in group]), strict=True):
            reduced[id(g)] = v.view_as(g)
    return [reduced[id(g)] for g in gs]


# Dense tensors up to this size go through the grouped path's flat buffer (norm layers, biases).
_FLAT_MAX_NUMEL = 1 << 16


def perturb_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    rhos: list[float],
    etas: list[float | None],
    eps: float,
    foreach: bool | None = None,
    state: dict[Any, Any] | None = None,
) -> tuple[torch.Tensor, Saved]:
    """SAM's ascent, in place: save each parameter's value, then ``w_i += e_i``.

    ``e_i = rhos[i] * T_i^2 g_i / (||T g|| + eps)`` with one global L2 norm over every tensor
    (whatever its device and dtype, accumulated in float32, or float64 if a parameter is float64);
    ``T_i = |w_i| + etas[i]`` elementwise (ASAM), or 1 where ``etas[i]`` is ``None`` (SAM). A sparse
    gradient perturbs its support only. If the norm is not finite (or is 0), nothing moves.
    DTensor parameters (FSDP2): each rank perturbs its local shards, with the norm over all shards
    (:mod:`samnorm.sam.fsdp`).

    Args:
        params, grads: equal-length lists of parameters and their (first-pass) gradients.
        rhos, etas: per-tensor radius and ASAM offset (``None``: SAM).
        eps: added to the norm before dividing.
        foreach: ``None``/``True``: grouped kernels, per (device, dtype, rho, eta): small dense
            tensors are gathered into one flat buffer (a fixed number of kernels whatever their
            count), large ones take ``torch._foreach_*`` kernels, sparse gradients go per tensor;
            ``False``: a loop over the tensors (same results).
        state: a dict kept by the caller between calls, where the backups and flat buffers stay
            allocated (``None``: allocated per call).

    Returns:
        ``(norm, saved)``: ``||T g||`` as a tensor on ``params[0]``'s device (never read on the
        host here), and the ``(params, backups)`` lists (one pair per bucket of one device and
        dtype on the grouped path) that :func:`restore_` copies back.

    Example:
        >>> w, g = torch.ones(3), torch.tensor([3.0, 0.0, 4.0])
        >>> norm, saved = perturb_([w], [g], rhos=[0.5], etas=[None], eps=0.0)
        >>> norm.item(), [round(x, 4) for x in w.tolist()]          # w + 0.5 * g / 5
        (5.0, [1.3, 1.0, 1.4])
        >>> restore_(saved); w.tolist()
        [1.0, 1.0, 1.0]
    """
    if not len(params) == len(grads) == len(rhos) == len(etas):
        raise ValueError(
            f"perturb_ takes one gradient, rho and eta per parameter: got {len(params)} params, "
            f"{len(grads)} grads, {len(rhos)} rhos and {len(etas)} etas"
        )
    if not params:
        return torch.zeros(()), []
    state = {} if state is None else state
    params, grads, shard_sum = fsdp.localize(params, grads)
    if foreach is False:
        return _single_tensor_perturb_(params, grads, rhos, etas, eps, state, shard_sum)
    return _multi_tensor_perturb_(params, grads, rhos, etas, eps, state, shard_sum)


def restore_(saved: Saved, *, foreach: bool | None = None) -> None:
    """Copy the backups of :func:`perturb_` back into their parameters, bit-exact (one
    ``torch._foreach_copy_`` per pair of lists unless ``foreach=False``)."""
    for params, backups in saved:
        if foreach is False:
            for p, b in zip(params, backups, strict=True):
                p.copy_(b)
        else:
            torch._foreach_copy_(params, backups)


def _single_tensor_perturb_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    rhos: list[float],
    etas: list[float | None],
    eps: float,
    state: dict[Any, Any],
    shard_sum: _ShardSum | None = None,
) -> tuple[torch.Tensor, Saved]:
    acc = accumulation_dtype({p.dtype for p in params})
    backups = [_save(state, p) for p in params]
    directions = [_direction(p, g, eta, acc) for p, g, eta in zip(params, grads, etas, strict=True)]
    norm = _total_norm([torch.linalg.vector_norm(v, dtype=acc) for _, v, _ in directions], shard_sum)
    scales = _scales(norm, rhos, eps)
    for p, (g, v, t), rho in zip(params, directions, rhos, strict=True):
        _add_ascent_(p, g, v, t, scales[rho].to(v.device))
    return norm, [(params, backups)]


def _multi_tensor_perturb_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    rhos: list[float],
    etas: list[float | None],
    eps: float,
    state: dict[Any, Any],
    shard_sum: _ShardSum | None = None,
) -> tuple[torch.Tensor, Saved]:
    # Buckets of dense tensors by (device, dtype, rho, eta, small); a sparse gradient goes per tensor
    buckets: dict[_BucketKey, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    sparse_items: list[tuple[torch.Tensor, torch.Tensor, float, float | None]] = []
    for p, g, rho, eta in zip(params, grads, rhos, etas, strict=True):
        if g.is_sparse:
            sparse_items.append((p, g, rho, eta))
        else:
            ps, gs = buckets[(p.device, p.dtype, rho, eta, p.numel() <= _FLAT_MAX_NUMEL)]
            ps.append(p)
            gs.append(g)
    acc = accumulation_dtype({key[1] for key in buckets} | {p.dtype for p, *_ in sparse_items})
    sparse: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[float, _Direction]]] = ([], [], [])
    for p, g, rho, eta in sparse_items:
        sparse[0].append(p)
        sparse[1].append(_save(state, p))
        sparse[2].append((rho, _direction(p, g, eta, acc)))
    norms = [torch.linalg.vector_norm(v, dtype=acc) for _, (_, v, _) in sparse[2]]
    saved: Saved = []
    directions: list[tuple[_Tensors, _Tensors | None, _BucketBuffers]] = []
    ordinal: dict[tuple[torch.device, torch.dtype], int] = defaultdict(int)
    for (device, dtype, _, eta, small), (ps, gs) in buckets.items():
        # buffers keyed by the n-th bucket of a device and dtype: stable while a scheduler changes rho
        buf = _bucket_buffers(state, ("bucket", device, dtype, ordinal[(device, dtype)]), ps, acc if small else None)
        ordinal[(device, dtype)] += 1
        torch._foreach_copy_(buf.backups, ps)
        saved.append((ps, buf.backups))
        vs, ts = (_flat_direction if small else _foreach_direction)(ps, gs, eta, buf, acc)
        directions.append((vs, ts, buf))
        norms.extend(torch._foreach_norm(vs, 2, dtype=acc))
    norm = _total_norm(norms, shard_sum)
    scales = _scales(norm, rhos, eps)
    for (device, _, rho, _, small), (ps, _), (vs, ts, buf) in zip(buckets, buckets.values(), directions, strict=True):
        scale = scales[rho].to(device)
        _guard_(vs)
        if ts is not None:  # e = rho * T (T g) / ||T g||
            torch._foreach_mul_(vs, ts)
        if small:
            torch._foreach_mul_(vs, scale)
            torch._foreach_add_(ps, buf.views)
        else:
            torch._foreach_addcmul_(ps, vs, [scale] * len(vs))
    for p, (rho, (g, v, t)) in zip(sparse[0], sparse[2], strict=True):
        _add_ascent_(p, g, v, t, scales[rho].to(v.device))
    if sparse[0]:
        saved.append(sparse[:2])
    return norm, saved


# (device, dtype, rho, eta, small) of a bucket of the grouped path
_BucketKey = tuple[torch.device, torch.dtype, float, float | None, bool]


class _BucketBuffers:
    """A bucket's buffers, kept between steps (allocating, and on CPU page-faulting, model-sized
    buffers every step costs more than the arithmetic): the backups in the parameters' dtype and,
    for small tensors, the flat direction vector in the accumulation dtype, each with a view per
    tensor (small tensors share one flat backup too)."""

    def __init__(self, ps: list[torch.Tensor], acc: torch.dtype | None) -> None:
        self.shapes, self.acc = [p.shape for p in ps], acc
        self.flat: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        if acc is None:
            self.backups = [torch.empty_like(p, memory_format=torch.preserve_format) for p in ps]
            return
        sizes = [math.prod(s) for s in self.shapes]
        backup = torch.empty(sum(sizes), device=ps[0].device, dtype=ps[0].dtype)
        self.flat = torch.empty(sum(sizes), device=ps[0].device, dtype=acc)
        self.backups = [v.view(s) for v, s in zip(torch.split(backup, sizes), self.shapes, strict=True)]
        self.views = [v.view(s) for v, s in zip(torch.split(self.flat, sizes), self.shapes, strict=True)]


def _bucket_buffers(
    state: dict[Any, Any], key: tuple[Any, ...], ps: list[torch.Tensor], acc: torch.dtype | None
) -> _BucketBuffers:
    """The buffers of a bucket (the device and dtype are in ``key``), rebuilt if its shapes changed."""
    buf: _BucketBuffers | None = state.get(key)
    if buf is None or buf.acc != acc or buf.shapes != [p.shape for p in ps]:
        buf = state[key] = _BucketBuffers(ps, acc)
    return buf


def _save(state: dict[Any, Any], p: torch.Tensor) -> torch.Tensor:
    """Copy ``p`` into its own persistent backup (the per-tensor path)."""
    key = ("tensor", id(p))
    b: torch.Tensor | None = state.get(key)
    if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
        b = state[key] = torch.empty_like(p, memory_format=torch.preserve_format)
    b.copy_(p)
    return b


def _flat_direction(
    ps: list[torch.Tensor], gs: list[torch.Tensor], eta: float | None, buf: _BucketBuffers, acc: torch.dtype
) -> tuple[_Tensors, _Tensors | None]:
    """``([v], [T] or None)`` with ``v = T g`` gathered into the bucket's flat vector."""
    flat = buf.flat
    assert flat is not None  # a bucket of small tensors has one
    t = None
    if eta is not None:
        torch._foreach_copy_(buf.views, ps)
        t = flat.abs().add_(eta)
    torch._foreach_copy_(buf.views, gs)
    if t is not None:
        flat.mul_(t)
    return [flat], None if t is None else [t]


def _foreach_direction(
    ps: list[torch.Tensor], gs: list[torch.Tensor], eta: float | None, buf: _BucketBuffers, acc: torch.dtype
) -> tuple[_Tensors, _Tensors | None]:
    """``(vs, ts or None)`` with ``v = T g`` per tensor: the gradient itself when no copy is needed."""
    dtype = ps[0].dtype
    if eta is None:
        return (gs if dtype == acc else [g.to(acc) for g in gs]), None
    ts = torch._foreach_abs(ps if dtype == acc else [p.to(acc) for p in ps])
    torch._foreach_add_(ts, eta)
    return torch._foreach_mul(ts, gs), ts


def _direction(p: torch.Tensor, g: torch.Tensor, eta: float | None, acc: torch.dtype) -> _Direction:
    """``(g, v, T)`` for one tensor: ``v = T g`` on the gradient's support (the values of a sparse
    gradient, coalesced), in ``acc`` (``v`` is the gradient itself when that has dtype ``acc``)."""
    if g.is_sparse:
        g = g.coalesce()
    values = g.values() if g.is_sparse else g
    if eta is None:
        return g, values if values.dtype == acc else values.to(acc), None
    t = (p[tuple(g.indices())] if g.is_sparse else p).to(acc).abs().add_(eta)
    return g, t * values, t


def _add_ascent_(
    p: torch.Tensor, g: torch.Tensor, v: torch.Tensor, t: torch.Tensor | None, scale: torch.Tensor
) -> None:
    """``p += scale * T v`` for one tensor, in the grouped path's order."""
    _guard_([v])
    if t is not None:
        v.mul_(t)
    if g.is_sparse:
        p.index_put_(tuple(g.indices()), (v * scale).to(p.dtype), accumulate=True)
    else:
        p.addcmul_(v, scale)


def _guard_(vs: _Tensors) -> None:
    """Zero the non-finite entries of the directions in place. The scale is 0 when the norm is not
    finite, but NaN * 0 is still NaN; when it is finite this is the identity (and cheaper than a
    select). A direction may be the first-pass gradient itself, which the ascent consumes."""
    for v in vs:
        v.nan_to_num_(0.0, 0.0, 0.0)


def accumulation_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """float64 if a tensor is float64, else float32 (fp16/bf16 norms and scales would overflow or
    underflow); complex parameters are refused before anything moves."""
    if any(d.is_complex for d in dtypes):
        raise TypeError("SAM does not support complex parameters; perturb real ones only")
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _total_norm(norms: list[torch.Tensor], shard_sum: _ShardSum | None = None) -> torch.Tensor:
    """The L2 norm of per-tensor norms that may live on several devices (as clip_grad_norm_); with
    ``shard_sum`` (FSDP2), of the norms of every rank's shards."""
    first = norms[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]))
    return norm if shard_sum is None else shard_sum(norm.square()).sqrt()


def _scales(norm: torch.Tensor, rhos: list[float], eps: float) -> dict[float, torch.Tensor]:
    """``rho / (norm + eps)`` for each radius; 0 when the norm is not finite (a NaN norm gives a
    NaN scale) or is 0 (0 / 0 with eps=0)."""
    ok = torch.isfinite(norm) & (norm > 0)
    denom = norm + eps
    return {rho: torch.where(ok, rho / denom, 0.0) for rho in set(rhos)}


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """``tensors`` split by (device, dtype), order kept (a collective takes one of each)."""
    out: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        out[(t.device, t.dtype)].append(t)
    return out
