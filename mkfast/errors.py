"""Errors the ``mkfast`` command reports as one line, without a traceback (see mkfast.cli).

Exit codes: 2 for a :class:`UsageError` (the command line or a config file asks for
something impossible: a bad value, a path that does not exist) and for argparse's own
errors; 1 for any other error while running. ``mkfast --debug ...`` shows tracebacks.
"""

from __future__ import annotations

EXIT_RUNTIME_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(ValueError):
    """A flag, argument or config value that cannot work; a ValueError so library callers may catch it as one."""
