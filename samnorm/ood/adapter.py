"""ModelAdapter: the one place that knows how a classifier splits into feature extractor and head.

A classifier is seen as ``embed -> blocks[0] -> ... -> blocks[-1] -> pool -> fc``:

- ``embed(x)``: everything before the first block (a CNN stem, a ViT patch/position embedding);
- ``blocks``: the sequence whose outputs RankFeat edits (ResNet stages, transformer blocks);
- ``pool(h)``: from the last block's output to the ``(B, D)`` penultimate (pre-logits) features
  (final norm, global pooling or class token);
- ``fc``: the final linear layer, ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (timm's ResNetV2 head).

Every scorer in :mod:`samnorm.ood.detectors` goes through this interface, so supporting a new
architecture means writing one split, not touching the scorers; registered with
:meth:`ModelAdapter.register`, :meth:`ModelAdapter.from_model` finds it for the class and its subclasses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samnorm.utils.nn import eval_mode

__all__ = ["ModelAdapter"]

#: A registered split: ``factory(model) -> ModelAdapter`` (see :meth:`ModelAdapter.register`).
Factory = TypeVar("Factory", bound=Callable[..., "ModelAdapter"])

# Registered splits, by class (a user's architecture) or by qualified name (timm's and torchvision's
# classes, so that registering them imports neither).
_SPLITS: dict[type | str, Callable[[Any], ModelAdapter]] = {}


def _checked_fc(fc: nn.Module) -> nn.Linear | nn.Conv2d:
    if isinstance(fc, nn.Linear):
        return fc
    if isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1:
        return fc
    raise TypeError(
        f"the final layer must be an nn.Linear or a 1x1 nn.Conv2d, got {type(fc).__name__}; "
        "a model without a classification head (num_classes=0) cannot be scored"
    )


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered(cls: type) -> tuple[type, Callable[[Any], ModelAdapter]] | None:
    """The nearest class of ``cls``'s MRO with a registered split, and that split."""
    for klass in cls.__mro__:
        factory = _SPLITS.get(klass) or _SPLITS.get(_qualified(klass))
        if factory is not None:
            return klass, factory
    return None


def _overridden(cls: type, base: type) -> list[str]:
    """The methods and properties of ``base`` that its subclass ``cls`` redefines (``__init__`` and
    the other dunders aside): a split registered for ``base`` follows ``base``'s forward pass."""
    found: set[str] = set()
    for klass in cls.__mro__[: cls.__mro__.index(base)]:
        for name, value in vars(klass).items():
            routine = inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod, property))
            if routine and not (name.startswith("__") and name.endswith("__")) and hasattr(base, name):
                found.add(name)
    return sorted(found)


def _unsupported(model: nn.Module, why: str) -> TypeError:
    known = sorted({k.rsplit(".", 1)[-1] if isinstance(k, str) else k.__qualname__ for k in _SPLITS})
    return TypeError(
        f"ModelAdapter.from_model cannot split {_qualified(type(model))} into features and head: {why}. "
        f"Registered: {known} and their subclasses that override none of their methods. Build "
        "ModelAdapter(model, embed=..., blocks=..., pool=..., fc=...) explicitly (see its docstring), "
        "or register a split for the class with @ModelAdapter.register"
    )


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of :meth:`ModelAdapter.verify` for logits of ``dtype``: both sides run the
    same operations, so only a few rounding steps (more in half precision) separate them."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


class ModelAdapter:
    """Splits ``model`` into ``embed``, ``blocks``, ``pool`` and ``fc`` (see the module docstring).

    Build it with :meth:`from_model` for the architectures it knows, or explicitly for any other
    classifier. A wrong split would silently corrupt every score, so the adapter checks itself
    once, on the first batch it sees (:meth:`prepare`, :meth:`features`, :meth:`logits`): the
    logits of the split must reproduce ``model(x)`` on up to two samples, else ``ValueError``.
    Pass ``auto_verify=False`` only for a model whose ``forward`` does not return the logits. The
    adapter does not change the model's mode: scorers put it in eval mode while they score.

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
        auto_verify: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        blocks = tuple(blocks)
        if not blocks or not all(callable(b) for b in blocks):
            raise ValueError("blocks must be a non-empty sequence of modules (callables)")
        self.model = model
        self.embed = embed
        self.blocks = blocks
        self.pool = pool
        self.fc = _checked_fc(fc)
        self.name = name
        #: False until the split has been checked against ``model(x)`` (never checked when False)
        self.verified = not auto_verify

    # ------------------------------------------------------------------ construction
    @classmethod
    def register(cls, *classes: type[nn.Module] | str) -> Callable[[Factory], Factory]:
        """Decorator: ``factory(model) -> ModelAdapter`` becomes the split :meth:`from_model` uses for
        ``classes`` (class objects, or qualified names such as ``"timm.models.resnet.ResNet"`` that
        need no import) and for their subclasses that redefine none of their methods.

        A subclass that overrides a method (``forward``, ``forward_head``, ...) may compute other
        logits than the split, so it is refused unless it is registered itself; the first-batch check
        (:meth:`verify`) stays the last guard. A class is registered once (``ValueError`` otherwise).

        Example:
            >>> class Net(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.body, self.fc = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
            ...     def forward(self, x):
            ...         return self.fc(self.body(x.flatten(1)))
            >>> @ModelAdapter.register(Net)
            ... def split_net(model):
            ...     return ModelAdapter(model, embed=torch.nn.Flatten(), blocks=[model.body],
            ...                         pool=lambda h: h, fc=model.fc, name="net")
            >>> class Wider(Net):  # a new constructor, the same forward pass
            ...     pass
            >>> ModelAdapter.from_model(Wider()).name
            'net'
        """
        for klass in classes:
            if not isinstance(klass, str) and not (isinstance(klass, type) and issubclass(klass, nn.Module)):
                raise TypeError(f"register takes nn.Module classes or their qualified names, got {klass!r}")
            if klass in _SPLITS:
                raise ValueError(f"{klass!r} already has a registered split; register a subclass instead")

        def decorate(factory: Factory) -> Factory:
            if not callable(factory):
                raise TypeError(f"register decorates a function model -> ModelAdapter, got {factory!r}")
            for klass in classes:
                _SPLITS[klass] = factory
            return factory

        return decorate

    @classmethod
    def from_model(cls, model: nn.Module | ModelAdapter) -> ModelAdapter:
        """The registered split of ``model``'s class (see :meth:`register`), found along its MRO.

        Registered here: timm ``VisionTransformer`` (not DeiT's distilled subclass: it overrides
        the head), samnorm's ``T2TViT``, torchvision/timm ``ResNet`` and the timm stem/stages families
        (ResNetV2/BiT, ConvNeXt, NFNet, ByobNet/GENet, FastViT, ...: the error message lists them).
        Any other class raises ``TypeError`` naming it: build the adapter explicitly then, or
        register one. One exception: a model with exactly the torchvision ResNet attributes
        (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``-``layer4``, ``avgpool``, ``fc``) is
        split like one, and the first-batch check catches a mismatch. DistributedDataParallel,
        DataParallel and ``torch.compile`` wrappers are looked through.

        Example:
            >>> import timm  # doctest: +SKIP
            >>> ModelAdapter.from_model(timm.create_model("resnetv2_50x1_bit")).name  # doctest: +SKIP
            'resnetv2'
        """
        if isinstance(model, ModelAdapter):
            return model
        net: Any = model
        while isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(net, "_orig_mod"):
            net = net.module if hasattr(net, "module") else net._orig_mod
        if not isinstance(net, nn.Module):
            raise TypeError(f"model must be an nn.Module or a ModelAdapter, got {type(net).__name__}")
        found = _registered(type(net))
        if found is not None:
            base, factory = found
            overridden = _overridden(type(net), base)
            if overridden:
                raise _unsupported(net, f"it overrides {overridden} of {_qualified(base)}, whose split is registered")
            return factory(net)
        if _looks_like_torchvision_resnet(net):
            return _resnet(net)
        raise _unsupported(net, "its class is not one whose forward pass is known")

    # ------------------------------------------------------------------ head
    @property
    def fc_weight(self) -> Tensor:
        """The final layer's weight as a ``(K, D)`` matrix (a view: gradients reach ``fc``)."""
        return self.fc.weight.flatten(1)

    @property
    def fc_bias(self) -> Tensor | None:
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

    def head(self, features: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Logits ``(B, K)`` from penultimate features ``(B, D)``; computed in ``dtype`` (the
        features and the layer's parameters cast to it) when given, else as the layer runs."""
        if dtype is not None:
            bias = self.fc_bias
            return F.linear(features.to(dtype), self.fc_weight.to(dtype), None if bias is None else bias.to(dtype))
        if isinstance(self.fc, nn.Linear):
            return self.fc(features)
        return F.linear(features, self.fc_weight, self.fc_bias)

    # ------------------------------------------------------------------ inputs
    def placement(self) -> tuple[torch.device, torch.dtype | None]:
        """The model's device and the dtype of its first floating-point parameter (None without one)."""
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        return device, dtype

    def prepare(self, inputs: Tensor) -> Tensor:
        """``inputs`` on the model's device, floating-point ones in its parameter dtype (a float32
        batch for a bfloat16 model), after the one-time check of the split (see the class).

        Every scorer and :func:`samnorm.ood.evaluate` pass their batches through here.
        """
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a tensor batch, got {type(inputs).__name__}")
        device, dtype = self.placement()
        floating = inputs.is_floating_point() and dtype is not None
        inputs = inputs.to(device, dtype) if floating else inputs.to(device)
        self._check_once(inputs)
        return inputs

    def _check_once(self, x: Tensor) -> None:
        if not self.verified and x.shape[0] > 0:
            self.verify(x[:2])  # two samples: cheap, and enough to expose a wrong split

    # ------------------------------------------------------------------ trunk
    def block_index(self, index: int) -> int:
        """``index`` as a non-negative block index (negative counts from the end)."""
        n = len(self.blocks)
        if not isinstance(index, int) or not -n <= index < n:
            raise ValueError(f"block index must be an int in [{-n}, {n - 1}] ({n} blocks), got {index!r}")
        return index % n

    def run_blocks(self, hidden: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Apply ``blocks[start:stop]`` to ``hidden`` (the input of ``blocks[start]``)."""
        for block in self.blocks[start:stop]:
            hidden = block(hidden)
        return hidden

    def _features(self, x: Tensor) -> Tensor:
        return self.pool(self.run_blocks(self.embed(x)))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate (pre-logits) features ``(B, D)``."""
        self._check_once(x)
        return self._features(x)

    def logits(self, x: Tensor) -> Tensor:
        """Logits ``(B, K)``; equal to ``model(x)`` (see :meth:`verify`)."""
        self._check_once(x)
        return self.head(self._features(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, logits)`` from one forward pass."""
        self._check_once(x)
        feats = self._features(x)
        return feats, self.head(feats)

    def verify(self, x: Tensor, *, rtol: float | None = None, atol: float | None = None) -> None:
        """Raise ``ValueError`` unless :meth:`logits` reproduces ``model(x)`` (in eval mode).

        The default tolerances follow the logits' dtype (``rtol`` 1e-4 in float32, a few
        rounding steps in half precision; ``atol`` = ``rtol`` times the largest logit, at least
        ``rtol``). Runs by itself on the first batch; marks the adapter as verified when it passes.
        """
        with eval_mode(self.model), torch.no_grad():
            want = self.model(x)
            try:
                got = self.head(self._features(x))
            except RuntimeError as err:  # e.g. a head fed features of the wrong width
                raise ValueError(
                    f"adapter {self.name!r} fails on {_qualified(type(self.model))} ({err}); its split into "
                    "embed/blocks/pool/fc is wrong: build ModelAdapter(model, embed=..., blocks=..., "
                    "pool=..., fc=...) for this model"
                ) from err
        if not isinstance(want, Tensor):
            raise ValueError(
                f"model(x) returned a {type(want).__name__}, not the logits, so adapter {self.name!r} "
                "cannot be checked; build it with auto_verify=False if the split is right"
            )
        diff = float("nan")
        if want.shape == got.shape:
            tol = _tolerance(want.dtype) if rtol is None else rtol
            want, got = want.detach().double(), got.detach().double()
            scale = float(want.abs().max()) if want.numel() else 0.0
            slack = tol * max(1.0, scale) if atol is None else atol
            if torch.allclose(got, want, rtol=tol, atol=slack, equal_nan=True):
                self.verified = True
                return
            diff = float((got - want).abs().max())
        raise ValueError(
            f"adapter {self.name!r} does not reproduce {_qualified(type(self.model))}: logits shape "
            f"{tuple(got.shape)} vs {tuple(want.shape)}, max |difference| {diff:.3g}; its split into "
            "embed/blocks/pool/fc is wrong: build ModelAdapter(model, embed=..., blocks=..., pool=..., "
            "fc=...) for this model"
        )

    def __repr__(self) -> str:
        return (
            f"ModelAdapter({type(self.model).__name__}, name={self.name!r}, blocks={len(self.blocks)}, "
            f"features={self.num_features}, classes={self.num_classes})"
        )


# ---------------------------------------------------------------------- the registered splits
def _pre_logits_after(model: Any, *tail: nn.Module) -> Callable[[Tensor], Tensor]:
    """``pool`` of a timm model: the layers between the last block and the head, then its pre-logits."""
    return lambda h: model.forward_head(nn.Sequential(*tail)(h), pre_logits=True)


@ModelAdapter.register("samnorm.models.t2t_vit.T2TViT")
def _t2t_vit(model: Any) -> ModelAdapter:
    return ModelAdapter(
        model,
        embed=model.prepare_tokens,
        blocks=list(model.blocks),
        pool=_pre_logits_after(model, model.norm),
        fc=model.head,
        name="t2t_vit",
    )


@ModelAdapter.register("timm.models.vision_transformer.VisionTransformer")
def _vit(model: Any) -> ModelAdapter:
    def embed(x: Tensor) -> Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    return ModelAdapter(
        model,
        embed=embed,
        blocks=list(model.blocks),
        pool=_pre_logits_after(model, model.norm),
        fc=model.head,
        name="vit",
    )


def _stem_stages(name: str, tail: tuple[str, ...]) -> Callable[[Any], ModelAdapter]:
    """The split of a timm family laid out ``stem -> stages -> tail -> forward_head``."""

    def split(model: Any) -> ModelAdapter:
        if getattr(model, "fork_feat", False):
            raise _unsupported(model, "it is built as a feature pyramid (fork_feat=True)")
        fc = getattr(getattr(model, "head", None), "fc", None)
        if not isinstance(fc, nn.Module):
            raise _unsupported(model, "its head has no final layer head.fc")
        pool = _pre_logits_after(model, *(getattr(model, n) for n in tail))
        return ModelAdapter(model, embed=model.stem, blocks=list(model.stages), pool=pool, fc=fc, name=name)

    return split


#: timm classes laid out ``stem -> stages -> tail -> forward_head`` whose ``forward_features`` is
#: exactly that (checked against timm's source), with the modules of the tail in order. Only these
#: classes (and subclasses redefining none of their methods) are split this way: a look-alike may
#: hide another tail (NFNet's final_conv) or a second head (distillation), which would corrupt every
#: score silently.
_STEM_STAGES: dict[str, tuple[str, ...]] = {
    "timm.models.resnetv2.ResNetV2": ("norm",),
    "timm.models.convnext.ConvNeXt": ("norm_pre",),
    "timm.models.nfnet.NormFreeNet": ("final_conv", "final_act"),
    "timm.models.byobnet.ByobNet": ("final_conv",),
    "timm.models.fastvit.FastVit": ("final_conv",),
    "timm.models.maxxvit.MaxxVit": ("norm",),
    "timm.models.cspnet.CspNet": (),
    "timm.models.davit.DaVit": ("norm_pre",),
    "timm.models.edgenext.EdgeNeXt": ("norm_pre",),
    "timm.models.metaformer.MetaFormer": (),
    "timm.models.mambaout.MambaOut": (),
    "timm.models.gcvit.GlobalContextVit": (),
    "timm.models.vovnet.VovNet": (),
    "timm.models.hgnet.HighPerfGpuNet": (),
    "timm.models.nextvit.NextViT": ("norm",),
    "timm.models.sequencer.Sequencer2d": ("norm",),
    "timm.models.cspnext.CspNext": (),
}
for _family, _tail in _STEM_STAGES.items():
    ModelAdapter.register(_family)(_stem_stages(_family.rsplit(".", 1)[1].lower(), _tail))

_RESNET_LAYOUT = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


def _looks_like_torchvision_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, n) for n in _RESNET_LAYOUT) and not hasattr(model, "forward_head")


@ModelAdapter.register("timm.models.resnet.ResNet", "torchvision.models.resnet.ResNet")
def _resnet(model: Any) -> ModelAdapter:
    act = model.relu if hasattr(model, "relu") else model.act1  # torchvision / timm
    if hasattr(model, "forward_head"):
        pool = _pre_logits_after(model)
    else:

        def pool(h: Tensor) -> Tensor:
            return torch.flatten(model.avgpool(h), 1)

    return ModelAdapter(
        model,
        embed=nn.Sequential(model.conv1, model.bn1, act, model.maxpool),
        blocks=[model.layer1, model.layer2, model.layer3, model.layer4],
        pool=pool,
        fc=model.fc,
        name="resnet",
    )
