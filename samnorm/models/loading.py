"""Build models by name and load their weights from a local file, with clear errors.

Nothing here downloads: a hub download happens only when a caller passes ``pretrained=True``
explicitly (and has a network). Supported files:

* plain ``state_dict`` files (``.pth``/``.pt``/``.bin``) and ``.safetensors``;
* training checkpoints with a ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` entry
  (timm's train script, the official T2T-ViT ``.pth.tar`` releases, samnorm's own fine-tuning
  checkpoints), with ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes stripped;
* BiT ``.npz`` files (Google's original ResNetV2 weights) through timm's own converter, for models that
  implement ``load_pretrained`` (timm's ResNetV2 and VisionTransformer do).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from samnorm.models.state_dicts import check_state_dict, extract_state_dict  # re-exported
from samnorm.models.t2t_vit import T2TViT, checkpoint_filter_fn

__all__ = [
    "RECORDED_MODEL_KWARGS",
    "check_state_dict",
    "create_model",
    "extract_state_dict",
    "load_checkpoint",
    "load_state_dict",
    "read_checkpoint",
    "recorded_model_kwargs",
]

DEFAULT_MODEL = "resnetv2_101x1_bit.goog_in21k_ft_in1k"
"""The timm model of :func:`create_model` and the CLI when none is named: BiT ResNetV2-101x1 (the paper's CNN)."""


def read_checkpoint(path: str | os.PathLike[str], trusted: bool = False) -> Any:
    """Read a ``torch.save`` or ``.safetensors`` file on the CPU without running arbitrary code.

    Files are opened with ``weights_only=True`` (``argparse.Namespace``, which timm's train script saves
    as ``args``, is allowed too). ``trusted=True`` falls back to full unpickling for older files that
    store other Python objects; use it only for files you trust.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
        >>> torch.save({"w": torch.ones(2)}, path)
        >>> read_checkpoint(path)["w"].tolist()
        [1.0, 1.0]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: give the path of a local weights file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    # torch < 2.5 has no safe_globals; there such files need trusted=True.
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trusted:
            raise ValueError(
                f"cannot read {path!r} as a weights-only checkpoint ({type(err).__name__}: {err}); "
                "if you trust the file, pass trusted=True (CLI: --trust-checkpoint) to unpickle it fully"
            ) from err
    return torch.load(path, map_location="cpu", weights_only=False)


def _classifier_prefix(model: nn.Module) -> str | None:
    """Module name of the model's final classifier (timm's ``get_classifier``), or None."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    return next((name for name, m in model.named_modules() if m is head and name), None)


def _load_npz(model: nn.Module, path: str) -> None:
    loader = getattr(model, "load_pretrained", None)
    if not callable(loader):
        raise ValueError(
            f"{type(model).__name__} cannot read .npz weights: only timm models with a load_pretrained "
            "method (ResNetV2/BiT, VisionTransformer) can; convert the file to a PyTorch state dict"
        )
    try:
        with torch.no_grad():
            loader(path)
    except KeyError as err:
        raise ValueError(
            f"{path!r} does not fit {type(model).__name__}: the .npz has no entry {err}; "
            "check that the model name matches the checkpoint (e.g. resnetv2_101x1_bit for BiT-M R101x1)"
        ) from err
    except RuntimeError as err:  # shape errors from copy_
        raise ValueError(f"{path!r} does not fit {type(model).__name__}: {err}") from err


def _is_npz(path: str) -> bool:
    return path.lower().endswith((".npz", ".npy"))


def _fit_head(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace a checkpoint's classifier that is absent or sized for other classes by the model's own."""
    head = _classifier_prefix(model)
    if head is None:
        return state_dict
    prefix = head + "."
    own_head = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    if all(k in state_dict and state_dict[k].shape == v.shape for k, v in own_head.items()):
        return state_dict
    return {**{k: v for k, v in state_dict.items() if not k.startswith(prefix)}, **own_head}


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], new_head: bool = False, what: str = "checkpoint"
) -> nn.Module:
    """Load an extracted state dict into ``model`` (in place) after checking that every key fits.

    ``new_head=True`` keeps the model's own classifier when the state dict's is missing or sized for
    another number of classes. A T2T-ViT keeps its own fixed position table when the state dict's was
    made for another image size.

    Example:
        >>> load_state_dict(nn.Linear(2, 2), nn.Linear(2, 2).state_dict()).out_features
        2
    """
    state_dict = dict(state_dict)
    if new_head:
        state_dict = _fit_head(model, state_dict)
    if isinstance(model, T2TViT):
        state_dict = checkpoint_filter_fn(state_dict, model)
    check_state_dict(model, state_dict, what=what)
    model.load_state_dict(state_dict)
    return model


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    use_ema: bool = True,
    new_head: bool = False,
    trusted: bool = False,
) -> nn.Module:
    """Load weights from a local file into ``model`` (in place) and return it.

    Args:
        model: the model to fill.
        path: ``.pth``/``.pth.tar``/``.pt``/``.bin``/``.safetensors`` state dict or training checkpoint,
            or a BiT ``.npz`` (via timm's converter).
        use_ema: prefer the EMA weights of a training checkpoint (the official T2T-ViT releases are
            evaluated with them).
        new_head: keep the model's freshly initialised classifier when the checkpoint's is missing or
            has another number of classes (fine-tuning on new classes); otherwise that is an error.
        trusted: allow full unpickling for old files (see :func:`read_checkpoint`).

    Raises:
        ValueError: listing missing, unexpected and wrongly shaped keys when the file does not fit.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pth.tar")
        >>> src = nn.Linear(3, 2)
        >>> torch.save({"state_dict_ema": {"module." + k: v for k, v in src.state_dict().items()}}, path)
        >>> dst = load_checkpoint(nn.Linear(3, 2), path)
        >>> torch.equal(dst.weight, src.weight)
        True
    """
    path = os.fspath(path)
    if _is_npz(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist: give the path of a local weights file")
        _load_npz(model, path)
        return model
    state_dict = extract_state_dict(read_checkpoint(path, trusted=trusted), use_ema=use_ema)
    return load_state_dict(model, state_dict, new_head=new_head, what=f"checkpoint {path!r}")


RECORDED_MODEL_KWARGS = frozenset(
    {
        "num_classes",
        "img_size",
        "in_chans",
        "patch_size",
        "embed_dim",
        "depth",
        "depths",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "class_token",
        "global_pool",
        "drop_rate",
        "drop_path_rate",
        "attn_drop_rate",
        "proj_drop_rate",
        "pos_drop_rate",
        "init_values",
        "token_dim",
        "tokens_type",
        "layers",
        "channels",
        "dims",
        "widths",
        "width_factor",
        "stem_type",
        "output_stride",
        "num_features",
    }
)
"""Model arguments a checkpoint may carry to ``timm.create_model``: the architecture's shape and
regularisation, never file paths, hub options or callables (a recorded ``checkpoint_path`` or
``pretrained_cfg_overlay`` would make timm open or download other files)."""
_LITERALS = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _LITERALS) for v in value)
    return isinstance(value, _LITERALS)


def recorded_model_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model_kwargs`` a samnorm checkpoint records, filtered to :data:`RECORDED_MODEL_KWARGS`
    with plain values (numbers, strings, tuples of them); anything else is dropped with a warning.

    Example:
        >>> recorded_model_kwargs({"model_kwargs": {"img_size": 32, "checkpoint_path": "/etc/x"}})
        {'img_size': 32}
    """
    recorded = raw.get("model_kwargs") or {}
    if not isinstance(recorded, Mapping):
        raise ValueError(f"the checkpoint's model_kwargs must be a mapping, got {type(recorded).__name__}")
    kept = {k: v for k, v in recorded.items() if k in RECORDED_MODEL_KWARGS and _plain(v)}
    dropped = sorted(str(k) for k in recorded if k not in kept)
    if dropped:
        warnings.warn(
            f"ignoring model argument(s) {dropped} recorded in the checkpoint (not architecture "
            "settings samnorm passes on); give them explicitly if you need them",
            stacklevel=2,
        )
    return kept


def create_model(
    name: str | None = DEFAULT_MODEL,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    new_head: bool = False,
    use_ema: bool = True,
    trusted: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build any timm model (and samnorm's T2T-ViTs) by name, optionally with weights from a local file.

    Nothing is downloaded unless ``pretrained=True`` (timm's hub weights; needs a network). With a
    ``checkpoint`` and no ``num_classes``, the head takes the checkpoint's number of classes. A samnorm
    fine-tuning checkpoint records its model: ``name=None`` rebuilds that one.

    Args:
        name: timm model name, e.g. ``"resnetv2_101x1_bit.goog_in21k_ft_in1k"`` (the default, BiT-M
            R101x1 as in the paper) or ``"t2t_vit_24"``.
        checkpoint: local weights file (see :func:`load_checkpoint`), or a checkpoint already read
            with :func:`read_checkpoint`.
        num_classes: classifier size; with ``new_head=True`` a checkpoint's other-sized head is dropped.
        pretrained: download timm's hub weights (explicit opt-in; excludes ``checkpoint``).
        new_head, use_ema, trusted: see :func:`load_checkpoint`.
        **kwargs: passed to ``timm.create_model`` (``img_size``, ``in_chans``, ``drop_path_rate``, ...).

    Example:
        >>> model = create_model("t2t_vit_7", num_classes=10, img_size=32, in_chans=1)
        >>> model(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    import timm

    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True (hub download) or checkpoint=<local file>, not both")
    path: str | None
    raw: Mapping[str, Any] | None
    if isinstance(checkpoint, Mapping):
        path, raw = "", checkpoint
    else:
        path = None if checkpoint is None else os.fspath(checkpoint)
        raw = None if path is None or _is_npz(path) else read_checkpoint(path, trusted)
    if name is None:
        if not isinstance(raw, Mapping) or "model_name" not in raw:
            where = "" if path is None else f" ({path!r} records none)"
            raise ValueError(f"give a model name, or a samnorm checkpoint that records one{where}")
        name, kwargs = raw["model_name"], {**recorded_model_kwargs(raw), **kwargs}
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if path is None:
        return model
    if raw is None:  # .npz: timm's converter
        return load_checkpoint(model, path)
    state_dict = extract_state_dict(raw, use_ema)
    head = _classifier_prefix(model)
    if num_classes is None and head is not None and head + ".weight" in state_dict:
        found = int(state_dict[head + ".weight"].shape[0])
        reset_classifier = getattr(model, "reset_classifier", None)
        if found != getattr(model, "num_classes", found) and callable(reset_classifier):
            reset_classifier(found)
    what = f"checkpoint {path!r}" if path else "the checkpoint"
    return load_state_dict(model, state_dict, new_head=new_head, what=what)
