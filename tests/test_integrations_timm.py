"""SAM in timm's train loop, with timm's real NativeScaler, clipping and Lookahead."""

from __future__ import annotations

import pytest
import torch

timm_utils = pytest.importorskip("timm.utils")

from helpers import batch, ce, mlp  # noqa: E402
from integration_reference import (  # noqa: E402
    BATCH,
    CLIP,
    LR,
    RHO,
    STEPS,
    K,
    assert_same_params,
    data,
    make_sam,
    reference,
)
from reference_sam import sam_sgd  # noqa: E402
from timm.optim import Lookahead  # noqa: E402

from samnorm import SAM  # noqa: E402
from samnorm.integrations.timm import find_sam, sam_step  # noqa: E402
from samnorm.sam.protocol import Phase  # noqa: E402


def _native_scaler():
    return timm_utils.NativeScaler(device="cpu")  # the CUDA GradScaler code path, on the CPU


@pytest.mark.parametrize("scaled", [False, True])
def test_native_scaler_after_first_step_matches_reference(scaled):
    x, y = data(STEPS * BATCH)
    model = mlp()
    sam = make_sam(model)
    loss_scaler = _native_scaler() if scaled else None
    for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
        loss = ce(model, xb, yb)
        sam.first_step(loss_scaler._scaler.scale(loss) if scaled else loss)
        with sam.second_pass(model):
            loss2 = ce(model, xb, yb)
        if scaled:  # exactly timm's _backward with a loss scaler
            loss_scaler(loss2, sam, clip_grad=CLIP, parameters=model.parameters())
        else:  # and without one
            loss2.backward()
            timm_utils.dispatch_clip_grad(model.parameters(), CLIP)
            sam.step()
        sam.zero_grad()
    if scaled:
        assert loss_scaler.state_dict()["scale"] == 2.0**16  # no overflow, no back-off
    # power-of-two scaling is exact
    assert_same_params(model, reference(mlp(), x, y, k=1, schedule=False), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
def test_default_native_scaler_without_cuda_is_a_plain_step():
    x, y = data(BATCH)
    model = mlp()
    sam = make_sam(model)
    loss_scaler = timm_utils.NativeScaler()  # device="cuda": disabled on a CPU-only machine
    sam.first_step(ce(model, x, y))
    with sam.second_pass(model):
        loss_scaler(ce(model, x, y), sam, clip_grad=CLIP, parameters=model.parameters())
    assert_same_params(model, reference(mlp(), x, y, k=1, steps=1, schedule=False), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scaled", [False, True])
def test_sam_step_accumulates_over_the_window(scaled):
    x, y = data()
    model = mlp()
    sam = make_sam(model)
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda t: 1 - t / STEPS)
    loss_scaler = _native_scaler() if scaled else None
    micro = list(zip(x.split(BATCH), y.split(BATCH)))
    for s in range(STEPS):
        sam_step(
            sam,
            model,
            lambda b: ce(model, *b) / K,
            micro[s * K : (s + 1) * K],
            loss_scaler=loss_scaler,
            clip_grad=CLIP,
            parameters=model.parameters(),
        )
        sched.step()
    assert_same_params(model, reference(mlp(), x, y), rtol=1e-6, atol=1e-7)


def _lookahead_reference(x, y, k, alpha):
    """SAM steps by hand, then timm's Lookahead rule written out: every k steps the slow weights
    move alpha of the way to the fast ones, and the fast weights jump there (timm starts the slow
    weights at the fast ones of the first sync, which therefore changes nothing)."""
    model = mlp()
    sam = make_sam(model)
    slow = None
    for s, (xb, yb) in enumerate(zip(x.split(BATCH), y.split(BATCH)), 1):
        sam.first_step(ce(model, xb, yb))
        ce(model, xb, yb).backward()
        sam.second_step(zero_grad=True)
        if s % k == 0 and slow is None:
            slow = [p.detach().clone() for p in model.parameters()]
        elif s % k == 0:
            with torch.no_grad():
                for w, p in zip(slow, model.parameters()):
                    w += alpha * (p - w)
                    p.copy_(w)
    return model


@pytest.mark.parametrize("order", ["Lookahead(SAM)", "SAM(Lookahead)"])
def test_lookahead_either_side(order):
    x, y = data(6 * BATCH)
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if order == "Lookahead(SAM)":
        opt = Lookahead(SAM(sgd, model, rho=RHO), alpha=0.5, k=2)
    else:
        opt = SAM(Lookahead(sgd, alpha=0.5, k=2), model, rho=RHO)
    sam = find_sam(opt)
    for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
        sam.first_step(ce(model, xb, yb))
        ce(model, xb, yb).backward()
        opt.step()  # for Lookahead(SAM): Lookahead's step, which calls SAM's
        opt.zero_grad()
    assert_same_params(model, _lookahead_reference(x, y, k=2, alpha=0.5), rtol=1e-6, atol=1e-7)


def test_native_scaler_without_first_step_names_the_integration():
    x, y = data(BATCH)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"samnorm\.integrations\.timm"):
        _native_scaler()(ce(model, x, y), make_sam(model), clip_grad=CLIP, parameters=model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_clip_without_parameters_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="parameters"):
        sam_step(make_sam(model), model, lambda b: ce(model, *b), [data(BATCH)], clip_grad=1.0)


def test_lookahead_of_sam_with_a_scaler_restores_the_weights_of_a_skipped_step():
    x, y = data(BATCH)
    model = mlp()
    opt = Lookahead(SAM(torch.optim.SGD(model.parameters(), lr=LR), model, rho=RHO), alpha=0.5, k=2)
    before = [p.detach().clone() for p in model.parameters()]

    def poisoned(b):  # finite first pass, inf in the second
        loss = ce(model, *b)
        return loss * float("inf") if find_sam(opt).phase is Phase.PERTURBED else loss

    scaler = _native_scaler()
    sam_step(opt, model, poisoned, [(x, y)], loss_scaler=scaler)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler._scaler.get_scale() < 65536.0  # backed off
    sam_step(opt, model, lambda b: ce(model, *b), [(x, y)], loss_scaler=scaler)  # the next step runs
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_lookahead_around_sam_two_step_form():
    pytest.importorskip("timm")
    from timm.optim import Lookahead

    x, y = batch(dtype=torch.float64)
    model, ref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    la = Lookahead(opt, alpha=0.5, k=2)
    slow = None
    for step in range(1, 7):
        opt.first_step(ce(model, x, y))
        ce(model, x, y).backward()
        la.step()  # Lookahead.step calls SAM.step(), which finishes the SAM step
        la.zero_grad()
        sam_sgd(ref, list(ref[1].parameters()), lambda: ce(ref, x, y), rho=0.3, lr=0.1, steps=1)
        if step % 2 == 0:  # Lookahead: slow += alpha (fast - slow); fast = slow (slow starts at step k)
            slow = slow or [p.detach().clone() for p in ref.parameters()]
            with torch.no_grad():
                for s, p in zip(slow, ref.parameters()):
                    s += 0.5 * (p - s)
                    p.copy_(s)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
