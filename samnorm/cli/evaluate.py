"""``samnorm evaluate``: OOD metrics of a model on an ID image folder and OOD image folders.

Writes ``results.md``, ``results.csv`` and ``scores.json`` together (:func:`samnorm.runs.result_set`).
A scorer whose fit needs class labels (its ``needs_labels``, e.g. Mahalanobis) gets a ``--fit`` folder
read with its class sub-folders (:func:`samnorm.cli.common.fit_folder`).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="samnorm")
    >>> add_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["evaluate", "--id", "val", "--ood", "tex=dtd", "--output", "out"]).ood
    [('tex', 'dtd')]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from samnorm.cli.common import (
    UsageError,
    add_model_args,
    build_model,
    fit_folder,
    image_transform,
    literal,
    named_dir,
    names,
    read_recorded,
    setup,
)
from samnorm.runs import RunSpec, result_set

__all__ = ["add_parser", "run"]

_DEFAULT_SCORERS = "msp,max_logit,energy"  # the three that need no fit


def add_parser(subparsers: Any) -> None:
    """Register ``samnorm evaluate`` on an ``argparse`` sub-parser collection."""
    e = subparsers.add_parser(
        "evaluate",
        help="OOD metrics of a model on ID and OOD image folders",
        description="Score an ID folder and OOD folders; write results.md, results.csv, scores.json.",
    )
    e.add_argument("--id", required=True, help="ID test folder (class sub-folders)")
    e.add_argument(
        "--ood",
        required=True,
        action="append",
        type=named_dir,
        metavar="NAME=DIR",
        help="OOD folder, repeatable; images anywhere below DIR",
    )
    e.add_argument("--fit", help="ID training folder, for scorers that need statistics (ReAct, Mahalanobis, KNN, ViM)")
    e.add_argument("--scorers", default=_DEFAULT_SCORERS, help=f"comma-separated (default {_DEFAULT_SCORERS})")
    e.add_argument(
        "--scorer-opt",
        action="append",
        metavar="SCORER.KEY=VALUE",
        help="an option of one of the --scorers, repeatable; VALUE is read as a Python literal when "
        "it is one, e.g. rankfeat.blocks=-2,-1  rankfeat.method=power  react.percentile=95  "
        "odin.temperature=1000 (the keywords of samnorm.ood's scorer classes)",
    )
    e.add_argument("--output", required=True, help="output directory")
    e.add_argument("--tpr", type=float, default=0.95, help="TPR of the FPR column (default 0.95)")
    e.add_argument("--convention", default="samnorm", help="metric convention (samnorm.ood.CONVENTIONS)")
    e.add_argument("--id-name", default="ID", help="name of the ID set in the tables")
    add_model_args(e)
    e.set_defaults(func=run, run_spec=RunSpec("output", {"--id": "id", "--ood": "ood", "--fit": "fit"}))


def _scorer_options(texts: Sequence[str] | None, scorers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``SCORER.KEY=VALUE`` items as ``{scorer: {key: value}}``; every scorer must be evaluated and
    every key one of its options."""
    from samnorm.ood import check_scorer_options, scorer_class

    chosen = {scorer_class(s) for s in scorers}
    out: dict[str, dict[str, Any]] = {}
    for text in texts or []:
        target, sep, value = text.partition("=")
        scorer, dot, key = target.partition(".")
        if not sep or not dot or not scorer or not key.isidentifier():
            raise UsageError(f"--scorer-opt takes SCORER.KEY=VALUE (e.g. rankfeat.blocks=-2,-1), got {text!r}")
        if scorer_class(scorer) not in chosen:
            raise UsageError(f"--scorer-opt {text!r}: scorer {scorer!r} is not in --scorers ({', '.join(scorers)})")
        check_scorer_options(scorer, {key: None})
        out.setdefault(scorer_class(scorer).name, {})[key] = literal(value)
    return out


def _check_args(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Check what the user typed for ``evaluate``; return the scorer names and their options."""
    from samnorm.ood import SCORERS, canonical_name
    from samnorm.ood.metrics import check_tpr, resolve_convention

    scorers = names(args.scorers)
    unknown = []
    for s in scorers:
        try:
            canonical_name(s)
        except ValueError:
            unknown.append(s)
    if unknown or not scorers:
        choices = ", ".join(sorted(c.name for c in SCORERS.values()))
        raise UsageError(f"unknown scorer(s) {unknown or scorers}: choose from {choices}")
    options = _scorer_options(args.scorer_opt, scorers)
    try:
        check_tpr(args.tpr)
    except ValueError as err:
        raise UsageError(f"--tpr: {err}") from err
    resolve_convention(args.convention)
    ood_names = [n for n, _ in args.ood]
    if len(set(ood_names)) != len(ood_names):
        raise UsageError(f"two --ood sets share a name ({ood_names}): name them NAME=DIR")
    for path in [args.id, *(p for _, p in args.ood), *([args.fit] if args.fit else [])]:
        if not os.path.isdir(path):
            raise UsageError(f"image folder {path!r} does not exist (or is not a directory)")
    return scorers, options


def run(args: argparse.Namespace) -> int:
    """Run ``samnorm evaluate`` with its parsed arguments; returns the exit status."""
    import json

    from samnorm.data.folders import ImageFolder
    from samnorm.ood.sharded import evaluate_datasets
    from samnorm.utils.io import atomic_write

    # everything the user typed is checked before a model is built or an image is read
    scorers, options = _check_args(args)
    ood_names = [n for n, _ in args.ood]
    files = [os.path.join(args.output, n) for n in ("results.md", "results.csv", "scores.json")]
    rank, _world, device = setup(args.device)
    raw = read_recorded(args.checkpoint, args.trust_checkpoint)
    model, name, kwargs = build_model(args, raw)
    meta = (raw or {}).get("metadata", {})
    transform = image_transform(args, model, kwargs, meta.get("transform"))
    classes = meta.get("classes")
    id_set = ImageFolder(args.id, transform, classes=classes)
    ood_sets = {n: ImageFolder(p, transform, flat=True) for n, p in args.ood}
    fit_set = fit_folder(args.fit, transform, classes, scorers) if args.fit else None
    model.to(device).eval()
    res, skipped = evaluate_datasets(
        model,
        id_set,
        ood_sets,
        scorers,
        fit_data=fit_set,
        batch_size=args.batch_size,
        num_workers=args.workers,
        tpr=args.tpr,
        convention=args.convention,
        id_name=args.id_name,
        scorer_options=options,
    )
    if rank == 0:
        table = res.to_markdown()
        with result_set(args.output, "evaluate"):  # the three files replace the previous three together
            atomic_write(
                files[0], f"Model: {name}" + (f" ({args.checkpoint})" if args.checkpoint else "") + "\n\n" + table
            )
            atomic_write(files[1], res.to_csv())
            sets = {args.id_name: id_set, **ood_sets}
            gone = {n: set(idx) for n, idx in skipped.items()}
            payload = {
                "model": name,
                "checkpoint": args.checkpoint,
                "id_name": args.id_name,
                "ood_names": ood_names,
                "scorer_options": options,
                "tpr": res.tpr,
                "convention": res.convention.name,
                "higher_is_in_distribution": True,
                "metrics": res.table,
                "files": {n: [p for i, (p, _) in enumerate(ds.samples) if i not in gone[n]] for n, ds in sets.items()},
                "skipped": {n: [sets[n].samples[i][0] for i in idx] for n, idx in skipped.items() if idx},
                "scores": {s: {n: v.tolist() for n, v in per_set.items()} for s, per_set in res.scores.items()},
            }
            atomic_write(files[2], json.dumps(payload))
        print(table, flush=True)
        n_skipped = sum(len(v) for v in skipped.values())
        if n_skipped:
            print(f"left out {n_skipped} unreadable image(s); scores.json lists them under 'skipped'", file=sys.stderr)
        print(
            f"wrote results.md, results.csv, scores.json and evaluate.manifest.json to {args.output}", file=sys.stderr
        )
    return 0
