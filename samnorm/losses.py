"""Deprecated: moved to :mod:`samnorm.train.losses`; importing a name from here warns (``DeprecationWarning``)."""

from samnorm.utils.deprecation import moved_module_getattr

__getattr__ = moved_module_getattr(__name__, "samnorm.train.losses")
