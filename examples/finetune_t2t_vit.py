"""Fine-tune T2T-ViT-24 with SAM-ON and pseudo-OOD images, written out as a plain training loop.

Where ``finetune_resnetv2.py`` calls the recipe, this script shows its parts: the optimizer
(``samnorm.SAM`` perturbing only the LayerNorms), the pseudo-OOD sampler, the loss, and SAM's
two-step API with its ``first_pass`` / ``second_pass`` contexts (DDP-ready).

Tiny folders on a CPU (random weights unless you give --weights):

    python examples/finetune_t2t_vit.py --train data/train --val data/val --ood noise=data/ood \\
        --img-size 64 --steps 10 --batch-size 8

The paper's backbone: the official ``82.3_T2T_ViT_24.pth.tar`` (github.com/yitu-opensource/T2T-ViT
releases) via ``--weights``; keep --img-size 224 for it.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch.utils.data import DataLoader

import samnorm
from samnorm.data.folders import ImageFolder, transform_for_model
from samnorm.data.pseudo_ood import PseudoOOD
from samnorm.models import create_model
from samnorm.ood import evaluate
from samnorm.train.losses import SFTLoss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--ood", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--weights", help="official T2T-ViT-24 .pth.tar (default: random init)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rho", type=float, default=0.5)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    train = ImageFolder(args.train, flat=False)
    model = create_model(
        "t2t_vit_24", checkpoint=args.weights, num_classes=len(train.classes), new_head=True, img_size=args.img_size
    ).to(device)
    train.transform = transform = transform_for_model(model, size=args.img_size)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=2)
    val = DataLoader(ImageFolder(args.val, transform, classes=train.classes), batch_size=args.batch_size)
    ood = {
        name: DataLoader(ImageFolder(path, transform, flat=True), batch_size=args.batch_size)
        for name, path in (o.split("=", 1) for o in args.ood)
    }
    before = evaluate(model, val, ood, ["msp", "energy", "rankfeat"])

    # SAM-ON: perturb=model selects the normalization layers; SGD updates every parameter.
    opt = samnorm.SAM(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), perturb=model, rho=args.rho)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    sampler = PseudoOOD(seed=0)  # jigsaw, patch mix, rotations, blur, noise, Fourier phase mix
    loss_fn = SFTLoss("uniform")  # CE on ID + 0.5 * CE-to-uniform on pseudo-OOD
    model.train()
    batches = itertools.islice(itertools.cycle(loader), args.steps)
    for step, (x, y) in enumerate(batches, 1):
        x, y = x.to(device), y.to(device)
        inputs = torch.cat([x, sampler(x[: len(x) // 2], y[: len(x) // 2])])  # half as many pseudo-OOD

        def loss_terms():
            logits = model(inputs)
            return loss_fn(logits[: len(y)], y, logits[len(y) :])

        with opt.first_pass(model):  # no DDP all-reduce for the ascent gradient
            terms = loss_terms()
        opt.first_step(terms.total)  # gradient of the norm layers only, then w += e
        with opt.second_pass(model):  # gradient at the perturbed point
            loss_terms().total.backward()
        opt.second_step(zero_grad=True)  # restore w exactly, SGD step
        sched.step()
        if step % 10 == 0 or step == args.steps:
            print(f"step {step}: loss {terms.total.item():.3f}  ce {terms.ce.item():.3f}  ood {terms.ood.item():.3f}")

    after = evaluate(model, val, ood, ["msp", "energy", "rankfeat"])
    print("## Before fine-tuning\n\n" + before.to_markdown())
    print("## After SFT (SAM-ON + pseudo-OOD)\n\n" + after.to_markdown())


if __name__ == "__main__":
    main()
