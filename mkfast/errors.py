"""Errors the ``mkfast`` command reports as one line, without a traceback (see mkfast.cli).

Exit codes: 2 for a :class:`UsageError` (the command line or a config file asks for
something impossible: a bad value, a path that does not exist) and for argparse's own
errors; 1 for any other error while running. ``mkfast --debug ...`` shows tracebacks.
"""

from __future__ import annotations

import os

EXIT_RUNTIME_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(ValueError):
    """A flag, argument or config value that cannot work (a ValueError, so that library callers
    may catch it as one)."""


# A Hugging Face hub id must be asked for explicitly: any other name is a local path, so a typo in a
# path fails at once instead of being looked up on the hub (~50 s of retries without a network).
HUB_PREFIX = "hf:"


def pretrained_source(value: str, what: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only) for ``value``: ``"hf:<org>/<name>"`` is a hub id,
    anything else a local path that must exist (then loaded with local_files_only, never the network)."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what} must be a local path or '{HUB_PREFIX}<hub id>', got {value!r}")
    if value.startswith(HUB_PREFIX):
        return value[len(HUB_PREFIX) :], False
    if not os.path.exists(value):
        raise UsageError(
            f"{what} {value!r} does not exist (a Hugging Face hub id is written '{HUB_PREFIX}<org>/<name>')"
        )
    return value, True
