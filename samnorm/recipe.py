"""Deprecated: moved to :mod:`samnorm.train.recipe` (``evaluate_datasets``, ``Evaluation``: to
:mod:`samnorm.ood.sharded`; ``save_atomic`` is :func:`samnorm.utils.io.atomic_save`); importing a name
from here warns (``DeprecationWarning``)."""

from samnorm.utils.deprecation import moved_module_getattr

__getattr__ = moved_module_getattr(
    __name__,
    "samnorm.train.recipe",
    {
        "evaluate_datasets": "samnorm.ood.sharded",
        "Evaluation": "samnorm.ood.sharded",
        "save_atomic": "samnorm.utils.io:atomic_save",
    },
)
