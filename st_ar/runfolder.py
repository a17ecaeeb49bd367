"""Output folders that commands write into: checked writable before any work starts, and errors
from the file system turned into one line that names the folder and what to do.

    out = prepare_output_dir(args.out, "--out")   # creates it, or says why it cannot be written
"""

from __future__ import annotations

import errno
import os
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
