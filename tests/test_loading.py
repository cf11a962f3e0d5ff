"""Weights from local files: the official T2T-ViT layout, timm checkpoints, safetensors, BiT .npz."""

from __future__ import annotations

import argparse
import os
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
models = pytest.importorskip("samnorm.models")
from samnorm.models import T2TViT, create_model, extract_state_dict, load_checkpoint  # noqa: E402

TINY = dict(img_size=28, in_chans=1, num_classes=10)

# The official T2T-ViT state-dict layout (models/t2t_vit.py of yitu-opensource/T2T-ViT), spelled out.
_PERFORMER = [
    "w",
    "kqv.weight",
    "kqv.bias",
    "proj.weight",
    "proj.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
]
_BLOCK = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]


def official_keys(depth: int) -> set[str]:
    keys = {
        "cls_token",
        "pos_embed",
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
        "tokens_to_token.project.weight",
        "tokens_to_token.project.bias",
    }
    keys |= {f"tokens_to_token.attention{i}.{k}" for i in (1, 2) for k in _PERFORMER}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK}
    return keys


def _outputs_equal(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_state_dict_keys_are_the_official_layout():
    with torch.device("meta"):
        model = timm.create_model("t2t_vit_24")
    assert set(model.state_dict()) == official_keys(24)


def test_official_pth_tar_round_trip(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("t2t_vit_7", **TINY)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save(
        {
            "epoch": 309,
            "arch": "t2t_vit_7",
            "args": argparse.Namespace(lr=1e-3, model="t2t_vit_7"),
            "state_dict": {"module." + k: v for k, v in src.state_dict().items()},
            "state_dict_ema": {"module." + k: v for k, v in ema.items()},
        },
        path,
    )
    torch.manual_seed(1)
    dst = load_checkpoint(timm.create_model("t2t_vit_7", **TINY), path, use_ema=False)
    x = torch.rand(2, 1, 28, 28)
    assert _outputs_equal(src, dst, x)
    dst_ema = create_model("t2t_vit_7", checkpoint=path, **TINY)  # EMA preferred by default
    for k, v in dst_ema.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_timm_pretrained_file_path_uses_the_filter(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("t2t_vit_7", **TINY)
    path = tmp_path / "w.pth.tar"
    torch.save({"state_dict_ema": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():  # timm drops the head when num_classes differs from the hub's 1000
        assert torch.equal(src.eval().forward_features(x), dst.eval().forward_features(x))


def test_plain_state_dict_and_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = T2TViT(embed_dim=16, depth=1, num_heads=2, **TINY)
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("plain.pth", "w.safetensors"):
        dst = load_checkpoint(T2TViT(embed_dim=16, depth=1, num_heads=2, **TINY), tmp_path / name)
        assert _outputs_equal(src, dst, torch.rand(2, 1, 28, 28)), name


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    src = T2TViT(embed_dim=16, depth=2, num_heads=2, **TINY).state_dict()
    src["extra.weight"] = torch.zeros(1)
    del src["norm.bias"]
    src["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 16)
    torch.save({"state_dict": src}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_checkpoint(T2TViT(embed_dim=16, depth=2, num_heads=2, **TINY), tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing keys: norm.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "blocks.0.mlp.fc1.weight (5, 16) vs model (48, 16)" in msg and "bad.pth" in msg


def test_wrong_architecture_names_every_problem_briefly(tmp_path):
    torch.save(T2TViT(embed_dim=16, depth=3, num_heads=2, **TINY).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.2\..*\(\d+ more\)|unexpected keys: blocks\.2\."):
        load_checkpoint(T2TViT(embed_dim=16, depth=2, num_heads=2, **TINY), tmp_path / "deep.pth")


def test_head_size_inferred_or_replaced(tmp_path):
    torch.manual_seed(0)
    src = T2TViT(embed_dim=16, depth=1, num_heads=2, **TINY)
    torch.save(src.state_dict(), tmp_path / "ten.pth")
    kw = dict(img_size=28, in_chans=1, embed_dim=16, depth=1, num_heads=2, mlp_ratio=3.0)
    inferred = create_model("t2t_vit_7", checkpoint=tmp_path / "ten.pth", **kw)
    assert inferred.num_classes == 10 and _outputs_equal(src, inferred, torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"head\.weight \(10, 16\) vs model \(4, 16\)"):
        create_model("t2t_vit_7", checkpoint=tmp_path / "ten.pth", num_classes=4, **kw)
    torch.manual_seed(5)
    fresh = create_model("t2t_vit_7", checkpoint=tmp_path / "ten.pth", num_classes=4, new_head=True, **kw)
    assert fresh.head.out_features == 4
    assert torch.equal(fresh.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("head.")}, tmp_path / "body.pth")
    body = create_model("t2t_vit_7", checkpoint=tmp_path / "body.pth", num_classes=3, new_head=True, **kw)
    assert body.head.out_features == 3


def test_position_table_follows_the_image_size(tmp_path):
    src = T2TViT(embed_dim=16, depth=1, num_heads=2, **TINY)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    big = load_checkpoint(
        T2TViT(embed_dim=16, depth=1, num_heads=2, num_classes=10, img_size=64, in_chans=1), tmp_path / "w.pth"
    )
    assert big.pos_embed.shape == (1, 17, 16)
    assert torch.equal(big.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


class PickledMeta:
    """A harmless object that weights-only loading must refuse, as it would refuse malware."""

    def __init__(self) -> None:
        self.note = "trained somewhere"


def test_pickled_objects_need_trust(tmp_path):
    path = tmp_path / "pickled.pth"
    src = nn.Linear(2, 2)
    torch.save({"state_dict": src.state_dict(), "meta": PickledMeta()}, path)
    with pytest.raises(ValueError, match="trusted=True"):
        load_checkpoint(nn.Linear(2, 2), path)
    assert torch.equal(load_checkpoint(nn.Linear(2, 2), path, trusted=True).weight, src.weight)


def test_bad_inputs():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(nn.Linear(2, 2), "/nonexistent/w.pth")
    with pytest.raises(ValueError, match=r"unknown model name 'resnetv2_101x1_bt'.*similar"):
        create_model("resnetv2_101x1_bt")
    with pytest.raises(ValueError, match="not both"):
        create_model("t2t_vit_7", checkpoint="w.pth", pretrained=True)
    with pytest.raises(TypeError, match="mapping"):
        extract_state_dict([1, 2])
    with pytest.raises(ValueError, match="no state dict"):
        extract_state_dict({"epoch": 3, "lr": 0.1})


def test_name_recorded_in_a_samnorm_checkpoint(tmp_path):
    src = create_model("t2t_vit_7", num_classes=4, img_size=32, in_chans=1)
    torch.save(
        {"model": src.state_dict(), "model_name": "t2t_vit_7", "model_kwargs": dict(img_size=32, in_chans=1)},
        tmp_path / "run.pt",
    )
    dst = create_model(None, checkpoint=tmp_path / "run.pt")
    assert dst.num_classes == 4 and _outputs_equal(src, dst, torch.rand(1, 1, 32, 32))
    torch.save(src.state_dict(), tmp_path / "anon.pt")
    with pytest.raises(ValueError, match="records none"):
        create_model(None, checkpoint=tmp_path / "anon.pt")


def test_default_model_never_downloads(monkeypatch):
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for fn in ("load_state_dict_from_url", "download_cached_file", "load_state_dict_from_hf"):
        monkeypatch.setattr(builder, fn, no_network, raising=False)
    with torch.device("meta"):
        model = create_model()
    assert type(model).__name__ == "ResNetV2" and model.num_classes == 1000


def _tiny_resnetv2() -> nn.Module:
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(128, 128, 128, 128),
        stem_chs=32,
        num_classes=5,
        stem_type="fixed",
        conv_layer=partial(StdConv2d, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=32),
    )


def _export_bit_npz(model: nn.Module, path: str) -> None:
    """Write ``model`` in Google's BiT .npz layout (HWIO kernels, gamma/beta), as the releases are."""

    def hwio(t):
        t = t.detach().numpy()
        return t.transpose(2, 3, 1, 0) if t.ndim == 4 else t

    w = {
        "resnet/root_block/standardized_conv2d/kernel": hwio(model.stem.conv.weight),
        "resnet/group_norm/gamma": hwio(model.norm.weight),
        "resnet/group_norm/beta": hwio(model.norm.bias),
        "resnet/head/conv2d/kernel": hwio(model.head.fc.weight),
        "resnet/head/conv2d/bias": hwio(model.head.fc.bias),
    }
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            p = f"resnet/block{i + 1}/unit{j + 1:02d}/"
            for letter, conv, norm in (
                ("a", block.conv1, block.norm1),
                ("b", block.conv2, block.norm2),
                ("c", block.conv3, block.norm3),
            ):
                w[f"{p}{letter}/standardized_conv2d/kernel"] = hwio(conv.weight)
                w[f"{p}{letter}/group_norm/gamma"] = hwio(norm.weight)
                w[f"{p}{letter}/group_norm/beta"] = hwio(norm.bias)
            if block.downsample is not None:
                w[f"{p}a/proj/standardized_conv2d/kernel"] = hwio(block.downsample.conv.weight)
    np.savez(path, **w)


def test_bit_npz_through_timms_loader(tmp_path):
    torch.manual_seed(0)
    src = _tiny_resnetv2()
    for p in src.parameters():  # GroupNorm starts at 1/0: make every tensor distinctive
        nn.init.normal_(p.data)
    _export_bit_npz(src, str(tmp_path / "BiT-M-tiny.npz"))
    torch.manual_seed(1)
    dst = load_checkpoint(_tiny_resnetv2(), tmp_path / "BiT-M-tiny.npz")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    np.savez(tmp_path / "other.npz", foo=np.zeros(2))
    with pytest.raises(ValueError, match=r"other.npz"):
        load_checkpoint(_tiny_resnetv2(), tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"cannot read .npz"):
        load_checkpoint(nn.Linear(2, 2), tmp_path / "other.npz")
    assert os.path.isfile(tmp_path / "BiT-M-tiny.npz")


def test_bit_pytorch_layout_is_renamed(tmp_path):
    """Google's PyTorch BiT names (the MOS/GradNorm/RankFeat checkpoints), spelled out by hand."""
    torch.manual_seed(0)
    src = _tiny_resnetv2()
    theirs = {
        "root.conv.weight": src.stem.conv.weight,
        "before_head.gn.weight": src.norm.weight,
        "before_head.gn.bias": src.norm.bias,
        "head.conv.weight": src.head.fc.weight,
        "head.conv.bias": src.head.fc.bias,
    }
    for i, stage in enumerate(src.stages):
        for j, block in enumerate(stage.blocks):
            p = f"body.block{i + 1}.unit{j + 1:02d}."
            for k in (1, 2, 3):
                theirs[p + f"conv{k}.weight"] = getattr(block, f"conv{k}").weight
                theirs[p + f"gn{k}.weight"] = getattr(block, f"norm{k}").weight
                theirs[p + f"gn{k}.bias"] = getattr(block, f"norm{k}").bias
            if block.downsample is not None:
                theirs[p + "downsample.weight"] = block.downsample.conv.weight
    assert len(theirs) == len(src.state_dict())
    ckpt = {"step": 10, "model": {"module." + k: v for k, v in theirs.items()}, "optim": {}}
    torch.save(ckpt, tmp_path / "bit.pth.tar")
    dst = load_checkpoint(_tiny_resnetv2(), tmp_path / "bit.pth.tar")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
