"""samnorm.sam.variants (every-k SAM, LookSAM, one-pass ascent) against float64 per-parameter references."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import batch, ce, closure, mlp, reference_problem, selection
from hypothesis import assume, given
from hypothesis import strategies as st
from reference_sam import ReferenceSAM
from torch import nn

import samnorm
from samnorm.sam.variants import IntervalSAM, LookSAM, OnePassSAM, make

# ----------------------------------------------------------------------------- driver


def _train(opt, model, x, y, steps, form):
    """``steps`` steps in one of the three forms every variant accepts."""
    for _ in range(steps):
        if form == "closure":
            opt.step(closure(opt, model, x, y))
        elif isinstance(opt, OnePassSAM):
            opt.first_step()
            with opt.second_pass(model):
                ce(model, x, y).backward()
            opt.second_step(zero_grad=True)
        else:
            if form == "loss":
                with opt.first_pass(model):
                    loss = ce(model, x, y)
                opt.first_step(loss)
            else:
                ce(model, x, y).backward()
                opt.first_step(zero_grad=True)
            if opt.is_sam_step:
                with opt.second_pass(model):
                    ce(model, x, y).backward()
            opt.second_step(zero_grad=True)


def _sq(vs):
    return sum(float((v * v).sum()) for v in vs)


def _setup(seed, width, which, opt="sgd"):
    model, x, y, base, ref_base, perturb = reference_problem(seed, width, which, opt)
    ref = copy.deepcopy(model)
    return model, ref, x, y, base, ref_base, perturb, selection(ref, which)


def _ref_run(kind, ref, sel, x, y, steps, base, rho, **settings):
    """``steps`` steps of reference_sam's ``kind`` on ``ref`` (plain SAM settings: not adaptive)."""
    ReferenceSAM(kind, rho, False, 0.0, base, **settings).run(ref, sel, lambda: ce(ref, x, y), steps)


def _assert_same(a, b, exact=False):
    for p, q in zip(a.parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- against references


@given(
    seed=st.integers(0, 10_000),
    width=st.integers(2, 7),
    rho=st.one_of(st.just(0.0), st.floats(0.05, 2.0)),
    k=st.integers(1, 3),
    alpha=st.sampled_from([0.0, 0.5, 1.3]),
    which=st.sampled_from(["all", "norm", "first"]),
    form=st.sampled_from(["loss", "grad", "closure"]),
)
def test_interval_and_looksam_match_float64_reference(seed, width, rho, k, alpha, which, form):
    # For rho -> 0, g_v = g_s - coef g is rounding noise that LookSAM scales to alpha ||g||: the update
    # is then ill-conditioned by construction, so LookSAM is compared where g_s and g differ.
    assume(rho > 0 or alpha == 0)
    model, ref, x, y, base, ref_base, perturb, sel = _setup(seed, width, which)
    opt = LookSAM(base, perturb, k=k, alpha=alpha, rho=rho) if alpha else IntervalSAM(base, perturb, k=k, rho=rho)
    _train(opt, model, x, y, 2 * k + 1, form)
    _ref_run("looksam" if alpha else "interval", ref, sel, x, y, 2 * k + 1, ref_base, rho, k=k, alpha=alpha)
    _assert_same(model, ref)
    assert opt.steps == 2 * k + 1


@given(
    seed=st.integers(0, 10_000),
    width=st.integers(2, 7),
    rho=st.floats(0.0, 2.0),
    direction=st.sampled_from(["momentum", "grad"]),
    opt=st.sampled_from(["sgd", "adamw"]),
    which=st.sampled_from(["all", "norm", "first"]),
    form=st.sampled_from(["two_step", "closure"]),
)
def test_onepass_matches_float64_reference(seed, width, rho, direction, opt, which, form):
    model, ref, x, y, base, ref_base, perturb, sel = _setup(seed, width, which, opt)
    sam = OnePassSAM(base, perturb, direction=direction, rho=rho)
    _train(sam, model, x, y, 4, form)
    _ref_run("onepass", ref, sel, x, y, 4, ref_base, rho, direction=direction)
    _assert_same(model, ref)


# ----------------------------------------------------------------------------- properties


@given(
    seed=st.integers(0, 1000),
    rho=st.floats(1e-3, 2.0),
    form=st.sampled_from(["loss", "grad", "closure"]),
    adaptive=st.booleans(),
)
def test_interval_k1_is_sam_bit_exactly(seed, rho, form, adaptive):
    torch.manual_seed(seed)
    a = mlp(nn.BatchNorm1d)
    b = copy.deepcopy(a)
    x, y = batch()
    sam = samnorm.SAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, rho=rho, adaptive=adaptive)
    var = IntervalSAM(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), b, k=1, rho=rho, adaptive=adaptive)
    for _ in range(3):
        if form == "closure":
            sam.step(closure(sam, a, x, y))
        else:  # SAM's own two-step form; the variant sees the same calls
            if form == "loss":
                sam.first_step(ce(a, x, y))
            else:
                ce(a, x, y).backward()
                sam.first_step(zero_grad=True)
            with sam.second_pass(a):
                ce(a, x, y).backward()
            sam.second_step(zero_grad=True)
    _train(var, b, x, y, 3, form)
    _assert_same(a, b, exact=True)
    assert torch.equal(a[1].running_mean, b[1].running_mean)


@given(seed=st.integers(0, 1000), k=st.integers(2, 4), form=st.sampled_from(["loss", "grad", "closure"]))
def test_looksam_alpha0_is_interval_and_its_plain_steps_are_the_base_step(seed, k, form):
    torch.manual_seed(seed)
    a = mlp()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    x, y = batch()
    ia = IntervalSAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, k=k, rho=0.3)
    lb = LookSAM(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), b, k=k, alpha=0.0, rho=0.3)
    _train(ia, a, x, y, k + 1, form)
    _train(lb, b, x, y, k + 1, form)
    _assert_same(a, b, exact=True)
    # step k + 1 is a plain step: the base optimizer's step on the same state
    assert not lb.is_sam_step
    base_c = torch.optim.SGD(c.parameters(), lr=0.1, momentum=0.9)
    c.load_state_dict(b.state_dict())
    base_c.load_state_dict(copy.deepcopy(lb.base_optimizer.state_dict()))  # no shared buffers
    _train(lb, b, x, y, 1, form)
    ce(c, x, y).backward()
    base_c.step()
    _assert_same(b, c, exact=True)


@given(seed=st.integers(0, 1000), rho=st.floats(1e-3, 2.0), direction=st.sampled_from(["momentum", "grad"]))
def test_onepass_with_zero_direction_is_the_base_step(seed, rho, direction):
    torch.manual_seed(seed)
    a = mlp(dtype=torch.float64)
    b = copy.deepcopy(a)
    x, y = batch(dtype=torch.float64)
    opt = OnePassSAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, rho=rho, direction=direction)
    base_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        if i == 2:  # zero the direction: the step must be the plain base step
            for p in opt.perturbed_parameters():
                opt.state[p]["momentum_buffer"].zero_()
            if opt._vec is not None:
                opt._vec.load("d", [None] * len(opt._vec.params))
            b.load_state_dict(a.state_dict())
            base_b.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))
        _train(opt, a, x, y, 1, "two_step")
        base_b.zero_grad()
        ce(b, x, y).backward()
        base_b.step()
        if i == 0:  # step 0 has no direction yet
            _assert_same(a, b, exact=True)
    _assert_same(a, b, exact=True)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("interval", {"k": 2}),
        ("looksam", {"k": 2, "alpha": 0.7}),
        ("onepass", {"direction": "momentum"}),
        ("onepass", {"direction": "grad"}),
    ],
)
@pytest.mark.parametrize("form", ["loss", "closure"])
def test_state_dict_round_trip_resumes_bit_identically(name, kw, form):
    x, y = batch()

    def build():
        torch.manual_seed(3)
        m = mlp(nn.BatchNorm1d)
        return m, make(name, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, rho=0.2, **kw)

    full_m, full_o = build()
    _train(full_o, full_m, x, y, 6, form)
    m, o = build()
    _train(o, m, x, y, 3, form)  # k=2: resumes in the middle of a cycle
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    m2, o2 = build()
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    assert o2.steps == 3
    _train(o2, m2, x, y, 3, form)
    for p, q in zip(full_m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "name, kw", [("interval", {"k": 2}), ("looksam", {"k": 2}), ("onepass", {}), ("onepass", {"direction": "grad"})]
)
def test_no_host_sync_in_the_step(monkeypatch, name, kw):
    model = mlp()
    opt = make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.1, **kw)
    x, y = batch()

    def forbidden(*_a, **_k):
        raise AssertionError("host sync in the step")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    _train(opt, model, x, y, 3, "loss")
    _train(opt, model, x, y, 3, "closure")


def test_closure_runs_as_often_as_the_step_needs():
    model = mlp()
    x, y = batch()
    calls = []

    def counting(opt):
        inner = closure(opt, model, x, y)
        return lambda: (calls.append(1), inner())[1]

    for opt, want in [
        (IntervalSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=3), [2, 1, 1, 2]),
        (OnePassSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model), [1] * 4),
    ]:
        got = []
        for _ in range(4):
            calls.clear()
            loss = opt.step(counting(opt))
            got.append(len(calls))
            assert loss.ndim == 0
        assert got == want


def test_onepass_updates_batchnorm_statistics_and_restores_on_error():
    model = mlp(nn.BatchNorm1d)
    x, y = batch()
    opt = OnePassSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5)
    opt.step(closure(opt, model, x, y))
    assert int(model[1].num_batches_tracked) == 1  # the one pass is also the statistics' pass
    _train(opt, model, x, y, 1, "closure")
    before = [p.detach().clone() for p in model.parameters()]

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)


def test_interval_plain_steps_keep_ddp_sync():
    class FakeDDP(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.no_sync_calls = module, 0

        def no_sync(self):
            self.no_sync_calls += 1
            return torch.enable_grad()

    model = FakeDDP(mlp())
    opt = IntervalSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2)
    x, y = batch()
    for want in (1, 1, 2):  # steps 0 (SAM), 1 (plain), 2 (SAM)
        with opt.first_pass(model):
            loss = ce(model.module, x, y)
        opt.first_step(loss)
        if opt.is_sam_step:
            ce(model.module, x, y).backward()
        opt.second_step(zero_grad=True)
        assert model.no_sync_calls == want


def test_looksam_keeps_previous_gv_when_the_sam_gradient_is_not_finite():
    model = mlp()
    x, y = batch()
    opt = LookSAM(torch.optim.SGD(model.parameters(), lr=0.0), model, k=1, alpha=1.0, rho=0.1)
    _train(opt, model, x, y, 1, "loss")
    gv = [v.clone() for v in opt._vec.views("gv")]
    assert _sq(gv) > 0
    opt.first_step(ce(model, x, y))
    ce(model, x, y).backward()
    model[1].weight.grad[0] = float("inf")
    opt.second_step(zero_grad=True)
    for a, b in zip(gv, opt._vec.views("gv")):
        assert torch.equal(a, b)


def test_clear_errors():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        IntervalSAM(sgd, model, k=0)
    with pytest.raises(ValueError, match="alpha must be"):
        LookSAM(sgd, model, alpha=-1.0)
    with pytest.raises(ValueError, match="direction must be"):
        OnePassSAM(sgd, model, direction="adam")
    with pytest.raises(ValueError, match="unknown SAM variant 'msam'"):
        make("msam", sgd, model)
    for no_momentum in (sgd, torch.optim.Adagrad(model.parameters()), torch.optim.RMSprop(model.parameters())):
        with pytest.raises(ValueError, match=r"keeps no momentum buffer.*direction='grad'"):
            OnePassSAM(no_momentum, model)
    opt = OnePassSAM(sgd, model, direction="grad")
    x, y = batch()
    with pytest.raises(ValueError, match="before the forward pass, without a loss"):
        opt.first_step(ce(model, x, y))
    iv = IntervalSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2)
    with pytest.raises(RuntimeError, match="without first_step"):
        iv.second_step()
    _train(iv, model, x, y, 1, "loss")
    iv.first_step(ce(model, x, y))
    with pytest.raises(RuntimeError, match="first_step called twice"):
        iv.first_step()
    with pytest.raises(RuntimeError, match="after second_step"):
        iv.state_dict()


def test_step_cost_benchmark_runs_every_candidate_interleaved():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_step_cost.py"
    spec = importlib.util.spec_from_file_location("bench_step_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    steps = bench.build_steps(model, x, y, list(bench.CANDIDATES))
    out = bench.interleaved(steps, rounds=2, block=4, warmup=0)
    assert set(out) == set(bench.CANDIDATES)
    assert out["sgd"]["cpu"]["paired_ratio_median"] == 1.0 and len(out["looksam4"]["wall"]["step_ms"]) == 2
    summaries = [s for c in out.values() for s in c.values()]
    assert all(math.isfinite(s["ratio_of_medians"]) and s["median_ms"] > 0 for s in summaries)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "| `onepass_grad` |" in bench.table({"candidates": out})
    with pytest.raises(ValueError, match="must include 'sgd'"):
        bench.build_steps(model, x, y, ["sam_on_loss"])
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.interleaved(steps, rounds=1, block=3)


def test_onepass_perturbs_against_the_momentum_and_leaves_it_bit_identical():
    model = mlp()
    x, y = batch()
    opt = OnePassSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5)
    _train(opt, model, x, y, 2, "two_step")
    params = opt.perturbed_parameters()
    m = [opt.state[p]["momentum_buffer"].clone() for p in params]
    w = [p.detach().clone() for p in params]
    opt.first_step()
    e = [p.detach() - w0 for p, w0 in zip(params, w)]
    dot = sum(float((a * b).sum()) for a, b in zip(e, m))
    assert math.isclose(math.sqrt(_sq(e)), 0.5, rel_tol=1e-5) and dot < 0  # e = -rho m / ||m||
    for p, m0 in zip(params, m):
        assert torch.equal(opt.state[p]["momentum_buffer"], m0)
    opt.restore()


@pytest.mark.parametrize(
    "name, kw", [("interval", {"k": 2}), ("looksam", {"k": 2, "alpha": 0.7}), ("onepass", {"direction": "grad"})]
)
def test_step_without_closure_and_grad_scaler_finish_the_step_like_second_step(name, kw):
    """``step()`` after first_step (what frameworks call) and ``second_step(scaler=...)`` with a
    GradScaler (scaled losses) train as ``second_step()`` does."""
    x, y = batch()
    runs = []
    for finish in ("second_step", "step", "scaler"):
        torch.manual_seed(3)
        model = mlp()
        opt = make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.2, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if finish == "scaler" else None
        scale = scaler.scale if scaler else (lambda t: t)
        for _ in range(5):
            if name == "onepass":
                opt.first_step()
            else:
                opt.first_step(scale(ce(model, x, y)))
            if opt.is_sam_step:
                with opt.second_pass(model):
                    scale(ce(model, x, y)).backward()
            if finish == "step":
                opt.step()
            else:
                opt.second_step(scaler=scaler)
            opt.zero_grad()
            if scaler:
                scaler.update()
        assert opt.steps == 5
        runs.append(model)
    _assert_same(runs[0], runs[1], exact=True)
    for p, q in zip(runs[0].parameters(), runs[2].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name, kw", [("looksam", {"k": 2, "alpha": 0.7}), ("onepass", {"direction": "grad"}), ("onepass", {})]
)
def test_low_precision_parameters_keep_float32_vectors(name, kw):
    model = mlp(dtype=torch.bfloat16)
    x, y = batch(dtype=torch.bfloat16)
    opt = make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.2, **kw)
    _train(opt, model, x, y, 4, "closure")
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())
    if opt._vec is not None:
        assert all(f.dtype == torch.float32 for flats in opt._vec.flats.values() for f in flats)


def test_plain_steps_through_the_integrations_window_take_the_plain_gradient():
    # sam_passes (SAMTrainer, accelerate's sam_backward, timm's sam_step) must not run a second pass
    # on a plain step of IntervalSAM: it would add to the first pass's gradient (2x the step).
    from samnorm.integrations import sam_passes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    opt = IntervalSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2, rho=0.1)
    x = torch.randn(8, 3)

    def forward_backward(b):
        loss = model(b).pow(2).mean()
        loss.backward()
        return loss

    sam_passes(opt, model, x, forward_backward)  # step 0: a SAM step
    opt.step()
    opt.zero_grad()
    assert not opt.is_sam_step
    start = [p.detach().clone() for p in model.parameters()]
    expected = torch.autograd.grad(model(x).pow(2).mean(), list(model.parameters()))
    sam_passes(opt, model, x, forward_backward)
    opt.step()
    for p, w, g in zip(model.parameters(), start, expected):
        torch.testing.assert_close(p.detach(), w - 0.1 * g)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_onepass_momentum_after_a_skipped_amp_step_is_a_plain_step(opt):
    # GradScaler skipped step 0: steps counts it, but the base optimizer kept no momentum yet, so
    # step 1 has no direction: e = 0 and it is the base optimizer's step, as step 0 of a clean run
    model, ref, x, y, base, ref_base, perturb, sel = _setup(0, 4, "norm", opt)
    onepass = OnePassSAM(base, perturb, rho=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for bad in (True, False):
        onepass.first_step()
        loss = ce(model, x, y) * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        onepass.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
    assert onepass.steps == 2 and scaler.get_scale() == 2.0**9
    _ref_run("onepass", ref, sel, x, y, 1, ref_base, 0.5, direction="momentum")
    _assert_same(model, ref)


def test_interval_plain_closure_step_under_grad_scaler_ignores_the_stale_inf_flag():
    # scaler.step(opt, closure): GradScaler checks .grad before the closure runs. After a skipped
    # SAM step those are the old inf gradients; the plain step's own finite ones must go through.
    model = mlp()
    opt = IntervalSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2, rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # GradScaler sets its scale lazily
    x, y = batch()
    factor = [float("inf")]

    def closure():
        opt.zero_grad()
        loss = ce(model, x, y) * factor[0]
        scaler.scale(loss).backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt, closure)
    scaler.update()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    assert not opt.is_sam_step and scaler.get_scale() == 2.0**9
    factor[0] = 1.0
    grads = torch.autograd.grad(ce(model, x, y), list(model.parameters()))
    scaler.step(opt, closure)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # no back-off: the step was finite
    for p, w, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, w - 0.1 * g)  # plain SGD on the unscaled gradient


@pytest.mark.parametrize("name, kw", [("looksam", {"k": 2}), ("onepass", {"direction": "grad"})])
def test_an_error_in_the_variant_vector_code_leaves_the_weights_restored(monkeypatch, name, kw):
    model = mlp()
    opt = make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5, **kw)
    x, y = batch()
    _train(opt, model, x, y, 2, "two_step")  # LookSAM: step 2 is a SAM step; OnePassSAM: d is set
    before = [p.detach().clone() for p in model.parameters()]
    if isinstance(opt, OnePassSAM):
        opt.first_step()
    else:
        opt.first_step(ce(model, x, y))
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), before))  # at w + e
    ce(model, x, y).backward()

    def fail(*args):
        raise RuntimeError("vector code failed")

    monkeypatch.setattr(samnorm.sam.variant.Vectors, "load", fail)
    with pytest.raises(RuntimeError, match="vector code failed"):
        opt.second_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def test_load_state_dict_refuses_another_variant_and_resumes_the_saved_settings():
    model = mlp()
    x, y = batch()

    def build(name, **kw):
        return make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.2, **kw)

    saved = {}
    for name, kw in (("interval", {"k": 2}), ("looksam", {"k": 2}), ("onepass", {})):
        opt = build(name, **kw)
        _train(opt, model, x, y, 3, "loss")
        saved[name] = opt.state_dict()
    for name, other in (
        ("interval", "onepass"),
        ("interval", "looksam"),
        ("looksam", "interval"),
        ("onepass", "looksam"),
    ):
        opt = build(name)
        with pytest.raises(ValueError, match=f"saved by the {other!r} SAM variant"):
            opt.load_state_dict(saved[other])
        assert opt.steps == 0 and not opt.state  # nothing half-loaded
    resumed = build("interval", k=5)
    resumed.load_state_dict(saved["interval"])
    assert (resumed.k, resumed.steps) == (2, 3)  # a resume: the saved k replaces the constructor's
    plain = samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    fresh = build("interval", k=5)
    fresh.load_state_dict(plain.state_dict())  # a plain SAM state: the variant keeps its own
    assert (fresh.k, fresh.steps) == (5, 0)
