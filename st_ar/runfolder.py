"""Output folders that commands write into: checked writable before any work starts, and errors
from the file system turned into one line that names the folder and what to do.

    out = prepare_output_dir(args.out, "--out")   # creates it, or says why it cannot be written

A full disk gets its own error, ``NoSpaceError`` (an OSError with errno ENOSPC), whose message names the
folder, says what was kept and what to do; ``write_json_atomic`` and ``atomic_save`` raise it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Callable
from typing import IO, Any

# Below this much free space after a failed write, the folder counts as full (torch reports a failed
# write without errno; a write that ran out of space leaves the disk at or near zero).
NEARLY_FULL_BYTES = 1 << 20
# torch's zip writer: "file write failed" (path target), "unexpected pos" (file object target)
_TORCH_WRITE_FAILED = re.compile(r"write failed|unexpected pos|no space left", re.IGNORECASE)


class OutputFolderError(ValueError):
    """A folder a command must write into cannot be created or written; the message says why."""


class NoSpaceError(OSError):
    """A write failed because the file system holding a folder is full; the message names the folder,
    says what was kept and what to do."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(errno.ENOSPC, message, None if path is None else os.fspath(path))

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return type(self), (self.strerror, self.filename)


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
        if not place:
            return "no space left on the device"
        place = os.path.abspath(place)
        return f"no space left on {place if os.path.isdir(place) else os.path.dirname(place)}"
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


# the suffix atomic_write gives its temporary files: ".tmp-" and a uuid4 hex
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
            error = e
    error = broadcast_from_main(error, info)
    if error is not None:
        raise error
    return lock


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes an ordinary user may still write in ``folder``'s file system; None where statvfs is unavailable."""
    try:
        st = os.statvfs(folder)
    except (AttributeError, OSError):
        return None
    return st.f_bavail * st.f_frsize


def megabytes(n: int | None) -> str:
    if n is None:
        return "? MB"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e6:.3f} MB"  # small files still show a size


def is_disk_full(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``exc`` is a write refused for want of space in ``folder``.

    An OSError says so by errno, also when it is the cause or context of another error. torch's zip writer
    turns a failed write into a RuntimeError without errno; for those the folder's free space decides, so
    call this before removing what the failed write left behind.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILED.search(str(exc)):
        free = free_bytes(folder)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def no_space_error(path: str | os.PathLike, written: int | None = None, existed: bool = False) -> NoSpaceError:
    """The error for a file at ``path`` that could not be written (the partial file already removed)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    size = f"more than {megabytes(written)}; " if written else ""
    kept = f"the previous {path} is intact" if existed else f"nothing was written to {path}"
    return NoSpaceError(
        f"no space left on {folder}: {os.path.basename(path)} did not fit ({size}{megabytes(free_bytes(folder))} "
        f"free); {kept}. Free space or choose another output folder, then run again",
        path,
    )


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """``write(file)`` into a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a crash leaves the old file or the new one, never half a file. On a full disk the temporary file is
    removed and NoSpaceError names the folder (the previous file at ``path`` is left as it was)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")  # TEMP_NAME
    existed = os.path.exists(path)
    try:
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # decide before removing the temporary file: its blocks are what filled the disk
        full = isinstance(e, (OSError, RuntimeError)) and is_disk_full(e, folder)
        written = os.path.getsize(tmp) if os.path.exists(tmp) else None
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise no_space_error(path, written, existed) from None
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """JSON through ``atomic_write``."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent), binary=False)
