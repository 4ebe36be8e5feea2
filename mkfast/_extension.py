"""Loading the compiled extension ``mkfast._C``.

The package works without it (reference backends only, and a warning once),
so that a broken build never blocks the pure-PyTorch paths.
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def _load() -> str | None:
    """Import ``mkfast._C`` (which registers torch.ops.mkfast.*); None or why not."""
    try:
        from mkfast import _C  # noqa: F401
    except ImportError as error:
        reason = f"mkfast._C is not built or does not load ({error})"
        warnings.warn(
            f"{reason}; only the reference and Triton backends are available. "
            "Reinstall with `pip install --no-build-isolation -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return reason
    return None


def missing_reason() -> str | None:
    return _load()


def built_parts() -> dict[str, bool]:
    """Which parts of the extension were compiled: {"cpu": ..., "cuda": ...}."""
    if _load() is not None:
        return {"cpu": False, "cuda": False}
    return {"cpu": True, "cuda": bool(torch.ops.mkfast.built_with_cuda())}
