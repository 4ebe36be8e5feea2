"""The one way mkfast imports matplotlib: plots are outputs on the side, never a reason to fail a run."""

from __future__ import annotations

import warnings


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning) where matplotlib is
    missing."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss plots (pip install matplotlib)", stacklevel=2)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
