"""Files written so that a kill at any instant leaves the old file or the whole new one.

Each is written to ``<name>.tmp``, flushed to disk and renamed over ``<name>``; a temporary a
kill left behind is removed by the next run (:func:`remove_temporaries`). Named fault points
let tests kill a writer at the dangerous instants (tests/test_run_faults.py).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterator

import torch

TEMPORARY_SUFFIX = ".tmp"

_fault_hook: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """A named point where a kill is dangerous; tests inject a hook that dies there."""
    if _fault_hook is not None:
        _fault_hook(name)


@contextlib.contextmanager
def fault_hook(hook: Callable[[str], None]) -> Iterator[None]:
    global _fault_hook
    previous, _fault_hook = _fault_hook, hook
    try:
        yield
    finally:
        _fault_hook = previous


def atomic_write(path: str, write: Callable[[str], None], point: str | None = None) -> None:
    """``write(temporary)`` then rename onto ``path``: readers see the old file or the whole new one."""
    temporary = path + TEMPORARY_SUFFIX
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())  # the bytes reach the disk before the name does
        if point:
            fault_point(point)
        os.replace(temporary, path)
    except Exception:  # an error, not a kill: leave nothing behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def atomic_write_text(path: str, text: str, point: str | None = None) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write(text)
    atomic_write(path, write, point)


def atomic_torch_save(obj, path: str, point: str | None = None) -> None:
    atomic_write(path, lambda temporary: torch.save(obj, temporary), point)


def remove_temporaries(directory: str) -> None:
    """Temporaries a killed write left (the complete file, if any, is still under its own name)."""
    for path in glob.glob(os.path.join(glob.escape(directory), "*" + TEMPORARY_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
