"""The one home of the process's place in ``torch.distributed`` (rank, world size), and of the launcher's
environment variables for code that runs before the process group exists.

Nothing here imports torch: a process group exists only if ``torch.distributed`` was imported and
initialised, so the CLI's fast paths (``--help``, argument errors) can ask for the rank for free.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

__all__ = ["env_rank", "gather_objects", "is_main_process", "leave_process_group", "rank_world"]


def _group() -> Any:
    """``torch.distributed`` if its default process group is initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one.

    Example:
        >>> rank_world()
        (0, 1)
    """
    dist = _group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def env_rank() -> int:
    """The rank a launcher (torchrun) gave this process in ``RANK``, 0 without one: for what runs before
    ``init_process_group`` (argument checks, the first messages).

    Example:
        >>> import os
        >>> env_rank() == int(os.environ.get("RANK", "0"))
        True
    """
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (of the process group if one is initialised, else of the launcher): the process
    that writes files and prints.

    Example:
        >>> is_main_process()
        True
    """
    dist = _group()
    return (dist.get_rank() if dist is not None else env_rank()) == 0


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``all_gather_object``); ``[obj]`` without a process group.

    Example:
        >>> gather_objects({"step": 3})
        [{'step': 3}]
    """
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def leave_process_group(timeout_s: float = 60.0) -> None:
    """Wait for every rank (at most ``timeout_s``), then destroy the default process group; a no-op
    without one. Registered at exit by the CLI.

    Why the wait: a rank that tears its group down while a peer still finishes the last collective can
    take the peer down with it (gloo aborts the process: "terminate called without an active
    exception"). A peer that crashed or hangs cannot make this one hang: the gloo barrier is bounded
    by ``timeout_s`` and its error is dropped, the group is destroyed either way.

    Example:
        >>> leave_process_group()  # no process group here: nothing to do
    """
    dist = _group()
    if dist is None:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # a peer is gone or late: leave anyway
    dist.destroy_process_group()
