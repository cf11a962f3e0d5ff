"""SAM with the real pytorch_lightning Trainer: manual optimization through sam_training_step, and
the automatic-optimization cases that cannot work refused with an error that names it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from integration_reference import (  # noqa: E402
    BATCH,
    CLIP,
    STEPS,
    K,
    assert_same_params,
    data,
    linear_schedule,
    make_sam,
    mlp,
    reference,
)
from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402

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
