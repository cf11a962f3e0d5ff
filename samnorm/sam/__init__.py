"""The SAM optimizer's core, in small modules: the step protocol (:mod:`.protocol`), the
GradScaler handshake (:mod:`.amp`), the non-finite bookkeeping (:mod:`.nonfinite`), the registry of
SAM kinds (:mod:`.registry`), GSAM (:mod:`.gsam`) and FSDP2 (:mod:`.fsdp`). :class:`samnorm.SAM`
(``samnorm.optim``) orchestrates them.
"""
