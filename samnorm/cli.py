"""The ``samnorm`` command line: ``finetune``, ``evaluate``, ``pseudo-ood`` (and the demo/diagnostics commands).

Every command runs the same under ``torchrun --nproc_per_node N`` (DDP, process group from the
environment, rank 0 writes and prints). Bad input ends with one line on stderr and exit status 2;
``--debug`` shows the traceback instead. Heavy imports (torch, timm) happen inside the commands, so
``samnorm --help`` answers quickly.

Example:
    >>> build_parser().parse_args(["evaluate", "--id", "val", "--ood", "tex=dtd", "--output", "out"]).ood
    [('tex', 'dtd')]
"""

from __future__ import annotations

import argparse
import ast
import atexit
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

# Modules of other parts of samnorm that add their own sub-commands (``add_parser(subparsers)``).
_PLUGINS = ("samnorm.demo", "samnorm.diagnostics.cli")
_DEFAULT_SCORERS = "msp,max_logit,energy"


# ------------------------------------------------------------------ argument types
def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a Python literal when it is one (``3``, ``0.1``, ``(1, 2)``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a Python name as KEY, got {text!r}")
    return key, _literal(value)


def _named_dir(text: str) -> tuple[str, str]:
    """``NAME=DIR``, or ``DIR`` alone (named after its last component)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = os.path.basename(os.path.normpath(text)), text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _literal(value: str) -> Any:
    """A Python literal when ``value`` is one (``3``, ``0.1``, ``-2,-1`` -> ``(-2, -1)``), else the text."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


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
            raise ValueError(f"--scorer-opt takes SCORER.KEY=VALUE (e.g. rankfeat.blocks=-2,-1), got {text!r}")
        if scorer_class(scorer) not in chosen:
            raise ValueError(f"--scorer-opt {text!r}: scorer {scorer!r} is not in --scorers ({', '.join(scorers)})")
        check_scorer_options(scorer, {key: None})
        out.setdefault(scorer_class(scorer).name, {})[key] = _literal(value)
    return out


# counts that must be positive / non-negative, by argparse destination (checked only when given)
_POSITIVE = ("batch_size", "img_size", "n", "size", "steps", "checkpoint_every", "log_every")
_NON_NEGATIVE = ("workers", "warmup_steps")


def _check_counts(args: argparse.Namespace) -> None:
    """One clear line for a zero or negative count (``--batch-size 0`` used to end in a traceback)."""
    for names, least in ((_POSITIVE, 1), (_NON_NEGATIVE, 0)):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and value < least:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be an integer >= {least}, got {value}")


# ------------------------------------------------------------------ shared set-up
def _setup(device_arg: str | None) -> tuple[int, int, Any]:
    """Device and process group; under torchrun the group comes from the environment variables."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is None:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Torn down at exit, so that several commands run in one process share the group.
        atexit.register(dist.destroy_process_group)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def _say(rank: int, text: str, stream: Any = None) -> None:
    if rank == 0:
        print(text, file=stream or sys.stdout, flush=True)


def _read_recorded(path: str | None, trusted: bool) -> dict[str, Any] | None:
    """A checkpoint read once (None for no file or a .npz, which records nothing)."""
    if path is None or path.lower().endswith((".npz", ".npy")):
        return None
    from samnorm.models import read_checkpoint

    raw = read_checkpoint(path, trusted=trusted)
    return dict(raw) if isinstance(raw, dict) else None


def _build_model(args: argparse.Namespace, raw: dict[str, Any] | None, **extra: Any) -> tuple[Any, str, dict]:
    """Model from --model / --checkpoint / --model-arg; returns it with its name and kwargs."""
    from samnorm.models import DEFAULT_MODEL, create_model

    kwargs = dict(args.model_arg or [])
    recorded = raw is not None and "model_name" in raw
    name = args.model or (raw["model_name"] if recorded else DEFAULT_MODEL)
    if recorded and not args.model:
        kwargs = {**raw.get("model_kwargs", {}), **kwargs}
    source = raw if raw is not None else args.checkpoint
    try:
        model = create_model(name, checkpoint=source, pretrained=getattr(args, "pretrained", False),
                             trusted=args.trust_checkpoint, **extra, **kwargs)
    except ValueError as err:
        raise ValueError(f"{args.checkpoint}: {err}" if args.checkpoint else str(err)) from err
    return model, name, kwargs


def _transform(args: argparse.Namespace, model: Any, kwargs: dict, recorded: dict | None) -> Any:
    from samnorm.data.folders import ImageTransform, transform_for_model

    if recorded and args.img_size is None:
        return ImageTransform(**recorded)
    size = args.img_size or kwargs.get("img_size")
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    return transform_for_model(model, size=size, in_chans=kwargs.get("in_chans"))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm model name, e.g. resnetv2_101x1_bit.goog_in21k_ft_in1k (default) or "
                   "t2t_vit_24; taken from --checkpoint when it records one")
    g.add_argument("--checkpoint", help="local weights: .pth/.pth.tar/.safetensors/.npz, or a samnorm checkpoint")
    g.add_argument("--model-arg", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="extra model argument, repeatable (e.g. img_size=384, drop_path_rate=0.1)")
    g.add_argument("--img-size", type=int, help="input side in pixels (default: the model's)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a checkpoint that stores Python objects (only for files you trust)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: LOCAL_RANK)")
    g.add_argument("--batch-size", type=int, default=64, help="images per step and process (default 64)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (default 4)")


# ------------------------------------------------------------------ commands
def _cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from samnorm.data.folders import ImageFolder
    from samnorm.recipe import FinetuneConfig, finetune

    _check_counts(args)
    train = ImageFolder(args.train, flat=False)  # checks the folder before any model is built
    rank, world, device = _setup(args.device)
    raw = _read_recorded(args.checkpoint, args.trust_checkpoint)
    try:
        model, name, kwargs = _build_model(args, raw, num_classes=len(train.classes), new_head=args.new_head)
    except ValueError as err:
        if "head" in str(err) and not args.new_head:
            raise ValueError(f"{err}; pass --new-head to train a new classifier for the folder's "
                             f"{len(train.classes)} classes") from err
        raise
    train.transform = _transform(args, model, kwargs, None)
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    settings["num_workers"] = args.workers
    if args.transforms is not None:
        settings["transforms"] = _names(args.transforms)
    cfg = FinetuneConfig(**settings)
    _say(rank, f"fine-tuning {name} on {len(train)} images of {len(train.classes)} classes "
               f"({world} process(es), {device}) -> {args.output}", sys.stderr)
    result = finetune(
        model, train, cfg, output_dir=args.output, resume=args.resume, device=device,
        progress=not args.no_progress, model_name=name, model_kwargs=kwargs,
        metadata={"classes": train.classes, "transform": vars(train.transform)},
    )
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "ce", "ood", "acc"))
    _say(rank, f"done: {result.steps} steps; {summary}; checkpoint {result.checkpoint}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from samnorm.data.folders import ImageFolder
    from samnorm.ood import SCORERS
    from samnorm.ood.metrics import _check_tpr, _convention
    from samnorm.recipe import evaluate_datasets

    # everything the user typed is checked before a model is built or an image is read
    _check_counts(args)
    scorers = _names(args.scorers)
    known = {k: c.name for k, c in SCORERS.items()}
    unknown = [s for s in scorers if s.lower().replace("_", "").replace("-", "") not in known]
    if unknown or not scorers:
        raise ValueError(f"unknown scorer(s) {unknown or scorers}: choose from {', '.join(sorted(known.values()))}")
    options = _scorer_options(args.scorer_opt, scorers)
    try:
        _check_tpr(args.tpr)
    except ValueError as err:
        raise ValueError(f"--tpr: {err}") from err
    _convention(args.convention)
    names = [n for n, _ in args.ood]
    if len(set(names)) != len(names):
        raise ValueError(f"two --ood sets share a name ({names}): name them NAME=DIR")
    for path in [args.id, *(p for _, p in args.ood), *([args.fit] if args.fit else [])]:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder {path!r} does not exist (or is not a directory)")
    rank, world, device = _setup(args.device)
    raw = _read_recorded(args.checkpoint, args.trust_checkpoint)
    model, name, kwargs = _build_model(args, raw)
    meta = (raw or {}).get("metadata", {})
    transform = _transform(args, model, kwargs, meta.get("transform"))
    classes = meta.get("classes")
    id_set = ImageFolder(args.id, transform, classes=classes)
    ood_sets = {n: ImageFolder(p, transform, flat=True) for n, p in args.ood}
    fit_set = ImageFolder(args.fit, transform, classes=classes) if args.fit else None
    model.to(device).eval()
    res, skipped = evaluate_datasets(
        model, id_set, ood_sets, scorers, fit_data=fit_set, batch_size=args.batch_size, num_workers=args.workers,
        tpr=args.tpr, convention=args.convention, id_name=args.id_name, scorer_options=options,
    )
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        table = res.to_markdown()
        with open(os.path.join(args.output, "results.md"), "w", encoding="utf-8") as f:
            f.write(f"Model: {name}" + (f" ({args.checkpoint})" if args.checkpoint else "") + "\n\n" + table)
        res.to_csv(os.path.join(args.output, "results.csv"))
        sets = {args.id_name: id_set, **ood_sets}
        gone = {n: set(idx) for n, idx in skipped.items()}
        payload = {
            "model": name, "checkpoint": args.checkpoint, "id_name": args.id_name, "ood_names": names,
            "scorer_options": options,
            "tpr": res.tpr, "convention": res.convention.name, "higher_is_in_distribution": True,
            "metrics": res.table,
            "files": {n: [p for i, (p, _) in enumerate(ds.samples) if i not in gone[n]]
                      for n, ds in sets.items()},
            "skipped": {n: [sets[n].samples[i][0] for i in idx] for n, idx in skipped.items() if idx},
            "scores": {s: {n: v.tolist() for n, v in per_set.items()} for s, per_set in res.scores.items()},
        }
        with open(os.path.join(args.output, "scores.json"), "w", encoding="utf-8") as f:
            json.dump(payload, f)
        print(table, flush=True)
        n_skipped = sum(len(v) for v in skipped.values())
        if n_skipped:
            print(f"left out {n_skipped} unreadable image(s); scores.json lists them under 'skipped'", file=sys.stderr)
        print(f"wrote results.md, results.csv and scores.json to {args.output}", file=sys.stderr)
    return 0


def _cmd_pseudo_ood(args: argparse.Namespace) -> int:
    import torch

    from samnorm.data.folders import ImageFolder, ImageTransform
    from samnorm.data.pseudo_ood import PseudoOOD, save_example_grid

    _check_counts(args)
    c = args.channels
    ds = ImageFolder(args.images, ImageTransform(size=args.size, mean=(0.0,) * c, std=(1.0,) * c))
    # Spread the examples over the folder so that several classes show up.
    picks = sorted(set(torch.linspace(0, len(ds) - 1, min(args.n, len(ds))).round().long().tolist()))
    items = [ds[i] for i in picks]
    x = torch.stack([img for img, _ in items])
    y = torch.tensor([label for _, label in items])
    sampler = PseudoOOD(_names(args.transforms) if args.transforms else None, seed=args.seed)
    path = save_example_grid(x, args.output, labels=y, sampler=sampler, max_images=len(picks), seed=args.seed,
                             title=args.title)
    print(f"wrote {path} ({len(picks)} images x {len(sampler.transforms)} transforms)")
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``samnorm`` argument parser with every sub-command.

    Example:
        >>> args = build_parser().parse_args(["finetune", "--train", "t", "--output", "o", "--steps", "5"])
        >>> args.steps, args.optimizer
        (5, None)
    """
    parser = argparse.ArgumentParser(
        prog="samnorm", description="Sharpness-aware fine-tuning (SAM-ON) for OOD detection.",
        epilog="Each command runs under torchrun --nproc_per_node N as well.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version="%(prog)s " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("finetune", help="fine-tune with SAM-ON and pseudo-OOD images on an image folder",
                       description="Fine-tune a pretrained classifier on ROOT/<class>/<image> folders.")
    p.add_argument("--train", required=True, help="ID training folder (one sub-folder per class)")
    p.add_argument("--output", required=True, help="output directory (checkpoint.pt, log.jsonl, config.json)")
    _add_model_args(p)
    p.add_argument("--pretrained", action="store_true", help="download timm's hub weights (needs a network)")
    p.add_argument("--new-head", action="store_true",
                   help="new classifier when the checkpoint's head has another number of classes")
    t = p.add_argument_group("training (defaults: samnorm.recipe.FinetuneConfig)")
    t.add_argument("--optimizer", choices=["sam-on", "asam-on", "sam", "asam", "sgd"], help="default sam-on")
    t.add_argument("--rho", type=float, help="SAM radius (default per optimizer: 0.5 for sam-on)")
    t.add_argument("--eta", type=float, help="ASAM offset (default 0.01)")
    t.add_argument("--base-optimizer", choices=["sgd", "adamw"], help="default sgd (momentum 0.9)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3, cosine decay)")
    t.add_argument("--momentum", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--epochs", type=float, help="default 1")
    t.add_argument("--steps", type=int, help="number of steps (overrides --epochs)")
    t.add_argument("--ood-loss", choices=["uniform", "energy", "maxlogit"], help="default uniform")
    t.add_argument("--ood-weight", type=float, help="weight of the OOD term (default per loss)")
    t.add_argument("--ood-ratio", type=float, help="pseudo-OOD images per ID image (default 0.5)")
    t.add_argument("--transforms", help="pseudo-OOD transforms, comma-separated (default: all six)")
    t.add_argument("--m-in", type=float)
    t.add_argument("--m-out", type=float)
    t.add_argument("--grad-clip", type=float)
    t.add_argument("--precision", choices=["fp32", "bf16"])
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    t.add_argument("--log-every", type=int)
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt if present")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    p.set_defaults(func=_cmd_finetune, batch_size=None)

    e = sub.add_parser("evaluate", help="OOD metrics of a model on ID and OOD image folders",
                       description="Score an ID folder and OOD folders; write results.md, results.csv, scores.json.")
    e.add_argument("--id", required=True, help="ID test folder (class sub-folders)")
    e.add_argument("--ood", required=True, action="append", type=_named_dir, metavar="NAME=DIR",
                   help="OOD folder, repeatable; images anywhere below DIR")
    e.add_argument("--fit", help="ID training folder, for scorers that need statistics (ReAct, Mahalanobis, KNN, ViM)")
    e.add_argument("--scorers", default=_DEFAULT_SCORERS, help=f"comma-separated (default {_DEFAULT_SCORERS})")
    e.add_argument("--scorer-opt", action="append", metavar="SCORER.KEY=VALUE",
                   help="an option of one of the --scorers, repeatable; VALUE is read as a Python literal when "
                        "it is one, e.g. rankfeat.blocks=-2,-1  rankfeat.method=power  react.percentile=95  "
                        "odin.temperature=1000 (the keywords of samnorm.ood's scorer classes)")
    e.add_argument("--output", required=True, help="output directory")
    e.add_argument("--tpr", type=float, default=0.95, help="TPR of the FPR column (default 0.95)")
    e.add_argument("--convention", default="samnorm", help="metric convention (samnorm.ood.CONVENTIONS)")
    e.add_argument("--id-name", default="ID", help="name of the ID set in the tables")
    _add_model_args(e)
    e.set_defaults(func=_cmd_evaluate)

    g = sub.add_parser("pseudo-ood", help="save a PNG grid of pseudo-OOD examples made from a folder",
                       description="Rows: the ID images, then one row per pseudo-OOD transform.")
    g.add_argument("--images", required=True, help="image folder (class sub-folders or flat)")
    g.add_argument("--output", required=True, help="PNG path")
    g.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    g.add_argument("--size", type=int, default=128, help="side of each image in pixels (default 128)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=3)
    g.add_argument("--transforms", help="comma-separated transform names (default: all six)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--title")
    g.set_defaults(func=_cmd_pseudo_ood)

    for module in _PLUGINS:
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and module.startswith(err.name):
                continue  # that part of samnorm is not installed/written: no such command
            raise
        plugin.add_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("samnorm")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``samnorm`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["pseudo-ood", "--images", "/no/such/dir", "--output", "g.png"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"samnorm {args.command}: error: {message}", file=sys.stderr)
        return 2
