"""Progress bars that suit where stderr goes: a tqdm bar on a terminal, plain lines in a log file.

    with progress_bar(total=steps, desc="train", unit="step") as bar:
        for ...:
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.3f}"})

On a terminal this is tqdm. When stderr is not one (nohup, a scheduler's log file, a pipe), tqdm's
carriage-return redraws would pile up as megabytes of text, so the bar is replaced by one plain
line at most every ``interval`` seconds (default 30, or ``ST_AR_PROGRESS_INTERVAL``) and one when
the bar closes:

    train: 1200/5000 step (24%), 3.41 step/s, elapsed 05:52, ETA 18:34, loss=2.315
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL = 30.0


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    interval: float | None = None,
    stream: TextIO | None = None,
    **tqdm_kwargs: Any,
):
    """A tqdm bar when ``stream`` (default: sys.stderr) is a terminal, else a LineProgress.

    ``tqdm_kwargs`` (dynamic_ncols, smoothing, ...) only concern the tqdm bar.
    """
    stream = stream if stream is not None else sys.stderr
    if disable or _isatty(stream):
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=stream, **tqdm_kwargs
        )
    if interval is None:
        interval = float(os.environ.get("ST_AR_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, interval=interval, stream=stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LineProgress:
    """The part of tqdm's interface the project uses, printing whole lines instead of redrawing."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = DEFAULT_INTERVAL,
        stream: TextIO | None = None,
    ):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.interval, self.stream = interval, stream if stream is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self.start = self.last_print = time.monotonic()
        self.printed_n: int | None = None
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_print >= self.interval:
            self._print(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def write(self, s: str, file: TextIO | None = None) -> None:
        print(s, file=file if file is not None else sys.stdout, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.printed_n != self.n:  # the final count, unless the last line already showed it
            self._print(time.monotonic())

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.start
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({self.n / self.total:.0%})"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if rate > 0 and self.total is not None and self.n < self.total:
            parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.last_print, self.printed_n = now, self.n

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable if self.iterable is not None else ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
