"""What every part of samnorm that runs a model shares: eval mode for a block, and batches of data.

The OOD scorers and harness (:mod:`samnorm.ood`), the diagnostics and the demo all read the same
kinds of data: a DataLoader (or any re-iterable of batches) yielding ``(images, labels)`` pairs or
bare image tensors, an ``(images, labels)`` pair of tensors, or one image tensor. They go through
:func:`batches` (and :func:`split_batch` for one batch), so they accept and refuse the same things.
The fine-tuning recipe and the sharded OOD evaluation pick dataset items with :class:`IndexSampler`.
Only torch is imported here.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    >>> with eval_mode(net):
    ...     net.training
    False
    >>> net.training
    True
    >>> [tuple(x.shape) for x, _ in batches(torch.zeros(5, 3), batch_size=2)]
    [(2, 3), (2, 3), (1, 3)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sized
from typing import Any, cast

from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

__all__ = ["Batch", "IndexSampler", "batches", "dataset_len", "eval_mode", "is_tensor_pair", "split_batch"]

Batch = tuple[Tensor, Tensor | None]
"""One batch: ``(inputs, labels or None)``."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flag afterwards
    (also on an exception). Only the top-level flag is restored, as ``model.train(mode)`` sets it
    for every submodule.

    Example:
        >>> import torch
        >>> net = torch.nn.BatchNorm1d(2)
        >>> with eval_mode(net) as m:
        ...     m is net, net.training
        (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def split_batch(batch: Any) -> Batch:
    """``(inputs, labels or None)`` of one batch: an image tensor, or a tuple/list whose first
    entry is the images and whose second entry, when a tensor, the labels.

    Example:
        >>> import torch
        >>> x, y = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> tuple(x.shape), y.tolist()
        ((2, 3), [0, 1])
        >>> split_batch(torch.zeros(2, 3))[1] is None
        True
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    raise TypeError(f"a loader must yield image tensors or (images, labels) pairs, got {type(batch).__name__}")


def is_tensor_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(images (N, ...), labels (N,))`` pair of tensors.

    Example:
        >>> import torch
        >>> is_tensor_pair((torch.zeros(4, 3), torch.zeros(4))), is_tensor_pair(torch.zeros(4, 3))
        (True, False)
    """
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[1].dim() == 1
        and data[0].dim() > 1
        and data[0].shape[0] == data[1].shape[0]
    )


def batches(data: Any, batch_size: int = 256) -> Iterator[Batch]:
    """``(inputs, labels or None)`` batches of a loader (its own batches, see :func:`split_batch`),
    of an ``(images, labels)`` pair of tensors or of an image tensor (``batch_size`` rows at a time).

    Example:
        >>> import torch
        >>> x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
        >>> [labels.tolist() for _, labels in batches((x, y), batch_size=2)]
        [[0, 1], [2]]
    """
    if isinstance(data, Tensor) or is_tensor_pair(data):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        x, y = (data, None) if isinstance(data, Tensor) else data
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], None if y is None else y[i : i + batch_size]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a DataLoader, an iterable of batches, an (images, labels) pair or a "
            f"tensor, got {type(data).__name__}"
        )
    for batch in data:
        yield split_batch(batch)


class IndexSampler(Sampler[int]):
    """Yields a fixed list of dataset indices, in order (the rest of an epoch after a resume, a rank's shard).

    Example:
        >>> list(IndexSampler([4, 2, 7])), len(IndexSampler([4, 2, 7]))
        ([4, 2, 7], 3)
    """

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def dataset_len(dataset: Dataset) -> int:
    """The size of a map-style dataset (``Dataset`` declares no ``__len__``; the callers check it has one).

    Example:
        >>> import torch
        >>> dataset_len(torch.utils.data.TensorDataset(torch.zeros(5, 2)))
        5
    """
    return len(cast(Sized, dataset))
