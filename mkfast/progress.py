"""Progress of long work: a tqdm bar on a terminal, plain periodic lines elsewhere, nothing when quiet.

Every loop that can run longer than a few seconds (training steps, memory building,
sampling, benchmark cases) goes through :func:`progress_bar`, so one switch
(:func:`quiet`, set by ``--quiet``) silences them all and a CI log gets readable lines
instead of a bar's carriage returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterable, Iterator

# Seconds between two plain lines when the output is not a terminal.
PLAIN_INTERVAL_SECONDS = 15.0

_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("mkfast_quiet", default=False)


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Inside the block, :func:`progress_bar` shows nothing and :func:`say` prints nothing."""
    token = _quiet.set(enabled)
    try:
        yield
    finally:
        _quiet.reset(token)


def is_quiet() -> bool:
    return _quiet.get()


def say(message: str) -> None:
    """One line of progress on stdout (flushed), unless quiet."""
    if not _quiet.get():
        print(message, flush=True)


class PlainProgress:
    """tqdm's small interface (update, set_postfix, close, iteration) as a line every few seconds."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, initial: int,
                 interval: float = PLAIN_INTERVAL_SECONDS, stream=None):
        self.iterable, self.total, self.desc, self.count = iterable, total, desc, initial
        self.interval, self.stream = interval, stream or sys.stderr
        self.started = self.last = time.monotonic()
        self.postfix = ""

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        of_total = f"/{self.total}" if self.total else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        status = "done" if final else "..."
        print(f"{self.desc}: {self.count}{of_total} {status} ({elapsed:.0f} s){postfix}", file=self.stream,
              flush=True)
        self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.count += count
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        self._line(final=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()


class _Silent(PlainProgress):
    def update(self, count: int = 1) -> None:
        self.count += count

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True, initial: int = 0):
    """A progress bar over ``iterable`` (or a manual one of ``total`` steps: call ``update``).

    A tqdm bar where stderr is a terminal, a line every PLAIN_INTERVAL_SECONDS elsewhere, and
    nothing when ``enabled`` is false or inside :func:`quiet`.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled or _quiet.get():
        return _Silent(iterable, total, desc, initial)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=False)
    return PlainProgress(iterable, total, desc, initial)
