"""``samnorm finetune``: fine-tune a classifier with SAM-ON and pseudo-OOD images on an image folder.

The options of the training group are the fields of :class:`samnorm.train.recipe.FinetuneConfig` (left
unset, the config's defaults apply).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="samnorm")
    >>> add_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["finetune", "--train", "t", "--output", "o", "--lr", "0.01"])
    >>> args.lr, args.optimizer
    (0.01, None)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from samnorm.cli.common import (
    UsageError,
    add_model_args,
    build_model,
    image_transform,
    names,
    read_recorded,
    say,
    setup,
)
from samnorm.runs import RunSpec
from samnorm.sam import registry
from samnorm.validate import SPECS

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``samnorm finetune`` on an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune with SAM-ON and pseudo-OOD images on an image folder",
        description="Fine-tune a pretrained classifier on ROOT/<class>/<image> folders.",
    )
    p.add_argument("--train", required=True, help="ID training folder (one sub-folder per class)")
    p.add_argument("--output", required=True, help="output directory (checkpoint.pt, log.jsonl, config.json)")
    add_model_args(p)
    p.add_argument("--pretrained", action="store_true", help="download timm's hub weights (needs a network)")
    p.add_argument(
        "--new-head",
        action="store_true",
        help="new classifier when the checkpoint's head has another number of classes",
    )
    t = p.add_argument_group("training (defaults: samnorm.train.recipe.FinetuneConfig)")
    _add_optimizer_args(t)
    _add_ood_args(t)
    _add_run_args(t)
    p.set_defaults(func=run, batch_size=None, run_spec=RunSpec("output", {"--train": "train"}))


def _add_optimizer_args(t: Any) -> None:
    """The optimizer, its schedule and the step size."""
    t.add_argument("--optimizer", choices=[*registry.ascents(), "sgd"], help="default sam-on")
    t.add_argument("--rho", type=float, help="SAM radius (default per optimizer: 0.5 for sam-on)")
    t.add_argument(
        "--variant",
        choices=registry.schedules(),
        help="a cheaper schedule of the SAM optimizer (default: every step is SAM's two passes); "
        "benchmarks/RESULTS.md sections 7 and 8 measure how much of SAM-ON's gain each keeps",
    )
    with_k = {
        name: kind.defaults["k"]
        for name, kind in registry.KINDS.items()
        if name in registry.schedules() and "k" in kind.defaults
    }
    t.add_argument(
        "--variant-k",
        type=int,
        metavar="K",
        help=f"steps per SAM step of --variant {' or '.join(with_k)} "
        f"(default {', '.join(f'{n} {k}' for n, k in with_k.items())})",
    )
    t.add_argument("--eta", type=float, help="ASAM offset (default 0.01)")
    t.add_argument("--base-optimizer", choices=["sgd", "adamw"], help="default sgd (momentum 0.9)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3, cosine decay)")
    t.add_argument("--momentum", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--epochs", type=float, help="default 1")
    t.add_argument("--steps", type=int, help="number of steps (overrides --epochs)")


def _add_ood_args(t: Any) -> None:
    """The pseudo-OOD images and their loss."""
    t.add_argument("--ood-loss", choices=["uniform", "energy", "maxlogit"], help="default uniform")
    t.add_argument(
        "--ood-weight",
        type=float,
        help="weight of the OOD term (default: 0.25 for the uniform loss, chosen on validation data in "
        "benchmarks/RESULTS.md section 8.4; for the other losses the library's, samnorm.train.losses.OOD_LOSSES)",
    )
    t.add_argument("--ood-ratio", type=float, help="pseudo-OOD images per ID image (default 0.5)")
    t.add_argument(
        "--transforms",
        help="pseudo-OOD transforms, comma-separated (default: jigsaw alone, chosen on validation data "
        "over both backbone families in benchmarks/RESULTS.md section 8.4; until 0.1.0 all six)",
    )
    t.add_argument("--m-in", type=float)
    t.add_argument("--m-out", type=float)


def _add_run_args(t: Any) -> None:
    """Precision, seed, checkpoints, logging and what to do with a run already in the output folder."""
    t.add_argument("--grad-clip", type=float)
    t.add_argument(
        "--precision",
        choices=SPECS["precision"].allowed(),
        help="default fp32; bf16: bfloat16 autocast; fp16: float16 autocast with a GradScaler (for GPUs "
        "without bf16, e.g. T4, V100): steps with an inf/NaN gradient are skipped, and log.jsonl "
        "records loss_scale and skipped_steps",
    )
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    t.add_argument("--log-every", type=int)
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT/checkpoint.pt if present; without --model/--checkpoint the model, its "
        "arguments and the image transform are the checkpoint's (other settings must be the run's)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --output: its checkpoint.pt, log.jsonl, config.json are removed once the "
        "settings pass their checks (without this or --resume, a folder holding a run is refused)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")


def run(args: argparse.Namespace) -> int:
    """Run ``samnorm finetune`` with its parsed arguments; returns the exit status."""
    import dataclasses

    import torch

    from samnorm.data.folders import ImageFolder
    from samnorm.train.recipe import CHECKPOINT_NAME, FinetuneConfig, finetune

    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --output, --overwrite replaces it: pass one of them")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    settings["num_workers"] = args.workers
    if args.transforms is not None:
        settings["transforms"] = names(args.transforms)
    try:
        cfg = FinetuneConfig(**settings)  # every setting checked before any folder is read
    except ValueError as err:
        field, _, rest = str(err).partition(" ")  # "lr must be ..." -> "--lr must be ..."
        raise UsageError(f"--{field.replace('_', '-')} {rest}" if field in fields else str(err)) from err
    train = ImageFolder(args.train, flat=False)  # checks the folder before any model is built
    rank, world, device = setup(args.device)
    resume_from = os.path.join(args.output, CHECKPOINT_NAME)
    if args.resume and not (args.model or args.checkpoint) and os.path.isfile(resume_from):
        args.checkpoint = resume_from  # the interrupted run's model, arguments and image transform
    raw = read_recorded(args.checkpoint, args.trust_checkpoint)
    torch.manual_seed(cfg.seed)  # the new head's (or a fresh model's) initial weights follow --seed
    try:
        model, name, kwargs = build_model(args, raw, num_classes=len(train.classes), new_head=args.new_head)
    except ValueError as err:
        if "head" in str(err) and not args.new_head:
            raise UsageError(
                f"{err}; pass --new-head to train a new classifier for the folder's {len(train.classes)} classes"
            ) from err
        raise
    train.transform = image_transform(args, model, kwargs, (raw or {}).get("metadata", {}).get("transform"))
    say(
        rank,
        f"fine-tuning {name} on {len(train)} images of {len(train.classes)} classes "
        f"({world} process(es), {device}) -> {args.output}",
        sys.stderr,
    )
    result = finetune(  # a DivergedError is main's one line and exit 3, as for every command
        model,
        train,
        cfg,
        output_dir=args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        device=device,
        progress=not args.no_progress,
        model_name=name,
        model_kwargs=kwargs,
        metadata={"classes": train.classes, "transform": vars(train.transform)},
    )
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "ce", "ood", "acc"))
    say(rank, f"done: {result.steps} steps; {summary}; checkpoint {result.checkpoint}")
    return 0
