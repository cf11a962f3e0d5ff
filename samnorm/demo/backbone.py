"""The demo's backbone and its pretraining, cached on disk keyed by what determines the weights."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samnorm.demo.config import DemoConfig, default_cache_dir
from samnorm.demo.data import DemoData, accuracy, load_data
from samnorm.runs import ensure_folder
from samnorm.utils.io import atomic_save

__all__ = ["build_backbone", "cache_path", "check_cache", "pretrain", "progress_bar"]


def build_backbone(config: DemoConfig, num_classes: int = 10) -> nn.Module:
    """The demo's compact backbone, randomly initialised (seeded by ``config.pretrain_seed``).

    ``"resnetv2"``: timm's ``ResNetV2`` (pre-activation bottlenecks, ``StdConv2d`` weight-standardised
    convolutions, ``GroupNormAct``; the BiT family), one input channel, ``config.widths`` channels and
    ``config.depths`` blocks per stage, output stride 8 so the last feature map is 4x4 (RankFeat needs a
    spatial map). ``"t2t_vit"``: :class:`samnorm.models.T2TViT` (LayerNorm, performer tokens-to-token)
    for ``config.size`` inputs, embedding width ``widths[-1] * 3 // 8`` (96 by default),
    ``len(depths)`` blocks, 4 heads, MLP ratio 2, token width 16.

    Example:
        >>> model = build_backbone(DemoConfig())
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    torch.manual_seed(config.pretrain_seed)
    if config.backbone == "t2t_vit":
        from samnorm.models import T2TViT

        dim = max(4, config.widths[-1] * 3 // 32) * 4  # divisible by the 4 heads
        return T2TViT(
            img_size=config.size,
            in_chans=1,
            num_classes=num_classes,
            embed_dim=dim,
            depth=len(config.depths),
            num_heads=4,
            mlp_ratio=2.0,
            token_dim=16,
        )
    from functools import partial

    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=list(config.depths),
        channels=tuple(config.widths),
        num_classes=num_classes,
        in_chans=1,
        stem_chs=config.stem_width,
        stem_type="fixed",
        output_stride=8,
        norm_layer=partial(GroupNormAct, num_groups=config.groups),
        conv_layer=StdConv2d,
    )


def _shift(x: Tensor, g: torch.Generator, pixels: int = 2) -> Tensor:
    """Random translation by up to ``pixels`` in each direction (zero padding = MNIST's background)."""
    padded = F.pad(x, (pixels,) * 4, value=float(x.min()))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=g)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (disabled when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True, file=sys.stderr)


def cache_path(config: DemoConfig) -> Path:
    """``<cache_dir>/demo/<backbone>-<hash of DemoConfig.pretrain_key()>.pt``."""
    key = json.dumps(config.pretrain_key(), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return folder / "demo" / f"{config.backbone}-{digest}.pt"


def check_cache(config: DemoConfig) -> None:
    """Fail now (``ValueError``) when pretraining would be needed and its cache folder cannot take the
    weights, instead of after the pretraining.

    Example:
        >>> check_cache(DemoConfig(cache_dir="/proc/no-such-cache"))
        Traceback (most recent call last):
        ...
        ValueError: the cache folder (--cache-dir, DemoConfig.cache_dir) /proc/no-such-cache/demo: cannot create ...
    """
    path = cache_path(config)
    if not path.is_file():
        ensure_folder(str(path.parent), "the cache folder (--cache-dir, DemoConfig.cache_dir)")


def pretrain(config: DemoConfig, data: DemoData | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained backbone: loaded from the cache when there, else trained on ID train and cached.

    The cache file is :func:`cache_path`, written atomically; a cache folder that cannot be created or
    written to is a ``ValueError`` before any training. Returns the model (eval mode) and
    ``{"cached": bool, "path": str, "seconds": float, "val_accuracy": float}``.

    Example:
        >>> model, info = pretrain(DemoConfig())  # doctest: +SKIP
        >>> info["cached"]                        # doctest: +SKIP
        True
    """
    key = json.dumps(config.pretrain_key(), sort_keys=True)
    path = cache_path(config)
    check_cache(config)
    data = data if data is not None else load_data(config)
    model = build_backbone(config)
    start = time.perf_counter()
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") != key:
                raise ValueError("configuration mismatch")
            model.load_state_dict(saved["state_dict"])
            model.eval()
            return model, {
                "cached": True,
                "path": str(path),
                "seconds": time.perf_counter() - start,
                "val_accuracy": float(saved["val_accuracy"]),
            }
        except Exception as exc:  # a corrupt or foreign file: retrain and overwrite it
            warnings.warn(f"ignoring the cached weights in {path} ({exc}); pretraining again", stacklevel=2)
    # DemoConfig.__post_init__ fills the backbone's defaults into these (typed optional to mean "default")
    assert config.pretrain_epochs is not None and config.pretrain_lr is not None
    x, y = data.train
    steps_per_epoch = math.ceil(len(x) / config.batch_size)
    total = config.pretrain_epochs * steps_per_epoch
    opt: torch.optim.Optimizer
    if config.pretrain_optimizer == "adamw":  # what ViTs train with; SGD leaves this one at ~75%
        opt = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=config.pretrain_lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.pretrain_lr, total_steps=total, pct_start=0.15)
    g = torch.Generator().manual_seed(config.pretrain_seed)
    model.train()
    with progress_bar(total, f"pretrain (seed {config.pretrain_seed})", config.progress) as bar:
        for _ in range(config.pretrain_epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), config.batch_size):
                idx = order[i : i + config.batch_size]
                loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    val_accuracy = accuracy(model, *data.val)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"key": key, "state_dict": model.state_dict(), "val_accuracy": val_accuracy}, path)
    return model, {
        "cached": False,
        "path": str(path),
        "seconds": time.perf_counter() - start,
        "val_accuracy": val_accuracy,
    }
