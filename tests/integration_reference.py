"""What every framework test compares with: the SAM loop a user would write by hand.

Plain torch, no framework: k micro-batches per step, the ascent on their accumulated gradient, the
descent gradient on the same micro-batches at the perturbed point, clipping, the step, the schedule.
"""

from __future__ import annotations

import torch
from helpers import batch
from torch import nn

from samnorm import SAM

STEPS, BATCH, K, LR, RHO, CLIP = 3, 4, 2, 0.2, 0.3, 0.05


def data(n=STEPS * BATCH * K, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Enough of helpers.batch for STEPS windows of K micro-batches."""
    return batch(n, seed=seed)


def make_sam(model: nn.Module, momentum=0.9) -> SAM:
    return SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum), model, rho=RHO)


def linear_schedule(opt) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' "linear" schedule without warm-up, over STEPS steps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / STEPS)


def reference(model, x, y, *, k=K, steps=STEPS, clip=CLIP, momentum=0.9, autocast=None, schedule=True):
    """Train ``model`` in place with the hand-written loop; returns it."""
    sam = make_sam(model, momentum)
    sched = linear_schedule(sam) if schedule else None
    micro = list(zip(x.split(BATCH), y.split(BATCH)))

    def loss(xb, yb):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(xb)
        return nn.functional.cross_entropy(out.float(), yb) / k

    for s in range(steps):
        window = micro[s * k : (s + 1) * k]
        for xb, yb in window:
            loss(xb, yb).backward()
        sam.first_step(zero_grad=True)
        with sam.second_pass(model):
            for xb, yb in window:
                loss(xb, yb).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        sam.second_step(zero_grad=True)
        if sched is not None:
            sched.step()
    return model


def assert_same_params(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), msg=lambda m: f"{name}: {m}", **tol)
