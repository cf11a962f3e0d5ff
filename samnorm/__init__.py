"""samnorm: sharpness-aware fine-tuning (SAM on normalization layers) for OOD detection.

Names load on first use (PEP 562), so ``import samnorm`` and ``samnorm --help`` stay fast; nothing
here imports timm or torchvision.

Example:
    >>> import torch, samnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> opt = samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from samnorm.utils.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "SAM": "sam.optimizer",
    "disable_running_stats": "sam.optimizer",
    "Selection": "select",
    "all_params": "select",
    "by_name": "select",
    "by_type": "select",
    "norm_layers": "select",
    "register_norm_type": "select",
    "GSAM": "sam.variants",
    "IntervalSAM": "sam.variants",
    "LookSAM": "sam.variants",
    "OnePassSAM": "sam.variants",
}
_SUBMODULES = {
    "data",
    "demo",
    "diagnostics",
    "distributions",
    "figures",
    "integrations",
    "io",
    "losses",
    "models",
    "nn_utils",
    "ood",
    "optim",
    "plots",
    "recipe",
    "sam",
    "select",
    "train",
    "utils",
    "variants",
    "viz",
}

__all__ = [
    "GSAM",
    "SAM",
    "IntervalSAM",
    "LookSAM",
    "OnePassSAM",
    "Selection",
    "__version__",
    "all_params",
    "by_name",
    "by_type",
    "disable_running_stats",
    "norm_layers",
    "register_norm_type",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .sam.optimizer import SAM, disable_running_stats
    from .sam.variants import GSAM, IntervalSAM, LookSAM, OnePassSAM
    from .select import Selection, all_params, by_name, by_type, norm_layers, register_norm_type


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)
