"""``samnorm pseudo-ood``: a PNG grid of pseudo-OOD examples made from an image folder.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="samnorm")
    >>> add_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["pseudo-ood", "--images", "d", "--output", "g.png"]).n
    8
"""

from __future__ import annotations

import argparse
from typing import Any

from samnorm.cli.common import names
from samnorm.runs import RunSpec

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``samnorm pseudo-ood`` on an ``argparse`` sub-parser collection."""
    g = subparsers.add_parser(
        "pseudo-ood",
        help="save a PNG grid of pseudo-OOD examples made from a folder",
        description="Rows: the ID images, then one row per pseudo-OOD transform.",
    )
    g.add_argument("--images", required=True, help="image folder (class sub-folders or flat)")
    g.add_argument("--output", required=True, help="PNG path")
    g.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    g.add_argument("--size", type=int, default=128, help="side of each image in pixels (default 128)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=3)
    g.add_argument("--transforms", help="comma-separated transform names (default: all six)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--title")
    g.set_defaults(func=run, run_spec=RunSpec("output", {"--images": "images"}, file=True))


def run(args: argparse.Namespace) -> int:
    """Run ``samnorm pseudo-ood`` with its parsed arguments; returns the exit status."""
    import torch

    from samnorm.data.folders import ImageFolder, ImageTransform
    from samnorm.data.pseudo_ood import PseudoOOD, save_example_grid

    c = args.channels
    ds = ImageFolder(args.images, ImageTransform(size=args.size, mean=(0.0,) * c, std=(1.0,) * c))
    # Spread the examples over the folder so that several classes show up.
    picks = sorted(set(torch.linspace(0, len(ds) - 1, min(args.n, len(ds))).round().long().tolist()))
    items = [ds[i] for i in picks]
    x = torch.stack([img for img, _ in items])
    y = torch.tensor([label for _, label in items])
    sampler = PseudoOOD(names(args.transforms) if args.transforms else None, seed=args.seed)
    path = save_example_grid(
        x, args.output, labels=y, sampler=sampler, max_images=len(picks), seed=args.seed, title=args.title
    )
    print(f"wrote {path} ({len(picks)} images x {len(sampler.transforms)} transforms)")
    return 0
