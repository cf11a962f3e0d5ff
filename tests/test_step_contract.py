"""The step contract: hypothesis generates training loops (every SAM class, the four ways to drive
a step, accumulation windows, GradScaler on/off, zero_grad(set_to_none) either way, step hooks,
progressive unfreezing, checkpoint and resume) and each must match one hand-written reference SAM
(tests/reference_sam.py, float64) and fire the step hooks exactly once per step."""

from __future__ import annotations

import copy

import torch
from helpers import float64_net
from hypothesis import example, given
from hypothesis import strategies as st
from reference_sam import ReferenceSAM, RefSGD
from torch import nn

from samnorm.integrations import sam_passes
from samnorm.sam.protocol import run_passes
from samnorm.sam.variants import make

KINDS = {
    "sam": {},
    "interval": {"k": 2},
    "looksam": {"k": 2, "alpha": 0.7},
    "onepass": {"direction": "momentum"},
    "gsam": {"alpha": 0.3},
}
LR, MOMENTUM, WD, RHO, ETA = 0.05, 0.9, 1e-3, 0.3, 0.01
STEPS = 4


def _sam(kind, model, groups, adaptive, settings):
    base = torch.optim.SGD([{"params": g} for g in groups], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    return make(kind, base, model, rho=RHO, adaptive=adaptive, eta=ETA, **settings)


def _batches(seed, step, window):
    g = torch.Generator().manual_seed(seed * 100 + step)
    xs = torch.randn(window, 5, 4, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (window, 5), generator=g)
    return list(zip(xs, ys))


@given(
    seed=st.integers(0, 1000),
    kind=st.sampled_from(sorted(KINDS)),
    direction=st.sampled_from(["momentum", "grad"]),
    adaptive=st.booleans(),
    loop=st.sampled_from(["closure", "driver", "sam_passes", "two_step"]),
    window=st.integers(1, 3),
    scaler=st.booleans(),
    set_to_none=st.booleans(),
    unfreeze_at=st.sampled_from([None, 1, 2]),
    resume_at=st.sampled_from([None, 1, 3]),
)
@example(
    seed=0,
    kind="onepass",
    direction="momentum",
    adaptive=False,
    loop="sam_passes",
    window=2,
    scaler=False,
    set_to_none=False,
    unfreeze_at=None,
    resume_at=None,
)
@example(
    seed=0,
    kind="gsam",
    direction="grad",
    adaptive=False,
    loop="closure",
    window=1,
    scaler=True,
    set_to_none=False,
    unfreeze_at=2,
    resume_at=1,
)
@example(
    seed=1,
    kind="looksam",
    direction="grad",
    adaptive=True,
    loop="driver",
    window=1,
    scaler=True,
    set_to_none=True,
    unfreeze_at=1,
    resume_at=3,
)
def test_every_loop_matches_the_reference(
    seed, kind, direction, adaptive, loop, window, scaler, set_to_none, unfreeze_at, resume_at
):
    if loop == "closure":
        window = 1  # step(closure) sees one batch (accumulation is the other loops')
    settings = dict(KINDS[kind], **({"direction": direction} if kind == "onepass" else {}))
    model = float64_net(seed, 6, inputs=4)
    ref_model = copy.deepcopy(model)
    late = list(model[4].parameters()), list(ref_model[4].parameters())
    if unfreeze_at is not None:
        model[4].requires_grad_(False)
        ref_model[4].requires_grad_(False)
    groups = [[p for p in model.parameters() if p.requires_grad]]
    sam = _sam(kind, model, groups, adaptive, settings)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
    if grad_scaler is not None:
        grad_scaler.scale(torch.zeros(()))  # GradScaler.step(opt, closure) needs a scale before the first step
    calls = {"pre": 0, "post": 0}

    def hook(name):
        def count(*_):
            calls[name] += 1

        return count

    handles = [sam.register_step_pre_hook(hook("pre")), sam.register_step_post_hook(hook("post"))]
    ref = ReferenceSAM(kind, RHO, adaptive, ETA, RefSGD(LR, MOMENTUM, WD), **settings)

    def loss_of(net, batch):
        x, y = batch
        return nn.functional.cross_entropy(net(x), y) / window

    def backward(loss):
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()

    def finish():
        if grad_scaler is None:
            sam.step()
        else:
            grad_scaler.step(sam)
            grad_scaler.update()

    for step in range(STEPS):
        batches = _batches(seed, step, window)
        if step == unfreeze_at:
            for net in (model, ref_model):
                net[4].requires_grad_(True)
            sam.add_param_group({"params": late[0]})
        if step == resume_at:  # checkpoint and resume into a fresh optimizer
            state = copy.deepcopy(sam.state_dict())
            for h in handles:
                h.remove()
            sam = _sam(kind, model, [g["params"] for g in sam.param_groups], adaptive, settings)
            sam.load_state_dict(state)
            handles = [sam.register_step_pre_hook(hook("pre")), sam.register_step_post_hook(hook("post"))]
        if loop == "closure":

            def closure(sam=sam, batch=batches[0]):
                sam.zero_grad(set_to_none=set_to_none)
                loss = loss_of(model, batch)
                backward(loss)
                return loss

            if grad_scaler is None:
                sam.step(closure)
            else:
                grad_scaler.step(sam, closure)
                grad_scaler.update()
        elif loop == "driver":
            run_passes(
                sam, model, batches, lambda b: loss_of(model, b), backward=None if grad_scaler is None else backward
            )
            finish()
        elif loop == "sam_passes":

            def forward_backward(b):
                loss = loss_of(model, b)
                backward(loss)
                return loss

            for i, b in enumerate(batches):
                sam_passes(sam, model, b, forward_backward, last=i == window - 1)
            finish()
        else:  # the two-step form, as the passes say
            passes = sam.passes()
            if passes[0].at == "w+e":
                sam.first_step()
            for b in batches:
                backward(loss_of(model, b))
            if passes[0].at == "w":
                sam.first_step(zero_grad=len(passes) > 1)
                for _ in passes[1:]:
                    for b in batches:
                        backward(loss_of(model, b))
            finish()
        sam.zero_grad(set_to_none=set_to_none)

        ref_params = [p for p in ref_model.parameters() if p.requires_grad]
        selected = [p for p in (*ref_model[1].parameters(), *ref_model[4].parameters()) if p.requires_grad]

        def grads(batches=batches, ref_params=ref_params):
            total = sum(loss_of(ref_model, b) for b in batches)
            return list(torch.autograd.grad(total, ref_params))

        ref.step(ref_params, selected, grads)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert calls == {"pre": STEPS, "post": STEPS}
