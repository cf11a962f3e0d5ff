"""The demo's data (MNIST digits vs offline OOD sets) and batched inference helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from samnorm.demo.config import DemoConfig
from samnorm.utils.deprecation import renamed_getattr
from samnorm.utils.nn import eval_mode

__all__ = ["DemoData", "accuracy", "chunks", "load_data", "logits"]

_MEAN, _STD = 0.5, 0.5  # BiT's input normalisation, (x - 0.5) / 0.5


@dataclass
class DemoData:
    """ID train / validation / test pairs (normalised) and the OOD image sets by name."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    ood: dict[str, Tensor]


def _normalise(x: Tensor) -> Tensor:
    return (x - _MEAN) / _STD


def load_data(config: DemoConfig, *, heldout: bool = False) -> DemoData:
    """The ID splits and the test OOD sets of ``config`` (``heldout``: the validation OOD set instead).

    Example:
        >>> data = load_data(DemoConfig(n_train=100, n_ood=20))  # doctest: +SKIP
    """
    from samnorm.data import offline

    def cap(pair: tuple[Tensor, Tensor], n: int | None) -> tuple[Tensor, Tensor]:
        x, y = pair
        return (_normalise(x[:n]), y[:n]) if n is not None else (_normalise(x), y)

    seed, size = config.data_seed, config.size
    train = cap(offline.mnist_digits("train", size=size, seed=seed), config.n_train)
    val = cap(offline.mnist_digits("val", size=size, seed=seed), None)
    test = cap(offline.mnist_digits("test", size=size, seed=seed), config.n_test)
    if heldout:
        ood = {"heldout": _normalise(offline.heldout_patches(config.n_ood, size=size, seed=seed))}
    else:
        sets = offline.load_ood_sets(config.ood_sets, n=config.n_ood, size=size, seed=seed)
        ood = {k: _normalise(v) for k, v in sets.items()}
    return DemoData(train, val, test, ood)


def chunks(x: Tensor, y: Tensor | None = None, size: int = 500) -> list[Any]:
    """``x`` (and ``y``) cut into a list of consecutive chunks of ``size`` rows: tensors, or
    ``(x, y)`` pairs with ``y`` (unlike :func:`samnorm.utils.nn.batches`, which yields
    ``(inputs, labels or None)`` from any data it accepts).

    Example:
        >>> [tuple(c.shape) for c in chunks(torch.zeros(5, 2), size=2)]
        [(2, 2), (2, 2), (1, 2)]
    """
    return [(x[i : i + size], y[i : i + size]) if y is not None else x[i : i + size] for i in range(0, len(x), size)]


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` in eval mode, by batches; the model's train/eval mode is restored."""
    with eval_mode(model):
        return torch.cat([model(b) for b in chunks(x)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return float((logits(model, x).argmax(1) == y).double().mean())


# demo.data.batches was renamed chunks: samnorm.utils.nn.batches is another function of that name.
__getattr__ = renamed_getattr(__name__, {"batches": "samnorm.demo.data:chunks"})
