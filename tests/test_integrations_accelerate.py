"""sam_backward against the real accelerate: prepare, accumulate, mixed precision, save/load_state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from helpers import ce, mlp  # noqa: E402
from integration_reference import (  # noqa: E402
    BATCH,
    CLIP,
    STEPS,
    K,
    assert_same_params,
    data,
    linear_schedule,
    make_sam,
    reference,
)

from samnorm import SAM  # noqa: E402
from samnorm.integrations.accelerate import find_sam, sam_backward  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own singletons
    GradientState._reset_state()


def _train(model, x, y, *, steps=STEPS, mixed_precision="no", scaler=None, state_in=None, state_out=None):
    if scaler is not None:
        mixed_precision = "fp16"
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K, mixed_precision=mixed_precision)
    if scaler is not None:  # accelerate's CUDA fp16 path on the CPU, where accelerate has no scaler:
        acc.scaler = scaler  # the prepared optimizer steps through it, backward scales the loss
    sam = make_sam(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    model, opt, loader, sched = acc.prepare(model, sam, loader, linear_schedule(sam))
    if scaler is not None:
        acc.native_amp = True  # after prepare: clip_grad_norm_ unscales, the forward stays fp32
    if state_in is not None:
        acc.load_state(state_in)
    for i, batch in enumerate(loader):
        if i == steps * K:
            break
        with acc.accumulate(model):
            sam_backward(acc, opt, model, lambda b: nn.functional.cross_entropy(model(b[0]).float(), b[1]), batch)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
    if state_out is not None:
        acc.save_state(state_out)
    return acc, opt


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_accumulate_clip_schedule_match_hand_written_loop(precision):
    x, y = data()
    model = mlp()
    _, opt = _train(model, x, y, mixed_precision=precision)
    assert find_sam(opt) is opt.optimizer
    if precision == "no":
        assert_same_params(model, reference(mlp(), x, y), rtol=1e-6, atol=1e-7)
    else:  # the same bf16 autocast in both: only summation order may differ
        assert_same_params(model, reference(mlp(), x, y, autocast=torch.bfloat16), rtol=1e-3, atol=1e-4)


def test_fp16_grad_scaler_path_matches_unscaled_loop():
    x, y = data()
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _train(model, x, y, scaler=scaler)
    assert scaler.get_scale() == 2.0**12  # no overflow, no back-off
    # power-of-two scaling is exact: the same parameters as without a scaler
    assert_same_params(model, reference(mlp(), x, y), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:SAM. the first-pass gradient norm was not finite")
@pytest.mark.parametrize("inject", ["first", "second"])
def test_fp16_inf_in_either_pass_skips_the_step(inject):
    x, y = data()
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def poison(g):  # an inf in the chosen pass of the first step only
        calls.append(None)
        first = len(calls) <= K
        return g * float("inf") if (inject == "first") == first and len(calls) <= 2 * K else g

    model[1].weight.register_hook(poison)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _, opt = _train(model, x, y, steps=1, scaler=scaler)
    assert scaler.get_scale() == 2.0**11  # backed off
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not find_sam(opt).state  # the base optimizer never stepped


def test_save_state_load_state_resumes_exactly(tmp_path):
    x, y = data(2 * STEPS * BATCH * K)
    straight = mlp()
    _train(straight, x, y, steps=2 * STEPS)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = mlp()
    _train(resumed, x[: STEPS * BATCH * K], y[: STEPS * BATCH * K], state_out=tmp_path / "ckpt")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = mlp(seed=5)  # different weights: all must come from the checkpoint
    _train(resumed, x[STEPS * BATCH * K :], y[STEPS * BATCH * K :], state_in=tmp_path / "ckpt")
    assert_same_params(straight, resumed, rtol=0, atol=0)


def test_leftover_gradients_are_refused():
    x, y = data()
    model = mlp()
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, make_sam(model))
    nn.functional.cross_entropy(model(x), y).backward()  # and no zero_grad
    with pytest.raises(ValueError, match="zero_grad"):
        sam_backward(acc, opt, model, lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), (x, y))


def test_two_step_form_with_the_original_sam_and_the_prepared_optimizer():
    """The prepared optimizer has no first_step (accelerate's wrapper): call it on the SAM object
    itself (the same one, not a copy), then the prepared optimizer's step() finishes the step."""
    x, y = data(BATCH)
    model = mlp()
    sam = make_sam(model)
    acc = accelerate.Accelerator(cpu=True)
    prepared, opt = acc.prepare(model, sam)
    assert find_sam(opt) is sam
    sam.first_step(nn.functional.cross_entropy(prepared(x), y))
    acc.backward(nn.functional.cross_entropy(prepared(x), y))
    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    assert_same_params(model, reference(mlp(), x, y, k=1, steps=1, schedule=False), rtol=1e-6, atol=1e-7)


def test_closure_step_under_accumulate_names_sam_backward():
    x, y = data()
    model = mlp()
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K)
    model, opt = acc.prepare(model, make_sam(model))
    with pytest.raises(ValueError, match="sam_backward"):
        for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
            with acc.accumulate(model):

                def closure(xb=xb, yb=yb):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    acc.backward(loss)
                    return loss

                opt.step(closure)


def test_accumulate_with_closure_is_refused():
    x, y = data(16)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        pmodel, opt = acc.prepare(model, SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3))

        def closure():
            opt.zero_grad()
            loss = ce(pmodel, x, y)
            acc.backward(loss)
            return loss

        with pytest.raises(ValueError, match="sam_backward"):
            for _ in range(2):  # the first micro-batch's step is skipped: the closure never runs
                with acc.accumulate(pmodel):
                    opt.step(closure)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
