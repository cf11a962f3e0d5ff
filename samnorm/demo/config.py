"""The demo's settings: :class:`DemoConfig`, per-backbone defaults, the cache folder.

Imports neither torch nor timm, so ``samnorm demo --help`` stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samnorm.validate import MAX_IMAGE_SIDE, MAX_SEED, SPECS, Spec, check, check_fields

__all__ = [
    "ARMS",
    "BACKBONE_DEFAULTS",
    "PSEUDO_OOD_TRANSFORMS",
    "SCORER_NAMES",
    "SELECTION",
    "DemoConfig",
    "default_cache_dir",
]

#: Fine-tuning arms and their display names; "pretrained" is the common starting point.
ARMS: dict[str, str] = {"sam_on": "SAM-ON", "sgd": "SGD", "sam": "full SAM"}
#: Scorers of the report, by display name, as understood by samnorm.ood.make_scorer.
SCORER_NAMES: tuple[str, ...] = ("MSP", "MaxLogit", "Energy", "ODIN", "ReAct", "GradNorm", "RankFeat")
#: The names of samnorm.data.pseudo_ood.TRANSFORMS (a test keeps the two lists equal; this module
#: must not import torch).
PSEUDO_OOD_TRANSFORMS: tuple[str, ...] = ("jigsaw", "patch_mix", "rotate", "blur", "noise", "fourier")
_CACHE_FORMAT = 2  # bump when pretraining code changes what a cached checkpoint contains

#: Per-backbone defaults of the DemoConfig fields left at None (see SELECTION for the fine-tuning lr).
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnetv2": {
        "pretrain_optimizer": "sgd",
        "pretrain_lr": 0.1,
        "pretrain_epochs": 8,
        "lr": 0.1,
        "ood_loss": "uniform",
        "ood_weight": 0.25,
        "rho_sam_on": 0.1,
        "adaptive_sam_on": True,
        "rho_sam": 0.1,
        "adaptive_sam": False,
    },
    "t2t_vit": {
        "pretrain_optimizer": "adamw",
        "pretrain_lr": 2e-3,
        "pretrain_epochs": 15,
        "lr": 0.03,
        "ood_loss": "uniform",
        "ood_weight": 0.5,
        "rho_sam_on": 0.1,
        "adaptive_sam_on": True,
        "rho_sam": 0.02,
        "adaptive_sam": False,
    },
}

#: How the fine-tuning defaults were chosen (kept with the code so the report can quote it).
SELECTION = """\
Fine-tuning defaults were chosen with `samnorm demo --select` (samnorm.demo.select_hyperparameters),
on validation data only: ID = the 500-digit validation split (never trained on); OOD = a held-out real
set (patches of scikit-image's coins, moon, clock, page, text and cell pictures, in no test table).
Criterion: mean FPR95 of MSP and Energy on the held-out set, averaged over seeds 100 and 101 (not the
report's seeds), among settings that keep validation accuracy within 1 point of the pretrained model's.
Step 1, on the SGD arm (so the baseline gets its best setting): learning rate {0.03, 0.05, 0.1} x loss
weight {0.1, 0.25, 0.5} x pseudo-OOD loss {uniform-target CE, energy margin}; chosen lr 0.1, uniform
CE, weight 0.25. Step 2, with those settings: SAM-ON rho {0.05, 0.1, 0.2, 0.3} and ASAM-ON rho
{0.1, 0.2, 0.5, 1}, chosen ASAM-ON rho 0.1; full SAM rho {0.02, 0.05, 0.1, 0.2}, chosen 0.1.
Learning rates stop at the pretraining peak (0.1); the pseudo-OOD transforms are the sampler's six
defaults (not varied). The test OOD sets were never used. This selection ran with the demo's former
fine-tuning loop (before it moved onto samnorm.train.recipe.finetune); benchmarks/ablation.py repeats the
comparison through the recipe, over two pretrained backbones, with intervals (benchmarks/RESULTS.md).
T2T-ViT (`--backbone t2t_vit`), same protocol: pretraining with AdamW for 15 epochs; grid lr
{0.003, 0.01, 0.03} x weight {0.1, 0.25, 0.5}, uniform CE; chosen lr 0.03 and weight 0.5, ASAM-ON
rho 0.1, full SAM rho 0.02."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does, with defaults that run in about a minute on a 2-core CPU.

    Attributes:
        backbone: ``"resnetv2"`` (compact BiT-style ResNetV2) or ``"t2t_vit"`` (small T2T-ViT).
        out_dir: folder for ``report.md``, ``report.json`` and the PNG plots.
        cache_dir: where pretrained weights are cached (default: :func:`default_cache_dir`).
        seeds: fine-tuning seeds; each seed fixes the data order and the pseudo-OOD images, shared
            by all arms (the pairing of the paired differences).
        arms: subset of ``ARMS``, in the order of the table.
        n_train, n_test: caps on the ID train (3,500) and test (1,000) splits; ``None`` = all.
        n_ood: images per OOD set (the LFW faces stop at 100).
        ood_sets: names from :data:`samnorm.data.offline.OOD_SETS`.
        scorers: display names from ``SCORER_NAMES``.
        image_size: side of the images fed to the model; ``None``: 28 (MNIST's own) for the ResNetV2,
            42 for the T2T-ViT, whose tokens-to-token module downsamples by 16 (a 3x3 token grid).
        widths, depths, stem_width, groups: the ResNetV2's stage widths and blocks per stage, stem
            width and GroupNorm groups; the T2T-ViT derives its size from them.
        pretrain_epochs, pretrain_lr, pretrain_optimizer, batch_size: pretraining (one-cycle
            schedule, random 2-pixel shifts; ``"sgd"``: Nesterov momentum 0.9, ``"adamw"``: weight
            decay 0.05). ``None`` takes the backbone's default (``BACKBONE_DEFAULTS``).
        pretrain_seed: seed of the initial weights and of pretraining's data order and shifts
            (the ID split and the OOD images stay those of ``data_seed``).
        epochs, lr, momentum, weight_decay: fine-tuning through :func:`samnorm.train.recipe.finetune`
            (SGD base optimizer, cosine schedule).
        ood_loss, ood_weight, ood_ratio: the pseudo-OOD term of :class:`samnorm.train.losses.SFTLoss`, its
            weight and the pseudo-OOD images per ID image in a batch (``0`` turns the term off).
        m_in, m_out: energy-margin loss margins (``ood_loss="energy"`` only).
        transforms: pseudo-OOD transforms of :class:`samnorm.data.pseudo_ood.PseudoOOD`.
        rho_sam_on, rho_sam: SAM radius of the SAM-ON and full-SAM arms.
        adaptive_sam_on, adaptive_sam: use the adaptive ascent (ASAM, ``eta=0.01``) in that arm.
        data_seed: seed of the ID split and the OOD patches.
        progress: progress bars (to stderr).
        plots: write the PNG figures (needs matplotlib).
        plot_scorers: scorers whose distributions are plotted, pretrained vs each arm's first seed.
        quiet: do not print the table at the end.

    Example:
        >>> DemoConfig().lr, DemoConfig(backbone="t2t_vit").lr
        (0.1, 0.03)
    """

    backbone: str = "resnetv2"
    out_dir: str = "samnorm_demo"
    cache_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ("sam_on", "sgd", "sam")
    n_train: int | None = None
    n_test: int | None = None
    n_ood: int = 500
    ood_sets: tuple[str, ...] = ("textures", "photos", "faces", "noise")
    scorers: tuple[str, ...] = SCORER_NAMES
    image_size: int | None = None
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    stem_width: int = 16
    groups: int = 8
    pretrain_epochs: int | None = None
    pretrain_lr: float | None = None
    pretrain_optimizer: str | None = None
    pretrain_seed: int = 0
    batch_size: int = 64
    epochs: int = 1
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    ood_loss: str | None = None
    ood_weight: float | None = None
    ood_ratio: float = 1.0
    m_in: float = -10.0
    m_out: float = -4.0
    transforms: tuple[str, ...] = PSEUDO_OOD_TRANSFORMS
    rho_sam_on: float | None = None
    rho_sam: float | None = None
    adaptive_sam_on: bool | None = None
    adaptive_sam: bool | None = None
    data_seed: int = 0
    progress: bool = True
    plots: bool = True
    plot_scorers: tuple[str, ...] = ("MSP", "Energy", "RankFeat")
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_DEFAULTS:
            raise ValueError(f"backbone must be one of {list(BACKBONE_DEFAULTS)}, got {self.backbone!r}")
        for name, value in BACKBONE_DEFAULTS[self.backbone].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: fill the backbone's default once
        if self.ood_loss not in ("uniform", "energy", "maxlogit"):
            raise ValueError(f"ood_loss must be 'uniform', 'energy' or 'maxlogit', got {self.ood_loss!r}")
        if not self.transforms or any(t not in PSEUDO_OOD_TRANSFORMS for t in self.transforms):
            raise ValueError(
                f"transforms must be names from {list(PSEUDO_OOD_TRANSFORMS)}, got {list(self.transforms)}"
            )
        if self.pretrain_optimizer not in ("sgd", "adamw"):
            raise ValueError(f"pretrain_optimizer must be 'sgd' or 'adamw', got {self.pretrain_optimizer!r}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be distinct names from {list(ARMS)}, got {list(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, at least one, got {list(self.seeds)}")
        bad = [s for s in self.scorers if s not in SCORER_NAMES]
        if bad or not self.scorers:
            raise ValueError(f"scorers must be names from {list(SCORER_NAMES)}, got {list(self.scorers)}")
        if any(s not in self.scorers for s in self.plot_scorers):
            raise ValueError(
                f"plot_scorers must be among the scorers {list(self.scorers)}, got {list(self.plot_scorers)}"
            )
        if not self.ood_sets:
            raise ValueError("ood_sets is empty: name at least one of textures, photos, faces, noise")
        # types, ranges, finiteness: samnorm.validate's one table (epochs: whole ones, unlike the recipe's)
        check_fields(
            self,
            (
                "pretrain_epochs",
                "batch_size",
                "n_ood",
                "stem_width",
                "groups",
                "lr",
                "pretrain_lr",
                "momentum",
                "weight_decay",
                "ood_ratio",
                "m_in",
                "m_out",
                "pretrain_seed",
                "data_seed",
            ),
        )
        check_fields(
            self, ("epochs", "seeds"), {"epochs": Spec(int, low=1), "seeds": Spec(int, 0, MAX_SEED, each=True)}
        )
        if self.image_size is not None:
            check("image_size", self.image_size, Spec(int, low=16, high=MAX_IMAGE_SIDE))
        for name in ("n_train", "n_test"):
            check(name, getattr(self, name), Spec(int, low=10, optional=True))
        if len(self.widths) != len(self.depths) or len(self.widths) < 2:
            raise ValueError("widths and depths must have the same length, at least 2 stages")
        for name in ("ood_weight", "rho_sam_on", "rho_sam"):
            check(name, getattr(self, name), SPECS["rho"])
        object.__setattr__(self, "seeds", tuple(self.seeds))  # check_fields gave a list; a frozen config keeps tuples

    @property
    def size(self) -> int:
        """The image side the model sees (``image_size`` or the backbone's default)."""
        return self.image_size or (42 if self.backbone == "t2t_vit" else 28)

    def pretrain_key(self) -> dict[str, Any]:
        """What determines the pretrained weights (hashed into the cache file name).

        Example:
            >>> DemoConfig(pretrain_seed=1).pretrain_key() != DemoConfig().pretrain_key()
            True
        """
        return {
            "format": _CACHE_FORMAT,
            "backbone": self.backbone,
            "size": self.size,
            "widths": list(self.widths),
            "depths": list(self.depths),
            "stem_width": self.stem_width,
            "groups": self.groups,
            "epochs": self.pretrain_epochs,
            "lr": self.pretrain_lr,
            "optimizer": self.pretrain_optimizer,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "n_train": self.n_train,
            "data_seed": self.data_seed,
            "pretrain_seed": self.pretrain_seed,
        }


def default_cache_dir() -> Path:
    """``$SAMNORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/samnorm``, else ``~/.cache/samnorm``.

    Example:
        >>> default_cache_dir().name == "samnorm" or "SAMNORM_CACHE_DIR" in os.environ
        True
    """
    if os.environ.get("SAMNORM_CACHE_DIR"):
        return Path(os.environ["SAMNORM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "samnorm"
