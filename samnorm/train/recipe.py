"""The SFT recipe: fine-tune a pretrained classifier with SAM-ON on ID images plus pseudo-OOD images.

:func:`finetune` runs the whole thing: SAM on the normalization layers (SAM-ON) by default, the
pseudo-OOD sampler and the loss of :mod:`samnorm.train.losses`, for a number of steps or epochs, with a
progress bar, logged loss / accuracy / OOD term, periodic *atomic* checkpoints and exact resumption,
on one device or under ``torchrun`` (DDP).

Defaults and why (:class:`FinetuneConfig`):

* ``optimizer="sam-on"``, ``rho=0.5``: the paper's method; Mueller et al. report plain SAM-ON working
  with rho around 0.5-1 (``"asam-on"`` defaults to their rho=10, ``"sam"`` to Foret et al.'s 0.05,
  ``"asam"`` to Kwon et al.'s 0.5, and ``"sgd"`` is the no-SAM ablation). ``variant=None``: every step
  is SAM's two passes; ``"onepass"``, ``"interval"``, ``"looksam"`` (:mod:`samnorm.sam.variants`) cost less,
  and benchmarks/RESULTS.md section 7 measures how much of SAM-ON's OOD gain each keeps.
* ``epochs=1``: the paper reports the gain within one epoch of fine-tuning.
* SGD with momentum 0.9, ``lr=1e-3``, cosine decay, no weight decay: a short fine-tune of a pretrained
  model needs a small step so the ID accuracy survives (BiT fine-tunes with SGD 0.9 as well).
* ``ood_loss="uniform"`` (Outlier Exposure): no margin to tune (see :mod:`samnorm.train.losses`), at the
  recipe's weight 0.25 (:data:`RECIPE_OOD_WEIGHTS`; the library's own default, 0.5, stays that of
  :class:`~samnorm.train.losses.SFTLoss`), with ``transforms`` = jigsaw alone (:data:`RECIPE_TRANSFORMS`):
  both chosen on validation data over 2 backbone families x 2 pretrainings x 5 seeds
  (benchmarks/RESULTS.md section 8.4; the six transforms and weight 0.5 of 0.1.0 are
  :data:`DEFAULTS_0_1_0`). ``ood_ratio=0.5``: half as many pseudo-OOD as ID images per batch, since the
  OOD term has a single target and needs fewer samples; the step costs 1.5x a plain one, not 2x.
  Section 8.4 also shows where SAM-ON does not help: on the T2T-ViT (LayerNorm) family SAM-ON ≈ SGD.
* ``precision``: ``"fp32"``; ``"bf16"`` autocasts to bfloat16; ``"fp16"`` autocasts to float16 with a
  ``torch.amp.GradScaler`` handed to SAM's step (steps with an inf/NaN gradient are skipped, counted
  and logged as ``skipped_steps`` with the ``loss_scale``; the scaler's state is checkpointed).
* ``batch_size=64`` per process, ``seed=0``; checkpoints every 500 steps and at the end.

Determinism: on the CPU, the same seed gives bit-identical weights, and a run resumed from a
checkpoint ends bit-identical to an uninterrupted one (the checkpoint holds model, optimizer with
SAM's base state, LR schedule, the pseudo-OOD generators and torch's RNG of every rank, and the data
position). Random data augmentation is not used by default, for that reason.

Example:
    >>> import torch, samnorm.train.recipe as R
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.LayerNorm(16),
    ...                             torch.nn.Linear(16, 3))
    >>> data = (torch.rand(48, 1, 8, 8), torch.arange(48) % 3)
    >>> result = R.finetune(model, data, steps=3, batch_size=16, progress=False)
    >>> result.steps, sorted(result.history[-1])[:3]
    (3, ['acc', 'ce', 'epoch'])
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from samnorm.data.pseudo_ood import PseudoOOD
from samnorm.runs import deferred_signals, hold, signals_blocked, worker_ignores_signals
from samnorm.sam import registry
from samnorm.sam.optimizer import SAM
from samnorm.sam.protocol import run_passes
from samnorm.sam.variants import VARIANTS, make
from samnorm.train.losses import OOD_LOSSES, LossTerms, SFTLoss
from samnorm.utils.deprecation import renamed_getattr
from samnorm.utils.dist import gather_objects, rank_world
from samnorm.utils.io import atomic_save, atomic_write, remove_stale_temps
from samnorm.utils.nn import IndexSampler, dataset_len
from samnorm.validate import check_fields

__all__ = [
    "CHECKPOINT_NAME",
    "DEFAULTS_0_1_0",
    "OPTIMIZERS",
    "RECIPE_OOD_WEIGHTS",
    "RECIPE_TRANSFORMS",
    "DivergedError",
    "FinetuneConfig",
    "FinetuneResult",
    "Interrupted",
    "finetune",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "samnorm.finetune/1"

# optimizer -> (perturb the norm layers only?, adaptive?, default rho); None: no SAM. A view of the
# registry's ascent kinds (samnorm.sam.registry), plus "sgd".
OPTIMIZERS: Mapping[str, tuple[bool, bool, float] | None] = registry.RegistryView(
    lambda kind: kind.norm_only is not None,
    lambda kind: (kind.norm_only, kind.defaults["adaptive"], kind.defaults["rho"]),
    {"sgd": None},
)
RECIPE_TRANSFORMS: tuple[str, ...] = ("jigsaw",)
"""The recipe's pseudo-OOD transforms when ``FinetuneConfig.transforms`` is None: jigsaw alone, chosen on
validation data (benchmarks/RESULTS.md section 8.4: all six minus jigsaw alone, validation criterion,
SAM-ON -2.5 [-3.8, -1.2] on ResNetV2, -18.5 [-22.7, -14.2] on T2T-ViT)."""
RECIPE_OOD_WEIGHTS: Mapping[str, float] = {"uniform": 0.25}
"""The recipe's OOD weight per loss when ``FinetuneConfig.ood_weight`` is None; a loss not named here takes
the library's default (samnorm.train.losses.OOD_LOSSES). Uniform 0.25 (RESULTS.md section 8.4: 0.5 - 0.25,
SAM-ON, +4.5 [+0.9, +8.2] on ResNetV2, +5.9 [+0.7, +11.2] on T2T-ViT); the others were not measured."""
DEFAULTS_0_1_0: Mapping[str, Any] = {
    "transforms": ("jigsaw", "patch_mix", "rotate", "blur", "noise", "fourier"),
    "ood_weight": dict(OOD_LOSSES),
}
"""What ``transforms=None``/``ood_weight=None`` meant in samnorm 0.1.0 (all six transforms; the library's
weight, 0.5 for uniform): the runs of benchmarks/ablation.py's ``cli`` study, and checkpoints written
then (they record None), resume with these."""
# precision -> autocast dtype (None: no autocast); "fp16" also scales the loss (torch.amp.GradScaler)
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that do not change the trajectory, so a resumed run may change them.
_FREE_ON_RESUME = {"checkpoint_every", "log_every", "num_workers"}
# FinetuneConfig fields checked against samnorm.validate.SPECS (the optimizer and the loss are checked by name first)
_CHECKED_FIELDS = (
    "variant",
    "rho",
    "variant_k",
    "eta",
    "base_optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_steps",
    "epochs",
    "steps",
    "batch_size",
    "ood_weight",
    "ood_ratio",
    "transforms",
    "m_in",
    "m_out",
    "grad_clip",
    "precision",
    "seed",
    "checkpoint_every",
    "log_every",
    "num_workers",
)
# Files of a run in its output folder (a fresh run would replace them).
_RUN_FILES = (CHECKPOINT_NAME, "log.jsonl", "config.json")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`finetune`; the message says which checkpoint is kept.

    Example:
        >>> str(Interrupted("interrupted; no checkpoint was written"))
        'interrupted; no checkpoint was written'
    """


class DivergedError(ArithmeticError):
    """Training produced a non-finite loss or parameter; the last good checkpoint is kept.

    Example:
        >>> issubclass(DivergedError, ArithmeticError)
        True
    """


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune` (module docstring: the reasons for the defaults).

    ``None`` in ``rho``, ``ood_weight`` and ``transforms`` takes the recipe's default, resolved by
    :meth:`resolved_rho`, :meth:`resolved_ood_weight` and :meth:`resolved_transforms`: the optimizer's
    rho, and, chosen on validation data (benchmarks/RESULTS.md section 8.4), the uniform loss at weight
    0.25 (another loss: the library's weight) on pseudo-OOD images made by jigsaw alone.

    Example:
        >>> FinetuneConfig(optimizer="asam-on").resolved_rho()
        10.0
        >>> c = FinetuneConfig()
        >>> c.resolved_ood_weight(), c.resolved_transforms(), FinetuneConfig(ood_loss="energy").resolved_ood_weight()
        (0.25, ['jigsaw'], 0.1)
    """

    optimizer: str = "sam-on"
    rho: float | None = None  # None: the optimizer's default (OPTIMIZERS)
    # a cheaper schedule of the SAM optimizer (samnorm.sam.variants.make: "interval", "looksam", "onepass");
    # None: plain SAM. variant_k: the interval of "interval"/"looksam" (None: the class's default).
    variant: str | None = None
    variant_k: int | None = None
    eta: float = 0.01  # ASAM's offset
    base_optimizer: str = "sgd"  # or "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    batch_size: int = 64  # per process
    ood_loss: str = "uniform"
    ood_weight: float | None = None  # None: RECIPE_OOD_WEIGHTS (uniform 0.25), else the loss's (OOD_LOSSES)
    ood_ratio: float = 0.5
    transforms: Sequence[str] | None = None  # pseudo-OOD transform names; None: RECIPE_TRANSFORMS (jigsaw)
    m_in: float = -25.0
    m_out: float = -7.0
    grad_clip: float | None = None
    precision: str = "fp32"  # "bf16" (autocast) or "fp16" (autocast and GradScaler)
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
        check_fields(self, _CHECKED_FIELDS)  # types, ranges, finiteness, choices: samnorm.validate's one table
        if self.variant is not None and OPTIMIZERS[self.optimizer] is None:
            raise ValueError(
                f"variant {self.variant!r} is a schedule of a SAM optimizer: choose one of "
                f"{sorted(o for o in OPTIMIZERS if OPTIMIZERS[o] is not None)}, not {self.optimizer!r}"
            )
        with_k = sorted(name for name, kind in registry.KINDS.items() if name in VARIANTS and "k" in kind.defaults)
        if self.variant_k is not None and self.variant not in with_k:
            raise ValueError(
                f"variant_k must be an int >= 1 with a variant that takes k ({' or '.join(with_k)}), "
                f"got {self.variant_k!r} with variant {self.variant!r}"
            )
        if self.ood_loss not in OOD_LOSSES:
            raise ValueError(f"unknown ood_loss {self.ood_loss!r}: choose one of {sorted(OOD_LOSSES)}")

    def resolved_rho(self) -> float | None:
        """``rho``, or the chosen optimizer's default (None for plain SGD)."""
        spec = OPTIMIZERS[self.optimizer]
        if spec is None:
            return None
        return spec[2] if self.rho is None else float(self.rho)

    def resolved_ood_weight(self) -> float:
        """``ood_weight``, or the recipe's default for ``ood_loss`` (:data:`RECIPE_OOD_WEIGHTS`, else the library's)."""
        if self.ood_weight is not None:
            return float(self.ood_weight)
        return RECIPE_OOD_WEIGHTS.get(self.ood_loss, OOD_LOSSES[self.ood_loss])

    def resolved_transforms(self) -> list[str]:
        """``transforms``, or the recipe's default (:data:`RECIPE_TRANSFORMS`)."""
        return list(RECIPE_TRANSFORMS if self.transforms is None else self.transforms)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model (unwrapped from DDP), logs, steps, checkpoint,
    unreadable images met and (fp16) steps skipped for an inf/NaN gradient."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    checkpoint: str | None = None
    skipped_images: int = 0
    skipped_steps: int = 0  # precision="fp16": steps GradScaler skipped (an inf/NaN gradient)


def _as_dataset(data: Any) -> Dataset:
    if isinstance(data, DataLoader):
        raise TypeError(
            "finetune takes the dataset, not a DataLoader: it builds its own loader so that it can "
            "shard the data under DDP and resume mid-epoch (pass loader.dataset)"
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return TensorDataset(data[0], data[1])
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(f"data must be a map-style Dataset or an (images, labels) pair, got {type(data).__name__}")
    return data


def _build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    if cfg.base_optimizer == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        base = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    spec = OPTIMIZERS[cfg.optimizer]
    if spec is None:
        return base
    norm_only, adaptive, _ = spec
    kwargs: dict[str, Any] = {"rho": cfg.resolved_rho(), "adaptive": adaptive, "eta": cfg.eta, "model": model}
    if cfg.variant is None:
        return SAM(base, perturb=model if norm_only else None, **kwargs)
    if cfg.variant_k is not None:
        kwargs["k"] = cfg.variant_k
    return make(cfg.variant, base, model if norm_only else None, **kwargs)


def _schedule(cfg: FinetuneConfig, total: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 0 over ``total`` steps (a factor of ``lr``)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))

    return factor


def _check_resume(
    saved: Mapping[str, Any], cfg: FinetuneConfig, world: int, path: str, model_record: Mapping[str, Any]
) -> None:
    if saved.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a samnorm fine-tuning checkpoint (format {saved.get('format')!r})")
    now = _effective(dataclasses.asdict(cfg), _resolved(cfg))
    before = _effective(saved["config"], saved.get("resolved"))
    changed = [
        f"{k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if k not in _FREE_ON_RESUME and before.get(k) != v
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {path!r} with other settings ({'; '.join(changed)}): use the original "
            "settings, or a new output directory"
        )
    _check_same_model(saved, model_record, path)
    if saved["world_size"] != world:
        raise ValueError(
            f"{path!r} was written by {saved['world_size']} process(es) and this run has {world}: resume "
            "with the same number of processes (each has its own data shard and random streams)"
        )


def _resolved(cfg: FinetuneConfig) -> dict[str, Any]:
    """The recipe defaults a run used (recorded in its checkpoint: a later release may change them)."""
    return {"ood_weight": cfg.resolved_ood_weight(), "transforms": cfg.resolved_transforms()}


def _effective(config: Mapping[str, Any], resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config's settings with the recipe's defaults filled in: from ``resolved`` (a checkpoint's record),
    else from the config (a checkpoint of samnorm 0.1.0, which has no record: :data:`DEFAULTS_0_1_0`)."""
    out = dict(config)
    if resolved is not None:
        return {**out, **resolved}
    if config.get("transforms") is None:
        out["transforms"] = list(DEFAULTS_0_1_0["transforms"])
    if config.get("ood_weight") is None:
        out["ood_weight"] = DEFAULTS_0_1_0["ood_weight"].get(config.get("ood_loss"))
    return out


def _model_record(
    model_name: str | None, model_kwargs: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What a resume checks the model against: its name, its arguments and the image transform."""
    return {
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "transform": (metadata or {}).get("transform"),
    }


def _check_same_model(saved: Mapping[str, Any], now: Mapping[str, Any], path: str) -> None:
    """A resumed run must build the model (and read the images) as the interrupted one did."""
    before = {
        "model_name": saved.get("model_name"),
        "model_kwargs": dict(saved.get("model_kwargs") or {}),
        "transform": (saved.get("metadata") or {}).get("transform"),
    }
    changed = []
    for key, option in (("model_name", "model"), ("model_kwargs", "model argument"), ("transform", "image transform")):
        old, new = before[key], now[key]
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changed += [
                f"{option} {k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted({*old, *new}, key=str)
                if old.get(k) != new.get(k)
            ]
        elif old != new:
            changed.append(f"{option}: {old!r} -> {new!r}")
    if changed:
        raise ValueError(
            f"cannot resume from {path!r} with another model or image transform ({'; '.join(changed)}): resume "
            "with the original --model / --model-arg / --img-size, or start a new run in another output folder"
        )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load_resume(path: str) -> Mapping[str, Any]:
    """The checkpoint to resume from, or one readable line on what is wrong with it."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot resume from {path!r}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)}); "
            "move it away to start over, or start a new run elsewhere"
        ) from err
    if not isinstance(saved, Mapping) or saved.get("format") != FORMAT:
        found = saved.get("format") if isinstance(saved, Mapping) else type(saved).__name__
        raise ValueError(f"cannot resume from {path!r}: not a samnorm fine-tuning checkpoint (format {found!r})")
    return saved


def _data_record(dataset: Dataset) -> dict[str, Any]:
    """What a resume checks the data against: the size and, for datasets that give one (ImageFolder),
    a fingerprint of the file list."""
    fingerprint = getattr(dataset, "fingerprint", None)
    return {"images": dataset_len(dataset), "fingerprint": fingerprint() if callable(fingerprint) else None}


def _check_data(saved: Mapping[str, Any], now: Mapping[str, Any], path: str) -> None:
    before = saved.get("data")
    if before is None:  # checkpoints written before the data were recorded
        return
    if before["images"] != now["images"] or before["fingerprint"] != now["fingerprint"]:
        what = (
            f"{before['images']} -> {now['images']} images"
            if before["images"] != now["images"]
            else "the same number of images, but other files, labels or sizes"
        )
        raise ValueError(
            f"cannot resume from {path!r}: the training data changed since it was written ({what}); resume "
            "with the data the run started with, or start a new run in another output folder"
        )


def _all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim bool tensor, on the tensors' device: are all their entries finite?

    A float64 sum is NaN/inf exactly when an entry is (float32 entries cannot overflow it), and costs
    a twelfth of ``isfinite(t).all()`` (measured on a ResNet-18 on the CPU: 3% of a training step).
    """
    return torch.isfinite(torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors]).sum())


def _check_finite_model(model: nn.Module, resumed_from: str | None = None) -> None:
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    if not floats or bool(_all_finite(list(floats.values()))):
        return
    bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    if bad:
        where = f"the weights resumed from {resumed_from!r}" if resumed_from else "the starting weights"
        raise ValueError(
            f"{where} hold NaN/inf values ({len(bad)} tensor(s), e.g. {bad[0]!r}): fine-tuning "
            "cannot start from them; check the checkpoint (or start a new run in another output folder)"
        )


def _check_output(out_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a run's files unless asked (``resume`` continues it, ``overwrite`` replaces it)."""
    if overwrite or resume or not os.path.isdir(out_dir):
        return
    # a run's progress lives in its checkpoint and log; a config.json alone has nothing to lose
    found = [
        n
        for n in (CHECKPOINT_NAME, "log.jsonl")
        if os.path.isfile(os.path.join(out_dir, n)) and os.path.getsize(os.path.join(out_dir, n)) > 0
    ]
    if found:
        raise ValueError(
            f"{out_dir!r} already holds a run ({', '.join(found)}): resume it (resume=True, CLI --resume), "
            "replace it (overwrite=True, CLI --overwrite) or choose another output folder"
        )


def _remove_file(path: str) -> bool:
    """Remove ``path`` if it is a file or a link (a link's target is left alone); True if removed."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
        return True
    return False


def _write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def _holding_output(fn: Callable[..., FinetuneResult]) -> Callable[..., FinetuneResult]:
    """Run ``fn`` holding the lock of its ``output_dir`` (rank 0; :func:`samnorm.runs.hold`): a second
    run on the folder, by the CLI or the API, fails at once instead of mixing its files with this one's."""

    @functools.wraps(fn)
    def run(*args: Any, output_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> FinetuneResult:
        if output_dir is None or rank_world()[0] != 0:
            return fn(*args, output_dir=output_dir, **kwargs)
        with hold(output_dir, "finetune"):
            return fn(*args, output_dir=output_dir, **kwargs)

    return run


@_holding_output
def finetune(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    config: FinetuneConfig | None = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    sampler: PseudoOOD | None = None,
    log: Callable[[str], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with SAM-ON (by default) and pseudo-OOD images.

    Args:
        model: a classifier (``model(x) -> logits``); trained in place and returned.
        data: a map-style dataset of ``(image, label)`` (e.g. :class:`samnorm.data.folders.ImageFolder`)
            or an ``(images, labels)`` pair of tensors.
        config: hyper-parameters; keyword ``overrides`` (``steps=100, lr=3e-3, ...``) replace fields.
        output_dir: where ``checkpoint.pt``, ``log.jsonl`` and ``config.json`` go (rank 0 writes, holding
            the folder's lock for the whole run: :func:`samnorm.runs.hold`); ``None`` keeps everything in memory.
        resume: continue from ``output_dir/checkpoint.pt`` when it exists (otherwise start afresh);
            the settings and the data must be those of the interrupted run.
        overwrite: start afresh even though ``output_dir`` holds a run; without it (or ``resume``)
            a folder with a run's files is a ``ValueError``, so a finished run is never replaced by mistake.
            Once every check has passed, the old run's checkpoint, log and config are removed (nothing else).
        device: where to train (default: where the model is).
        progress: show a tqdm progress bar (rank 0 only).
        model_name, model_kwargs: recorded in the checkpoint so ``create_model(None, checkpoint=...)``
            and ``samnorm evaluate`` rebuild the model.
        metadata: anything else to record in the checkpoint under ``"metadata"`` (the CLI keeps the
            class names and the image transform there).
        sampler: a custom :class:`PseudoOOD` (default: one from ``config.transforms`` and the seed).
        log: where to print log lines (default: stderr on rank 0).

    Under ``torch.distributed`` (e.g. ``torchrun``) the model is wrapped in DDP, each process takes its
    shard of every epoch (``DistributedSampler``) and ``batch_size`` images per step, and only rank 0
    writes files and logs.

    A non-finite loss or parameter stops training with :class:`DivergedError` (checked, without an
    extra device synchronisation, at every log line and before every checkpoint), so the last
    checkpoint written is always a finite one.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.GroupNorm(2, 8), nn.Linear(8, 2))
        >>> data = (torch.rand(32, 1, 4, 4), torch.arange(32) % 2)
        >>> finetune(model, data, steps=2, batch_size=8, optimizer="sgd", progress=False).steps
        2
    """
    cfg = dataclasses.replace(config or FinetuneConfig(), **overrides)
    run = _Run.create(
        model,
        _as_dataset(data),
        cfg,
        device=device,
        output_dir=output_dir,
        resume=resume,
        overwrite=overwrite,
        log=log,
        sampler=sampler,
        model_name=model_name,
        model_kwargs=model_kwargs,
        metadata=metadata,
    )
    if resume and run.ckpt_path is not None and os.path.isfile(run.ckpt_path):
        run.resume(run.ckpt_path)
    elif resume:
        run.say("nothing to resume: starting from scratch")
    if run.out_dir is not None and run.rank == 0:
        run.prepare_output(run.out_dir, overwrite)
    if run.world > 1:
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    run.checked, run.saved_step = run.start, run.start if run.start else None
    if progress and run.rank == 0:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.total, initial=run.start, desc=f"finetune ({cfg.optimizer})", dynamic_ncols=True)
    model.train()
    try:
        run.train()
    except KeyboardInterrupt as err:  # Ctrl-C: say what is kept, once, instead of a traceback
        raise run.interrupted(err) from err
    if run.bar is not None:
        run.bar.close()
    skipped = _skipped(run.dataset, run.world, run.device)
    if skipped:
        run.say(f"skipped {skipped} unreadable image(s); their neighbours were used instead")
    return FinetuneResult(
        model=model,
        history=run.history,
        steps=run.total,
        checkpoint=run.ckpt_path,
        skipped_images=skipped,
        skipped_steps=sum(int(r.get("skipped_steps", 0)) for r in run.history),
    )


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _silent(msg: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for everyone."""


@dataclass(eq=False)
class _Run:
    """One run of :func:`finetune`: the state its parts share (resume, the training step, the logging
    window, the divergence check, checkpoints). :meth:`create` builds it; :meth:`train` runs the steps
    ``start`` .. ``total``."""

    cfg: FinetuneConfig
    dataset: Dataset
    model: nn.Module
    net: nn.Module  # what the step runs: the model, or its DDP wrapper
    trainable: list[nn.Parameter]
    device: torch.device
    rank: int
    world: int
    steps_per_epoch: int
    total: int
    out_dir: str | None
    say: Callable[[str], None]
    model_name: str | None
    model_kwargs: dict[str, Any]
    metadata: dict[str, Any]
    data_record: dict[str, Any]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    loss_fn: SFTLoss
    pseudo: PseudoOOD
    # fp16: the loss is scaled so that small gradients survive float16; a step whose gradients hold an
    # inf/NaN is skipped and the scale backs off (disabled, the scaler passes everything through unchanged)
    scaler: torch.amp.GradScaler
    window: Tensor  # since the last log line: loss, ce, ood, correct, count (float64, summed over images)
    history: list[dict[str, float]] = field(default_factory=list)
    start: int = 0  # the first step to train (the checkpoint's, after a resume)
    skipped_steps: int = 0  # since the last log line (fp16)
    checked: int = 0  # the last step known finite
    saved_step: int | None = None  # the step of the last checkpoint written (None: none kept)
    bar: Any = None  # the tqdm progress bar (rank 0, progress=True)

    @property
    def ckpt_path(self) -> str | None:
        """The checkpoint file in the output folder (None: the run keeps no files)."""
        return None if self.out_dir is None else os.path.join(self.out_dir, CHECKPOINT_NAME)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        dataset: Dataset,
        cfg: FinetuneConfig,
        *,
        device: torch.device | str | None,
        output_dir: str | os.PathLike[str] | None,
        resume: bool,
        overwrite: bool,
        log: Callable[[str], None] | None,
        sampler: PseudoOOD | None,
        model_name: str | None,
        model_kwargs: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
    ) -> _Run:
        """Check the run's settings, model and data, and build its optimizer, schedule, loss and sampler."""
        rank, world = rank_world()
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model.to(device)
        out_dir = None if output_dir is None else os.fspath(output_dir)
        steps_per_epoch = dataset_len(dataset) // world // cfg.batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"the dataset has {dataset_len(dataset)} images: fewer than one batch of {cfg.batch_size} per "
                f"process ({world} process(es)); lower batch_size or add images"
            )
        total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
        if out_dir is not None:
            _check_output(out_dir, resume, overwrite)
        _check_finite_model(model)
        data_record = _data_record(dataset)
        opt = _build_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
        loss_fn = SFTLoss(cfg.ood_loss, cfg.resolved_ood_weight(), m_in=cfg.m_in, m_out=cfg.m_out)
        # Each rank draws its own pseudo-OOD images; the offset keeps the stream apart from torch's RNG.
        pseudo = sampler or PseudoOOD(cfg.resolved_transforms(), seed=cfg.seed * 1000 + 7919 + rank)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        torch.manual_seed(cfg.seed + rank)  # dropout, stochastic depth
        return cls(
            cfg=cfg,
            dataset=dataset,
            model=model,
            net=model,
            trainable=[p for p in model.parameters() if p.requires_grad],
            device=device,
            rank=rank,
            world=world,
            steps_per_epoch=steps_per_epoch,
            total=total,
            out_dir=out_dir,
            say=_silent if rank != 0 else log or _to_stderr,
            model_name=model_name,
            model_kwargs=dict(model_kwargs or {}),
            metadata=dict(metadata or {}),
            data_record=data_record,
            opt=opt,
            sched=sched,
            loss_fn=loss_fn,
            pseudo=pseudo,
            scaler=scaler,
            window=torch.zeros(5, dtype=torch.float64, device=device),
        )

    def resume(self, path: str) -> None:
        """Continue from the checkpoint at ``path``: the same settings, model and data are checked first,
        then every state of the run (weights, optimizer, schedule, sampler, RNG, log window, scaler)."""
        saved = _load_resume(path)
        record = _model_record(self.model_name, self.model_kwargs, self.metadata)
        _check_resume(saved, self.cfg, self.world, path, record)
        _check_data(saved, self.data_record, path)
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as err:  # another architecture: one line, not a traceback
            raise ValueError(
                f"cannot resume from {path!r}: its weights do not fit this model ({_first_line(err)}); "
                "resume with the original model, or start a new run in another output folder"
            ) from err
        _check_finite_model(self.model, path)  # a NaN checkpoint.pt is no better a start than NaN weights
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.pseudo.load_state_dict(saved["sampler"][self.rank])
        rng = saved["rng"][self.rank]
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "window" in saved:  # the steps since the last log line, so the next line is the uninterrupted one
            self.window.copy_(saved["window"][self.rank])
        if self.scaler.is_enabled():  # precision is checked equal, so an fp16 checkpoint holds the scaler's state
            self.scaler.load_state_dict(saved["scaler"])
            self.skipped_steps = int(saved["skipped_steps"])
        self.start, self.history = int(saved["step"]), list(saved["history"])
        self.say(f"resuming from {path} at step {self.start}/{self.total}")

    def prepare_output(self, out_dir: str, overwrite: bool) -> None:
        """Rank 0: the output folder with this run's config.json and log so far (``overwrite``: the old run's
        files removed first), and no temporary file of a writer killed mid-save."""
        os.makedirs(out_dir, exist_ok=True)
        if overwrite:  # every check passed: the old run goes now, so no mix of its files and the new run's remains
            removed = [n for n in _RUN_FILES if _remove_file(os.path.join(out_dir, n))]
            if removed:
                self.say(f"overwrite: removed the previous run's {', '.join(removed)} from {out_dir}")
        for name in _RUN_FILES:  # temporary files of writers killed mid-save
            remove_stale_temps(os.path.join(out_dir, name))
        config = {
            **dataclasses.asdict(self.cfg),
            "total_steps": self.total,
            "world_size": self.world,
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
        }
        atomic_write(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
        _write_jsonl(os.path.join(out_dir, "log.jsonl"), self.history)

    def train(self) -> None:
        """The steps ``start`` .. ``total``: a log line every ``log_every`` steps, a checkpoint every
        ``checkpoint_every`` steps, both at the end."""
        cfg, loader = self.cfg, None
        for step in range(self.start, self.total):
            epoch, position = divmod(step, self.steps_per_epoch)
            if loader is None or position == 0:
                loader = self.loader(epoch, position)
            x, y = next(loader)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            terms, logits = self.step(x, y)
            self.accumulate(terms, logits, y)
            done = step + 1
            if done % cfg.log_every == 0 or done == self.total:
                self.log_window(done)
            if self.bar is not None:
                self.bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == self.total:
                if self.checked != done:
                    self.stop_if_diverged(done, math.isfinite(self.window[0].item()))
                self.save(done)

    def loader(self, epoch: int, skip: int) -> Iterator[Any]:
        """This rank's batches of ``epoch`` from batch ``skip`` on (DistributedSampler's shuffled shard)."""
        cfg = self.cfg
        shard: DistributedSampler[int] = DistributedSampler(
            self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        shard.set_epoch(epoch)
        indices = list(shard)[skip * cfg.batch_size : self.steps_per_epoch * cfg.batch_size]
        # Own generator: a DataLoader otherwise draws its worker seed from the global RNG, which would
        # shift the dropout stream of a resumed run by one draw.
        workers_seed = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 101 + self.rank)
        with signals_blocked():  # workers start with signals blocked, then ignore them: the main process handles them
            return iter(
                DataLoader(
                    self.dataset,
                    batch_size=cfg.batch_size,
                    sampler=IndexSampler(indices),
                    drop_last=True,
                    num_workers=cfg.num_workers,
                    pin_memory=self.device.type == "cuda",
                    generator=workers_seed,
                    worker_init_fn=worker_ignores_signals,
                )
            )

    def forward(self, inputs: Tensor, y: Tensor) -> tuple[LossTerms, Tensor]:
        """The loss terms and the ID logits of ``inputs`` (the ID images ``y`` labels, then the pseudo-OOD ones)."""
        dtype = _AUTOCAST[self.cfg.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = self.net(inputs).float()
        b = y.shape[0]
        return self.loss_fn(logits[:b], y, logits[b:] if inputs.shape[0] > b else None), logits[:b]

    def step(self, x: Tensor, y: Tensor) -> tuple[LossTerms, Tensor]:
        """One training step on the ID batch ``(x, y)`` and its pseudo-OOD images; the loss terms and ID
        logits of its first pass."""
        opt, scaler = self.opt, self.scaler
        n_ood = round(self.cfg.ood_ratio * x.shape[0])
        inputs = torch.cat([x, self.pseudo(x[:n_ood], y[:n_ood])]) if n_ood else x
        if isinstance(opt, SAM):  # every pass the step needs (samnorm.sam.protocol); logged: the first
            ((terms, logits),) = run_passes(
                opt, self.net, [inputs], lambda b: self.forward(b, y), loss_of=lambda out: scaler.scale(out[0].total)
            )
        else:
            terms, logits = self.forward(inputs, y)
            scaler.scale(terms.total).backward()
        if self.cfg.grad_clip is not None:
            scaler.unscale_(opt)  # clip the true gradients (a no-op unless fp16)
            nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)  # second-pass gradients: the ones applied
        if isinstance(opt, SAM):
            opt.second_step(zero_grad=True, scaler=scaler)  # an inf in either pass skips the whole step
        else:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            # the scale backs off exactly when the step was skipped; the step read the inf flag on
            # the host already, so these reads add no device synchronisation of note
            before = scaler.get_scale()
            scaler.update()
            self.skipped_steps += scaler.get_scale() < before
        self.sched.step()
        return terms, logits

    @torch.no_grad()
    def accumulate(self, terms: LossTerms, logits: Tensor, y: Tensor) -> None:
        """Add a step's image-weighted losses, correct answers and image count to the logging window."""
        correct = (logits.argmax(1) == y).sum()
        b = len(y)
        parts = (terms.total.detach() * b, terms.ce * b, terms.ood * b, correct, y.new_tensor(b))
        self.window += torch.stack([t.double() for t in parts])

    def log_window(self, done: int) -> None:
        """The log line of the steps since the last one (summed over the ranks), checked finite, then a new window."""
        window = self.window
        if self.world > 1:
            dist.all_reduce(window)
        n = window[4].item()
        record: dict[str, Any] = {
            "step": done,
            "epoch": round(done / self.steps_per_epoch, 4),
            "lr": self.sched.get_last_lr()[0],
            "loss": window[0].item() / n,
            "ce": window[1].item() / n,
            "ood": window[2].item() / n,
            "acc": window[3].item() / n,
        }
        if self.scaler.is_enabled():
            record.update(loss_scale=self.scaler.get_scale(), skipped_steps=self.skipped_steps)
            self.skipped_steps = 0
        # the window sums every loss since the last line: a NaN/inf in any of them shows here
        self.stop_if_diverged(done, all(math.isfinite(record[k]) for k in ("loss", "ce", "ood")))
        self.history.append(record)
        window.zero_()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "acc", "ood")})
        else:
            self.say(json.dumps(record))

    def stop_if_diverged(self, done: int, loss_finite: bool) -> None:
        """Raise DivergedError when a loss since step ``checked`` or a parameter is not finite."""
        # one device tensor, one synchronisation (not one per parameter)
        ok = _all_finite(self.trainable).int() * int(loss_finite)
        if self.world > 1:  # every rank stops together, or none does
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            kept = (
                f"the last good checkpoint (step {self.saved_step}) is kept in {self.ckpt_path}"
                if self.saved_step
                else "no checkpoint was written"
            )
            raise DivergedError(
                f"training diverged: non-finite loss or weights between steps {self.checked + 1} and {done}; "
                f"{kept}. Lower the learning rate, check the loss margins, or clip gradients (grad_clip)"
            )
        self.checked = done

    def save(self, step: int) -> None:
        """The checkpoint after ``step`` (every rank's RNG, sampler and window gathered; rank 0 writes)."""
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        states = gather_objects({"rng": rng, "sampler": self.pseudo.state_dict(), "window": self.window.cpu()})
        with deferred_signals():  # a SIGTERM now comes after the checkpoint and the step it names
            if self.rank == 0 and self.out_dir is not None:
                atomic_save(self.checkpoint(step, states), os.path.join(self.out_dir, CHECKPOINT_NAME))
                _write_jsonl(os.path.join(self.out_dir, "log.jsonl"), self.history)
            self.saved_step = step if self.ckpt_path is not None else None  # in memory: nothing kept

    def checkpoint(self, step: int, states: list[Any]) -> dict[str, Any]:
        """What checkpoint.pt holds after ``step``: everything a resume needs to continue bit for bit."""
        return {
            "format": FORMAT,
            "step": step,
            "total_steps": self.total,
            "world_size": self.world,
            "config": dataclasses.asdict(self.cfg),
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "metadata": dict(self.metadata),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "sampler": [s["sampler"] for s in states],
            "rng": [s["rng"] for s in states],
            "history": self.history,
            "window": [s["window"] for s in states],
            "data": self.data_record,
            "resolved": _resolved(self.cfg),
            "scaler": self.scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
        }

    def interrupted(self, err: KeyboardInterrupt) -> Interrupted:
        """Ctrl-C (or a signal turned into KeyboardInterrupt): the bar closed, one line on what is kept."""
        if self.bar is not None:
            self.bar.close()
        kept = (
            f"the last checkpoint (step {self.saved_step}) is kept in {self.ckpt_path}; continue with --resume "
            "(resume=True)"
            if self.saved_step
            else "no checkpoint was written"
        )
        return Interrupted(f"interrupted{f' by {err}' if str(err) else ''}; {kept}")


def _skipped(dataset: Dataset, world: int, device: torch.device) -> int:
    """Distinct unreadable images met by any rank (ImageFolder marks them; other datasets have none)."""
    mask_fn = getattr(dataset, "skipped_mask", None)
    if mask_fn is None:
        return 0
    mask = mask_fn().to(device=device, dtype=torch.uint8)
    if world > 1:
        dist.all_reduce(mask, op=dist.ReduceOp.MAX)  # the union of what each rank met
    return int(mask.sum().item())


# recipe.save_atomic was another name for io.atomic_save: the old name still works, with a warning.
__getattr__ = renamed_getattr(__name__, {"save_atomic": "samnorm.utils.io:atomic_save"})
