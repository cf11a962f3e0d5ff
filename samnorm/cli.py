"""The ``samnorm`` command line: ``finetune``, ``evaluate``, ``pseudo-ood`` (and the demo/diagnostics commands).

Every command runs the same under ``torchrun --nproc_per_node N`` (DDP, process group from the
environment, rank 0 writes and prints). Each command holds its output folder's lock for the whole
run, after refusing an output inside one of its input folders (:mod:`samnorm.runs`). Exit status: 0
done; 2 bad input (a :class:`~samnorm.cli_common.UsageError`, or the library's ``ValueError``/``OSError``,
e.g. an output folder another run holds), one line on stderr; 3 training diverged (one line; the last
good checkpoint is kept); 74 a write failed (disk full, file-size limit, read-only folder: one line
with the errno's name and the path; the previous files are kept); 128 + n stopped by signal n (130
Ctrl-C, 143 SIGTERM, 129 SIGHUP; one line on the checkpoint kept); 1 anything else (a bug, out of
memory), with its traceback and a one-line hint. ``--debug`` raises every error instead.
Heavy imports (torch, timm) happen inside the commands, so ``samnorm --help`` and
``samnorm COMMAND --help`` import neither.

Example:
    >>> build_parser().parse_args(["evaluate", "--id", "val", "--ood", "tex=dtd", "--output", "out"]).ood
    [('tex', 'dtd')]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from samnorm.cli_common import (
    UsageError,
    add_model_args,
    build_model,
    check_args,
    error_line,
    fit_folder,
    image_transform,
    literal,
    named_dir,
    names,
    read_recorded,
    say,
    setup,
)
from samnorm.runs import (
    EXIT_IOERR,
    RunSpec,
    Signalled,
    WriteError,
    check_outside,
    exit_status,
    handle_signals,
    hold,
    result_set,
)
from samnorm.sam import registry
from samnorm.utils.dist import env_rank, rank_world
from samnorm.validate import SPECS

__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_IOERR", "EXIT_USAGE", "build_parser", "main"]

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
# Modules of other parts of samnorm that add their own sub-commands with ``add_parser(subparsers)``;
# each must be importable without torch or timm (the parser is built for every --help).
_PLUGINS = ("samnorm.demo.cli", "samnorm.diagnostics.cli")
_DEFAULT_SCORERS = "msp,max_logit,energy"


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


# ------------------------------------------------------------------ commands
def _cmd_finetune(args: argparse.Namespace) -> int:
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


def _check_evaluate_args(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from samnorm.data.folders import ImageFolder
    from samnorm.ood.sharded import evaluate_datasets
    from samnorm.utils.io import atomic_write

    # everything the user typed is checked before a model is built or an image is read
    scorers, options = _check_evaluate_args(args)
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


def _cmd_pseudo_ood(args: argparse.Namespace) -> int:
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


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``samnorm`` argument parser with every sub-command.

    Example:
        >>> args = build_parser().parse_args(["finetune", "--train", "t", "--output", "o", "--steps", "5"])
        >>> args.steps, args.optimizer
        (5, None)
    """
    parser = _Parser(
        prog="samnorm",
        description="Sharpness-aware fine-tuning (SAM-ON) for OOD detection.",
        epilog="Each command runs under torchrun --nproc_per_node N as well.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version="%(prog)s " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
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
    p.set_defaults(func=_cmd_finetune, batch_size=None, run_spec=RunSpec("output", {"--train": "train"}))

    e = sub.add_parser(
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
    e.set_defaults(func=_cmd_evaluate, run_spec=RunSpec("output", {"--id": "id", "--ood": "ood", "--fit": "fit"}))

    g = sub.add_parser(
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
    g.set_defaults(func=_cmd_pseudo_ood, run_spec=RunSpec("output", {"--images": "images"}, file=True))

    for module in _PLUGINS:
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and module.startswith(err.name):
                continue  # that part of samnorm is not installed/written: no such command
            raise
        plugin.add_parser(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (``samnorm finetune: error: argument --seed: ...``), exit 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("samnorm")
    except PackageNotFoundError:
        return "unknown"


def _diverged(err: Exception) -> bool:
    """Is ``err`` the recipe's DivergedError? (Imported only when torch already is: a lookup, no import.)"""
    recipe = sys.modules.get("samnorm.train.recipe")
    return recipe is not None and isinstance(err, recipe.DivergedError)


def _say_once(text: str) -> None:
    """Print ``text`` on stderr on rank 0 only (every rank of a torchrun run meets the same error)."""
    say(rank_world()[0], text, sys.stderr)


def _run_folder(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """The lock of the command's output (rank 0 holds it), after refusing an output inside an input folder."""
    spec: RunSpec | None = getattr(args, "run_spec", None)
    if spec is None:
        return contextlib.nullcontext()
    output = getattr(args, spec.output)
    check_outside(output, {option: getattr(args, dest, None) for option, dest in spec.inputs.items()}, spec.option)
    if env_rank() != 0:  # under torchrun only rank 0 writes
        return contextlib.nullcontext()
    return hold(output, args.command, option=spec.option, file=spec.file)


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
        return EXIT_USAGE
    try:
        check_args(args)  # every option of every command, before the lock and any work
        with handle_signals(), _run_folder(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: finetune's message names the checkpoint kept
        if args.debug:
            raise
        _say_once(
            f"samnorm {args.command}: {f'interrupted by {err}' if isinstance(err, Signalled) else str(err)}"
            if str(err)
            else f"samnorm {args.command}: interrupted"
        )
        return exit_status(err)
    except WriteError as err:  # disk full, file-size limit, read-only: the previous files are kept
        if args.debug:
            raise
        _say_once(f"samnorm {args.command}: write error: {err}")
        return EXIT_IOERR
    except (ValueError, OSError) as err:  # UsageError, and the library's convention for bad input
        if args.debug:
            raise
        print(f"samnorm {args.command}: error: {error_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a bug or a resource problem: keep the traceback
        if args.debug:
            raise
        if _diverged(err):
            _say_once(f"samnorm {args.command}: stopped: {err}")
            return EXIT_DIVERGED
        traceback.print_exc()
        print(
            f"samnorm {args.command}: internal error ({type(err).__name__}), not a problem with your input as "
            "far as samnorm can tell; if it is not a resource limit (e.g. out of memory), please report it "
            "with the traceback above",
            file=sys.stderr,
        )
        return 1
