"""SAM perturb/restore and full training steps against their baselines, side by side.

Run: ``python -m pytest benchmarks/bench_optim.py --benchmark-only`` (add ``-k cuda`` on a GPU).
The baseline "per-parameter loop" is the common formulation of public SAM code: per-tensor norms
stacked into a global norm, ``e = g * scale`` per tensor, ``p.add_(e)``, and ``p.sub_(e)`` to undo.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samnorm

timm = pytest.importorskip("timm")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _loop_perturb_restore(params, rho=0.05):
    grads = [p.grad for p in params]
    with torch.no_grad():
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        scale = rho / (norm + 1e-12)
        es = []
        for p, g in zip(params, grads):
            e = g * scale
            p.add_(e)
            es.append(e)
        for p, e in zip(params, es):
            p.sub_(e)


def _model(device, name="resnetv2_50x1_bit"):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["sam_on", "plain_sam"])
@pytest.mark.parametrize("impl", ["samnorm", "loop"])
def test_perturb_restore(benchmark, device, which, impl):
    model = _model(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    sam = samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model if which == "sam_on" else None)
    params = sam.perturbed_parameters()

    def run():
        if impl == "samnorm":
            sam.first_step()
            sam.restore()
        else:
            _loop_perturb_restore(params)
        _sync(device)

    benchmark.extra_info["pairs"] = [(f"perturb+restore {which} resnetv2_50 {device}",
                                      "candidate" if impl == "samnorm" else "baseline")]
    benchmark.pedantic(run, rounds=30 if which == "sam_on" else 8, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", ["sgd", "sam_on_loss", "sam_on_full_backward"])
def test_training_step(benchmark, device, step):
    size, batch = (128, 4) if device == "cpu" else (224, 64)
    model = _model(device, "resnetv2_50x1_bit")
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sam = samnorm.SAM(base, model, rho=0.5)

    def sgd():
        base.zero_grad()
        loss_fn(model(x), y).backward()
        base.step()
        _sync(device)

    def sam_loss():  # first pass differentiates the norm parameters only
        sam.first_step(loss_fn(model(x), y))
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)
        _sync(device)

    def sam_full():  # the usual formulation: a full backward in the first pass
        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)
        _sync(device)

    fn = {"sgd": sgd, "sam_on_loss": sam_loss, "sam_on_full_backward": sam_full}[step]
    pair = f"train step {{}} vs sgd resnetv2_50 {device}"
    benchmark.extra_info["pairs"] = (
        [(pair.format(s), "baseline") for s in ("sam_on_loss", "sam_on_full_backward")]
        if step == "sgd" else [(pair.format(step), "candidate")]
    )
    benchmark.pedantic(fn, rounds=12 if device == "cpu" else 20, warmup_rounds=2, iterations=1)
