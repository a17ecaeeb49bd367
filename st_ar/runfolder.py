"""Output folders that commands write into: checked writable before any work starts, and errors
from the file system turned into one line that names the folder and what to do.

    out = prepare_output_dir(args.out, "--out")   # creates it, or says why it cannot be written
"""

from __future__ import annotations

import errno
import os
import re
import uuid


class OutputFolderError(ValueError):
    """A folder a command must write into cannot be created or written; the message says why."""


def prepare_output_dir(path: str | os.PathLike, setting: str = "output folder") -> str:
    """Create ``path`` (and its parents) and check that a file can be written in it.

    ``setting`` names where the folder came from (``--out``, ``train.out_dir``) so the error says
    what to change. Returns the path as a string.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{uuid.uuid4().hex}")
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise OutputFolderError(
            f"cannot write to {setting} {path}: {describe_os_error(e, path)}; "
            f"choose another {setting} or fix the folder's permissions"
        ) from None
    return path


def describe_os_error(e: OSError, where: str | os.PathLike | None = None) -> str:
    """A short phrase for a file-system error: 'no space left on <folder>', 'permission denied', ..."""
    place = os.fspath(where) if where is not None else e.filename
    if e.errno == errno.ENOSPC:
        return f"no space left on {os.path.dirname(os.path.abspath(place)) if place else 'the device'}"
    if e.errno == errno.ENOTDIR:
        return f"a part of {place} is a file, not a folder"
    if e.errno == errno.EEXIST and place and not os.path.isdir(place):
        return f"{place} is a file, not a folder"
    reason = e.strerror or type(e).__name__
    if e.filename and os.fspath(e.filename) != place:
        reason += f" ({e.filename})"
    return reason.lower() if reason[:1].isupper() and reason[1:2].islower() else reason


class FolderInUse(ValueError):
    """Another process holds the lock of a run or output folder."""


LOCK_NAME = ".lock"


class FolderLock:
    """An exclusive lock on a folder for as long as a process works in it.

    ``flock`` on ``FOLDER/.lock``: the kernel drops it when the holder exits, however it exits
    (``kill -9`` included), so a stale file never blocks the next run. The file holds the holder's
    PID, which the refusal names. Where ``fcntl`` does not exist (Windows) nothing is locked.
    """

    def __init__(self, folder: str | os.PathLike, setting: str = "folder"):
        self.folder, self.setting = os.fspath(folder), setting
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self  # already held by this object
        try:
            import fcntl
        except ImportError:
            return self
        path = os.path.join(self.folder, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(
                f"{self.folder} is in use by another process (PID {holder}); wait for it to finish or stop it, "
                f"or choose another {self.setting}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock; the file stays for the next holder
            self._fd = None

    close = release  # for contextlib.closing: hold a lock taken later, release it on exit

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# the suffix our atomic writers give their temporary files: ".tmp-" and a uuid4 hex
TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{32}$")


def remove_stale_temp_files(*folders: str | os.PathLike) -> list[str]:
    """Delete the temporary files that an interrupted atomic write left in ``folders``.

    Call it only while holding the folder's lock: then no live writer of ours owns them.
    """
    removed = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if TEMP_NAME.search(name):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    os.unlink(path)
                    removed.append(path)
    return removed


def lock_run_folder(folder: str | os.PathLike, setting: str, info) -> FolderLock:
    """Create ``folder``, check it is writable and lock it, on the main process only (``info`` is the
    run's DistInfo); every rank learns the outcome, so all of them refuse together. Release the
    returned lock when the work is done (the other ranks get one that holds nothing)."""
    from .distributed import broadcast_from_main

    lock, error = FolderLock(folder, setting), None
    if info.is_main:
        try:
            prepare_output_dir(folder, setting)
            lock.acquire()
        except (OutputFolderError, FolderInUse) as e:
            error = (type(e).__name__, str(e))
    error = broadcast_from_main(error, info)
    if error is not None:
        raise {"OutputFolderError": OutputFolderError, "FolderInUse": FolderInUse}[error[0]](error[1])
    return lock
