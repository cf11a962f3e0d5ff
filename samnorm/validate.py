"""One table of rules for every setting: the Python configs and the command line check the same specs.

A :class:`Spec` says what a value must be: its type (an ``int`` is never a ``2.5`` or a ``True``),
its range, finiteness (every float setting must be finite), its choices, and a resource bound that is
refused with the figure that makes it unsafe (an image side whose tensor would not fit in memory).
:data:`SPECS` holds the specs by name; the same name means the same rule everywhere:
:class:`samnorm.train.recipe.FinetuneConfig` and :class:`samnorm.demo.DemoConfig` check their fields with
:func:`check_fields` in ``__post_init__``, and ``samnorm`` checks every parsed option with
:func:`check_options` before any work (its ``--batch-size`` is the field ``batch_size``).

Errors are ``TypeError`` (wrong type) or ``ValueError`` (wrong value) naming the setting (the field,
or ``--option`` on the command line), the value, the rule and the fix. Imports neither torch nor timm.

Example:
    >>> check("batch_size", 2.5)
    Traceback (most recent call last):
    ...
    TypeError: batch_size must be an integer in [1, 1048576], got 2.5 (a float): pass a whole number
    >>> check("img_size", 100000, option=True)
    Traceback (most recent call last):
    ...
    ValueError: --img-size must be an integer in [1, 8192], got 100000: one 3 x 100000 x 100000 float32 \
image needs 112 GiB
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from samnorm.sam import registry

__all__ = [
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "MAX_TENSOR_BYTES",
    "SPECS",
    "Spec",
    "check",
    "check_fields",
    "check_options",
    "label",
]

MAX_IMAGE_SIDE = 8192
"""Largest image side (pixels) accepted anywhere: one 3 x 8192 x 8192 float32 image is 768 MiB, and a batch of them
more; larger sides are refused with the memory one image would need."""
MAX_TENSOR_BYTES = 4 * 2**30
"""Largest tensor of images one option set may ask for (a batch, pseudo-ood's grid): 4 GiB."""
# (count option, side option, images per count): the image tensors the options size together
_TENSORS = (("batch_size", "img_size", 1), ("n", "size", 7))  # pseudo-ood: a row per transform (6) + the images
MAX_SEED = 2**32 - 1
"""Largest seed: the seeds of numpy's legacy generator, torch's and the DataLoader workers' all take it."""


def _image_bytes(side: int) -> str:
    return f"one 3 x {side} x {side} float32 image needs {3 * 4 * side * side / 2**30:.0f} GiB"


@dataclass(frozen=True)
class Spec:
    """What one setting must be.

    Args:
        kind: ``int``, ``float``, ``str``, ``bool``; with ``each=True`` a list/tuple of them (a lone
            string is refused, so ``"blur"`` never becomes ``['b', 'l', 'u', 'r']``).
        low, high: inclusive bounds (``low_open``: ``> low``).
        optional: ``None`` is accepted (the setting's default is taken elsewhere).
        choices: the accepted values (of each item with ``each``), or a function giving them now (a live
            registry: a kind registered after import is accepted too).
        cost: for a value over ``high``: the figure that makes it unsafe (a resource bound).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    choices: tuple[Any, ...] | Callable[[], Sequence[Any]] | None = None
    each: bool = False
    cost: Callable[[Any], str] | None = None

    def rule(self) -> str:
        """The rule in words, e.g. ``an integer >= 1``."""
        noun = {int: "an integer", float: "a finite number", str: "a string", bool: "True or False"}[self.kind]
        if self.each:
            noun = f"a list of {noun.split(' ', 1)[1]}s"
        if self.low is not None and self.high is not None:
            noun += f" in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        elif self.low is not None:
            noun += f" {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            noun += f" <= {self.high}"
        if self.choices is not None:
            noun += f" from {list(self.allowed())}"
        return noun

    def allowed(self) -> tuple[Any, ...]:
        """The accepted values now (``()`` when any value of the kind is)."""
        return tuple(self.choices() if callable(self.choices) else self.choices or ())


def _positive(kind: type, **kw: Any) -> Spec:
    return Spec(kind, low=0 if kind is float else 1, low_open=kind is float, **kw)


_SEED = Spec(int, low=0, high=MAX_SEED)
_SIDE = Spec(int, low=1, high=MAX_IMAGE_SIDE, cost=_image_bytes)

SPECS: dict[str, Spec] = {
    # counts
    "batch_size": Spec(int, low=1, high=2**20),
    "steps": _positive(int, optional=True),
    "warmup_steps": Spec(int, low=0),
    "checkpoint_every": _positive(int),
    "log_every": _positive(int),
    "num_workers": Spec(int, low=0, high=1024),
    "workers": Spec(int, low=0, high=1024),
    "variant_k": _positive(int, optional=True),
    "n": Spec(int, low=1, high=4096),
    "max_images": _positive(int, optional=True),
    "theory": Spec(int, low=0),
    "theory_iters": Spec(int, low=1, high=10_000),
    # the demo's --seeds is a count (its seeds are 0..N-1): range(2**31) would fill the memory first
    "seeds": Spec(int, low=1, high=1000),
    "pretrain_epochs": _positive(int),
    "n_ood": _positive(int),
    "stem_width": _positive(int),
    "groups": _positive(int),
    # seeds
    "seed": _SEED,
    "pretrain_seed": _SEED,
    "data_seed": _SEED,
    # image sides: a resource bound
    "img_size": Spec(int, low=1, high=MAX_IMAGE_SIDE, optional=True, cost=_image_bytes),
    "size": _SIDE,
    # below 20 dpi matplotlib cannot size the labels' font (FT_Set_Char_Size: invalid ppem)
    "dpi": Spec(int, low=20, high=1000, cost=lambda d: f"a 10 x 8 inch figure at {d} dpi has {80 * d * d:,} pixels"),
    # real numbers (always finite)
    "lr": _positive(float),
    "pretrain_lr": _positive(float),
    "epochs": _positive(float),
    "rho": Spec(float, low=0, optional=True),
    "eta": Spec(float, low=0),
    "momentum": Spec(float, low=0),
    "weight_decay": Spec(float, low=0),
    "grad_clip": _positive(float, optional=True),
    "ood_weight": Spec(float, optional=True),
    "ood_ratio": Spec(float, low=0, high=1),
    "m_in": Spec(float),
    "m_out": Spec(float),
    "h": _positive(float),
    "grad_norm_p": Spec(float, low=1),
    # names
    "transforms": Spec(str, each=True, optional=True),
    # autocast dtype; "fp16" also scales the loss (GradScaler)
    "precision": Spec(str, choices=("fp32", "bf16", "fp16")),
    # a cheaper schedule of SAM (samnorm.sam.registry's schedules; None: plain SAM's two passes)
    "variant": Spec(str, optional=True, choices=registry.schedules),
    "base_optimizer": Spec(str, choices=("sgd", "adamw")),
}
"""The rules by setting name (a FinetuneConfig/DemoConfig field or a ``samnorm`` option's destination)."""

# keys of --model-arg that samnorm sets itself (passing them too would be a TypeError deep in timm)
_RESERVED_MODEL_ARGS = {
    "num_classes": "the class count is the number of class folders (or the checkpoint's head)",
    "pretrained": "pass --pretrained",
    "checkpoint": "pass --checkpoint",
    "checkpoint_path": "pass --checkpoint",
    "pretrained_cfg_overlay": "samnorm reads weights from --checkpoint",
}


def label(name: str, option: bool) -> str:
    """How a setting is named to the user: the field (``batch_size``) or the option (``--batch-size``)."""
    return "--" + name.replace("_", "-") if option else name


def check(name: str, value: Any, spec: Spec | None = None, *, option: bool = False) -> Any:
    """``value`` checked against ``spec`` (default ``SPECS[name]``); returns it normalised (numpy
    integers as ``int``, reals as ``float``, a sequence as a list).

    Example:
        >>> check("transforms", ("blur",)), check("seed", 3)
        (['blur'], 3)
        >>> check("lr", float("nan"), option=True)
        Traceback (most recent call last):
        ...
        ValueError: --lr must be a finite number > 0, got nan
    """
    spec = spec or SPECS[name]
    what = label(name, option)
    if value is None:
        if spec.optional:
            return None
        raise TypeError(f"{what} must be {spec.rule()}, got None")
    if spec.each:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise TypeError(
                f"{what} must be {spec.rule()}, got {value!r} (a {type(value).__name__}): pass a list, e.g. [{value!r}]"
            )
        item = dataclasses.replace(spec, optional=False, each=False)
        return [check(name, v, item, option=option) for v in value]
    ok_type = {
        int: isinstance(value, numbers.Integral) and not isinstance(value, bool),
        float: isinstance(value, numbers.Real) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }[spec.kind]
    if not ok_type:
        fix = {int: "pass a whole number", float: "pass a number", str: "pass a string", bool: "pass True or False"}
        raise TypeError(f"{what} must be {spec.rule()}, got {value!r} (a {type(value).__name__}): {fix[spec.kind]}")
    if spec.kind is int:
        value = int(value)
    elif spec.kind is float:
        value = float(value)
    bad = spec.kind is float and not math.isfinite(value)
    if spec.low is not None and not bad:
        bad = value <= spec.low if spec.low_open else value < spec.low
    over = spec.high is not None and not bad and value > spec.high
    if bad or over or (spec.choices is not None and value not in spec.allowed()):
        why = f": {spec.cost(value)}" if over and spec.cost is not None else ""
        raise ValueError(f"{what} must be {spec.rule()}, got {value!r}{why}")
    return value


def check_fields(obj: Any, names: Sequence[str], specs: Mapping[str, Spec] | None = None) -> None:
    """Check (and normalise in place) the fields ``names`` of a dataclass instance, frozen or not.

    Example:
        >>> from types import SimpleNamespace
        >>> o = SimpleNamespace(seed=1.5)
        >>> check_fields(o, ["seed"])
        Traceback (most recent call last):
        ...
        TypeError: seed must be an integer in [0, 4294967295], got 1.5 (a float): pass a whole number
    """
    for name in names:
        value = check(name, getattr(obj, name), (specs or SPECS).get(name))
        object.__setattr__(obj, name, value)  # frozen dataclasses too: the checked, normalised value


def check_options(args: Any) -> None:
    """Check every parsed ``samnorm`` option that has a spec, and the model options' conflicts, before
    any work; errors name the option (``--seed``), not the field.

    Example:
        >>> from types import SimpleNamespace
        >>> check_options(SimpleNamespace(dpi=0))
        Traceback (most recent call last):
        ...
        ValueError: --dpi must be an integer in [20, 1000], got 0
    """
    for name, value in vars(args).items():  # lists (--transforms) are comma-separated text on the command line
        if name in SPECS and value is not None and not SPECS[name].each:
            check(name, value, option=True)
    for count, side, per in _TENSORS:
        n, s = getattr(args, count, None), getattr(args, side, None)
        if n is not None and s is not None and per * n * 3 * 4 * s * s > MAX_TENSOR_BYTES:
            raise ValueError(
                f"{label(count, True)} {n} with {label(side, True)} {s}: {per * n} images of "
                f"3 x {s} x {s} float32 need {per * n * 12 * s * s / 2**30:.1f} GiB at once "
                f"(limit {MAX_TENSOR_BYTES / 2**30:.0f} GiB); lower one of them"
            )
    model_args = dict(getattr(args, "model_arg", None) or [])
    for key, why in _RESERVED_MODEL_ARGS.items():
        if key in model_args:
            raise ValueError(f"--model-arg {key}={model_args[key]!r}: samnorm sets {key} itself ({why}); drop it")
    size = model_args.get("img_size")
    for img_side in size if isinstance(size, (tuple, list)) else [size]:
        if img_side is not None:
            check("img_size", img_side, _SIDE, option=True)
    if getattr(args, "random_init", False):
        given = [
            o
            for o, v in (
                ("--checkpoint", getattr(args, "checkpoint", None)),
                ("--pretrained", getattr(args, "pretrained", False)),
            )
            if v
        ]
        if given:
            raise ValueError(f"--random-init and {given[0]} contradict each other: pass one of them")
