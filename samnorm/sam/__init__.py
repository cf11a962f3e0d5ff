"""The SAM optimizer's core, in small modules: :class:`samnorm.SAM` (:mod:`.optimizer`) orchestrates
the arithmetic over tensor lists (:mod:`.functional`), the step protocol (:mod:`.protocol`), the
GradScaler handshake (:mod:`.amp`), the non-finite bookkeeping (:mod:`.nonfinite`), the registry of
SAM kinds (:mod:`.registry`) and FSDP2 (:mod:`.fsdp`); the cheaper schedules and GSAM are
:mod:`.variants` over the base class of :mod:`.variant`; the private torch internals it relies on
live in ``_compat``.
"""

__all__: list[str] = []  # the public names live in the submodules (and in samnorm itself)
