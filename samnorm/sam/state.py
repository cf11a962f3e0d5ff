"""SAM's record in the state dict (under ``"sam"``) and the upgrade of pickles from older releases:
plain functions over dicts, so that :class:`samnorm.SAM` only calls them."""

from __future__ import annotations

from typing import Any

__all__ = ["check_record", "class_name", "upgrade_pickle"]


def class_name(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class (what the state dict records of the base optimizer).

    Example:
        >>> class_name(1.0)
        'builtins.float'
    """
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_record(record: dict[str, Any], normalize_bias: bool, base_optimizer: object) -> None:
    """Refuse (``ValueError``) a ``"sam"`` record saved with another ``normalize_bias`` or around
    another base optimizer class (a record from before issue 17 names none: accepted).

    Example:
        >>> check_record({"base_optimizer": "torch.optim.adam.Adam"}, True, 1.0)
        Traceback (most recent call last):
        ValueError: the state dict was saved by SAM around torch.optim.adam.Adam, and this SAM wraps ...
    """
    if bool(record.get("normalize_bias", True)) != normalize_bias:
        raise ValueError(
            f"the state dict was saved with normalize_bias={record.get('normalize_bias', True)}; "
            "build SAM with the same setting before loading it"
        )
    saved = record.get("base_optimizer")
    if saved is not None and saved != class_name(base_optimizer):
        raise ValueError(
            f"the state dict was saved by SAM around {saved}, and this SAM wraps "
            f"{class_name(base_optimizer)}: their states differ (momentum buffers, step counts); "
            "build SAM around the same base optimizer class to load it"
        )


def upgrade_pickle(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int | None, Any]:
    """Split a pickled SAM's ``__dict__`` from any release into ``(state, legacy group defaults,
    skipped-step count or None, legacy selection or ())``; scratch buffers are dropped (rebuilt when
    used).

    Example:
        >>> upgrade_pickle({"rho": 0.1, "_perturbed": None, "_nonfinite_count": 2})
        ({'_buffers': {}}, {'rho': 0.1}, 2, ())
    """
    state = dict(state)
    legacy: dict[str, Any] = {k: state.pop(k) for k in ("rho", "adaptive", "eta") if k in state}  # per-group since
    state.pop("_backups", None)  # before issue 12
    state["_buffers"] = {}
    state.pop("_perturbed", None)  # before issue 17: the phase, and loose non-finite fields
    count = state.pop("_nonfinite_count", None)
    for key in ("_first_nonfinite", "_nonfinite_seen", "_warned"):
        state.pop(key, None)
    selection = state.pop("_selection", ())
    return state, legacy, None if count is None else int(count), selection
