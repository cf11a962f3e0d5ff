"""The ``samnorm`` command line: ``finetune``, ``evaluate``, ``pseudo-ood`` (and the demo/diagnostics commands).

Every command runs the same under ``torchrun --nproc_per_node N`` (DDP, process group from the
environment, rank 0 writes and prints). Each command holds its output folder's lock for the whole
run, after refusing an output inside one of its input folders (:mod:`samnorm.runs`). Exit status: 0
done; 2 bad input (a :class:`~samnorm.cli.common.UsageError`, or the library's ``ValueError``/``OSError``,
e.g. an output folder another run holds), one line on stderr; 3 training diverged (one line; the last
good checkpoint is kept); 74 a write failed (disk full, file-size limit, read-only folder: one line
with the errno's name and the path; the previous files are kept); 128 + n stopped by signal n (130
Ctrl-C, 143 SIGTERM, 129 SIGHUP; one line on the checkpoint kept); 1 anything else (a bug, out of
memory), with its traceback and a one-line hint. ``--debug`` raises every error instead.
Heavy imports (torch, timm) happen inside the commands, so ``samnorm --help`` and
``samnorm COMMAND --help`` import neither.

Each command is a module with ``add_parser(subparsers)`` and ``run(args)``: :mod:`.finetune`,
:mod:`.evaluate`, :mod:`.pseudo_ood` here, and the plugins ``samnorm.demo.cli`` and
``samnorm.diagnostics.cli``; what they share (the model options, argument types,
:class:`~samnorm.cli.common.UsageError`) is in :mod:`.common`. This module builds the parser and maps
errors to exit statuses.

Example:
    >>> build_parser().parse_args(["evaluate", "--id", "val", "--ood", "tex=dtd", "--output", "out"]).ood
    [('tex', 'dtd')]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from samnorm.cli import evaluate, finetune, pseudo_ood
from samnorm.cli.common import check_args, error_line, say
from samnorm.runs import (
    EXIT_IOERR,
    RunSpec,
    Signalled,
    WriteError,
    check_outside,
    exit_status,
    handle_signals,
    hold,
)
from samnorm.utils.dist import env_rank, rank_world

__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_IOERR", "EXIT_USAGE", "build_parser", "main"]

EXIT_USAGE = 2
"""Exit status of bad input: an option, a folder, a file (one line on stderr)."""
EXIT_DIVERGED = 3
"""Exit status of a training run that diverged (the last good checkpoint is kept)."""
EXIT_INTERRUPTED = 130
"""Exit status of Ctrl-C (128 + SIGINT); another signal n gives 128 + n."""
# Modules of other parts of samnorm that add their own sub-commands with ``add_parser(subparsers)``;
# each must be importable without torch or timm (the parser is built for every --help).
_PLUGINS = ("samnorm.demo.cli", "samnorm.diagnostics.cli")


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

    for command in (finetune, evaluate, pseudo_ood):
        command.add_parser(sub)
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
