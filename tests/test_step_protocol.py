"""Issue 17: one step protocol for every loop, and the invariants that made silent failures
impossible. Each test names the failure it pins; they import only names that existed before the
protocol where they can, so that they fail (not error) on the code before it."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from reference_sam import RefSGD, ascent, gradient_at
from torch import nn
from torch.utils.checkpoint import checkpoint

import samnorm
from samnorm import SAM
from samnorm.integrations import sam_passes
from samnorm.sam.variants import IntervalSAM, LookSAM, OnePassSAM, make

ALL = ["sam", "interval", "looksam", "onepass"]


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def _build(name, model, **kw):
    kw = {"k": 2, **kw} if name in ("interval", "looksam") else kw
    return make(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.1, **kw)


class _Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


# ------------------------------------------------------------------ passes and BatchNorm, per loop
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("window", [1, 3])
def test_sam_passes_runs_the_passes_the_step_needs_and_moves_batchnorm_once(name, window):
    """OnePassSAM through sam_passes (so SAMTrainer, sam_backward, timm's sam_step) ran two
    forward/backward passes per micro-batch and tracked BatchNorm twice per step."""
    model = _Counting(_bn_net())
    sam = _build(name, model.net)
    steps = 4
    for _ in range(steps):
        for i in range(window):

            def fb(x):
                loss = model(x).pow(2).mean() / window
                loss.backward()
                return loss

            sam_passes(sam, model, torch.randn(8, 4), fb, last=i == window - 1)
        sam.step()
        sam.zero_grad()
    expected = {"sam": 2 * steps, "interval": 6, "looksam": 6, "onepass": steps}[name]
    assert model.calls == expected * window
    assert int(model.net[1].num_batches_tracked) == steps * window  # once per micro-batch and step


@pytest.mark.parametrize("name", ALL)
def test_closure_step_moves_batchnorm_once_per_step(name):
    model = _bn_net()
    sam = _build(name, model)
    for _ in range(4):

        def closure():
            sam.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            return loss

        sam.step(closure)
    assert int(model[1].num_batches_tracked) == 4


def test_onepass_in_timm_sam_step_costs_one_forward():
    pytest.importorskip("timm")
    from samnorm.integrations.timm import sam_step

    model = _Counting(_bn_net())
    sam = _build("onepass", model.net)
    for _ in range(3):
        sam_step(sam, model, lambda x: model(x).pow(2).mean() / 2, list(torch.randn(2, 8, 4)))
    assert model.calls == 6 and int(model.net[1].num_batches_tracked) == 6


def test_onepass_in_samtrainer_costs_one_forward(tmp_path):
    transformers = pytest.importorskip("transformers")
    from samnorm.integrations.transformers import SAMTrainer

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = _bn_net(), 0

        def forward(self, x, labels):
            self.calls += 1
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    model = Tiny()
    sam = OnePassSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.net, rho=0.1)
    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(32)]
    args = transformers.TrainingArguments(
        str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    SAMTrainer(model, args, train_dataset=data, optimizers=(sam, None)).train()
    assert model.calls == 6 and int(model.net[1].num_batches_tracked) == 6


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize("kind", ALL)
def test_step_hooks_fire_once_per_step_after_a_plain_sam_exists(kind):
    """torch wraps ``step`` at class level once any instance exists; a subclass that overrode
    step and called super().step() fired its hooks twice (issue 17)."""
    model = _bn_net()
    _build("sam", model)  # wraps SAM.step
    sam = _build(kind, model)
    fired = []
    sam.register_step_post_hook(lambda *_: fired.append(1))
    sam.register_step_pre_hook(lambda *_: fired.append(0))
    x = torch.randn(8, 4)

    def closure():
        sam.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        sam.step(closure)
    assert fired == [0, 1] * 3


def test_a_subclass_overriding_step_is_refused():
    with pytest.raises(TypeError, match="hooks"):
        type("Twice", (SAM,), {"step": lambda self, closure=None: None})


def test_first_step_loss_through_reentrant_checkpointing_is_refused():
    """autograd.grad cannot reach parameters inside a reentrant checkpoint: allow_unused hid it and
    nothing was perturbed (plain SGD without a word)."""
    inner = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.inner = nn.Linear(3, 4), inner

        def forward(self, x):
            return checkpoint(self.inner, self.inp(x), use_reentrant=True)

    model = Model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"reentrant.*\.grad path"):
        sam.first_step(model(torch.randn(2, 3)).pow(2).mean())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the .grad path works under the same checkpointing
    model(torch.randn(2, 3)).pow(2).mean().backward()
    sam.first_step(zero_grad=True)
    assert not torch.equal(inner[1].weight, before[2])


def _two_norm_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))


def _perturbed_now(sam, model):
    """The tensors a first step moves (measured, not asked)."""
    before = {id(p): p.detach().clone() for p in model.parameters()}
    sam.first_step(model(torch.randn(5, 3)).pow(2).mean())
    moved = {id(p) for p in model.parameters() if not torch.equal(p, before[id(p)])}
    sam.restore()
    return moved


def test_a_norm_layer_unfrozen_later_is_perturbed():
    model = _two_norm_net()
    model[3].requires_grad_(False)
    sam = SAM(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model)
    assert _perturbed_now(sam, model) == {id(p) for p in model[1].parameters()}
    model[3].requires_grad_(True)
    sam.add_param_group({"params": list(model[3].parameters())})
    assert _perturbed_now(sam, model) == {id(p) for p in (*model[1].parameters(), *model[3].parameters())}


def test_a_norm_layer_frozen_later_is_not_perturbed():
    model = _two_norm_net()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model[1].requires_grad_(False)
    model[1].zero_grad()
    assert _perturbed_now(sam, model) == {id(p) for p in model[3].parameters()}


def test_state_dict_of_another_base_optimizer_is_one_clear_error():
    model = _two_norm_net()
    adam = SAM(torch.optim.Adam(model.parameters(), lr=0.1), model)
    adam.step(_closure(adam, model))
    sgd = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    with pytest.raises(ValueError, match=r"Adam.*SGD|SGD.*Adam"):
        sgd.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="base optimizer class"):
        adam.load_state_dict(sgd.state_dict())


def _closure(sam, model):
    def closure():
        sam.zero_grad()
        loss = model(torch.randn(5, 3)).pow(2).mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", ALL)
def test_zero_filled_gradients_are_accepted_and_leftovers_refused(name):
    """zero_grad(set_to_none=False) left zero tensors, which sam_passes took for leftovers."""
    model = _bn_net()
    sam = _build(name, model)
    ref = copy.deepcopy(model)
    ref_sam = _build(name, ref)
    x = torch.randn(8, 4)
    for net, opt, set_to_none in ((model, sam, False), (ref, ref_sam, True)):
        for _ in range(3):

            def fb(b, net=net):
                loss = net(b).pow(2).mean()
                loss.backward()
                return loss

            sam_passes(opt, net, x, fb)
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    sam_passes(sam, model, x, lambda b: model(b).pow(2).mean().backward())
    sam.step()  # and no zero_grad: the descent's gradients are left over
    with pytest.raises(ValueError, match="zero_grad"):
        sam_passes(sam, model, x, lambda b: model(b).pow(2).mean().backward())


# ------------------------------------------------------------------ variants first-class
def test_a_scheduler_drives_looksam_alpha_through_param_groups():
    torch.manual_seed(0)
    model = _two_norm_net()
    look = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2, alpha=0.7)
    twin = copy.deepcopy(model)
    interval = IntervalSAM(torch.optim.SGD(twin.parameters(), lr=0.1), twin, k=2)
    assert all(g["alpha"] == 0.7 for g in look.param_groups)
    for _ in range(4):
        for g in look.param_groups:  # what a scheduler does: alpha 0 is IntervalSAM
            g["alpha"] = 0.0
        x = torch.randn(5, 3)
        for opt, net in ((look, model), (interval, twin)):
            opt.step(lambda opt=opt, net=net, x=x: _closure_on(opt, net, x))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _closure_on(opt, net, x):
    opt.zero_grad()
    loss = net(x).pow(2).mean()
    loss.backward()
    return loss


def test_a_checkpoint_with_the_old_variant_settings_key_still_loads():
    model = _two_norm_net()
    look = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=2, alpha=0.7)
    look.step(_closure(look, model))
    state = look.state_dict()
    for g in state["param_groups"]:  # the layout before the settings moved into the groups
        del g["k"], g["alpha"]
    state["sam_variant"].update(k=3, alpha=0.25)
    fresh = LookSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, k=5, alpha=0.7)
    fresh.load_state_dict(state)
    assert (fresh.k, fresh.alpha, fresh.steps) == (3, 0.25, 1)
    assert all(g["k"] == 3 and g["alpha"] == 0.25 for g in fresh.param_groups)


def test_the_registry_is_what_the_recipe_cli_and_variants_read():
    from samnorm import cli
    from samnorm.sam import registry
    from samnorm.train import recipe

    assert set(recipe.OPTIMIZERS) == {*registry.ascents(), "sgd"}
    assert set(samnorm.sam.variants.VARIANTS) == set(registry.schedules())
    parser = cli.build_parser() if hasattr(cli, "build_parser") else None
    if parser is not None:
        sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
        choices = next(a for a in sub._actions if a.dest == "optimizer").choices
        assert list(choices) == [*registry.ascents(), "sgd"]
    for name in registry.schedules():  # the registry's defaults are the classes' own
        kind = registry.KINDS[name]
        params = inspect.signature(kind.load()).parameters
        assert {k: params[k].default for k in kind.defaults} == dict(kind.defaults)
    for name in registry.ascents():
        _, adaptive, rho = recipe.OPTIMIZERS[name]
        assert registry.KINDS[name].defaults == {"rho": rho, "adaptive": adaptive}


def test_a_three_pass_variant_is_expressible_through_the_driver():
    """A GAM-like variant: ascent at w, a second ascent from the gradient at w + e1, the descent at
    w + e2: three passes, run by the one driver, against the same arithmetic by hand."""
    from samnorm.sam.protocol import ASCENT, DESCENT_PERTURBED, Pass, run_passes
    from samnorm.sam.variant import Variant

    class TwoAscents(Variant):
        NAME = "two-ascents-test"

        def _step_passes(self):
            return (ASCENT, Pass(at="w+e", use="ascent", update_bn=False, sync=False), DESCENT_PERTURBED)

    torch.manual_seed(0)
    model = _two_norm_net().double()
    ref = copy.deepcopy(model)
    opt = TwoAscents(torch.optim.SGD(model.parameters(), lr=0.1), None, rho=0.2)
    x = torch.randn(6, 3, dtype=torch.float64)
    calls = []

    def loss_fn(b):
        calls.append(1)
        return model(b).pow(2).mean()

    run_passes(opt, model, [x], loss_fn)
    opt.step()
    assert len(calls) == 3
    params = list(ref.parameters())

    def grad():
        return list(torch.autograd.grad(ref(x).pow(2).mean(), params))

    def at(g):  # the gradient at the point SAM's ascent along g leads to (reference_sam's parts)
        return gradient_at(params, ascent(g, [0.2] * len(g), [None] * len(g))[0], grad)

    RefSGD(0.1, 0.0, 0.0).step(params, at(at(grad())))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_second_step_hands_its_scaler_over_without_a_frame_lookup(monkeypatch):
    """The GradScaler handshake takes the scaler explicitly where the caller holds it: with the
    frame lookup disabled, an inf in the first pass (SAM's own flag) still skips the step and
    backs the scale off."""
    from samnorm.sam import _compat

    monkeypatch.setattr(_compat, "calling_grad_scaler", lambda *a, **k: None)
    model = _two_norm_net()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    sam.first_step(scaler.scale(model(torch.randn(5, 3)).pow(2).mean()) * float("inf"))
    scaler.scale(model(torch.randn(5, 3)).pow(2).mean()).backward()
    sam.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0**8
