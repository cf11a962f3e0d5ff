"""Backbones for samnorm: T2T-ViT (written here, registered with timm) and any timm model by name.

Importing this package imports timm (about 4 s) and registers ``t2t_vit_7/10/12/14/19/24`` in timm's
registry, so ``timm.create_model("t2t_vit_24")`` works afterwards. ``import samnorm`` does not import
it; use it when you need a model.

Example:
    >>> import samnorm.models
    >>> model = samnorm.models.create_model("t2t_vit_7", num_classes=5, img_size=32, in_chans=1)
    >>> type(model).__name__
    'T2TViT'
"""

from samnorm.models.loading import (
    DEFAULT_MODEL,
    check_state_dict,
    create_model,
    extract_state_dict,
    load_checkpoint,
    load_state_dict,
    read_checkpoint,
)
from samnorm.models.t2t_vit import (
    T2TViT,
    t2t_vit_7,
    t2t_vit_10,
    t2t_vit_12,
    t2t_vit_14,
    t2t_vit_19,
    t2t_vit_24,
)

__all__ = [
    "DEFAULT_MODEL",
    "T2TViT",
    "check_state_dict",
    "create_model",
    "extract_state_dict",
    "load_checkpoint",
    "load_state_dict",
    "read_checkpoint",
    "t2t_vit_7",
    "t2t_vit_10",
    "t2t_vit_12",
    "t2t_vit_14",
    "t2t_vit_19",
    "t2t_vit_24",
]
