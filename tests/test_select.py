"""Selectors: norm layers by module type (torch and timm), set algebra, summaries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from samnorm.select import Selection, all_params, by_name, by_type, is_norm_layer, norm_layers, register_norm_type

timm = pytest.importorskip("timm")


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: instant, no memory
        return timm.create_model(name, pretrained=False)


def _layers(sel: Selection) -> int:
    return int(sel.summary().split(" layers")[0].split()[-1])


def test_bit_resnetv2_101_norm_count():
    sel = norm_layers(_meta("resnetv2_101x1_bit"))
    assert sel.numel() == 97_664 and _layers(sel) == 100 and len(sel) == 200
    # the name-based selection of public SAM-ON code ("norm"/"bn" in the name) is not what we do
    assert all(n.endswith(("weight", "bias")) for n in sel.names())


def test_vit_small_norm_count():
    sel = norm_layers(_meta("vit_small_patch16_224"))
    assert sel.numel() == 19_200 and _layers(sel) == 25


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetz_b16_evos", "convnextv2_atto"])
def test_norm_count_equals_everything_but_conv_linear_and_embeddings(name):
    """Independent count: these models hold parameters only in conv/linear layers, token/position
    embeddings and norm layers, so the norm elements are the rest."""
    model = _meta(name)
    other = sum(
        p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters(recurse=False)
    )
    total = sum(p.numel() for p in model.parameters())
    sel = norm_layers(model)
    assert sel.numel() == total - other > 0


def test_timm_module_only_norms_and_containers():
    from timm.layers import ConvNormAct, EvoNorm2dB0, FilterResponseNormAct2d, RmsNorm, SimpleNorm
    from timm.layers.grn import GlobalResponseNorm

    model = nn.Sequential(
        RmsNorm(4),
        SimpleNorm(4),
        EvoNorm2dB0(4),
        FilterResponseNormAct2d(4),
        GlobalResponseNorm(4),
        ConvNormAct(4, 4, 3),
    )
    assert all(is_norm_layer(m) for m in list(model)[:5])
    assert not is_norm_layer(model[5]) and is_norm_layer(model[5].bn)
    from timm.layers.mlp import GlobalResponseNormMlp

    assert not is_norm_layer(GlobalResponseNormMlp(4, 8))
    sel = norm_layers(model)
    expected = sum(p.numel() for m in list(model)[:5] for p in m.parameters()) + sum(
        p.numel() for p in model[5].bn.parameters(recurse=False)
    )
    assert sel.numel() == expected
    assert not any(n.startswith("5.conv") for n in sel.names())


def test_registered_type_and_frozen_params():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(3))

    model = nn.Sequential(Scale(), nn.LayerNorm(3))
    model[1].bias.requires_grad_(False)
    assert norm_layers(model).names() == ["1.weight"]
    register_norm_type(Scale)
    assert norm_layers(model).names() == ["0.gamma", "1.weight"]
    with pytest.raises(TypeError):
        register_norm_type(int)  # type: ignore[arg-type]


def test_by_type_by_name_all_params():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2))
    assert by_type(model, nn.Conv2d).names() == ["0.weight", "0.bias"]
    assert by_type(model, "BatchNorm2d").names() == ["1.weight", "1.bias"]
    assert by_name(model, r"^2\.").names() == ["2.weight", "2.bias"]
    assert len(all_params(model)) == 6
    with pytest.raises(ValueError):
        by_type(model)
    with pytest.raises(TypeError):
        norm_layers([nn.Linear(1, 1)])  # type: ignore[arg-type]


def test_root_norm_layer_counts_as_one_layer():
    assert "Selection: 1 layers, 2 tensors, 8 elements" in norm_layers(nn.LayerNorm(4)).summary()


def test_tied_weights_counted_once():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, lin)
    assert len(all_params(model)) == 2


@given(a=st.sets(st.integers(0, 7)), b=st.sets(st.integers(0, 7)))
def test_selection_algebra_matches_sets(a, b):
    params = [nn.Parameter(torch.zeros(i + 1)) for i in range(8)]
    sa = Selection.from_params(params[i] for i in sorted(a))
    sb = Selection.from_params(params[i] for i in sorted(b))
    ids = {id(p): i for i, p in enumerate(params)}

    def as_set(s):
        return {ids[id(p)] for p in s}

    assert as_set(sa | sb) == a | b and len(sa | sb) == len(a | b)
    assert as_set(sa & sb) == a & b
    assert as_set(sa - sb) == a - b
    assert (sa | sb).numel() == sum(i + 1 for i in a | b)
    with pytest.raises(TypeError):
        sa | params  # type: ignore[operator]


def test_summary_names_layers_tensors_elements():
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.LayerNorm(4))
    text = str(norm_layers(model))
    assert "Selection: 3 layers, 6 tensors, 24 elements" in text
    assert "LayerNorm: 2 layers, 4 tensors, 16 elements" in text
