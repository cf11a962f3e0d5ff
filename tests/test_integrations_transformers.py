"""SAMTrainer against the real transformers.Trainer: the same parameters as a hand-written loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from helpers import mlp  # noqa: E402
from integration_reference import (  # noqa: E402
    BATCH,
    CLIP,
    LR,
    RHO,
    STEPS,
    K,
    assert_same_params,
    data,
    linear_schedule,
    make_sam,
    reference,
)

from samnorm import SAM  # noqa: E402
from samnorm.integrations.transformers import SAMTrainer  # noqa: E402


class Tiny(nn.Module):
    """What a Trainer needs from a model: keyword inputs, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x, labels):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits.float(), labels), "logits": logits}


def _dataset():
    x, y = data()
    return x, y, [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=K,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        optim="sgd",
        max_grad_norm=CLIP,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def test_samtrainer_builds_sam_and_matches_hand_written_loop(tmp_path):
    x, y, ds = _dataset()
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SAMTrainer(model, _args(tmp_path), train_dataset=ds, rho=RHO)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, SAM)  # accelerate's wrapper around ours
    assert trainer.state.global_step == STEPS
    # optim="sgd" is SGD without momentum; "linear" decays the LR to 0 over max_steps
    assert_same_params(model.net, reference(mlp(), x, y, momentum=0.0), rtol=1e-6, atol=1e-7)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_samtrainer_with_given_sam_scheduler_and_bf16(tmp_path):
    x, y, ds = _dataset()
    model = Tiny()
    sam = make_sam(model.net)
    trainer = SAMTrainer(model, _args(tmp_path, bf16=True), train_dataset=ds, optimizers=(sam, linear_schedule(sam)))
    trainer.train()
    assert trainer.state.global_step == STEPS
    # the same bf16 autocast in both: only summation order may differ
    assert_same_params(model.net, reference(mlp(), x, y, autocast=torch.bfloat16), rtol=1e-3, atol=1e-4)


def test_samtrainer_rejects_a_plain_optimizer_or_unknown_perturb(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ds = _dataset()[2]
    with pytest.raises(TypeError, match=r"samnorm\.SAM"):
        SAMTrainer(model, _args(tmp_path), train_dataset=ds, optimizers=(opt, None))
    with pytest.raises(ValueError, match="perturb"):
        SAMTrainer(model, _args(tmp_path), train_dataset=ds, perturb="bias")


def test_plain_trainer_with_sam_names_samtrainer(tmp_path):
    model = Tiny()
    sam = make_sam(model.net)
    trainer = transformers.Trainer(model, _args(tmp_path), train_dataset=_dataset()[2], optimizers=(sam, None))
    with pytest.raises(ValueError, match=r"samnorm\.integrations\.transformers\.SAMTrainer"):
        trainer.train()  # Trainer's optimizer.step() after one backward: no second pass to finish


def test_samtrainer_with_torch_compile(tmp_path):
    pytest.importorskip("torch._dynamo")
    x, y, ds = _dataset()
    model = Tiny()
    args = _args(tmp_path, torch_compile=True, torch_compile_backend="aot_eager")  # no C++ toolchain
    trainer = SAMTrainer(model, args, train_dataset=ds, rho=RHO)
    torch._dynamo.utils.counters.clear()
    trainer.train()
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert compiled > 0  # the model did run through dynamo
    assert_same_params(model.net, reference(mlp(), x, y, momentum=0.0), rtol=1e-5, atol=1e-6)
