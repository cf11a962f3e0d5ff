"""samnorm.integrations: light to import, helpful when a framework is missing, finds SAM in wrappers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from samnorm import SAM
from samnorm.integrations import find_sam, require, sam_passes

FRAMEWORKS = ("transformers", "accelerate", "pytorch_lightning", "lightning", "timm")


def test_importing_samnorm_integrations_imports_no_framework():
    code = f"import sys, samnorm, samnorm.integrations\nprint([m for m in {FRAMEWORKS!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_framework_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'samnorm\[transformers\]'"):
        require("samnorm_no_such_framework", "transformers")


def test_find_sam_through_wrappers_and_refusal():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)

    class Wrapper:  # the attribute names of accelerate's, Lightning's and timm's wrappers
        def __init__(self, name, inner):
            setattr(self, name, inner)

    wrapped = Wrapper("optimizer", Wrapper("_optimizer", Wrapper("_base_optimizer", sam)))
    assert find_sam(wrapped) is sam
    with pytest.raises(TypeError, match=r"samnorm\.SAM"):
        find_sam(torch.optim.SGD(model.parameters(), lr=0.1))
    loop = Wrapper("optimizer", None)
    loop.optimizer = loop  # a cycle ends in the error, not a hang
    with pytest.raises(TypeError, match=r"samnorm\.SAM"):
        find_sam(loop)


def test_sam_passes_refuses_leftover_gradients_and_forgets_an_aborted_window():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1)
    x = torch.randn(4, 3)
    calls = []

    def forward_backward(b):
        calls.append(b)
        loss = model(b).pow(2).mean()
        loss.backward()
        return loss

    forward_backward(x)
    with pytest.raises(ValueError, match="zero_grad"):
        sam_passes(sam, model, x, forward_backward)
    sam.zero_grad()

    def boom(b):
        raise RuntimeError("data error")

    sam_passes(sam, model, x, forward_backward, last=False)
    with pytest.raises(RuntimeError, match="data error"):
        sam_passes(sam, model, x, boom, last=False)
    sam.zero_grad()
    calls.clear()
    sam_passes(sam, model, x, forward_backward)  # a fresh window: one micro-batch, two passes
    assert len(calls) == 2
    sam.restore()
