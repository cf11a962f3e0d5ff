"""SAM under FSDP2 (``torch.distributed.fsdp.fully_shard``): the ascent over DTensor parameters.

``fully_shard`` turns each parameter into a DTensor sharded over a device mesh, and its backward
reduce-scatters the gradients: each rank holds its shard of the gradient *averaged over the ranks*.
SAM's ascent then needs one thing more than on a single process, a global norm: each rank perturbs
its local shards, scaled by one norm over all shards (the local sum of squares summed over the mesh
dimensions that shard the tensors). ASAM's ``T = |w| + eta`` is elementwise, so shard-local.

The first-pass gradient is thus the averaged one, identical in effect on every rank, as DDP with
``sync_first_pass=True`` gives (one process on the whole batch); DDP's default perturbs each replica
with its own gradient. ``first_step(loss)`` cannot differentiate shard by shard (the sharded
parameters are not in the autograd graph: ``torch.autograd.grad`` finds no gradient for them), so
there it runs ``loss.backward()``, FSDP2's reduce-scatter included, and takes those gradients.
The variants' vectors (LookSAM's ``g_v``, OnePassSAM's kept gradient, GSAM's ``g``) hold each
rank's shards, their dot products summed over the shards. Under ``GradScaler``, DTensor's unscale
kernel takes the max of the inf flag over the mesh, so every rank skips the same steps.

Supported layouts: every perturbed parameter a DTensor on one mesh with one pattern of sharded mesh
dimensions (FSDP2, HSDP). A mix of DTensors and plain tensors (the root module not sharded) or of
layouts (FSDP with tensor parallelism) is refused with a ``ValueError`` naming FSDP.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeGuard

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.tensor import DTensor

__all__ = ["backward_grads", "is_dtensor", "local", "localize", "shard_sum"]


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (FSDP2's parameters and gradients).

    Costs no import: a DTensor can only exist once torch's DTensor module is loaded.

    Example:
        >>> is_dtensor(torch.ones(2))
        False
    """
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None and isinstance(t, cls):
            return True
    return False


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage under ``torch.no_grad``), else ``t``.

    Example:
        >>> t = torch.ones(2)
        >>> local(t) is t
        True
    """
    return t.to_local() if is_dtensor(t) else t


def shard_sum(params: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``None`` for plain tensors; for DTensors, the function that sums a per-rank partial sum
    (a sum of squares, a dot product of local shards) over the mesh dimensions sharding them.

    Raises ``ValueError`` if ``params`` mix DTensors and plain tensors, or several layouts.

    Example:
        >>> shard_sum([torch.ones(2)]) is None
        True
    """
    sharded = [p for p in params if is_dtensor(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            f"SAM under FSDP: {len(params) - len(sharded)} of the perturbed parameters are plain tensors "
            "and the others DTensors; apply fully_shard to the root module too, so that every parameter is sharded"
        )
    layouts = {(p.device_mesh, tuple(pl.is_shard() for pl in p.placements)) for p in sharded}
    if len(layouts) > 1:
        raise ValueError(
            "SAM under FSDP needs every perturbed parameter sharded on one mesh in one pattern (FSDP2, HSDP); "
            f"got {len(layouts)} layouts (e.g. FSDP with tensor parallelism): perturb one layout's parameters"
        )
    mesh, dims = layouts.pop()
    groups = [mesh.get_group(i) for i, is_shard in enumerate(dims) if is_shard]

    def total(x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.clone()
        for group in groups:
            dist.all_reduce(x, group=group)
        return x

    return total


def localize(
    params: list[torch.Tensor], grads: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor] | None]:
    """``(local params, local grads, shard_sum(params))``: the tensors the ascent works on.

    A DTensor gradient is first laid out as its parameter (a no-op for FSDP2's reduce-scattered
    ``.grad``); a plain one beside a DTensor parameter is taken as its local shard already (a
    direction a variant keeps shard by shard) and must have that shape.

    Example:
        >>> w, g = [torch.ones(2)], [torch.zeros(2)]
        >>> localize(w, g) == (w, g, None)
        True
    """
    reduce = shard_sum(params)
    if reduce is None:
        return params, grads, None
    local_params, local_grads = [], []
    for p, g in zip(params, grads, strict=True):
        assert is_dtensor(p)  # shard_sum refused a mix of DTensors and plain tensors
        if is_dtensor(g):
            if g.placements != p.placements:
                g = g.redistribute(p.device_mesh, p.placements)
            g = g.to_local()
        elif g.shape != p.to_local().shape:
            raise ValueError(
                f"SAM under FSDP: a plain tensor of shape {tuple(g.shape)} given as the gradient of a "
                f"DTensor whose local shard has shape {tuple(p.to_local().shape)}"
            )
        local_params.append(p.to_local())
        local_grads.append(g)
    return local_params, local_grads, reduce


def backward_grads(
    loss: torch.Tensor, params: list[torch.Tensor], wanted: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    """``first_step(loss)`` under FSDP2: ``loss.backward()`` (FSDP2 reduce-scatters in it), the
    gradients of ``wanted``; the ``.grad`` of every tensor of ``params`` is left as it was.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> [g.tolist() for g in backward_grads((3 * w).sum(), [w], [w])], w.grad
        ([[3.0, 3.0]], None)
    """
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            loss.backward()  # type: ignore[no-untyped-call]
        return [p.grad for p in wanted]
    finally:
        for p, g in zip(params, kept, strict=True):
            p.grad = g
