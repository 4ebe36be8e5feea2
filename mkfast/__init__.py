"""mkfast: fused kernels and models for MKS2 and RA-CM3.

    import mkfast
    scores, indices = mkfast.ops.topk_dedup(queries, memory, k=8)
    with mkfast.use_backend("reference"):
        ...
"""

from mkfast import _extension
from mkfast.backend import BackendUnavailableError, use_backend

_extension.missing_reason()  # registers torch.ops.mkfast.* (or warns once)

from mkfast import ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "ops", "use_backend", "__version__"]
