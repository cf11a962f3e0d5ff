"""Deprecated: moved to :mod:`samnorm.sam.optimizer` (``SAM``, ``disable_running_stats``) and
:mod:`samnorm.sam.functional` (``perturb_``, ``restore_``, ...); importing a name from here warns
(``DeprecationWarning``)."""

from samnorm.utils.deprecation import moved_module_getattr

_FUNCTIONAL = ("perturb_", "restore_", "all_reduce_mean", "is_distributed")
__getattr__ = moved_module_getattr(
    __name__,
    "samnorm.sam.optimizer",
    {**dict.fromkeys(_FUNCTIONAL, "samnorm.sam.functional"), "check_nonnegative": "samnorm.sam.settings"},
)
