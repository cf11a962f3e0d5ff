"""ModelAdapter: the one place that knows how a classifier splits into feature extractor and head.

A classifier is seen as ``embed -> blocks[0] -> ... -> blocks[-1] -> pool -> fc``:

- ``embed(x)``: everything before the first block (a CNN stem, a ViT patch/position embedding);
- ``blocks``: the sequence whose outputs RankFeat edits (ResNet stages, transformer blocks);
- ``pool(h)``: from the last block's output to the ``(B, D)`` penultimate (pre-logits) features
  (final norm, global pooling or class token);
- ``fc``: the final linear layer, ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (timm's ResNetV2 head).

Every scorer in :mod:`samnorm.ood.detectors` goes through this interface, so supporting a new
architecture means writing one adapter, not touching the scorers.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModelAdapter"]


def _check_fc(fc: nn.Module) -> None:
    if isinstance(fc, nn.Linear):
        return
    if isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1:
        return
    raise TypeError(
        f"the final layer must be an nn.Linear or a 1x1 nn.Conv2d, got {type(fc).__name__}; "
        "a model without a classification head (num_classes=0) cannot be scored"
    )


class ModelAdapter:
    """Splits ``model`` into ``embed``, ``blocks``, ``pool`` and ``fc`` (see the module docstring).

    Build it with :meth:`from_model` for timm ResNetV2 / ResNet-like models (``stem``,
    ``stages``, ``head.fc``), timm VisionTransformer, samnorm's T2TViT, and torchvision/timm
    ResNet (``conv1`` ... ``layer4``, ``fc``); or explicitly for any other classifier, then check
    it with :meth:`verify`. The adapter does not change the model's mode: scorers put it in eval
    mode while they score.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        ...                           torch.nn.Linear(8, 4))
        >>> adapter = ModelAdapter(net, embed=torch.nn.Identity(), blocks=[net[:2], net[2:4]],
        ...                        pool=lambda h: h.mean(dim=(2, 3)), fc=net[6])
        >>> adapter.verify(torch.rand(2, 3, 9, 9))
        >>> adapter.features(torch.rand(2, 3, 9, 9)).shape, adapter.num_classes
        (torch.Size([2, 8]), 4)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        embed: Callable[[Tensor], Tensor],
        blocks: Sequence[nn.Module],
        pool: Callable[[Tensor], Tensor],
        fc: nn.Module,
        name: str = "custom",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        blocks = tuple(blocks)
        if not blocks or not all(callable(b) for b in blocks):
            raise ValueError("blocks must be a non-empty sequence of modules (callables)")
        _check_fc(fc)
        self.model = model
        self.embed = embed
        self.blocks = blocks
        self.pool = pool
        self.fc = fc
        self.name = name

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module | "ModelAdapter") -> "ModelAdapter":
        """Recognise a supported architecture by its attributes (duck typing).

        Raises ``TypeError`` naming the attributes it looked for when the model is not one of
        them; build the adapter explicitly then.

        Example:
            >>> import timm  # doctest: +SKIP
            >>> ModelAdapter.from_model(timm.create_model("resnetv2_50x1_bit")).name  # doctest: +SKIP
            'resnetv2'
        """
        if isinstance(model, ModelAdapter):
            return model
        # look through DistributedDataParallel / DataParallel and torch.compile wrappers
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(
            model, "_orig_mod"
        ):
            model = model.module if hasattr(model, "module") else model._orig_mod
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a ModelAdapter, got {type(model).__name__}")

        def has(*names: str) -> bool:
            return all(hasattr(model, n) for n in names)

        def pre_logits_after(norm: nn.Module) -> Callable[[Tensor], Tensor]:
            return lambda h: model.forward_head(norm(h), pre_logits=True)

        if has("prepare_tokens", "blocks", "norm", "head", "forward_head"):  # samnorm T2TViT
            return cls(model, embed=model.prepare_tokens, blocks=list(model.blocks),
                       pool=pre_logits_after(model.norm), fc=model.head, name="t2t_vit")
        if has("patch_embed", "_pos_embed", "blocks", "norm", "head", "forward_head"):  # timm ViT

            def embed(x: Tensor) -> Tensor:
                x = model._pos_embed(model.patch_embed(x))
                return model.norm_pre(model.patch_drop(x))

            return cls(model, embed=embed, blocks=list(model.blocks),
                       pool=pre_logits_after(model.norm), fc=model.head, name="vit")
        if has("stem", "stages", "head", "forward_head") and hasattr(model.head, "fc"):
            # timm ResNetV2 (final pre-activation `norm`), ConvNeXt-like (`norm_pre`)
            norm = next((getattr(model, n) for n in ("norm", "norm_pre") if hasattr(model, n)), nn.Identity())
            name = "resnetv2" if type(model).__name__ == "ResNetV2" else "stem_stages"
            return cls(model, embed=model.stem, blocks=list(model.stages),
                       pool=pre_logits_after(norm), fc=model.head.fc, name=name)
        if has("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"):
            act = model.relu if hasattr(model, "relu") else model.act1  # torchvision / timm
            if hasattr(model, "forward_head"):
                pool = pre_logits_after(nn.Identity())
            else:
                pool = lambda h: torch.flatten(model.avgpool(h), 1)  # noqa: E731
            return cls(model, embed=nn.Sequential(model.conv1, model.bn1, act, model.maxpool),
                       blocks=[model.layer1, model.layer2, model.layer3, model.layer4],
                       pool=pool, fc=model.fc, name="resnet")
        raise TypeError(
            f"cannot split {type(model).__name__} into features and head: expected a timm "
            "ResNetV2-like model (stem, stages, head.fc), a timm VisionTransformer (patch_embed, "
            "blocks, norm, head), samnorm's T2TViT (prepare_tokens, blocks, norm, head) or a "
            "ResNet (conv1 ... layer4, fc); build ModelAdapter(model, embed=..., blocks=..., "
            "pool=..., fc=...) yourself"
        )

    # ------------------------------------------------------------------ head
    @property
    def fc_weight(self) -> Tensor:
        """The final layer's weight as a ``(K, D)`` matrix (a view: gradients reach ``fc``)."""
        return self.fc.weight.flatten(1)

    @property
    def fc_bias(self) -> Optional[Tensor]:
        """The final layer's ``(K,)`` bias, or ``None``."""
        return self.fc.bias

    @property
    def num_features(self) -> int:
        """D, the width of the penultimate features."""
        return int(self.fc.weight.shape[1])

    @property
    def num_classes(self) -> int:
        """K, the number of logits."""
        return int(self.fc.weight.shape[0])

    def head(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from penultimate features ``(B, D)``."""
        if isinstance(self.fc, nn.Linear):
            return self.fc(features)
        return F.linear(features, self.fc_weight, self.fc_bias)

    # ------------------------------------------------------------------ trunk
    def block_index(self, index: int) -> int:
        """``index`` as a non-negative block index (negative counts from the end)."""
        n = len(self.blocks)
        if not isinstance(index, int) or not -n <= index < n:
            raise ValueError(f"block index must be an int in [{-n}, {n - 1}] ({n} blocks), got {index!r}")
        return index % n

    def run_blocks(self, hidden: Tensor, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Apply ``blocks[start:stop]`` to ``hidden`` (the input of ``blocks[start]``)."""
        for block in self.blocks[start:stop]:
            hidden = block(hidden)
        return hidden

    def features(self, x: Tensor) -> Tensor:
        """Penultimate (pre-logits) features ``(B, D)``."""
        return self.pool(self.run_blocks(self.embed(x)))

    def logits(self, x: Tensor) -> Tensor:
        """Logits ``(B, K)``; equal to ``model(x)`` (see :meth:`verify`)."""
        return self.head(self.features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, logits)`` from one forward pass."""
        feats = self.features(x)
        return feats, self.head(feats)

    def verify(self, x: Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
        """Raise ``ValueError`` unless :meth:`logits` reproduces ``model(x)`` (in eval mode).

        Use it once on a custom adapter: a wrong split silently corrupts every score.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                want, got = self.model(x), self.logits(x)
        finally:
            self.model.train(was_training)
        if want.shape != got.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
            diff = (got - want).abs().max().item() if want.shape == got.shape else float("nan")
            raise ValueError(
                f"adapter {self.name!r} does not reproduce the model: logits shape {tuple(got.shape)} "
                f"vs {tuple(want.shape)}, max |difference| {diff:.3g}; check embed/blocks/pool/fc"
            )

    def __repr__(self) -> str:
        return (
            f"ModelAdapter({type(self.model).__name__}, name={self.name!r}, blocks={len(self.blocks)}, "
            f"features={self.num_features}, classes={self.num_classes})"
        )
