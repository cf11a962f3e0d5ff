"""The private torch internals in samnorm/sam/_compat.py, each checked against the installed torch."""

from __future__ import annotations

import pickle
import warnings

import torch
from torch import nn

from samnorm.sam import _compat


class _Recorder(torch.optim.SGD):
    """An optimizer that handles AMP itself and records what GradScaler.step gives it."""

    _step_supports_amp_scaling = True

    def step(self, closure=None):
        self.seen = (_compat.calling_grad_scaler(self), self.grad_scale, self.found_inf)


def test_calling_grad_scaler_and_record_found_inf_drive_update():
    p = nn.Parameter(torch.ones(3))
    opt = _Recorder([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    found, grad_scale, found_inf = opt.seen
    assert found is scaler and float(grad_scale) == 8.0 and float(found_inf) == 0.0
    assert _compat.calling_grad_scaler(opt) is None  # outside GradScaler.step
    _compat.record_found_inf(scaler, opt, torch.ones(()))
    scaler.update()
    assert scaler.get_scale() == 4.0  # update() read the recorded flag: backed off


def test_adopt_unscaled_state_moves_the_unscale_record():
    p = nn.Parameter(torch.ones(3))
    a, b = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(p.sum()).backward()
    assert not _compat.adopt_unscaled_state(scaler, a, b)
    assert not _compat.is_unscaled(scaler, a, b)
    scaler.unscale_(a)
    assert _compat.is_unscaled(scaler, a, b) and not _compat.is_unscaled(scaler, b)
    assert _compat.adopt_unscaled_state(scaler, a, b)
    assert _compat.is_unscaled(scaler, b) and not _compat.is_unscaled(scaler, a)
    assert torch.equal(p.grad, torch.ones(3))
    scaler.step(b)  # b is recorded as unscaled: no second division
    scaler.update()
    assert torch.equal(p, torch.full((3,), 0.9))


def test_unscale_and_check_matches_division_and_isfinite():
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in ((5, torch.float32), (4, torch.float64))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 16
    expected = [p.grad / 16 for p in ps]
    found = torch.zeros(())
    _compat.unscale_and_check_(ps, torch.tensor(1 / 16), found)
    assert float(found) == 0.0
    for p, e in zip(ps, expected):
        assert torch.equal(p.grad, e)
    ps[1].grad[0] = float("nan")
    _compat.unscale_and_check_(ps, torch.tensor(1.0), found)
    assert float(found) > 0


def test_step_unless_found_inf_plain_and_fused():
    for fused in (False, True):
        p = nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
        p.grad = torch.ones(3)
        _compat.step_unless_found_inf(opt, torch.ones(()))
        assert torch.equal(p, torch.ones(3))
        _compat.step_unless_found_inf(opt, torch.zeros(()))
        assert not torch.equal(p, torch.ones(3))
        assert not hasattr(opt, "found_inf")


def test_mark_stepped_silences_the_scheduler_and_repatch_step_restores_hooks():
    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    _compat.mark_stepped(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()
    opt2 = pickle.loads(pickle.dumps(opt))
    _compat.repatch_step(opt2)
    calls = []
    opt2.register_step_post_hook(lambda *_: calls.append(1))
    opt2.step()
    assert calls == [1]


def test_accelerate_accumulation_steps_is_one_outside_an_accelerated_step():
    assert _compat.accelerate_accumulation_steps() == 1  # the positive case: test_integrations_accelerate.py
