"""Tokens-to-Token ViT (Yuan et al., ICCV 2021), written for samnorm and registered with timm.

The architecture follows the paper and its published checkpoints (the performer T2T variants):

* **T2T module**: three soft splits (``nn.Unfold`` with kernel/stride/padding 7/4/2, 3/2/1, 3/2/1)
  with a one-head *Performer* token layer (``token_dim`` 64, kernel ratio 0.5) after the first two,
  then a linear projection to ``embed_dim``. A 224x224 image becomes 56x56, 28x28 and finally 14x14 =
  196 tokens.
* **Backbone**: a class token, a *fixed* sinusoid position table (not learned), ``depth`` pre-norm
  transformer blocks (no qkv bias) and a final LayerNorm; the head reads the class token.

State-dict keys are those of the official checkpoints (``tokens_to_token.attention1.kqv.weight``,
``tokens_to_token.attention1.w``, ``blocks.0.attn.qkv.weight``, ``pos_embed``, ``head.weight``, ...),
so the released ``.pth.tar`` files load without renaming (see :mod:`samnorm.models.loading`).

The module layout follows timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``, ``pos_drop``,
``blocks``, ``norm``, ``head``, ``forward_features``/``forward_head``) so generic code, including the
OOD adapter, handles it like a ViT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from timm.layers import Attention as TimmAttention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block as VitBlock
from torch import Tensor, nn

from samnorm.models.state_dicts import extract_state_dict

__all__ = [
    "Attention",
    "Block",
    "T2TModule",
    "T2TViT",
    "TokenPerformer",
    "sinusoid_table",
    "t2t_vit_7",
    "t2t_vit_10",
    "t2t_vit_12",
    "t2t_vit_14",
    "t2t_vit_19",
    "t2t_vit_24",
]

# (kernel, stride, padding) of the three soft splits; the published models all use these.
_SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def _to_2tuple(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")
    return (size[0], size[1])


def _split_out(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of one unfold along one axis (the convolution formula)."""
    return (n + 2 * padding - kernel) // stride + 1


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """The fixed position table of T2T-ViT (Vaswani et al.'s sinusoids), shape ``(1, num_positions, dim)``.

    Entry ``(p, j)`` is ``sin(p / 10000^(2*(j//2)/dim))`` for even ``j`` and ``cos(...)`` for odd ``j``;
    computed in float64 and returned as float32, like the published checkpoints' ``pos_embed``.

    Example:
        >>> sinusoid_table(197, 512).shape
        torch.Size([1, 197, 512])
    """
    if num_positions < 1 or dim < 1:
        raise ValueError(f"num_positions and dim must be >= 1, got {num_positions} and {dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32).unsqueeze(0)


class TokenPerformer(nn.Module):
    """One T2T layer with single-head Performer attention (linear in the number of tokens).

    Softmax attention ``exp(q.k)`` is replaced by positive random features
    ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with ``m = int(out_dim * kernel_ratio)`` fixed orthogonal
    rows ``W`` (a buffer, saved in the state dict as ``w``): ``y_t = sum_s phi(q_t).phi(k_s) v_s /
    sum_s phi(q_t).phi(k_s)``. As in the paper the value ``v`` (not the input, whose width differs) is
    the residual: ``y = v + proj(y)``, followed by ``y + mlp(norm2(y))``.

    Example:
        >>> layer = TokenPerformer(in_dim=147, out_dim=64)
        >>> layer(torch.randn(2, 10, 147)).shape
        torch.Size([2, 10, 64])
    """

    w: Tensor  # the buffer of random-feature rows

    def __init__(self, in_dim: int, out_dim: int = 64, kernel_ratio: float = 0.5, drop: float = 0.1) -> None:
        super().__init__()
        if not kernel_ratio > 0:
            raise ValueError(f"kernel_ratio must be > 0, got {kernel_ratio}")
        self.out_dim = out_dim
        self.num_features = max(1, int(out_dim * kernel_ratio))
        self.norm1 = nn.LayerNorm(in_dim)
        self.kqv = nn.Linear(in_dim, 3 * out_dim)  # output order: key, query, value (checkpoint layout)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        # Indices 0 and 2 are the checkpoint's `mlp.0` / `mlp.2` keys.
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(drop))
        w = nn.init.orthogonal_(torch.empty(self.num_features, out_dim)) * math.sqrt(self.num_features)
        self.register_buffer("w", w)
        self.eps = 1e-8  # keeps the normaliser away from 0

    def random_features(self, x: Tensor) -> Tensor:
        """``phi(x) = exp(w x - |x|^2/2) / sqrt(m)``, shape ``(B, T, m)``, computed in float32."""
        x = x.float()
        return torch.exp(x @ self.w.float().t() - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(self.num_features)

    def attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Performer attention of normalised tokens and the values ``v`` (the residual branch)."""
        k, q, v = self.kqv(x).split(self.out_dim, dim=-1)
        # The exponentials overflow float16 easily: keep the kernel in float32 under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            kp, qp = self.random_features(k), self.random_features(q)  # (B, T, m)
            denom = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
            kv = kp.transpose(1, 2) @ v.float()  # (B, m, out_dim)
            y = (qp @ kv) / (denom + self.eps)
        return y.to(v.dtype), v

    def forward(self, x: Tensor) -> Tensor:
        y, v = self.attention(self.norm1(x))
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


class T2TModule(nn.Module):
    """Tokens-to-token encoding: image ``(B, C, H, W)`` to ``(B, N, embed_dim)`` tokens.

    ``N = h3 * w3`` with ``h1 = (H - 3) // 4 + 1``, ``h2 = (h1 - 1) // 2 + 1``, ``h3 = (h2 - 1) // 2 + 1``
    (the unfold formula), so 224 gives 14x14 = 196 tokens and 28 gives 2x2 = 4.

    Example:
        >>> t2t = T2TModule(img_size=28, in_chans=1, embed_dim=32)
        >>> t2t(torch.rand(2, 1, 28, 28)).shape, t2t.num_patches
        (torch.Size([2, 4, 32]), 4)
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 512,
        token_dim: int = 64,
        kernel_ratio: float = 0.5,
        drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.img_size = _to_2tuple(img_size, "img_size")
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = _SOFT_SPLITS
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
        self.attention1 = TokenPerformer(in_chans * k0 * k0, token_dim, kernel_ratio, drop)
        self.attention2 = TokenPerformer(token_dim * k1 * k1, token_dim, kernel_ratio, drop)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        self.in_chans = in_chans
        self.grid_sizes = self.token_grids(self.img_size)
        if min(self.grid_sizes[-1]) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for T2T-ViT: use at least 3x3 pixels")
        self.grid_size = self.grid_sizes[-1]
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    @staticmethod
    def token_grids(size: tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid ``(h, w)`` after each of the three soft splits for an input of ``size``."""
        grids, (h, w) = [], size
        for k, s, p in _SOFT_SPLITS:
            h, w = _split_out(h, k, s, p), _split_out(w, k, s, p)
            grids.append((h, w))
        return grids

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"T2T-ViT built for (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}) input got "
                f"{tuple(x.shape)}: resize the images or build the model with img_size/in_chans to match"
            )
        (h1, w1), (h2, w2), _ = self.grid_sizes
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h1, w1)
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h2, w2)
        return self.project(self.soft_split2(x).transpose(1, 2))


class Attention(TimmAttention):
    """timm's multi-head self-attention (same weights and keys: ``qkv``, ``proj``), with the
    T2T-ViT signature; ``scale`` defaults to ``head_dim ** -0.5``.

    The official ``pretrained=True`` entry points set ``qk_scale = embed_dim ** -0.5`` (a leftover of
    timm's first ViT); their released checkpoints were trained through the default path, so the
    default here is the standard scale. Pass ``qk_scale`` to reproduce the other setting.

    Example:
        >>> Attention(64, num_heads=4)(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **kwargs)
        if qk_scale is not None:
            _use_scale(self, qk_scale)


def _use_scale(attn: TimmAttention, scale: float) -> None:
    """Scale timm's attention logits ``q k^T`` by ``scale`` instead of ``head_dim ** -0.5``."""
    attn.scale = scale
    # the fused kernel has the default scale only; timm marks the flag Final for TorchScript, which
    # does not compile this model
    attn.fused_attn = False  # type: ignore[misc]


class Block(VitBlock):
    """timm's pre-norm ViT block (``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, the official
    T2T-ViT state-dict keys) with T2T-ViT's defaults: MLP ratio 3, no qkv bias, torch's LayerNorm
    (eps 1e-5, as the checkpoints were trained with), ``qk_scale`` as in :class:`Attention`.

    Example:
        >>> Block(64, num_heads=4)(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        super().__init__(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=drop,
            attn_drop=attn_drop,
            drop_path=drop_path,
            norm_layer=nn.LayerNorm,
        )
        if qk_scale is not None:
            _use_scale(cast(TimmAttention, self.attn), qk_scale)  # timm's Block builds an Attention


class T2TViT(nn.Module):
    """Tokens-to-Token ViT with the performer T2T module.

    Defaults are T2T-ViT-24 (embed 512, depth 24, 8 heads, MLP ratio 3, about 64.0M trainable
    parameters plus the fixed tables; the paper counts 64.1M). ``img_size``/``in_chans``/``num_classes``
    may be anything (e.g. 28x28 one channel for tests): the token count and the position table follow.

    Args:
        img_size: input size; the position table is fixed for it.
        in_chans: image channels.
        num_classes: classes of the linear head; 0 gives an ``nn.Identity`` head.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale: transformer shape.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after position/MLP/projection, on the
            attention map, and the stochastic-depth rate (linear over depth); all 0 as published.
        token_dim, kernel_ratio: width of the T2T tokens and the performer's feature ratio.
        t2t_drop_rate: dropout inside the performer layers (0.1 in the published models).
        global_pool: only ``"token"`` (the class token) exists; accepted for timm compatibility.

    Example:
        >>> model = T2TViT(img_size=28, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
        >>> model(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
        >>> model.forward_features(torch.rand(4, 1, 28, 28)).shape  # 2x2 tokens + class token
        torch.Size([4, 5, 32])
    """

    pos_embed: Tensor  # the buffer of the fixed sinusoid table

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 512,
        depth: int = 24,
        num_heads: int = 8,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_dim: int = 64,
        kernel_ratio: float = 0.5,
        t2t_drop_rate: float = 0.1,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.tokens_to_token = T2TModule(img_size, in_chans, embed_dim, token_dim, kernel_ratio, t2t_drop_rate)
        self.patch_grid = self.tokens_to_token.grid_size
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A buffer (saved, never trained): the published models use a fixed sinusoid table.
        self.register_buffer("pos_embed", sinusoid_table(num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth grows linearly over the blocks (plain floats: also works on the meta device).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, r) for r in rates)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _check_pool(global_pool: str | None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(
                f"T2T-ViT classifies from the class token only: global_pool must be 'token', got {global_pool!r}"
            )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's optimizer factory keeps out of weight decay."""
        return {"cls_token"}

    def get_classifier(self) -> nn.Module:
        """The classification head (timm API)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: ``nn.Identity``), timm API."""
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """Image to ``(B, N+1, C)``: T2T tokens, class token prepended, position table added, dropout."""
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised tokens ``(B, N+1, C)`` (class token first)."""
        return self.norm(self.blocks(self.prepare_tokens(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class token of the normalised tokens ``x``; its logits unless ``pre_logits``."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: T2TViT) -> dict[str, Tensor]:
    """Adapt a T2T-ViT checkpoint (official ``.pth.tar`` or timm-style) to ``model`` for timm's loader.

    Unwraps ``state_dict_ema``/``state_dict``, strips ``module.`` prefixes, and, when the checkpoint was
    made for another image size, keeps the model's own ``pos_embed``: the table is fixed, not learned.

    Example:
        >>> m = T2TViT(img_size=32, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
        >>> sorted(checkpoint_filter_fn({"state_dict": m.state_dict()}, m)) == sorted(m.state_dict())
        True
    """
    state_dict = extract_state_dict(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = model.pos_embed.detach().clone()
    return state_dict


_RELEASES = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"


def _cfg(file: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": _RELEASES + file,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": None,  # the first layer is a linear map of unfolded 7x7 patches, not a conv
        "classifier": "head",
        "license": "bsd-3-clause-clear",
        **kwargs,
    }


# Official ImageNet-1k checkpoints; used only when a caller asks for pretrained=True.
default_cfgs = generate_default_cfgs(
    {
        "t2t_vit_7.in1k": _cfg("71.7_T2T_ViT_7.pth.tar"),
        "t2t_vit_10.in1k": _cfg("75.2_T2T_ViT_10.pth.tar"),
        "t2t_vit_12.in1k": _cfg("76.5_T2T_ViT_12.pth.tar"),
        "t2t_vit_14.in1k": _cfg("81.5_T2T_ViT_14.pth.tar"),
        "t2t_vit_14.in1k_384": _cfg("83.3_T2T_ViT_14.pth.tar", input_size=(3, 384, 384), crop_pct=1.0),
        "t2t_vit_19.in1k": _cfg("81.9_T2T_ViT_19.pth.tar"),
        "t2t_vit_24.in1k": _cfg("82.3_T2T_ViT_24.pth.tar"),
    }
)

# Published shapes: (embed_dim, depth, num_heads, mlp_ratio) and the paper's parameter count.
_ARCHS = {
    "t2t_vit_7": (256, 7, 4, 2.0, "4.3M"),
    "t2t_vit_10": (256, 10, 4, 2.0, "5.9M"),
    "t2t_vit_12": (256, 12, 4, 2.0, "6.9M"),
    "t2t_vit_14": (384, 14, 6, 3.0, "21.5M"),
    "t2t_vit_19": (448, 19, 7, 3.0, "39.2M"),
    "t2t_vit_24": (512, 24, 8, 3.0, "64.1M"),  # the paper's transformer backbone
}


def _entrypoint(variant: str) -> Callable[..., T2TViT]:
    """The timm entry point ``variant(pretrained=False, **kwargs)``, registered under that name."""
    embed_dim, depth, num_heads, mlp_ratio, params = _ARCHS[variant]

    def create(pretrained: bool = False, **kwargs: Any) -> T2TViT:
        args = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        return build_model_with_cfg(
            T2TViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs)
        )

    create.__name__ = create.__qualname__ = variant
    create.__module__ = __name__  # timm finds default_cfgs through the entry point's module
    create.__doc__ = (
        f"{variant.replace('t2t_vit', 'T2T-ViT').replace('_', '-')}: embed {embed_dim}, depth {depth}, "
        f"{num_heads} heads, MLP ratio {mlp_ratio:g} ({params} parameters).\n\n"
        f"    ``pretrained=True`` downloads the official ImageNet weights (needs a network); for a local\n"
        f"    file use :func:`samnorm.models.create_model` with ``checkpoint=``.\n\n"
        f"    Example:\n"
        f"        >>> with torch.device('meta'):  # the architecture only: no memory for the weights\n"
        f"        ...     model = {variant}(num_classes=10)\n"
        f"        >>> len(model.blocks), model.embed_dim, model.head.out_features\n"
        f"        ({depth}, {embed_dim}, 10)\n"
    )
    return register_model(create)


t2t_vit_7 = _entrypoint("t2t_vit_7")
t2t_vit_10 = _entrypoint("t2t_vit_10")
t2t_vit_12 = _entrypoint("t2t_vit_12")
t2t_vit_14 = _entrypoint("t2t_vit_14")
t2t_vit_19 = _entrypoint("t2t_vit_19")
t2t_vit_24 = _entrypoint("t2t_vit_24")
