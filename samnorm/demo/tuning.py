"""Validation-only choice of the demo's fine-tuning settings (``samnorm demo --select``).

The test OOD sets never enter: ID = the validation digits, OOD = a held-out real set
(:func:`samnorm.data.offline.heldout_patches`, in no test table) and pseudo-OOD images of the
validation digits.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from samnorm.demo.backbone import pretrain
from samnorm.demo.config import DemoConfig
from samnorm.demo.data import load_data, logits
from samnorm.demo.run import arm_config, finetune_copy

__all__ = [
    "SELECTION_ADAPTIVE_RHOS",
    "SELECTION_GRID",
    "SELECTION_RHOS",
    "select_hyperparameters",
    "validation_metrics",
]

#: The grids of ``samnorm demo --select`` per backbone. Learning rates stop at the pretraining peak
#: (ResNetV2: 0.1); above it fine-tuning is no longer a small step from the pretrained weights.
SELECTION_GRID: dict[str, dict[str, tuple[Any, ...]]] = {
    "resnetv2": {"lr": (0.03, 0.05, 0.1), "ood_weight": (0.1, 0.25, 0.5), "ood_loss": ("uniform", "energy")},
    "t2t_vit": {"lr": (0.003, 0.01, 0.03), "ood_weight": (0.1, 0.25, 0.5)},
}
SELECTION_RHOS: dict[str, tuple[float, ...]] = {"sam_on": (0.05, 0.1, 0.2, 0.3), "sam": (0.02, 0.05, 0.1, 0.2)}
#: Radii tried with the adaptive ascent (ASAM; "ASAM-ON" for SAM-ON, the default of Mueller et al.).
SELECTION_ADAPTIVE_RHOS: dict[str, tuple[float, ...]] = {"sam_on": (0.1, 0.2, 0.5, 1.0)}
#: Fields of DemoConfig a selection grid may vary (shared by all arms).
_GRID_FIELDS = ("lr", "ood_weight", "ood_ratio", "transforms", "ood_loss", "epochs", "momentum", "weight_decay")


def validation_metrics(model: nn.Module, val: tuple[Tensor, Tensor], ood: Mapping[str, Tensor]) -> dict[str, float]:
    """Validation accuracy, MSP and Energy FPR95 per validation OOD set, and the selection criterion.

    ``criterion`` = mean of MSP and Energy FPR95 on the ``"heldout"`` set (lower is better).

    Example:
        >>> row = validation_metrics(model, data.val, {"heldout": data.ood["heldout"]})  # doctest: +SKIP
    """
    from samnorm.ood import energy, fpr_at_tpr, msp

    xv, yv = val
    lid = logits(model, xv)
    row = {"accuracy": float((lid.argmax(1) == yv).double().mean())}
    for name, x in ood.items():
        lo = logits(model, x)
        row[f"{name} MSP"] = fpr_at_tpr(msp(lid), msp(lo))
        row[f"{name} Energy"] = fpr_at_tpr(energy(lid), energy(lo))
    row["criterion"] = (row["heldout MSP"] + row["heldout Energy"]) / 2
    return row


def select_hyperparameters(
    config: DemoConfig | None = None,
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
    rhos: Mapping[str, Sequence[float]] | None = None,
    adaptive_rhos: Mapping[str, Sequence[float]] | None = None,
    seeds: Sequence[int] = (100, 101),
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Choose the fine-tuning defaults on validation data only (never the test OOD sets).

    Criterion (:func:`validation_metrics`): mean FPR95 of MSP and Energy on the held-out set, averaged
    over ``seeds`` (distinct from the demo's seeds), among settings whose validation accuracy stays
    within 1 point of the pretrained model's. Step 1 tries every combination of ``grid`` (DemoConfig
    fields shared by all arms: ``lr``, ``ood_weight``, ``ood_ratio``, ``transforms``, ``ood_loss``,
    ``epochs``, ...) on the SGD arm; step 2 picks rho per SAM arm from ``rhos`` (plain ascent) and
    ``adaptive_rhos`` (ASAM) with the step-1 settings. Every run goes through
    :func:`samnorm.train.recipe.finetune`. Prints one line per trial through ``out``; returns the
    pretrained model's row, every trial and the choice.

    Example:
        >>> choice = select_hyperparameters(grid={"lr": (0.03,)}, rhos={"sam_on": (0.1,)})  # doctest: +SKIP
        >>> choice["chosen"]                                                             # doctest: +SKIP
    """
    from samnorm.data.pseudo_ood import PseudoOOD

    config = config if config is not None else DemoConfig()
    grid = dict(grid) if grid is not None else dict(SELECTION_GRID[config.backbone])
    rhos = dict(rhos) if rhos is not None else dict(SELECTION_RHOS)
    adaptive_rhos = dict(adaptive_rhos) if adaptive_rhos is not None else dict(SELECTION_ADAPTIVE_RHOS)
    if set(grid) - set(_GRID_FIELDS):
        raise ValueError(f"grid keys must be among {sorted(_GRID_FIELDS)}, got {sorted(set(grid) - set(_GRID_FIELDS))}")
    if (set(rhos) | set(adaptive_rhos)) - {"sam_on", "sam"}:
        raise ValueError(f"rhos keys must be 'sam_on' and/or 'sam', got {sorted(set(rhos) | set(adaptive_rhos))}")
    data = load_data(config, heldout=True)
    model, _ = pretrain(config, data)
    xv, yv = data.val
    val_ood = {
        "heldout": data.ood["heldout"],
        "pseudo": PseudoOOD(list(config.transforms), seed=10_000 + config.data_seed)(xv, yv),
    }

    def show(values: Mapping[str, Any]) -> str:
        return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    base = validation_metrics(model, data.val, val_ood)
    out("pretrained: " + show(base))
    table: list[dict[str, Any]] = []

    def trial(arm: str, settings: dict[str, Any]) -> dict[str, Any]:
        shared = {k: v for k, v in settings.items() if k in _GRID_FIELDS}
        cfg = dataclasses.replace(config, **shared, **{f"{k}_{arm}": v for k, v in settings.items() if k not in shared})
        recipe = arm_config(cfg, arm)
        rows = [validation_metrics(finetune_copy(model, data.train, recipe, s), data.val, val_ood) for s in seeds]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        entry = {"arm": arm, **settings, **mean, "eligible": mean["accuracy"] >= base["accuracy"] - 0.01}
        table.append(entry)
        out(
            f"{arm:6s} "
            + show(settings)
            + " | "
            + show(mean)
            + ("" if entry["eligible"] else "  (accuracy drop > 1 pt)")
        )
        return entry

    def best(entries: list[dict[str, Any]]) -> dict[str, Any]:
        pool = [e for e in entries if e["eligible"]] or entries
        return min(pool, key=lambda e: e["criterion"])

    keys = list(grid)
    winner = best([trial("sgd", dict(zip(keys, values, strict=True))) for values in itertools.product(*grid.values())])
    shared = {k: winner[k] for k in keys}
    chosen: dict[str, Any] = dict(shared)
    for arm in [a for a in ("sam_on", "sam") if a in rhos or a in adaptive_rhos]:
        entries = [trial(arm, {**shared, "rho": r, "adaptive": False}) for r in rhos.get(arm, ())]
        entries += [trial(arm, {**shared, "rho": r, "adaptive": True}) for r in adaptive_rhos.get(arm, ())]
        winner = best(entries)
        chosen[f"rho_{arm}"], chosen[f"adaptive_{arm}"] = winner["rho"], winner["adaptive"]
    out("chosen: " + show(chosen))
    return {"pretrained": base, "table": table, "chosen": chosen}
