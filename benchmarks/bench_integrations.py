"""Overhead of each training-loop integration against the plain SAM-ON step, side by side.

Run: ``python -m pytest benchmarks/bench_integrations.py --benchmark-only``.
Pairs: GradScaler step vs plain; scaler.step(sam) after unscale_ (the framework path) vs
second_step(scaler=); k=2 accumulated micro-batches vs one batch; the second_pass context
(BatchNorm shield) vs a bare second pass.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from samnorm import SAM

timm = pytest.importorskip("timm")


def _setup():
    torch.manual_seed(0)
    model = timm.models.resnetv2.ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(64, 128, 256, 512),
        num_classes=10,
        conv_layer=timm.layers.StdConv2d,
        norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=8),
    )
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    opt = SAM(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), model, rho=0.5)
    return model, opt, x, y


def _ce(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("variant", ["plain", "grad_scaler", "scaler_step_sam", "accumulate_2", "no_context"])
def test_integration_overhead(benchmark, variant):
    model, opt, x, y = _setup()
    scaler = torch.amp.GradScaler("cpu")

    def plain():
        opt.first_step(_ce(model, x, y))
        with opt.second_pass(model):
            _ce(model, x, y).backward()
        opt.second_step(zero_grad=True)

    def no_context():
        opt.first_step(_ce(model, x, y))
        _ce(model, x, y).backward()
        opt.second_step(zero_grad=True)

    def grad_scaler():
        opt.first_step(scaler.scale(_ce(model, x, y)))
        with opt.second_pass(model):
            scaler.scale(_ce(model, x, y)).backward()
        opt.second_step(scaler=scaler, zero_grad=True)
        scaler.update()

    def scaler_step_sam():  # what Lightning, accelerate and timm's NativeScaler do after the passes
        opt.first_step(scaler.scale(_ce(model, x, y)))
        with opt.second_pass(model):
            scaler.scale(_ce(model, x, y)).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    def accumulate_2():
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (_ce(model, xs, ys) / 2).backward()
        opt.first_step(zero_grad=True)
        with opt.second_pass(model):
            for xs, ys in zip(x.chunk(2), y.chunk(2)):
                (_ce(model, xs, ys) / 2).backward()
        opt.second_step(zero_grad=True)

    fn = {
        "plain": plain,
        "grad_scaler": grad_scaler,
        "scaler_step_sam": scaler_step_sam,
        "accumulate_2": accumulate_2,
        "no_context": no_context,
    }[variant]
    scaler_pair = "GradScaler step vs plain SAM-ON step"
    accum_pair = "2 accumulated micro-batches (full first backward) vs plain SAM-ON step"
    context_pair = "second_pass(model) context vs bare second pass"
    framework_pair = "scaler.step(sam) after unscale_ vs second_step(scaler=)"
    benchmark.extra_info["pairs"] = {
        "plain": [(scaler_pair, "baseline"), (accum_pair, "baseline"), (context_pair, "candidate")],
        "grad_scaler": [(scaler_pair, "candidate"), (framework_pair, "baseline")],
        "scaler_step_sam": [(framework_pair, "candidate")],
        "accumulate_2": [(accum_pair, "candidate")],
        "no_context": [(context_pair, "baseline")],
    }[variant]
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)
