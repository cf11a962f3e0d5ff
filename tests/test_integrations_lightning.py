"""SAM with the real pytorch_lightning Trainer: manual optimization through sam_training_step, and
the automatic-optimization cases that cannot work refused with an error that names it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from helpers import batch, ce, mlp  # noqa: E402
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
from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402
from reference_sam import sam_sgd  # noqa: E402

from samnorm import SAM  # noqa: E402
from samnorm.integrations.lightning import sam_training_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated")  # Lightning's own


def _ce(net, b):
    return nn.functional.cross_entropy(net(b[0]).float(), b[1])


class Manual(pl.LightningModule):
    def __init__(self, k=K, clip=None):
        super().__init__()
        self.automatic_optimization = False
        self.net = mlp()
        self.k, self.clip = k, clip
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = sam_training_step(
            self,
            batch,
            batch_idx,
            lambda b: _ce(self.net, b),
            accumulate_grad_batches=self.k,
            gradient_clip_val=self.clip,
        )
        if loss is not None:
            self.lr_schedulers().step()
            self.losses.append(loss)

    def configure_optimizers(self):
        sam = make_sam(self.net)
        return {"optimizer": sam, "lr_scheduler": linear_schedule(sam)}


class Automatic(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        return _ce(self.net, batch)

    def configure_optimizers(self):
        return make_sam(self.net)


def _fit(module, x, y, **kw):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    kw = {"max_steps": STEPS, **kw}
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(module, loader)
    return trainer


def _fp16_plugin():  # Lightning's CUDA 16-mixed path on the CPU (there it has no scaler)
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))


@pytest.mark.parametrize("clip", [None, CLIP])
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_manual_optimization_matches_reference_and_stops_at_max_steps(precision, clip):
    x, y = data(2 * STEPS * BATCH * K)  # more data than max_steps needs
    module = Manual(clip=clip)
    kw = {"plugins": [_fp16_plugin()]} if precision == "16-mixed" else {"precision": precision}
    trainer = _fit(module, x, y, **kw)
    assert trainer.global_step == STEPS
    assert len(module.losses) == STEPS
    n = STEPS * BATCH * K
    autocast = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    ref = reference(mlp(), x[:n], y[:n], clip=clip, autocast=autocast)
    tol = {"rtol": 1e-6, "atol": 1e-7} if autocast is None else {"rtol": 1e-3, "atol": 1e-4}
    assert_same_params(module.net, ref, **tol)


def test_manual_window_closes_at_epoch_end():
    x, y = data(3 * BATCH)  # 3 batches, windows of 2: steps of 2 and 1 batches per epoch
    module = Manual()
    module.configure_optimizers = lambda: make_sam(module.net)  # no schedule to step
    module.lr_schedulers = lambda: type("NoSchedule", (), {"step": lambda self: None})()
    trainer = _fit(module, x, y, max_steps=-1, max_epochs=2)
    assert trainer.global_step == 4


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_automatic_optimization_matches_reference(precision):
    x, y = data(STEPS * BATCH)
    module = Automatic()
    trainer = _fit(module, x, y, precision=precision)
    assert trainer.global_step == STEPS
    autocast = None if precision == "32" else torch.bfloat16
    ref = reference(mlp(), x, y, k=1, clip=None, schedule=False, autocast=autocast)
    tol = {"rtol": 1e-6, "atol": 1e-7} if autocast is None else {"rtol": 1e-3, "atol": 1e-4}
    assert_same_params(module.net, ref, **tol)


def test_automatic_optimization_with_accumulation_is_refused():
    x, y = data()
    with pytest.raises(ValueError, match=r"samnorm\.integrations\.lightning"):
        _fit(Automatic(), x, y, accumulate_grad_batches=2)


def test_automatic_optimization_with_16_mixed_is_refused():
    x, y = data()
    with pytest.raises(ValueError, match=r"samnorm\.integrations\.lightning"):
        _fit(Automatic(), x, y, plugins=[_fp16_plugin()])


def test_sam_training_step_needs_manual_optimization():
    module = Automatic()
    with pytest.raises(ValueError, match="automatic_optimization = False"):
        sam_training_step(module, data(BATCH), 0, lambda b: _ce(module.net, b))


def test_manual_optimization_two_pass_idiom_advances_global_step():
    pl = pytest.importorskip("pytorch_lightning")
    x, y = batch(32, dtype=torch.float64)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = mlp(dtype=torch.float64)

        def training_step(self, batch, _):
            opt = self.optimizers()
            self.manual_backward(ce(self.net, *batch))
            opt.optimizer.first_step(zero_grad=True)
            self.manual_backward(ce(self.net, *batch))
            opt.step()  # Lightning passes SAM a closure that does nothing: it finishes the step
            opt.zero_grad()

        def configure_optimizers(self):
            return SAM(torch.optim.SGD(self.parameters(), lr=0.1), self.net, rho=0.3)

    module, ref = Module(), mlp(dtype=torch.float64)
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
    sam_sgd(ref, list(ref[1].parameters()), lambda: ce(ref, x, y), rho=0.3, lr=0.1, steps=2)
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def _lightning(norm=nn.LayerNorm, max_steps=2, **trainer_kwargs):
    """A tiny LightningModule whose configure_optimizers returns SAM, and a Trainer for it.
    Returns (module, its state before training, the training_step call count, fit)."""
    pl = pytest.importorskip("pytorch_lightning")
    x, y = batch(32)
    calls = {"training_step": 0}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(norm)

        def training_step(self, batch, _):
            calls["training_step"] += 1
            return ce(self.net, *batch)

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
def test_automatic_accumulation_and_fp16_are_refused_through_the_trainer(case):
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


def test_automatic_optimization_runs_the_closure_twice_and_shields_batchnorm():
    module, before, calls, fit = _lightning(nn.BatchNorm1d, max_steps=3)
    fit()
    assert calls["training_step"] == 6  # step(closure) ran the closure twice per optimizer step
    assert int(module.net[1].num_batches_tracked) == 3  # the perturbed pass left BN alone
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
