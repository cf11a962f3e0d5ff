"""SAM in real training loops: GradScaler, accumulation, BatchNorm, clipping, compile, Lightning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samnorm import SAM, disable_running_stats
from samnorm.sam.variants import make


def _mlp(norm=nn.LayerNorm, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), norm(16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def _data(n=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _ce(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


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
            loss = _ce(model, x, y)
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
    opt.first_step(scaler.scale(_ce(model, x, y)))
    drop()
    if inject == "second":
        hook(model[0].weight)
    with opt.second_pass(model):
        loss = _ce(model, x, y)
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
    x, y = _data()
    a, b = _mlp(), _mlp()
    oa = SAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, rho=0.3)
    ob = SAM(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), b, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        _scaler_step(a, oa, scaler, x, y, api=api)
        ob.first_step(_ce(b, x, y))
        _ce(b, x, y).backward()
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
    x, y = _data()
    model = _mlp()
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
    x, y = _data()
    a, b = _mlp(), _mlp()
    oa = SAM(torch.optim.AdamW(a.parameters(), lr=0.01, fused=True), a, rho=0.3)
    ob = SAM(torch.optim.AdamW(b.parameters(), lr=0.01), b, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _scaler_step(a, oa, scaler, x, y, inject="first", api="scaler.step(sam)")
    assert scaler.get_scale() == 2.0**11
    for _ in range(2):
        _scaler_step(a, oa, scaler, x, y, api="scaler.step(sam)")
        ob.first_step(_ce(b, x, y))
        _ce(b, x, y).backward()
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
    x, y = _data()
    for inject in (None, "first"):
        a, b = _mlp(), _mlp()
        oa = SAM(torch.optim.SGD(a.parameters(), lr=0.1), a, rho=0.3)
        ob = SAM(torch.optim.SGD(b.parameters(), lr=0.1), b, rho=0.3)
        sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2))
        before = copy.deepcopy(b.state_dict())
        _scaler_step(a, oa, sa, x, y, inject=inject)
        handle = b[1].weight.register_hook(lambda g: g * float("inf")) if inject else None
        ob.first_step(sb.scale(_ce(b, x, y)))
        if handle:
            handle.remove()
        sb.scale(_ce(b, x, y)).backward()
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
    x, y = _data()
    model = _mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt.first_step(scaler.scale(_ce(model, x, y)))
    scaler.scale(_ce(model, x, y)).backward()
    scaler.unscale_(opt.base_optimizer)
    scaler.unscale_(opt)  # the shared gradients are now divided twice
    with pytest.raises(RuntimeError, match="both SAM and its base optimizer"):
        scaler.step(opt)


@pytest.mark.parametrize("name", ["sam", "interval", "onepass"])
def test_grad_scaler_unscale_before_a_closure_step_is_refused(name):
    # the closure computes the gradients inside the step: GradScaler would hand over no scale
    x, y = _data()
    model = _mlp()
    opt = make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.3)
    if name == "interval":
        opt.steps = 1  # a plain step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def closure():
        opt.zero_grad()
        loss = _ce(model, x, y)
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
    x, y = _data()
    model = _mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _scaler_step(model, opt, scaler, x, y, inject="first")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.nonfinite_steps == 1


def test_fp16_autocast_step_runs_on_cpu():
    x, y = _data()
    model = _mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = _ce(model, x, y)
    opt.first_step(scaler.scale(loss))
    with torch.autocast("cpu", dtype=torch.float16), opt.second_pass(model):
        loss2 = _ce(model, x, y)
    scaler.scale(loss2).backward()
    opt.second_step(scaler=scaler, zero_grad=True)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- step contract


def _manual_sam_sgd(model, x, y, rho, lr, steps):
    """SAM-ON with plain SGD written out, float64, from the definitions."""
    params = list(model.parameters())
    norm_ids = {id(model[1].weight), id(model[1].bias)}
    for _ in range(steps):
        gs = torch.autograd.grad(_ce(model, x, y), params)
        with torch.no_grad():
            sel = [(p, g) for p, g in zip(params, gs) if id(p) in norm_ids]
            norm = torch.sqrt(sum((g * g).sum() for _, g in sel))
            saved = [p.clone() for p in params]
            for p, g in sel:
                p += rho * g / (norm + 1e-12)
        gs = torch.autograd.grad(_ce(model, x, y), params)
        with torch.no_grad():
            for p, w, g in zip(params, saved, gs):
                p.copy_(w - lr * g)


def test_step_after_first_step_finishes_the_sam_step():
    x, y = _data(dtype=torch.float64)
    model, ref = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    for _ in range(3):
        opt.first_step(_ce(model, x, y))
        _ce(model, x, y).backward()  # the framework's backward ...
        assert opt.step() is None  # ... and its optimizer.step()
        opt.zero_grad()
    _manual_sam_sgd(ref, x, y, 0.3, 0.1, 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_closure_after_first_step_is_the_second_pass():
    x, y = _data(dtype=torch.float64)
    model, ref = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    for _ in range(2):
        opt.first_step(_ce(model, x, y))

        def second_pass():
            opt.zero_grad()
            loss = _ce(model, x, y)
            loss.backward()
            return loss

        assert opt.step(second_pass) is not None
    _manual_sam_sgd(ref, x, y, 0.3, 0.1, 2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_lightning_manual_optimization_two_pass_idiom_advances_global_step():
    pl = pytest.importorskip("pytorch_lightning")
    x, y = _data(32, dtype=torch.float64)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = _mlp(dtype=torch.float64)

        def training_step(self, batch, _):
            opt = self.optimizers()
            self.manual_backward(_ce(self.net, *batch))
            opt.optimizer.first_step(zero_grad=True)
            self.manual_backward(_ce(self.net, *batch))
            opt.step()  # Lightning passes SAM a closure that does nothing: it finishes the step
            opt.zero_grad()

        def configure_optimizers(self):
            return SAM(torch.optim.SGD(self.parameters(), lr=0.1), self.net, rho=0.3)

    module, ref = Module(), _mlp(dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 2  # so max_steps stops training
    _manual_sam_sgd(ref, x, y, 0.3, 0.1, 2)
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_step_without_closure_or_first_step_names_the_supported_paths():
    model = _mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    _ce(model, *_data()).backward()
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


def test_timm_lookahead_around_sam_two_step_form():
    pytest.importorskip("timm")
    from timm.optim import Lookahead

    x, y = _data(dtype=torch.float64)
    model, ref = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    la = Lookahead(opt, alpha=0.5, k=2)
    slow = None
    for step in range(1, 7):
        opt.first_step(_ce(model, x, y))
        _ce(model, x, y).backward()
        la.step()  # Lookahead.step calls SAM.step(), which finishes the SAM step
        la.zero_grad()
        _manual_sam_sgd(ref, x, y, 0.3, 0.1, 1)
        if step % 2 == 0:  # Lookahead: slow += alpha (fast - slow); fast = slow (slow starts at step k)
            slow = slow or [p.detach().clone() for p in ref.parameters()]
            with torch.no_grad():
                for s, p in zip(slow, ref.parameters()):
                    s += 0.5 * (p - s)
                    p.copy_(s)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- accumulation


def test_closure_step_refuses_accumulated_gradients():
    x, y = _data()
    model = _mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    _ce(model, x[:8], y[:8]).backward()  # micro-batch A, accumulated

    def accumulating():  # micro-batch B added to A's gradient, as Lightning's last micro-batch does
        loss = _ce(model, x[8:], y[8:])
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


def test_accelerate_accumulate_with_closure_is_refused():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    x, y = _data()
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        pmodel, opt = acc.prepare(model, SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3))

        def closure():
            opt.zero_grad()
            loss = _ce(pmodel, x, y)
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


def _lightning(norm=nn.LayerNorm, max_steps=2, **trainer_kwargs):
    """A tiny LightningModule whose configure_optimizers returns SAM, and a Trainer for it.
    Returns (module, its state before training, the training_step call count, fit)."""
    pl = pytest.importorskip("pytorch_lightning")
    x, y = _data(32)
    calls = {"training_step": 0}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(norm)

        def training_step(self, batch, _):
            calls["training_step"] += 1
            return _ce(self.net, *batch)

        def configure_optimizers(self):
            return SAM(torch.optim.SGD(self.parameters(), lr=0.1), self.net, rho=0.3)

    module = Module()
    before = copy.deepcopy(module.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    return module, before, calls, lambda: trainer.fit(module, loader)


@pytest.mark.parametrize("case", ["accumulate_grad_batches=2", "16-mixed"])
def test_lightning_automatic_accumulation_and_fp16_are_refused(case):
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.plugins.precision import MixedPrecision

    # on CPU "16-mixed" silently becomes bf16; the plugin forces the GradScaler path of a GPU
    extra = (
        {"accumulate_grad_batches": 2} if case.startswith("acc") else {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    )
    module, before, _, fit = _lightning(**extra)
    # Lightning's 16-mixed runs the closure itself, then scaler.step(sam): one pass only
    with pytest.raises(
        ValueError, match="accumulate_grad_batches" if case.startswith("acc") else "integrations.lightning"
    ):
        fit()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("perturb", ["norm", "all"])
def test_gradient_accumulation_equals_large_batch(perturb):
    x, y = _data(24, torch.float64)
    big, acc = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)

    def make(m):
        return SAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m if perturb == "norm" else None, rho=0.4)

    ob, oa = make(big), make(acc)
    k = 3
    for _ in range(2):
        ob.first_step(_ce(big, x, y))
        _ce(big, x, y).backward()
        ob.second_step(zero_grad=True)
        # k micro-batches: both passes accumulate into .grad, the ascent uses the sum
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (_ce(acc, xs, ys) / k).backward()
        oa.first_step(zero_grad=True)
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (_ce(acc, xs, ys) / k).backward()
        oa.second_step(zero_grad=True)
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- BatchNorm


def test_second_pass_leaves_batchnorm_statistics_alone():
    x, y = _data()
    model = _mlp(nn.BatchNorm1d)
    ref = copy.deepcopy(model)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5)
    opt.first_step(_ce(model, x, y))
    with opt.second_pass(model):
        _ce(model, x, y).backward()
    opt.second_step(zero_grad=True)
    ref(x)  # one forward at the unperturbed point: what the statistics must reflect
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(ref[1], name)), name
    # and without the context the perturbed pass would have moved them
    bn = copy.deepcopy(model[1])
    bn(torch.randn(8, 16))
    assert not torch.equal(bn.running_mean, model[1].running_mean)


def test_closure_step_shields_batchnorm_when_sam_knows_the_model():
    x, y = _data()
    model = _mlp(nn.BatchNorm1d)
    ref = copy.deepcopy(model)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5)

    def closure():
        opt.zero_grad()
        loss = _ce(model, x, y)
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
    x, y = _data(dtype=torch.float64)
    model = _mlp(dtype=torch.float64)
    lr, max_norm = 0.5, 0.01
    opt = SAM(torch.optim.SGD(model.parameters(), lr=lr), model, rho=0.2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step(_ce(model, x, y))
    _ce(model, x, y).backward()
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
    x, y = _data()
    eager, comp = _mlp(), _mlp()
    compiled = torch.compile(comp, backend="aot_eager")  # dynamo + AOTAutograd, no C++ toolchain
    oe = SAM(torch.optim.SGD(eager.parameters(), lr=0.1), eager, rho=0.3)
    oc = SAM(torch.optim.SGD(comp.parameters(), lr=0.1), comp, rho=0.3)
    for _ in range(3):
        for m, o in ((eager, oe), (compiled, oc)):
            o.first_step(_ce(m, x, y))
            _ce(m, x, y).backward()
            o.second_step(zero_grad=True)
    for p, q in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- Lightning


def test_lightning_automatic_optimization():
    module, before, calls, fit = _lightning(nn.BatchNorm1d, max_steps=3)
    fit()
    assert calls["training_step"] == 6  # step(closure) ran the closure twice per optimizer step
    assert int(module.net[1].num_batches_tracked) == 3  # the perturbed pass left BN alone
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
