"""SAM in hand-written training loops: GradScaler, accumulation, BatchNorm, clipping, compile (each
trainer's own loop is in its test_integrations_*.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import batch, ce, mlp
from reference_sam import sam_sgd
from torch import nn

from samnorm import SAM, disable_running_stats
from samnorm.sam.variants import make

# ----------------------------------------------------------------------------- GradScaler


_APIS = ["second_step", "scaler.step(sam)", "scaler.step(sam, closure)", "timm.NativeScaler"]


def _scaler_step(model, opt, scaler, x, y, inject=None, api="second_step"):
    """One AMP step through ``api``; ``inject`` puts an inf in one pass's gradient."""
    handles = []

    def hook(param):
        handles.append(param.register_hook(lambda g: g * float("inf")))

    def drop():
        while handles:
            handles.pop().remove()

    if api == "scaler.step(sam, closure)":
        calls = []

        def closure():
            calls.append(1)
            if (inject, len(calls)) in (("first", 1), ("second", 2)):
                hook(model[1].weight if inject == "first" else model[0].weight)
            opt.zero_grad()
            loss = ce(model, x, y)
            scaler.scale(loss).backward()
            drop()
            return loss

        scaler.scale(torch.ones(()))  # GradScaler creates its scale on the first scale(), not in step()
        scaler.step(opt, closure)
        scaler.update()
        opt.zero_grad()
        return
    if inject == "first":  # on a norm weight: the SAM-ON first pass differentiates only those
        hook(model[1].weight)
    opt.first_step(scaler.scale(ce(model, x, y)))
    drop()
    if inject == "second":
        hook(model[0].weight)
    with opt.second_pass(model):
        loss = ce(model, x, y)
        if api != "timm.NativeScaler":
            scaler.scale(loss).backward()
    if api == "second_step":
        opt.second_step(scaler=scaler)
        scaler.update()
    elif api == "scaler.step(sam)":
        scaler.step(opt)
        scaler.update()
    else:  # timm's train loop: backward, unscale_(sam), clip, scaler.step(sam), update
        from timm.utils import NativeScaler

        native = NativeScaler("cpu")
        native._scaler = scaler
        native(loss, opt, clip_grad=1e3, parameters=model.parameters())
    drop()
    opt.zero_grad()


@pytest.mark.parametrize("api", _APIS)
def test_grad_scaler_matches_unscaled_step_exactly(api):
    if api == "timm.NativeScaler":
        pytest.importorskip("timm")
    x, y = batch()
    a, b = mlp(), mlp()
    oa = SAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, rho=0.3)
    ob = SAM(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), b, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        _scaler_step(a, oa, scaler, x, y, api=api)
        ob.first_step(ce(b, x, y))
        ce(b, x, y).backward()
        ob.second_step(zero_grad=True)
    # power-of-two scaling is exact: the ascent direction and the unscaled gradient are identical
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert scaler.get_scale() == 2.0**12  # no inf: no back-off


@pytest.mark.filterwarnings("ignore:SAM. the first-pass gradient norm was not finite")
@pytest.mark.parametrize("api", _APIS)
@pytest.mark.parametrize("inject", ["first", "second"])
def test_grad_scaler_inf_in_either_pass_skips_whole_step_and_backs_off(inject, api):
    if api == "timm.NativeScaler":
        pytest.importorskip("timm")
    x, y = batch()
    model = mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = copy.deepcopy(model.state_dict())
    _scaler_step(model, opt, scaler, x, y, inject=inject, api=api)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the step had an inf"
    assert scaler.get_scale() == 2.0**11
    assert opt.nonfinite_steps == (1 if inject == "first" else 0)
    assert not opt.state  # the base optimizer never stepped: no momentum buffers
    _scaler_step(model, opt, scaler, x, y, api=api)  # and the next clean step goes through
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 2.0**11


@pytest.mark.filterwarnings("ignore:SAM. the first-pass gradient norm was not finite")
def test_grad_scaler_with_fused_base_skips_on_the_device():
    x, y = batch()
    a, b = mlp(), mlp()
    oa = SAM(torch.optim.AdamW(a.parameters(), lr=0.01, fused=True), a, rho=0.3)
    ob = SAM(torch.optim.AdamW(b.parameters(), lr=0.01), b, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _scaler_step(a, oa, scaler, x, y, inject="first", api="scaler.step(sam)")
    assert scaler.get_scale() == 2.0**11
    for _ in range(2):
        _scaler_step(a, oa, scaler, x, y, api="scaler.step(sam)")
        ob.first_step(ce(b, x, y))
        ce(b, x, y).backward()
        ob.step()
        ob.zero_grad()
    # the skipped step left no trace: same weights and Adam step count as two clean steps
    assert all(int(s["step"]) == 2 for s in oa.state.values())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:SAM. the first-pass gradient norm was not finite")
@pytest.mark.parametrize("finish", ["second_step", "scaler.step(sam)"])
@pytest.mark.parametrize("unscale_on", ["base", "sam"])
def test_grad_scaler_unscale_before_second_step_for_clipping(unscale_on, finish):
    # every entry point divides by the scale exactly once, whichever object unscale_ was given
    x, y = batch()
    for inject in (None, "first"):
        a, b = mlp(), mlp()
        oa = SAM(torch.optim.SGD(a.parameters(), lr=0.1), a, rho=0.3)
        ob = SAM(torch.optim.SGD(b.parameters(), lr=0.1), b, rho=0.3)
        sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2))
        before = copy.deepcopy(b.state_dict())
        _scaler_step(a, oa, sa, x, y, inject=inject)
        handle = b[1].weight.register_hook(lambda g: g * float("inf")) if inject else None
        ob.first_step(sb.scale(ce(b, x, y)))
        if handle:
            handle.remove()
        sb.scale(ce(b, x, y)).backward()
        sb.unscale_(ob.base_optimizer if unscale_on == "base" else ob)  # e.g. to clip
        if finish == "second_step":
            ob.second_step(scaler=sb, zero_grad=True)
        else:
            sb.step(ob)
            ob.zero_grad()
        sb.update()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
        if inject:
            assert sb.get_scale() == 2.0**11
            assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())


def test_grad_scaler_unscale_on_both_sam_and_base_is_refused():
    x, y = batch()
    model = mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt.first_step(scaler.scale(ce(model, x, y)))
    scaler.scale(ce(model, x, y)).backward()
    scaler.unscale_(opt.base_optimizer)
    scaler.unscale_(opt)  # the shared gradients are now divided twice
    with pytest.raises(RuntimeError, match="both SAM and its base optimizer"):
        scaler.step(opt)


@pytest.mark.parametrize("name", ["sam", "interval", "onepass"])
def test_grad_scaler_unscale_before_a_closure_step_is_refused(name):
    # the closure computes the gradients inside the step: GradScaler would hand over no scale
    x, y = batch()
    model = mlp()
    opt = make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.3)
    if name == "interval":
        opt.steps = 1  # a plain step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def closure():
        opt.zero_grad()
        loss = ce(model, x, y)
        scaler.scale(loss).backward()
        return loss

    before = copy.deepcopy(model.state_dict())
    scaler.scale(torch.ones(()))  # GradScaler sets its scale lazily
    scaler.unscale_(opt)
    with pytest.raises(ValueError, match="nothing to unscale yet"):
        scaler.step(opt, closure)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "found_inf" not in vars(opt)


@pytest.mark.filterwarnings("ignore:SAM. the first-pass gradient norm was not finite")
def test_disabled_grad_scaler_behaves_like_no_scaler():
    x, y = batch()
    model = mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _scaler_step(model, opt, scaler, x, y, inject="first")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.nonfinite_steps == 1


def test_fp16_autocast_step_runs_on_cpu():
    x, y = batch()
    model = mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ce(model, x, y)
    opt.first_step(scaler.scale(loss))
    with torch.autocast("cpu", dtype=torch.float16), opt.second_pass(model):
        loss2 = ce(model, x, y)
    scaler.scale(loss2).backward()
    opt.second_step(scaler=scaler, zero_grad=True)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- step contract


def test_step_after_first_step_finishes_the_sam_step():
    x, y = batch(dtype=torch.float64)
    model, ref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    for _ in range(3):
        opt.first_step(ce(model, x, y))
        ce(model, x, y).backward()  # the framework's backward ...
        assert opt.step() is None  # ... and its optimizer.step()
        opt.zero_grad()
    sam_sgd(ref, list(ref[1].parameters()), lambda: ce(ref, x, y), rho=0.3, lr=0.1, steps=3)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_closure_after_first_step_is_the_second_pass():
    x, y = batch(dtype=torch.float64)
    model, ref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    for _ in range(2):
        opt.first_step(ce(model, x, y))

        def second_pass():
            opt.zero_grad()
            loss = ce(model, x, y)
            loss.backward()
            return loss

        assert opt.step(second_pass) is not None
    sam_sgd(ref, list(ref[1].parameters()), lambda: ce(ref, x, y), rho=0.3, lr=0.1, steps=2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_step_without_closure_or_first_step_names_the_supported_paths():
    model = mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    ce(model, *batch()).backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        opt.step()
    for path in (
        "step(closure)",
        "first_step",
        "SAMTrainer",
        "integrations.lightning",
        "integrations.timm",
        "integrations.accelerate",
    ):
        assert path in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    scaler = torch.amp.GradScaler("cpu")  # the same error through GradScaler, and no stale attributes
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="first_step"):
        scaler.step(opt)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


# ----------------------------------------------------------------------------- accumulation


def test_closure_step_refuses_accumulated_gradients():
    x, y = batch()
    model = mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    ce(model, x[:8], y[:8]).backward()  # micro-batch A, accumulated

    def accumulating():  # micro-batch B added to A's gradient, as Lightning's last micro-batch does
        loss = ce(model, x[8:], y[8:])
        loss.backward()
        return loss

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"accumulat.*first_step"):
        opt.step(accumulating)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def zeroing():  # gradients left by an earlier backward, but the closure starts afresh
        model.zero_grad()
        return accumulating()

    opt.step(zeroing)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("perturb", ["norm", "all"])
def test_gradient_accumulation_equals_large_batch(perturb):
    x, y = batch(24, torch.float64)
    big, acc = mlp(dtype=torch.float64), mlp(dtype=torch.float64)

    def make(m):
        return SAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m if perturb == "norm" else None, rho=0.4)

    ob, oa = make(big), make(acc)
    k = 3
    for _ in range(2):
        ob.first_step(ce(big, x, y))
        ce(big, x, y).backward()
        ob.second_step(zero_grad=True)
        # k micro-batches: both passes accumulate into .grad, the ascent uses the sum
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (ce(acc, xs, ys) / k).backward()
        oa.first_step(zero_grad=True)
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (ce(acc, xs, ys) / k).backward()
        oa.second_step(zero_grad=True)
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- BatchNorm


def test_second_pass_leaves_batchnorm_statistics_alone():
    x, y = batch()
    model = mlp(nn.BatchNorm1d)
    ref = copy.deepcopy(model)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5)
    opt.first_step(ce(model, x, y))
    with opt.second_pass(model):
        ce(model, x, y).backward()
    opt.second_step(zero_grad=True)
    ref(x)  # one forward at the unperturbed point: what the statistics must reflect
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(ref[1], name)), name
    # and without the context the perturbed pass would have moved them
    bn = copy.deepcopy(model[1])
    bn(torch.randn(8, 16))
    assert not torch.equal(bn.running_mean, model[1].running_mean)


def test_closure_step_shields_batchnorm_when_sam_knows_the_model():
    x, y = batch()
    model = mlp(nn.BatchNorm1d)
    ref = copy.deepcopy(model)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5)

    def closure():
        opt.zero_grad()
        loss = ce(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    ref(x)
    assert torch.equal(model[1].running_mean, ref[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


def test_disable_running_stats_restores_flags_on_error():
    bn = nn.BatchNorm1d(3)
    with pytest.raises(RuntimeError), disable_running_stats(bn):
        raise RuntimeError("x")
    assert bn.track_running_stats


# ----------------------------------------------------------------------------- clipping


def test_clipping_the_second_pass_gradient():
    x, y = batch(dtype=torch.float64)
    model = mlp(dtype=torch.float64)
    lr, max_norm = 0.5, 0.01
    opt = SAM(torch.optim.SGD(model.parameters(), lr=lr), model, rho=0.2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step(ce(model, x, y))
    ce(model, x, y).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # the documented place
    grads = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    assert float(total) > max_norm
    assert (
        abs(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) - max_norm) < 1e-5 * max_norm
    )  # clip divides by norm + 1e-6
    for p, w, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), w - lr * g)


# ----------------------------------------------------------------------------- compile


def test_compiled_model_trains_like_eager():
    pytest.importorskip("torch._dynamo")
    x, y = batch()
    eager, comp = mlp(), mlp()
    compiled = torch.compile(comp, backend="aot_eager")  # dynamo + AOTAutograd, no C++ toolchain
    oe = SAM(torch.optim.SGD(eager.parameters(), lr=0.1), eager, rho=0.3)
    oc = SAM(torch.optim.SGD(comp.parameters(), lr=0.1), comp, rho=0.3)
    for _ in range(3):
        for m, o in ((eager, oe), (compiled, oc)):
            o.first_step(ce(m, x, y))
            ce(m, x, y).backward()
            o.second_step(zero_grad=True)
    for p, q in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
