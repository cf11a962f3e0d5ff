"""SAM's record in the state dict (under ``"sam"``) and its pickled ``__dict__``, with the upgrade of
pickles from older releases: functions over dicts and SAM's public attributes, so that
:class:`samnorm.SAM`'s ``state_dict``, ``load_state_dict``, ``__getstate__`` and ``__setstate__``
only call them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .nonfinite import NonFinite
from .protocol import Phase

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import SAM

__all__ = ["check_record", "class_name", "load_record", "pickled", "record", "unpickle", "upgrade_pickle"]


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


def record(sam: SAM) -> dict[str, Any]:
    """SAM's entry ``"sam"`` of its state dict: the defaults of the group settings (each group's own
    travel in ``param_groups``), the other settings, the skipped-ascent count (reading it syncs) and
    the base optimizer's class."""
    return {
        "rho": sam.defaults["rho"],
        "adaptive": sam.defaults["adaptive"],
        "eta": sam.defaults["eta"],
        "eps": sam.eps,
        "normalize_bias": sam.normalize_bias,
        "sync_first_pass": sam.sync_first_pass,
        "nonfinite_steps": sam.nonfinite_steps,
        "base_optimizer": class_name(sam.base_optimizer),
    }


def load_record(sam: SAM, state_dict: dict[str, Any]) -> int | None:
    """Load ``state_dict`` (with or without a ``"sam"`` entry) into ``sam``'s base optimizer, after
    checking the entry (:func:`check_record`) and taking its defaults (before the load, so that
    groups saved without settings get them); then its ``eps`` and ``sync_first_pass``. Returns
    the saved skipped-ascent count, or ``None`` without an entry. SAM re-links its groups after."""
    state_dict = dict(state_dict)
    saved = state_dict.pop("sam", None)
    if saved is not None:
        check_record(saved, sam.normalize_bias, sam.base_optimizer)
        sam.defaults.update(rho=float(saved["rho"]), adaptive=bool(saved["adaptive"]), eta=float(saved["eta"]))
    sam.base_optimizer.load_state_dict(state_dict)
    if saved is None:
        return None
    sam.eps = float(saved["eps"])
    sam.sync_first_pass = bool(saved.get("sync_first_pass", False))
    return int(saved.get("nonfinite_steps", 0))


def pickled(fields: dict[str, Any]) -> dict[str, Any]:
    """What ``pickle``/``copy`` take of a SAM's ``__dict__``: all of it but the scratch buffers and
    the group index (rebuilt on the next step)."""
    return {**fields, "_buffers": {}, "_group_of": ((), {})}


def unpickle(saved: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A SAM's ``__dict__`` from a pickle of any release (:func:`upgrade_pickle`): the fields of
    later releases filled in, a non-finite record built from an old count; the legacy group
    defaults go into the base optimizer's defaults. Returns ``(fields, legacy selection or ())``:
    SAM re-links its groups and rebuilds the selection."""
    state, legacy, count, selection = upgrade_pickle(saved)
    defaults = {"normalize_bias": True, "_bias_ids": set(), "_zeroed": False, "_group_of": ((), {})}
    fields = {**defaults, "_phase": Phase.IDLE, "_saved": [], **state}
    if count is not None or "_nonfinite" not in state:
        fields["_nonfinite"] = NonFinite(count or 0)
    for key, value in legacy.items():
        fields["base_optimizer"].defaults.setdefault(key, value)
    return fields, selection
