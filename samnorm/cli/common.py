"""What every ``samnorm`` sub-command shares: argument types, the model options, usage errors.

The command modules (:mod:`samnorm.cli.finetune`, :mod:`samnorm.cli.evaluate`,
:mod:`samnorm.cli.pseudo_ood`) and the plugin commands (``samnorm diagnose``, ``samnorm demo``) import
from here, never from each other nor from :mod:`samnorm.cli`, which imports them. Nothing here imports
torch or timm at import time: ``samnorm --help`` and ``samnorm COMMAND --help`` stay fast; the heavy
imports happen inside the functions that need them.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_model_args(p)
    >>> p.parse_args(["--model-arg", "img_size=32"]).model_arg
    [('img_size', 32)]
"""

from __future__ import annotations

import argparse
import ast
import atexit
import os
import sys
from collections.abc import Sequence
from typing import Any

from samnorm.utils.dist import env_rank, leave_process_group, rank_world

__all__ = [
    "UsageError",
    "add_model_args",
    "build_model",
    "check_args",
    "check_counts",
    "check_outside",
    "error_line",
    "fit_folder",
    "image_transform",
    "key_value",
    "literal",
    "named_dir",
    "names",
    "output_dir",
    "read_recorded",
    "say",
    "setup",
]


class UsageError(ValueError):
    """Bad input found by a command (an option, a folder, a file): ``samnorm`` prints its first line
    and exits with status 2, without a traceback.

    A ``ValueError`` or ``OSError`` from the library (its convention for bad input, e.g. a folder
    with no images) is reported the same way; every other exception is a bug or a resource problem
    (out of memory) and keeps its traceback.

    Example:
        >>> isinstance(UsageError("--lr must be finite"), ValueError)
        True
    """


# ------------------------------------------------------------------ argument types
def literal(value: str) -> Any:
    """A Python literal when ``value`` is one (``3``, ``0.1``, ``-2,-1`` -> ``(-2, -1)``), else the text.

    Example:
        >>> literal("-2,-1"), literal("power")
        ((-2, -1), 'power')
    """
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a Python literal when it is one (``3``, ``0.1``, ``(1, 2)``).

    Example:
        >>> key_value("img_size=(32, 32)")
        ('img_size', (32, 32))
    """
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a Python name as KEY, got {text!r}")
    return key, literal(value)


def named_dir(text: str) -> tuple[str, str]:
    """``NAME=DIR``, or ``DIR`` alone (named after its last component).

    Example:
        >>> named_dir("tex=data/dtd"), named_dir("data/dtd/")
        (('tex', 'data/dtd'), ('dtd', 'data/dtd/'))
    """
    name, sep, path = text.partition("=")
    if not sep:
        name, path = os.path.basename(os.path.normpath(text)), text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped.

    Example:
        >>> names("msp, energy,,")
        ['msp', 'energy']
    """
    return [t.strip() for t in text.split(",") if t.strip()]


def check_args(args: argparse.Namespace) -> None:
    """Every parsed option against :data:`samnorm.validate.SPECS` (type, range, finiteness, memory
    bounds, conflicts), before any work: one line naming the option, exit status 2.

    Example:
        >>> check_args(argparse.Namespace(batch_size=0))
        Traceback (most recent call last):
        ...
        samnorm.cli.common.UsageError: --batch-size must be an integer in [1, 1048576], got 0
    """
    from samnorm.validate import check_options

    try:
        check_options(args)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err


check_counts = check_args
"""The former name of :func:`check_args` (it checked the counts only)."""


def output_dir(path: str, option: str = "--output") -> str:
    """Create the output folder now, before any work: a file in its place is a usage error.

    Example:
        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile()
        >>> output_dir(f.name)
        Traceback (most recent call last):
        ...
        samnorm.cli.common.UsageError: --output ... is a file, not a folder: name a folder for the results
    """
    from samnorm import runs

    try:
        return runs.ensure_folder(path, option)
    except ValueError as err:
        raise UsageError(str(err)) from err


def check_outside(path: str, images: Any, option: str = "--output", folder_option: str = "--train") -> None:
    """Refuse an output folder inside an image folder or one of its class folders (links resolved): it
    would be read as a class of images on the next run (and a resume would find other data).

    Example:
        >>> import tempfile
        >>> from types import SimpleNamespace
        >>> root = tempfile.mkdtemp()
        >>> check_outside(os.path.join(root, "out"), SimpleNamespace(root=root, classes=[]))
        Traceback (most recent call last):
        ...
        samnorm.cli.common.UsageError: --output ... is inside --train ...: choose an output folder outside it (...
    """
    from samnorm import runs

    try:
        runs.check_outside(path, {folder_option: images.root}, option)
    except ValueError as err:
        raise UsageError(str(err)) from err


def error_line(err: BaseException) -> str:
    """The one line shown for ``err``: its first line, or, for an error re-raised from a DataLoader
    worker (``Caught ValueError in DataLoader worker process 0``), the original message.

    Example:
        >>> error_line(ValueError("Caught ValueError in DataLoader worker process 0.\\nOriginal Traceback:\\n"
        ...                       "  File x\\nValueError: no readable image left in 'd'\\n"))
        "no readable image left in 'd'"
    """
    text = str(err).strip()
    if text.startswith("Caught ") and "DataLoader worker" in text.splitlines()[0]:
        last = text.splitlines()[-1].strip()
        prefix = type(err).__name__ + ": "
        return last[len(prefix) :] if last.startswith(prefix) else last
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------ run set-up
def setup(device_arg: str | None) -> tuple[int, int, Any]:
    """``(rank, world_size, device)``; under torchrun the process group comes from the environment."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is None:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_arg)
        except RuntimeError as err:
            raise UsageError(f"--device {device_arg!r}: {error_line(err)}") from err
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device_arg}: no CUDA device is available here; use --device cpu")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Left at exit, so that several commands run in one process share the group.
        atexit.register(leave_process_group)
    return (*rank_world(), device)  # the group's own rank and size once it exists


def say(rank: int, text: str, stream: Any = None) -> None:
    """Print ``text`` on rank 0 only (stdout by default)."""
    if rank == 0:
        print(text, file=stream or sys.stdout, flush=True)


# ------------------------------------------------------------------ the model options
def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model options shared by ``finetune``, ``evaluate`` and ``diagnose``."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="timm model name, e.g. resnetv2_101x1_bit.goog_in21k_ft_in1k (default) or "
        "t2t_vit_24; taken from --checkpoint when it records one",
    )
    g.add_argument("--checkpoint", help="local weights: .pth/.pth.tar/.safetensors/.npz, or a samnorm checkpoint")
    g.add_argument(
        "--model-arg",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="extra model argument, repeatable (e.g. img_size=384, drop_path_rate=0.1)",
    )
    g.add_argument(
        "--img-size",
        type=int,
        help="input side in pixels (default: the model's, or the one a samnorm checkpoint records)",
    )
    g.add_argument(
        "--random-init",
        action="store_true",
        help="start from random weights on purpose (without it, a command with no --checkpoint or "
        "--pretrained is refused)",
    )
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle a checkpoint that stores Python objects (only for files you trust)",
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: LOCAL_RANK)")
    g.add_argument("--batch-size", type=int, default=64, help="images per step and process (default 64)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (default 4)")


def read_recorded(path: str | None, trusted: bool) -> dict[str, Any] | None:
    """A checkpoint read once (None for no file or a .npz, which records nothing)."""
    if path is None or path.lower().endswith((".npz", ".npy")):
        return None
    from samnorm.models import read_checkpoint

    raw = read_checkpoint(path, trusted=trusted)
    return dict(raw) if isinstance(raw, dict) else None


def build_model(args: argparse.Namespace, raw: dict[str, Any] | None, **extra: Any) -> tuple[Any, str, dict]:
    """Model from --model / --checkpoint / --model-arg; returns it with its name and kwargs.

    A samnorm checkpoint's recorded model arguments pass through
    :func:`samnorm.models.recorded_model_kwargs` (an allow-list); ``--model-arg`` overrides them.
    """
    from samnorm.models import DEFAULT_MODEL, create_model
    from samnorm.models.loading import recorded_model_kwargs

    kwargs = dict(args.model_arg or [])
    recorded = raw if raw is not None and "model_name" in raw else None
    name = args.model or (recorded["model_name"] if recorded is not None else DEFAULT_MODEL)
    if recorded is not None and not args.model:
        kwargs = {**recorded_model_kwargs(recorded), **kwargs}
    source = raw if raw is not None else args.checkpoint
    pretrained = getattr(args, "pretrained", False)
    if source is None and not pretrained and not args.random_init:
        sources = ["--checkpoint FILE", *(["--pretrained"] if hasattr(args, "pretrained") else [])]
        raise UsageError(
            f"no weights for {name}: pass {' or '.join(sources)}, or --random-init to start from "
            "random weights on purpose"
        )
    try:
        model = create_model(
            name, checkpoint=source, pretrained=pretrained, trusted=args.trust_checkpoint, **extra, **kwargs
        )
    except (TypeError, ValueError) as err:  # a TypeError: a --model-arg the model does not take
        raise UsageError(f"{args.checkpoint}: {err}" if args.checkpoint else str(err)) from err
    if source is None and not pretrained:
        say(env_rank(), f"samnorm: {name} starts from random weights (--random-init)", sys.stderr)
    return model, name, kwargs


def image_transform(args: argparse.Namespace, model: Any, kwargs: dict, recorded: dict | None) -> Any:
    """The images' transform: the one a samnorm checkpoint records, else the model's own.

    An image size asked for on the command line (``--img-size``, ``--model-arg img_size=...``) that
    differs from the recorded one is a usage error, not a silent choice of one of them; so is a size the
    model cannot take (one forward pass of a blank image, before any work, tells).
    """
    transform = _transform(args, model, kwargs, recorded)
    _check_input(model, transform)
    return transform


def _check_input(model: Any, transform: Any) -> None:
    """One blank image of the transform's shape through ``model``: a fixed-size model (a ViT built for
    224 px) given another size fails here with one line, not mid-run with a traceback."""
    import torch

    x = torch.zeros(1, transform.channels, transform.size, transform.size)
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except (AssertionError, RuntimeError, ValueError) as err:
        if isinstance(err, RuntimeError) and "out of memory" in str(err).lower():
            raise
        raise UsageError(
            f"the model does not take {transform.channels} x {transform.size} x {transform.size} "
            f"images ({error_line(err)}): pass an --img-size (or --model-arg img_size/in_chans) it "
            "takes"
        ) from err
    finally:
        model.train(training)


def _transform(args: argparse.Namespace, model: Any, kwargs: dict, recorded: dict | None) -> Any:
    from samnorm.data.folders import ImageTransform, transform_for_model

    asked = args.img_size or dict(args.model_arg or []).get("img_size")
    if isinstance(asked, (tuple, list)):
        asked = int(asked[0])
    if recorded:
        if asked is not None and asked != recorded.get("size"):
            raise UsageError(
                f"image size {asked} conflicts with the {recorded.get('size')} px recorded in {args.checkpoint}: "
                "drop --img-size / --model-arg img_size to use the recorded transform"
            )
        return ImageTransform(**recorded)
    size = asked or kwargs.get("img_size")
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    return transform_for_model(model, size=size, in_chans=kwargs.get("in_chans"))


def fit_folder(path: str, transform: Any, classes: Sequence[str] | None, scorers: Sequence[str]) -> Any:
    """The ``--fit`` folder as an ImageFolder; labelled (class sub-folders) when a scorer's
    ``needs_labels`` says its fit reads class labels (Mahalanobis, or a scorer a user registered).

    A flat folder would give every image label 0, and such a scorer would silently fit one class.
    """
    from samnorm.data.folders import ImageFolder
    from samnorm.ood import scorer_class

    labelled = [c.name for c in dict.fromkeys(scorer_class(s) for s in scorers) if c.needs_labels]
    try:
        return ImageFolder(path, transform, classes=classes, flat=False if labelled else None)
    except ValueError as err:
        if labelled and "no class sub-folders" in str(err):
            raise UsageError(
                f"--fit {path}: {', '.join(labelled)} needs labelled ID training images, one "
                f"sub-folder per class ({os.path.join(path, '<class>', '<image>')})"
            ) from err
        raise
