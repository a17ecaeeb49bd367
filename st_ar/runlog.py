"""Scalars to TensorBoard and a JSON-lines file, from rank 0 only.

    log = RunLogger(run_dir, enabled=dist_info.is_main)
    log.scalars(step, {"loss/ar": 5.1, "lr": 1e-4})
    log.image(step, "samples", grid)  # (H, W, 3) uint8
    log.close()

``metrics.jsonl`` is always written (easy to read back in tests and scripts); TensorBoard event
files are written when the tensorboard package is installed.

A run resumed from a checkpoint at step S passes ``resume_step=S``: the lines a killed run logged
after S (steps it will now repeat) are dropped from metrics.jsonl, and TensorBoard hides its
events after S, so each step appears once.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from .runfolder import NoSpaceError, atomic_write, is_disk_full


class RunLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None:
            truncate_metrics(self.jsonl_path, resume_step)
        self.jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSON lines still hold everything
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step hides the events a killed run wrote after the checkpoint
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=purge)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._append(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)

    def _append(self, line: str) -> None:
        end = None
        try:
            end = self.jsonl.tell()  # every line so far is on disk: line buffering
            self.jsonl.write(line)
            self.jsonl.flush()
        except OSError as e:
            if not is_disk_full(e, os.path.dirname(self.jsonl_path)):
                raise
            with contextlib.suppress(OSError):  # its buffer still holds what did not fit
                self.jsonl.close()
            self.jsonl = None
            if end is not None:  # drop the part of the line that did fit, so the file reads line by line
                with open(self.jsonl_path, "r+b") as f:
                    f.truncate(end)
            raise NoSpaceError(
                f"no space left on {os.path.dirname(os.path.abspath(self.jsonl_path))}: could not append to "
                f"metrics.jsonl; the lines already in it are intact. Free space, then run again",
                self.jsonl_path,
            ) from None

    def image(self, step: int, tag: str, image) -> None:
        """An (H, W, 3) uint8 array to TensorBoard (the caller writes its own PNG)."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the lines of a metrics.jsonl whose step is <= ``step``; the file is replaced atomically.

    A line that does not parse (the last one, cut off by a kill) is dropped too.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return  # nothing to drop: leave the file untouched
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept)), binary=False)
