"""Atomic file writes: a crash or a ``kill -9`` leaves either the old file or the new one, never half.

Every file samnorm writes for a run (checkpoints, logs, configs, results, scores) goes through
:func:`atomic_write` or :func:`atomic_save`: write a temporary file beside the target, fsync, then
``os.replace``. A process killed mid-write leaves a ``NAME.tmp-PID`` file behind;
:func:`remove_stale_temps` deletes those of dead processes on the next start.

An ``OSError`` while writing (disk full, a file-size limit, a read-only or forbidden folder), also one
that ``torch.save`` buried in a ``RuntimeError``, becomes a :class:`WriteError`: one line with the
errno's name and the path; the previous file is left as it was. Inside :func:`staged`, the renames
wait until the whole set is written (:func:`samnorm.runs.result_set` builds on it).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import glob
import os
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["WriteError", "atomic_save", "atomic_write", "remove_stale_temps", "staged"]

# target -> its written temporary file, while a staged() set is being written
_STAGE: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("samnorm_io_stage", default=None)


class WriteError(OSError):
    """Writing ``filename`` failed (``errno``: ENOSPC, EFBIG, EACCES, EROFS, ...); nothing half-written
    was left there, and the file's previous version (if any) is unchanged.

    Example:
        >>> import errno
        >>> str(WriteError(errno.ENOSPC, "out/checkpoint.pt"))
        'cannot write out/checkpoint.pt: ENOSPC (No space left on device); nothing was written there'
    """

    def __init__(self, code: int, path: str) -> None:
        name = errno.errorcode.get(code, f"errno {code}")
        kept = "its previous version is kept" if os.path.exists(path) else "nothing was written there"
        super().__init__(code, f"cannot write {path}: {name} ({os.strerror(code)}); {kept}")
        self.filename = path

    def __str__(self) -> str:
        return str(self.strerror)


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError in ``err``'s chain (``torch.save`` raises a RuntimeError from the OSError of the write)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def _atomic(path: str | os.PathLike[str], mode: str) -> Iterator[IO[Any]]:
    path = os.fspath(path)
    tmp = _tmp_name(path)
    stage = _STAGE.get()
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if stage is None:
            os.replace(tmp, path)
        else:
            stage[path] = tmp
    except Exception as err:
        cause = _os_error(err)
        if cause is None or isinstance(err, WriteError):
            raise
        raise WriteError(cause.errno, path) from err  # type: ignore[arg-type]
    finally:
        if os.path.exists(tmp) and (stage is None or stage.get(path) != tmp):
            os.remove(tmp)


@contextlib.contextmanager
def staged() -> Iterator[dict[str, str]]:
    """Hold back the renames of every atomic write inside the block: yields ``{target: temporary}``.

    The caller renames the temporaries once the block ends without an error (see
    :func:`samnorm.runs.result_set`); on an error they are deleted, so the targets stay as they were.

    Example:
        >>> import tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with staged() as pending:
        ...     _ = atomic_write(target, "new")
        >>> os.path.exists(target), list(pending) == [target]
        (False, True)
        >>> os.replace(pending[target], target)
    """
    if _STAGE.get() is not None:
        raise RuntimeError("staged() blocks do not nest: one result set at a time")
    pending: dict[str, str] = {}
    token = _STAGE.set(pending)
    try:
        yield pending
    except BaseException:
        for tmp in pending.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    finally:
        _STAGE.reset(token)


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
    import torch  # here, so that importing samnorm.utils.io stays free of torch

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
