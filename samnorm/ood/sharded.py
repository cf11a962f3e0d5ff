"""The OOD evaluation of datasets (:func:`evaluate_datasets`): the harness (:func:`samnorm.ood.evaluate`)
run on ``Dataset`` objects, sharded across ``torch.distributed`` ranks, with the images an
:class:`~samnorm.data.folders.ImageFolder` could not decode left out and listed.

Every rank scores the batches of a one-process run dealt out in turn, so the scores are those of one
process, bit for bit, with no sample dropped or repeated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors import make_scorer, scorer_class
from samnorm.ood.harness import OODResults, evaluate
from samnorm.ood.metrics import check_tpr, resolve_convention
from samnorm.runs import worker_ignores_signals
from samnorm.utils.dist import gather_objects, rank_world
from samnorm.utils.nn import IndexSampler, dataset_len

__all__ = ["Evaluation", "evaluate_datasets"]


def _batch_shard(n: int, batch_size: int, rank: int, world: int) -> tuple[list[int], bool]:
    """Indices of the batches ``rank, rank + world, ...`` of the one-process batching of ``n`` items.

    Each batch is then exactly the batch a single process would see, so the scores (which may depend
    on the batch composition through the kernels used) are the same bit for bit. A rank left without
    a batch scores the first batch again, flagged as padding (``False``) so the merge drops it.
    """
    batches = list(range(rank, math.ceil(n / batch_size), world))
    real = bool(batches)
    idx = [i for b in (batches or [0]) for i in range(b * batch_size, min((b + 1) * batch_size, n))]
    return idx, real


class Evaluation(NamedTuple):
    """What :func:`evaluate_datasets` returns: the results, and per set the indices left out as unreadable."""

    results: Any  # samnorm.ood.OODResults
    skipped: dict[str, list[int]]


def _union_mask(dataset: Dataset, world: int) -> Tensor | None:
    mask_fn = getattr(dataset, "skipped_mask", None)
    if mask_fn is None:
        return None
    mask = mask_fn().to(torch.uint8)
    if world > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mask = mask.to(backend_device)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX)
    return mask.cpu().bool()


def _fit_scorers(built: Sequence[Any], fit_data: Dataset | None, batch_size: int, num_workers: int) -> None:
    """Fit the scorers that need ID statistics on ``fit_data`` (the same, deterministic fit on every rank)."""
    if all(s.is_fitted for s in built):
        return
    if fit_data is None:
        need = [s.name for s in built if not s.is_fitted]
        raise ValueError(f"scorers {need} need ID training statistics: give the ID training data (--fit DIR)")
    loader = DataLoader(
        fit_data, batch_size=batch_size, shuffle=False, num_workers=num_workers, worker_init_fn=worker_ignores_signals
    )
    for scorer in built:
        if not scorer.is_fitted:
            scorer.fit(loader)


def evaluate_datasets(
    model: nn.Module,
    id_data: Dataset,
    ood_data: Mapping[str, Dataset],
    scorers: Sequence[str] = ("msp", "max_logit", "energy"),
    *,
    fit_data: Dataset | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    tpr: float = 0.95,
    convention: str = "samnorm",
    id_name: str = "ID",
    scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Evaluation:
    """:func:`samnorm.ood.evaluate` on datasets, sharded across ``torch.distributed`` ranks.

    Every rank scores its share of the batches (the batches of a one-process run, dealt out in
    turn), the shards are gathered and put back in dataset order, and every rank returns the same
    :class:`samnorm.ood.OODResults`: the scores equal those of one process, with no sample dropped
    or repeated (``DistributedSampler`` would pad with repeats). Images that an
    :class:`~samnorm.data.folders.ImageFolder` could not decode (on any rank) are left out of the
    scores and metrics and listed in ``skipped``. Scorers that need ID statistics are fitted on
    ``fit_data`` by every rank (the same, deterministic fit). ``scorer_options`` maps a scorer
    name to its keyword options, e.g. ``{"rankfeat": {"blocks": (-2, -1)}}``. Every argument
    (``batch_size``, ``tpr``, ``convention``, the options) is checked before any forward pass.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from samnorm.models import T2TViT
        >>> net = T2TViT(img_size=16, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
        >>> id_set = TensorDataset(torch.rand(10, 1, 16, 16), torch.zeros(10, dtype=torch.long))
        >>> ood = {"noise": TensorDataset(torch.randn(6, 1, 16, 16), torch.zeros(6, dtype=torch.long))}
        >>> res, skipped = evaluate_datasets(net, id_set, ood, ["msp", "energy"], batch_size=4)
        >>> res.scores["MSP"]["noise"].shape, skipped
        ((6,), {'ID': [], 'noise': []})
    """
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    tpr, conv = check_tpr(tpr), resolve_convention(convention)
    names = list(scorers)
    if not names:
        raise ValueError("scorers is empty: name at least one, e.g. ['msp', 'energy']")
    options = {scorer_class(k): dict(v) for k, v in (scorer_options or {}).items()}
    if len(options) != len(scorer_options or {}):
        raise ValueError(f"scorer_options names one scorer twice: {sorted(scorer_options or {})}")
    unused = [c.name for c in options if c not in {scorer_class(n) for n in names}]
    if unused:
        raise ValueError(f"scorer_options name scorers that are not evaluated: {unused}; add them to scorers")
    rank, world = rank_world()
    adapter = ModelAdapter.from_model(model)  # one split, checked once, shared by every scorer
    built = [make_scorer(name, adapter, **options.get(scorer_class(name), {})) for name in names]
    _fit_scorers(built, fit_data, batch_size, num_workers)
    sets = {id_name: id_data, **ood_data}
    shards = {name: _batch_shard(dataset_len(ds), batch_size, rank, world) for name, ds in sets.items()}
    loaders = {
        name: DataLoader(
            ds,
            batch_size=batch_size,
            sampler=IndexSampler(shards[name][0]),
            num_workers=num_workers,
            worker_init_fn=worker_ignores_signals,
        )
        for name, ds in sets.items()
    }
    local = evaluate(
        adapter, loaders[id_name], {n: loaders[n] for n in ood_data}, built, tpr=tpr, convention=conv, id_name=id_name
    )
    scores, speed = local.scores, local.images_per_second
    if world > 1:
        mine = {name: (idx, real, {s: scores[s][name] for s in scores}) for name, (idx, real) in shards.items()}
        gathered = gather_objects((mine, speed))
        merged: dict[str, dict[str, Any]] = {s: {} for s in scores}
        for name, ds in sets.items():
            for s in scores:
                out = torch.full((dataset_len(ds),), float("nan"), dtype=torch.float64)
                for part, _ in gathered:
                    idx, real, values = part[name]
                    if real:
                        out[torch.tensor(idx)] = torch.from_numpy(values[s])
                merged[s][name] = out.numpy()
        scores, speed = merged, sum(v for _, v in gathered)
    skipped: dict[str, list[int]] = {}
    for name, ds in sets.items():
        mask = _union_mask(ds, world)
        skipped[name] = [] if mask is None else mask.nonzero().flatten().tolist()
        if mask is not None and skipped[name]:
            keep = (~mask).numpy()
            for s in scores:
                scores[s][name] = scores[s][name][keep]
    if world == 1 and not any(skipped.values()):
        return Evaluation(local, skipped)
    return Evaluation(OODResults(scores, id_name, list(ood_data), tpr, local.convention, speed), skipped)
