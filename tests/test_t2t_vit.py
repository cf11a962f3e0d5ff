"""T2T-ViT: published sizes, shapes on any input, and each component against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

timm = pytest.importorskip("timm")
models = pytest.importorskip("samnorm.models")
from samnorm.models.t2t_vit import Attention, Block, T2TModule, T2TViT, TokenPerformer, sinusoid_table  # noqa: E402


def tiny(**kw) -> T2TViT:
    args = dict(img_size=28, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    args.update(kw)
    return T2TViT(**args)


def published_trainable(embed: int, depth: int, mlp_ratio: float, in_chans: int = 3, classes: int = 1000) -> int:
    """Trainable parameters from the paper's layer list, counted by hand (independent of the module code)."""
    tok = 64

    def performer(d_in: int) -> int:
        return 2 * d_in + (d_in * 3 * tok + 3 * tok) + (tok * tok + tok) + 2 * tok + 2 * (tok * tok + tok)

    t2t = performer(in_chans * 49) + performer(tok * 9) + (tok * 9 * embed + embed)
    hidden = int(embed * mlp_ratio)
    attention = 3 * embed * embed + (embed * embed + embed)  # qkv without bias, projection
    block = 4 * embed + attention + (embed * hidden + hidden) + (hidden * embed + embed)
    return t2t + embed + depth * block + 2 * embed + (embed * classes + classes)


@pytest.mark.parametrize(
    "name, embed, depth, mlp, paper_millions",
    [("t2t_vit_7", 256, 7, 2.0, 4.3), ("t2t_vit_14", 384, 14, 3.0, 21.5), ("t2t_vit_24", 512, 24, 3.0, 64.1)],
)
def test_parameter_counts_match_the_paper(name, embed, depth, mlp, paper_millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    trainable = sum(p.numel() for p in model.parameters())
    fixed = sum(b.numel() for b in model.buffers())  # position table + performer features
    assert trainable == published_trainable(embed, depth, mlp)
    # The paper's counts include the fixed tables (they were frozen nn.Parameters there).
    assert round((trainable + fixed) / 1e6, 1) == paper_millions
    assert model.embed_dim == model.num_features == embed and len(model.blocks) == depth


def test_t2t_vit_24_architecture_facts():
    with torch.device("meta"):
        model = timm.create_model("t2t_vit_24")
    assert model.pos_embed.shape == (1, 197, 512)
    assert model.tokens_to_token.num_patches == 196
    assert model.tokens_to_token.grid_sizes == [(56, 56), (28, 28), (14, 14)]
    blk = model.blocks[0]
    assert blk.attn.num_heads == 8 and blk.attn.qkv.bias is None
    assert blk.mlp.fc1.out_features == 1536
    perf = model.tokens_to_token.attention1
    assert perf.kqv.in_features == 3 * 49 and perf.kqv.out_features == 3 * 64 and perf.w.shape == (32, 64)
    assert model.tokens_to_token.attention2.kqv.in_features == 64 * 9
    assert "pos_embed" not in dict(model.named_parameters())  # fixed table, not trained
    assert model.pretrained_cfg["classifier"] == "head" and model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_real_size_forward_t2t_vit_7():
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_7").eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (1, 197, 256) and logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()


def test_contract_attributes_and_forward_decomposition():
    torch.manual_seed(0)
    model = tiny().eval()
    assert model.cls_token.shape == (1, 1, 16)
    assert isinstance(model.blocks, nn.Sequential) and isinstance(model.norm, nn.LayerNorm)
    assert isinstance(model.head, nn.Linear) and model.num_classes == 10
    x = torch.rand(3, 1, 28, 28)
    tokens = model.prepare_tokens(x)
    assert tokens.shape == (3, 5, 16)
    manual = model.norm(model.blocks(tokens))
    torch.testing.assert_close(model.forward_features(x), manual, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(manual, pre_logits=True), manual[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(model(x), model.head(manual[:, 0]), rtol=0, atol=0)
    assert torch.equal(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1]).expand(3, 1, 16)[:, 0])


def test_headless_and_reset_classifier():
    model = tiny(num_classes=0)
    assert isinstance(model.head, nn.Identity)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 16)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    assert model.no_weight_decay() == {"cls_token"}


def _reference_grid(h: int, w: int) -> tuple[int, int]:
    """Token grid via three real convolutions with the paper's kernel/stride/padding."""
    x = torch.zeros(1, 1, h, w)
    for k, s, p in ((7, 4, 2), (3, 2, 1), (3, 2, 1)):
        x = F.conv2d(x, torch.zeros(1, 1, k, k), stride=s, padding=p)
    return x.shape[-2], x.shape[-1]


@settings(max_examples=15, deadline=None)
@given(h=st.integers(3, 70), w=st.integers(3, 70), c=st.sampled_from([1, 3]))
def test_any_input_size_and_channels(h, w, c):
    torch.manual_seed(0)
    model = tiny(img_size=(h, w), in_chans=c, depth=1).eval()
    gh, gw = _reference_grid(h, w)
    assert model.patch_grid == (gh, gw)
    out = model.forward_features(torch.rand(2, c, h, w))
    assert out.shape == (2, gh * gw + 1, 16)
    assert torch.isfinite(out).all()


def test_wrong_input_gets_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="img_size"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="in_chans"):
        model(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="divisible"):
        tiny(embed_dim=15)
    with pytest.raises(ValueError, match="global_pool"):
        tiny(global_pool="avg")
    with pytest.raises(ValueError, match=r"too small|positive"):
        tiny(img_size=0)


def test_sinusoid_table_against_loop():
    table = sinusoid_table(9, 6)[0].double()
    for p in range(9):
        for j in range(6):
            angle = p / 10000 ** (2 * (j // 2) / 6)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(table[p, j].item() - expected) < 1e-6
    model = tiny()
    torch.testing.assert_close(model.pos_embed, sinusoid_table(5, 16), rtol=0, atol=0)


def test_performer_equals_quadratic_linear_attention_float64():
    torch.manual_seed(0)
    layer = TokenPerformer(in_dim=12, out_dim=8, kernel_ratio=0.5).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64) * 0.5
    xn = layer.norm1(x)
    k, q, v = layer.kqv(xn).split(8, dim=-1)
    y = torch.empty(2, 7, 8, dtype=torch.float64)
    w = layer.w.double()
    m = w.shape[0]
    for b in range(2):
        phi_q = [torch.exp(w @ q[b, t] - q[b, t].dot(q[b, t]) / 2) / math.sqrt(m) for t in range(7)]
        phi_k = [torch.exp(w @ k[b, s] - k[b, s].dot(k[b, s]) / 2) / math.sqrt(m) for s in range(7)]
        for t in range(7):
            weights = torch.stack([phi_q[t].dot(phi_k[s]) for s in range(7)])
            y[b, t] = (weights[:, None] * v[b]).sum(0) / (weights.sum() + layer.eps)
    attn, _values = layer.attention(xn)
    torch.testing.assert_close(attn.double(), y, rtol=1e-5, atol=1e-6)
    expected = v + layer.proj(y)
    expected = expected + layer.mlp(layer.norm2(expected))
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)
    # The random features are orthogonal rows scaled by sqrt(m), as published.
    torch.testing.assert_close(w @ w.t(), m * torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-4)


def test_attention_equals_softmax_attention_float64():
    torch.manual_seed(0)
    attn = Attention(12, num_heads=3).double().eval()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attn(x), expected)
    # another scale (the official entry points' qk_scale): timm's fused kernel cannot take it
    for scaled in (Attention(12, num_heads=3, qk_scale=0.1), Block(12, num_heads=3, qk_scale=0.1).attn):
        scaled = scaled.double().eval()
        scaled.load_state_dict(attn.state_dict())
        weights = torch.softmax(0.1 * q @ k.transpose(-1, -2), dim=-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 12))
        torch.testing.assert_close(scaled(x), expected)


def test_t2t_module_rejects_wrong_shapes_and_runs_under_autocast():
    t2t = T2TModule(img_size=32, in_chans=3, embed_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = t2t(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 4, 16) and torch.isfinite(out.float()).all()


def test_training_is_seeded_and_eval_is_deterministic():
    torch.manual_seed(0)
    a = tiny(drop_path_rate=0.2)
    torch.manual_seed(0)
    b = tiny(drop_path_rate=0.2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.rand(4, 1, 28, 28)
    a.eval()
    torch.testing.assert_close(a(x), a(x), rtol=0, atol=0)
    a.train()
    torch.manual_seed(1)
    out1 = a(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a(x), out1, rtol=0, atol=0)


def test_registered_in_timm():
    names = timm.list_models("t2t_vit*")
    assert {"t2t_vit_7", "t2t_vit_14", "t2t_vit_24"} <= set(names)
    model = timm.create_model("t2t_vit_7", img_size=28, in_chans=1, num_classes=3, drop_path_rate=0.1)
    assert isinstance(model, T2TViT) and model(torch.rand(1, 1, 28, 28)).shape == (1, 3)
    assert "82.3_T2T_ViT_24" in timm.get_pretrained_cfg("t2t_vit_24").url
