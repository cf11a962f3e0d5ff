"""Fine-tune BiT ResNetv2-101 with the SFT recipe (SAM-ON + pseudo-OOD), then compare OOD detection.

The whole recipe is one call, :func:`samnorm.train.recipe.finetune`; the evaluation before and after is
:func:`samnorm.ood.evaluate_datasets` (FPR95 / AUROC / AUPR per OOD set).

Tiny folders on a CPU (random weights unless you give --weights):

    python examples/finetune_resnetv2.py --train data/train --val data/val --ood noise=data/ood \\
        --img-size 64 --steps 10 --batch-size 8

The paper's backbone: BiT-S R101x1 fine-tuned on ImageNet (``BiT-S-R101x1-flat-finetune.pth.tar``,
the checkpoint RankFeat evaluates) or Google's ``BiT-M-R101x1-ILSVRC2012.npz``, via ``--weights``.
"""

from __future__ import annotations

import argparse

import torch

from samnorm.data.folders import ImageFolder, transform_for_model
from samnorm.models import DEFAULT_MODEL, create_model
from samnorm.ood import evaluate_datasets
from samnorm.train import finetune

SCORERS = ["msp", "energy", "rankfeat"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="ID training folder, one sub-folder per class")
    p.add_argument("--val", required=True, help="ID test folder with the same classes")
    p.add_argument("--ood", action="append", required=True, metavar="NAME=DIR", help="OOD folder (repeatable)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--weights", help="local .pth.tar / .npz weights (BiT); default: random init")
    p.add_argument("--img-size", type=int, help="input size (default: the model's, 448 for BiT)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", default="runs/resnetv2")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    train = ImageFolder(args.train, flat=False)
    # new_head: keep the checkpoint's classifier when it fits these classes, else start a fresh one.
    model = create_model(args.model, checkpoint=args.weights, num_classes=len(train.classes), new_head=True)
    train.transform = transform = transform_for_model(model, size=args.img_size)
    val = ImageFolder(args.val, transform, classes=train.classes)
    ood = {name: ImageFolder(path, transform, flat=True) for name, path in (o.split("=", 1) for o in args.ood)}
    model.to(device)

    before = evaluate_datasets(model, val, ood, SCORERS, batch_size=args.batch_size).results
    result = finetune(
        model,
        train,
        output_dir=args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        device=device,
        model_name=args.model,
    )
    after = evaluate_datasets(result.model, val, ood, SCORERS, batch_size=args.batch_size).results

    print("## Before fine-tuning\n\n" + before.to_markdown())
    print("## After SFT (SAM-ON + pseudo-OOD)\n\n" + after.to_markdown())
    print(f"checkpoint: {result.checkpoint} (evaluate it again with `samnorm evaluate --checkpoint ...`)")


if __name__ == "__main__":
    main()
