"""State dicts as name -> tensor maps: the weights inside a checkpoint, and whether they fit a model.

Below both :mod:`samnorm.models.loading` (files, timm names) and :mod:`samnorm.models.t2t_vit`
(whose checkpoint filter unwraps official releases), so neither imports the other for it. The
wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``) are stripped by timm's
``clean_state_dict``; the checkpoint entries are looked up in timm's order (``state_dict_ema``,
``model_ema``, ``state_dict``, ``model``). timm's ``load_state_dict`` is not used: it reads the
file itself, without samnorm's weights-only fallback and error messages (:func:`read_checkpoint`),
and callers need the raw checkpoint (a samnorm checkpoint records its model's name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from timm.models import clean_state_dict
from torch import Tensor, nn

__all__ = ["check_state_dict", "extract_state_dict"]

# Entries a training checkpoint may keep its weights under, most preferred first (EMA only if asked).
_EMA_KEYS = ("state_dict_ema", "model_ema")
_WEIGHT_KEYS = ("state_dict", "model")
_MAX_LISTED = 12


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


# Google's PyTorch BiT layout (big_transfer, also the MOS / GradNorm / RankFeat checkpoints such as
# BiT-S-R101x1-flat-finetune.pth.tar) -> timm's ResNetV2 names.
_UNIT = r"^body\.block(\d+)\.unit(\d+)\."


def _unit(m: re.Match[str], rest: str) -> str:
    return f"stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{rest}"


_BIT_RULES = (
    (re.compile(r"^root\.conv\."), "stem.conv."),
    (re.compile(_UNIT + r"gn(\d)\."), lambda m: _unit(m, f"norm{m[3]}.")),
    (re.compile(_UNIT + r"conv(\d)\."), lambda m: _unit(m, f"conv{m[3]}.")),
    (re.compile(_UNIT + r"downsample\."), lambda m: _unit(m, "downsample.conv.")),
    (re.compile(r"^(before_)?head\.gn\."), "norm."),
    (re.compile(r"^head\.conv\."), "head.fc."),
)


def _bit_to_timm(key: str) -> str:
    for pattern, repl in _BIT_RULES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def extract_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> dict[str, Tensor]:
    """The model weights inside a checkpoint, with DDP/compile prefixes stripped.

    Looks for ``state_dict_ema``/``model_ema`` (when ``use_ema``), then ``state_dict``/``model``; a
    mapping whose values are all tensors is taken as the state dict itself. Checkpoints in Google's
    PyTorch BiT layout (``root.conv``, ``body.block1.unit01.gn1``, ``head.conv``; e.g. the
    ``BiT-S-R101x1-flat-finetune.pth.tar`` used by MOS, GradNorm and RankFeat) are renamed to timm's
    ResNetV2 keys.

    Example:
        >>> import torch
        >>> ckpt = {"epoch": 3, "state_dict": {"module.fc.weight": torch.zeros(2, 2)}}
        >>> list(extract_state_dict(ckpt))
        ['fc.weight']
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a mapping of names to tensors, got {type(checkpoint).__name__}")
    keys = (_EMA_KEYS if use_ema else ()) + _WEIGHT_KEYS
    inner = next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    not_tensors = [str(k) for k, v in inner.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(
            "checkpoint holds no state dict: entries "
            f"{_listing(not_tensors)} are not tensors and none of {list(keys)} is present"
        )
    state = clean_state_dict({str(k): v for k, v in inner.items()})  # DDP / compile prefixes
    if "root.conv.weight" in state and any(k.startswith("body.block") for k in state):
        state = {_bit_to_timm(k): v for k, v in state.items()}
    return state


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """Raise one ``ValueError`` naming every missing, unexpected and wrongly shaped key.

    Example:
        >>> import torch
        >>> check_state_dict(nn.Linear(2, 3), {"weight": torch.zeros(3, 2)})
        Traceback (most recent call last):
        ...
        ValueError: checkpoint does not fit Linear: missing keys: bias
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{label}: {_listing(names)}"
        for label, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if names
    ]
    if problems:
        raise ValueError(f"{what} does not fit {type(model).__name__}: " + "; ".join(problems))
