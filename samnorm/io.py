"""Atomic file writes: a crash or a ``kill -9`` leaves either the old file or the new one, never half.

Every file samnorm writes for a run (checkpoints, logs, configs, results, scores) goes through
:func:`atomic_write` or :func:`atomic_save`: write a temporary file beside the target, fsync, then
``os.replace``. A process killed mid-write leaves a ``NAME.tmp-PID`` file behind;
:func:`remove_stale_temps` deletes those of dead processes on the next start.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["atomic_save", "atomic_write", "remove_stale_temps"]


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def _atomic(path: str | os.PathLike[str], mode: str) -> Iterator[IO[Any]]:
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> str:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically and return the path.

    Example:
        >>> import tempfile
        >>> p = atomic_write(os.path.join(tempfile.mkdtemp(), "a.json"), '{"x": 1}')
        >>> open(p).read()
        '{"x": 1}'
    """
    if not isinstance(data, (str, bytes)):
        raise TypeError(f"atomic_write writes str or bytes, got {type(data).__name__}: serialise it first")
    with _atomic(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return os.fspath(path)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> str:
    """``torch.save(obj)`` to ``path`` atomically and return the path.

    Example:
        >>> import tempfile, torch
        >>> p = atomic_save({"a": 1}, os.path.join(tempfile.mkdtemp(), "x.pt"))
        >>> torch.load(p)["a"]
        1
    """
    import torch  # here, so that importing samnorm.io stays free of torch

    with _atomic(path, "wb") as f:
        torch.save(obj, f)
    return os.fspath(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Delete the ``PATH.tmp-PID`` files that killed writers of ``path`` left; return their names.

    Temporary files of processes that are still running are kept (they may be writing now).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "x.pt.tmp-999999999"), "w").close()
        >>> [os.path.basename(p) for p in remove_stale_temps(os.path.join(d, "x.pt"))]
        ['x.pt.tmp-999999999']
    """
    removed = []
    for tmp in glob.glob(glob.escape(os.fspath(path)) + ".tmp-*"):
        suffix = tmp.rsplit(".tmp-", 1)[1]
        if suffix.isdigit() and int(suffix) != os.getpid() and not _alive(int(suffix)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            removed.append(tmp)
    return removed
