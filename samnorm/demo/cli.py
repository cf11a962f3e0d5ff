"""``samnorm demo``: its argparse sub-command. Imports neither torch nor timm until the command runs."""

from __future__ import annotations

import argparse
from typing import Any

from samnorm.cli.common import UsageError, names
from samnorm.demo.config import ARMS, BACKBONE_DEFAULTS, DemoConfig, default_cache_dir
from samnorm.runs import RunSpec

__all__ = ["add_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _defaults(field_name: str) -> str:
    return " (default: " + ", ".join(f"{k} {v[field_name]}" for k, v in BACKBONE_DEFAULTS.items()) + ")"


def add_parser(subparsers: Any) -> None:
    """Register ``samnorm demo`` on an ``argparse`` sub-parser collection.

    Example:
        >>> parser = argparse.ArgumentParser(prog="samnorm")
        >>> add_parser(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["demo", "--seeds", "3"]).seeds
        3
    """
    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="run the SAM-ON fine-tuning demo on offline data (MNIST vs textures/photos/faces/noise)",
        description="Pretrain a compact BiT-style ResNetV2 on 3,500 MNIST digits (cached), score OOD sets with "
        "7 scorers, fine-tune SAM-ON / SGD / full SAM through samnorm.train.recipe.finetune over several seeds, and "
        "report every arm and the paired differences arm - SGD with 95% intervals (Markdown, JSON) and "
        "score-distribution plots. No download, CPU only, about a minute.",
    )
    p.add_argument(
        "--backbone",
        choices=tuple(BACKBONE_DEFAULTS),
        default=d.backbone,
        help="compact ResNetV2 with GroupNorm (default) or a small T2T-ViT",
    )
    p.add_argument("--out", default=d.out_dir, help=f"output folder (default: {d.out_dir})")
    p.add_argument("--cache-dir", default=None, help=f"pretrained-weights cache (default: {default_cache_dir()})")
    p.add_argument("--seeds", type=_positive_int, default=len(d.seeds), help="number of seeds per arm, from 0")
    p.add_argument(
        "--pretrain-seed",
        type=int,
        default=d.pretrain_seed,
        help="seed of the pretrained backbone (each seed is pretrained once and cached)",
    )
    p.add_argument("--arms", default=",".join(d.arms), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate" + _defaults("lr"))
    p.add_argument("--ood-weight", type=float, default=None, help="pseudo-OOD loss weight" + _defaults("ood_weight"))
    p.add_argument(
        "--ood-ratio",
        type=float,
        default=d.ood_ratio,
        help=f"pseudo-OOD images per ID image, 0 = no pseudo-OOD term (default {d.ood_ratio:g})",
    )
    p.add_argument("--rho-sam-on", type=float, default=None, help="SAM-ON radius" + _defaults("rho_sam_on"))
    p.add_argument("--rho-sam", type=float, default=None, help="full-SAM radius" + _defaults("rho_sam"))
    p.add_argument(
        "--adaptive-sam-on",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="adaptive ascent (ASAM) in the SAM-ON arm" + _defaults("adaptive_sam_on"),
    )
    p.add_argument(
        "--adaptive-sam",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="adaptive ascent (ASAM) in the full-SAM arm" + _defaults("adaptive_sam"),
    )
    p.add_argument(
        "--ood-loss",
        choices=("uniform", "energy", "maxlogit"),
        default=None,
        help="pseudo-OOD loss term of samnorm.train.losses.SFTLoss" + _defaults("ood_loss"),
    )
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="fine-tuning epochs (default 1)")
    p.add_argument("--transforms", default=",".join(d.transforms), help="comma-separated pseudo-OOD transforms")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--select",
        action="store_true",
        help="instead of the demo, rerun the validation-only selection of the fine-tuning defaults",
    )
    p.set_defaults(func=main, run_spec=RunSpec("out", option="--out"))


def main(args: argparse.Namespace) -> int:
    """Run ``samnorm demo`` (or ``--select``) from parsed arguments; 2 on a bad setting."""
    try:
        config = DemoConfig(
            backbone=args.backbone,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            seeds=tuple(range(args.seeds)),
            pretrain_seed=args.pretrain_seed,
            arms=tuple(names(args.arms)),
            lr=args.lr,
            ood_weight=args.ood_weight,
            ood_ratio=args.ood_ratio,
            rho_sam_on=args.rho_sam_on,
            rho_sam=args.rho_sam,
            epochs=args.epochs,
            adaptive_sam_on=args.adaptive_sam_on,
            adaptive_sam=args.adaptive_sam,
            ood_loss=args.ood_loss,
            transforms=tuple(names(args.transforms)),
            plots=not args.no_plots,
            progress=not args.no_progress,
        )
    except (TypeError, ValueError) as exc:  # samnorm prints it as every command's bad input: one line, exit 2
        raise UsageError(str(exc)) from exc
    if args.select:
        from samnorm.demo.tuning import select_hyperparameters

        select_hyperparameters(config)
        return 0
    from samnorm.demo.run import run_demo

    run_demo(config)
    return 0
