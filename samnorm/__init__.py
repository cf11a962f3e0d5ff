"""samnorm: sharpness-aware fine-tuning (SAM on normalization layers) for OOD detection.

Example:
    >>> import torch, samnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> opt = samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5)
"""

from . import select
from .optim import SAM, disable_running_stats
from .select import Selection, all_params, by_name, by_type, norm_layers, register_norm_type

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "Selection",
    "all_params",
    "by_name",
    "by_type",
    "disable_running_stats",
    "norm_layers",
    "register_norm_type",
    "select",
]
