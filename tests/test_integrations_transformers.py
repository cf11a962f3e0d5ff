"""SAMTrainer against the real transformers.Trainer: the same parameters as a hand-written loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from samnorm import SAM  # noqa: E402
from samnorm.integrations.transformers import SAMTrainer  # noqa: E402

STEPS, BATCH, K, LR, RHO, CLIP = 3, 4, 2, 0.2, 0.3, 0.05


class Tiny(nn.Module):
    """What a Trainer needs from a model: keyword inputs, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x, labels):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits.float(), labels), "logits": logits}


def _data(n=STEPS * BATCH * K):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=K, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="sgd",
        max_grad_norm=CLIP, train_sampling_strategy="sequential", dataloader_num_workers=0,
        disable_tqdm=True, seed=0,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def _reference(data, autocast=None, momentum=0.0):
    """The loop a user would write: k micro-batches per step, both passes on all of them."""
    model = Tiny()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum), model, rho=RHO)
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda t: 1 - t / STEPS)  # "linear", no warm-up
    x = torch.stack([d["x"] for d in data])
    y = torch.stack([torch.as_tensor(d["labels"]) for d in data])
    micro = list(zip(x.split(BATCH), y.split(BATCH)))

    def loss(xb, yb):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return model(xb, yb)["loss"] / K

    for s in range(STEPS):
        window = micro[s * K:(s + 1) * K]
        for xb, yb in window:
            loss(xb, yb).backward()
        sam.first_step(zero_grad=True)
        with sam.second_pass(model):
            for xb, yb in window:
                loss(xb, yb).backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        sam.second_step(zero_grad=True)
        sched.step()
    return model


def _assert_same(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), msg=name, **tol)


def test_samtrainer_builds_sam_and_matches_hand_written_loop(tmp_path):
    data = _data()
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SAMTrainer(model, _args(tmp_path), train_dataset=data, rho=RHO)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, SAM)  # accelerate's wrapper around ours
    assert trainer.state.global_step == STEPS
    _assert_same(model, _reference(data), rtol=1e-6, atol=1e-7)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_samtrainer_with_given_sam_scheduler_and_bf16(tmp_path):
    data = _data()
    model = Tiny()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model, rho=RHO)
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda t: 1 - t / STEPS)
    trainer = SAMTrainer(model, _args(tmp_path, bf16=True), train_dataset=data, optimizers=(sam, sched))
    trainer.train()
    assert trainer.state.global_step == STEPS
    # the same bf16 autocast in both: only summation order may differ
    _assert_same(model, _reference(data, autocast=torch.bfloat16, momentum=0.9), rtol=1e-3, atol=1e-4)


def test_samtrainer_rejects_a_plain_optimizer(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="samnorm.SAM"):
        SAMTrainer(model, _args(tmp_path), train_dataset=_data(), optimizers=(opt, None))
    with pytest.raises(ValueError, match="perturb"):
        SAMTrainer(model, _args(tmp_path), train_dataset=_data(), perturb="bias")
