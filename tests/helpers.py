"""Factories every test module shares (plain functions, so subprocess workers can use them too; the
pytest fixtures built on them are in conftest.py). Import as ``from helpers import ...``.

- the tiny MLP and its data: ``mlp``, ``batch``, ``ce``, ``closure``;
- the float64 problem every comparison with tests/reference_sam.py shares: ``float64_net``,
  ``reference_problem``;
- the tiny CLI runs: ``TINY`` (a one-block 16 px grayscale T2T-ViT), ``png_folder``, ``train_args``,
  ``cli`` and ``one_line`` (the one-error-line contract);
- the tiny library runs: ``tiny_t2t``, ``toy``, ``FAST`` and ``CrashAfter`` (a preempted job's data);
- the tiny OOD models and images: ``tiny_resnetv2`` (needs timm), ``images``.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------- the tiny MLP


def mlp(norm: type[nn.Module] = nn.LayerNorm, dtype=torch.float32, seed: int = 0, width: int = 16) -> nn.Sequential:
    """6 inputs -> ``width`` -> ``norm`` -> ReLU -> 4 classes, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), norm(width), nn.ReLU(), nn.Linear(width, 4)).to(dtype)


def batch(n: int = 16, dtype=torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs for ``mlp`` and their labels, from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def closure(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The LBFGS-style closure that a SAM ``step(closure)`` runs twice."""

    def closure():
        opt.zero_grad()
        loss = ce(model, x, y)
        loss.backward()
        return loss

    return closure


def float64_net(seed: int, width: int, inputs: int = 5) -> nn.Sequential:
    """Two LayerNorm blocks and a 3-class head, float64, seeded."""
    torch.manual_seed(seed)
    layers = [nn.Linear(inputs, width), nn.LayerNorm(width), nn.Tanh(), nn.Linear(width, width), nn.LayerNorm(width)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(width, 3)).double()


def reference_problem(seed: int, width: int, which: str, opt: str = "sgd"):
    """A float64 net, a batch, a base optimizer and its hand-written twin (reference_sam.RefSGD or
    RefAdamW), and what to perturb (``which``: "all", "norm" or "first"): (model, x, y, base, twin, perturb)."""
    from reference_sam import RefAdamW, RefSGD

    model = float64_net(seed, width)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    if opt == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        twin = RefSGD(0.05, 0.9, 1e-3)
    else:
        base = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
        twin = RefAdamW(0.01, 0.05)
    perturb = {"all": None, "norm": model, "first": list(model[0].parameters())}[which]
    return model, x, y, base, twin, perturb


def selection(model: nn.Module, which: str) -> list[torch.Tensor]:
    """The tensors ``reference_problem``'s ``which`` perturbs, in ``model`` (e.g. its deep copy)."""
    import samnorm

    return {
        "all": list(model.parameters()),
        "norm": list(samnorm.norm_layers(model)),
        "first": list(model[0].parameters()),
    }[which]


# ----------------------------------------------------------------------------- the tiny CLI run

TINY_MODEL = [
    "--model",
    "t2t_vit_7",
    "--model-arg",
    "img_size=16",
    "--model-arg",
    "in_chans=1",
    "--model-arg",
    "embed_dim=16",
    "--model-arg",
    "depth=1",
    "--model-arg",
    "num_heads=2",
    "--workers",
    "0",
]
TINY = [*TINY_MODEL, "--random-init"]


def png_folder(root, classes=("a", "b", "c"), per_class=4, size=(16, 16), seed=0):
    """``per_class`` grayscale PNGs per class folder under ``root`` (a class's images differ in brightness)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.random(size[::-1]) * 60 + 60 * ci).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def train_args(data, out, *extra):
    """``samnorm finetune`` on ``data`` into ``out`` with the tiny model, batch 4, a log line every step."""
    return [
        "finetune",
        "--train",
        str(data),
        "--output",
        str(out),
        *TINY,
        "--batch-size",
        "4",
        "--no-progress",
        "--log-every",
        "1",
        *extra,
    ]


def cli(args, capsys):
    """Run ``samnorm ARGS`` in-process: (exit code, stdout, stderr)."""
    from samnorm.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, message, status=2):
    """Exit ``status`` and one error line (after finetune's "fine-tuning ... -> OUT" line, if any)."""
    lines = [
        line
        for line in err.strip().splitlines()
        if not line.startswith("fine-tuning ") and not line.endswith("starts from random weights (--random-init)")
    ]
    assert code == status and len(lines) == 1 and lines[0].startswith("samnorm ") and message in lines[0], err


# ----------------------------------------------------------------------------- the tiny library run

FAST = dict(batch_size=4, progress=False, log=lambda _: None)


def tiny_t2t(seed=0, classes=3):
    """A one-block 16 px grayscale T2T-ViT."""
    from samnorm.models.t2t_vit import T2TViT

    torch.manual_seed(seed)
    return T2TViT(img_size=16, in_chans=1, num_classes=classes, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)


def toy(n=32, classes=3):
    """``n`` random 16 px grayscale images in ``classes`` classes."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % classes)


class CrashAfter(torch.utils.data.Dataset):
    """The same data, but loading dies after ``limit`` items, like a preempted job."""

    def __init__(self, data: torch.utils.data.Dataset, limit: int) -> None:
        self.data, self.limit, self.calls = data, limit, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt("preempted")
        return self.data[i]


# ----------------------------------------------------------------------------- the tiny OOD set-up


def tiny_resnetv2(num_classes: int = 10) -> nn.Module:
    """A 4-stage timm ResNetV2 in the BiT layout (StdConv2d + GroupNormAct, 1x1-conv head), eval mode."""
    import functools

    import timm

    torch.manual_seed(0)
    return timm.models.resnetv2.ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(16, 32, 64, 128),
        num_classes=num_classes,
        conv_layer=timm.layers.StdConv2d,
        norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=4),
    ).eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth images (a DC level plus texture), so block outputs have a clear top singular value."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + 0.1 * torch.rand(n, 3, size, size, generator=gen)


def free_port() -> int:
    """A TCP port free on localhost now (for a process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
