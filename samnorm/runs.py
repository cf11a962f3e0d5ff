"""The life of a run's output folder: one run at a time, signals as Ctrl-C, results swapped in as a set.

Every ``samnorm`` command that writes goes through this module (:func:`samnorm.cli.main` declares
each command's output and input folders in a :class:`RunSpec`), and so does
:func:`samnorm.train.recipe.finetune` with an ``output_dir``:

* :func:`check_outside`: an output inside an input folder (or one of its sub-folders, links
  resolved) is refused before any work; its files would be read as images by the next run.
* :func:`hold`: an exclusive ``fcntl.flock`` on ``FOLDER/.samnorm.lock`` for the whole run, with the
  holder's pid, host and command written in it. A second run on the folder fails at once with
  :class:`FolderBusy`, naming the holder. A lock file left by a process that died (``kill -9``, a
  power cut) is no longer locked: the next run names the dead holder and takes it over.
  Temporary files of dead writers in the folder are deleted then.
* :func:`handle_signals`: SIGTERM (Slurm, Kubernetes) and SIGHUP (a closed terminal) raise
  :class:`Signalled`, a ``KeyboardInterrupt``, as Ctrl-C does; :func:`exit_status` gives the
  conventional ``128 + signal number`` (130 SIGINT, 129 SIGHUP, 143 SIGTERM). Inside
  :func:`deferred_signals` (a checkpoint being written) a signal waits until the block ends.
  SIGXFSZ is ignored, so that a file-size limit is a :class:`samnorm.utils.io.WriteError` (EFBIG), not a
  core dump.
* :func:`result_set`: the files of one result (evaluate's tables and scores, diagnose's figures, the
  demo's report) are written in full as temporary files first; only then are they renamed into
  place, and ``COMMAND.manifest.json`` is written last, naming the run and each file's size and
  SHA-256. A failed write leaves the previous set and its manifest untouched; a set without a
  manifest that matches it is incomplete. Each command has its own set: ``evaluate`` and ``diagnose``
  may share a folder.

Nothing here imports torch.

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with hold(out, "example"), result_set(out, "example"):
    ...     _ = atomic_write(os.path.join(out, "a.txt"), "hello")
    >>> sorted(read_manifest(out, "example")["files"])
    ['a.txt']
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from samnorm.utils.io import WriteError, atomic_write, remove_stale_temps, staged

__all__ = [
    "EXIT_IOERR",
    "LOCK_NAME",
    "FolderBusy",
    "RunSpec",
    "Signalled",
    "WriteError",
    "check_outside",
    "deferred_signals",
    "ensure_folder",
    "exit_status",
    "handle_signals",
    "hold",
    "manifest_name",
    "read_manifest",
    "result_set",
    "signals_blocked",
    "worker_ignores_signals",
]

EXIT_IOERR = 74
"""Exit status of a failed write (disk full, file-size limit, read-only folder): sysexits.h's ``EX_IOERR``."""
LOCK_NAME = ".samnorm.lock"
"""The lock file a run holds in its output folder (the holder's pid and host in it)."""


class FolderBusy(ValueError):
    """Another run holds the output folder's lock.

    Example:
        >>> isinstance(FolderBusy("x"), ValueError)
        True
    """


class Signalled(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised where the program was, as Ctrl-C is.

    Example:
        >>> err = Signalled(signal.SIGTERM)
        >>> str(err), exit_status(err)
        ('SIGTERM', 143)
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class RunSpec:
    """Which of a command's parsed arguments is its output and which are its inputs.

    ``output``: the argparse destination of the output folder (of the output file when ``file``);
    ``inputs``: option name -> destination, whose values are a folder, ``None``, or a list of
    folders or of ``(name, folder)`` pairs; ``option``: the output's option name in messages.

    Example:
        >>> RunSpec("output", {"--train": "train"}).option
        '--output'
    """

    output: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    option: str = "--output"
    file: bool = False


# ------------------------------------------------------------------ folders
def ensure_folder(path: str, option: str = "--output") -> str:
    """Create ``path`` (and its parents) and check that files can be created in it; ``ValueError`` if not.

    Example:
        >>> ensure_folder("/proc/samnorm-test", "--cache-dir")
        Traceback (most recent call last):
        ...
        ValueError: --cache-dir /proc/samnorm-test: cannot create the folder (No such file or directory)
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} is a file, not a folder: name a folder for the results")
    try:
        os.makedirs(path, exist_ok=True)
        # a real file, not os.access: that one says yes to root on a read-only file system
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        what = "cannot create the folder" if not os.path.isdir(path) else "cannot create files in it"
        raise ValueError(f"{option} {path}: {what} ({err.strerror or err})") from err
    return path


def _folders(value: Any) -> list[str]:
    """The folders an argument names: a path, None, or a list of paths or of (name, path) pairs."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [p for item in value for p in _folders(item[1] if isinstance(item, tuple) else item)]


def check_outside(output: str, inputs: Mapping[str, Any], option: str = "--output") -> None:
    """Refuse an ``output`` inside an input folder or one of its direct sub-folders (class folders,
    which may be links elsewhere), links resolved: the next run would read its files as images.

    Example:
        >>> root = tempfile.mkdtemp()
        >>> check_outside(os.path.join(root, "out"), {"--train": root})
        Traceback (most recent call last):
        ...
        ValueError: --output ... is inside --train ...: choose an output folder outside it (its files would be read ...
    """
    real = os.path.realpath(output)
    for name, value in inputs.items():
        for folder in _folders(value):
            try:
                subs = [e.path for e in os.scandir(folder) if e.is_dir()]
            except OSError:  # missing or unreadable: the command's own check names it
                subs = []
            for candidate in [folder, *subs]:
                inside = os.path.realpath(candidate)
                if os.path.commonpath([real, inside]) == inside:
                    raise ValueError(
                        f"{option} {output} is inside {name} {folder}: choose an output folder "
                        "outside it (its files would be read as images on the next run)"
                    )


# ------------------------------------------------------------------ the lock
_HELD: dict[str, list[Any]] = {}  # lock file -> [fd, depth]: a process may enter its own lock again


def _lock_path(output: str, file: bool) -> str:
    if file:
        head, tail = os.path.split(os.path.abspath(output))
        return os.path.join(head, f".{tail}{LOCK_NAME}")
    return os.path.join(output, LOCK_NAME)


def _describe(record: str) -> str:
    try:
        info = json.loads(record)
        return f"samnorm {info['command']} (pid {info['pid']} on {info['host']}, since {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another samnorm process (it has not written its pid yet)"


def _open_locked(path: str, option: str, output: str) -> int:
    """An fd holding the exclusive lock on ``path``; FolderBusy names the holder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise FolderBusy(
                f"{option} {output} is in use by {holder}: wait for it to end, or choose another output"
            ) from None
        # the holder may have removed the file between our open and flock: lock the file now there
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold(
    output: str | os.PathLike[str],
    command: str,
    *,
    option: str = "--output",
    file: bool = False,
    say: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive lock of the run in ``output`` (a folder, or with ``file`` an output file)
    for the block; create the folder, which is removed again at the end if the run left it empty.

    Raises :class:`FolderBusy` while another process holds it. A lock file that a dead process left
    is taken over, and ``say`` (default: stderr) names that process.

    Example:
        >>> out = tempfile.mkdtemp()
        >>> with hold(out, "example"):
        ...     with hold(out, "example"):  # the same process may enter again
        ...         os.path.exists(os.path.join(out, LOCK_NAME))
        True
        >>> os.path.exists(os.path.join(out, LOCK_NAME))
        False
    """
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output)) if file else output
    created = not os.path.isdir(folder)
    ensure_folder(folder, option if not file else f"the folder of {option}")
    path = os.path.realpath(_lock_path(output, file))
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    fd = _open_locked(path, option, output)
    _HELD[path] = [fd, 1]
    try:
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if left.strip():  # a holder that ended without releasing: it was killed
            (say or (lambda text: print(text, file=sys.stderr, flush=True)))(
                f"{option} {output}: taking over the lock of {_describe(left)}, which ended without "
                "releasing it (killed?)"
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        for tmp in glob.glob(os.path.join(glob.escape(folder), "*.tmp-*")):  # writers killed mid-write
            remove_stale_temps(tmp.rsplit(".tmp-", 1)[0])
        yield
    finally:
        del _HELD[path]
        # removed while still locked: a process that opened the old file sees it gone and retries
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty: a run refused before it wrote anything leaves nothing


# ------------------------------------------------------------------ signals
_deferring = 0
_pending: list[int] = []
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _in_finalizer(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _raise(signum: int, frame: Any) -> None:
    if _deferring:
        _pending.append(signum)
    elif _in_finalizer(frame):
        # Python drops an exception raised in a __del__ (e.g. a DataLoader's, shutting its workers down
        # between epochs): deliver the signal again once the finalizer has ended
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
    else:
        raise Signalled(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Signalled` and SIGXFSZ is ignored;
    the previous handlers come back after it. Outside the main thread it does nothing (Python only
    lets that thread set handlers).

    Example:
        >>> with handle_signals():
        ...     signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        True
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted: dict[int, Callable[[int, Any], None] | signal.Handlers] = {
        getattr(signal, n): _raise for n in _SIGNALS if hasattr(signal, n)
    }
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    before = {s: signal.signal(s, h) for s, h in wanted.items()}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A signal that arrives inside the block (under :func:`handle_signals`) is raised when it ends,
    so that e.g. a checkpoint and the step it records are written together.

    Example:
        >>> with deferred_signals():
        ...     pass
    """
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Signalled(signum)


def worker_ignores_signals(worker_id: int) -> None:
    """``worker_init_fn`` of samnorm's DataLoaders: a worker ignores SIGINT and SIGHUP sent to the whole
    process group (Ctrl-C in a terminal) and ends quietly (exit 0) on SIGTERM (Slurm's SIGTERM to a job
    step); the main process handles them, instead of reporting each killed worker with a traceback.
    SIGTERM is not ignored: multiprocessing ends a leftover worker with it when the main process exits
    (an ignoring worker kept that exit waiting forever).

    A signal that reached the worker while it was started inside :func:`signals_blocked` is dropped.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> _ = DataLoader(range(4), num_workers=0, worker_init_fn=worker_ignores_signals)
    """
    handled = [getattr(signal, n) for n in _SIGNALS if hasattr(signal, n)]
    for signum in handled:
        signal.signal(signum, _worker_exit if signum == signal.SIGTERM else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)


def _worker_exit(signum: int, frame: Any) -> None:
    """A DataLoader worker's SIGTERM: exit status 0, so that the main process reports no killed worker."""
    os._exit(0)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block ends (``pthread_sigmask``): around starting
    DataLoader workers, where a signal would otherwise land in fork handlers that drop exceptions, or
    kill a worker before :func:`worker_ignores_signals` runs in it.

    Example:
        >>> with signals_blocked():
        ...     pass
    """
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, n) for n in _SIGNALS if hasattr(signal, n)])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def exit_status(err: BaseException) -> int:
    """``128 + n`` for the signal ``n`` behind ``err`` (found along its chain); 130 for a plain Ctrl-C.

    Example:
        >>> exit_status(KeyboardInterrupt()), exit_status(Signalled(signal.SIGHUP))
        (130, 129)
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, Signalled):
            return 128 + seen.signum
        seen = seen.__cause__ or seen.__context__
    return 128 + signal.SIGINT


# ------------------------------------------------------------------ result sets
def manifest_name(command: str) -> str:
    """The file name of ``command``'s manifest.

    Example:
        >>> manifest_name("evaluate")
        'evaluate.manifest.json'
    """
    return f"{command}.manifest.json"


def read_manifest(folder: str | os.PathLike[str], command: str) -> dict[str, Any] | None:
    """The manifest of ``command``'s result set in ``folder``, or None when the folder holds no complete
    set of it (no manifest, or a file that no longer has the size it records).

    Example:
        >>> read_manifest(tempfile.mkdtemp(), "evaluate") is None
        True
    """
    try:
        with open(os.path.join(folder, manifest_name(command)), encoding="utf-8") as f:
            manifest = json.load(f)
        sizes = {n: os.path.getsize(os.path.join(folder, n)) for n in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(sizes[n] != v["bytes"] for n, v in manifest["files"].items()):
        return None
    return manifest


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def result_set(folder: str | os.PathLike[str], command: str, info: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Write the files of one result into ``folder`` as a unit.

    Every :func:`samnorm.utils.io.atomic_write`/``atomic_save`` inside the block writes a temporary file;
    when the block ends without an error, the previous manifest of ``command`` is removed, the files are
    renamed into place, the previous set's files that this one does not have are removed, and
    :func:`manifest_name` (run id, command, time, ``info``, each file's size and SHA-256) is written
    last; signals wait until then. An error inside the block (a failed write, a signal) deletes the
    temporaries: the previous set stays, whole.

    Example:
        >>> out = tempfile.mkdtemp()
        >>> with result_set(out, "example"):
        ...     _ = atomic_write(os.path.join(out, "a.txt"), "one")
        >>> try:
        ...     with result_set(out, "example"):
        ...         _ = atomic_write(os.path.join(out, "a.txt"), "two")
        ...         raise OSError("disk full")
        ... except OSError:
        ...     pass
        >>> open(os.path.join(out, "a.txt")).read(), read_manifest(out, "example")["command"]
        ('one', 'example')
    """
    folder = os.fspath(folder)
    with staged() as pending:
        yield
        for target in pending:
            if os.path.dirname(os.path.abspath(target)) != os.path.abspath(folder):
                raise ValueError(f"result_set({folder!r}) wrote {target!r}, outside its folder")
        files = {
            os.path.basename(t): {"bytes": os.path.getsize(tmp), "sha256": _sha256(tmp)} for t, tmp in pending.items()
        }
        manifest_path = os.path.join(folder, manifest_name(command))
        previous = read_manifest(folder, command) or {"files": {}}
    with deferred_signals():  # every file written: swap the set in (the manifest, written last, is not staged)
        try:
            os.remove(manifest_path)  # from here until the new manifest, the folder holds no complete set
        except FileNotFoundError:
            pass
        except OSError as err:
            raise WriteError(err.errno or 0, manifest_path) from err
        for target, tmp in pending.items():
            os.replace(tmp, target)
        for name in set(previous["files"]) - set(files):
            if os.path.basename(name) == name:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))
        atomic_write(
            manifest_path,
            json.dumps(
                {
                    "run": uuid.uuid4().hex,
                    "command": command,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    **({"info": dict(info)} if info else {}),
                    "files": files,
                },
                indent=2,
            ),
        )
