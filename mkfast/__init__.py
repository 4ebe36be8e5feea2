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
from mkfast.layers.attention import apply_attention, remove_attention  # noqa: E402
from mkfast.mks2.patching import apply_mks2, remove_mks2  # noqa: E402


def save_mks2(model, directory: str) -> list[str]:
    """Write the MKS2 tensors of a model patched by :func:`apply_mks2` (adapter_config.json +
    adapter_model.safetensors, never the base weights) into ``directory``; returns their names."""
    from mkfast.mks2.adapters import save_adapters

    return save_adapters(model, directory)


def load_mks2(model, directory: str):
    """Restore a model saved with :func:`save_mks2` in one call: applies the saved MKS2 stage
    to ``model`` (unpatched, or patched alike) and loads its tensors, in place; returns the model.
    A model of another size is refused before anything changes."""
    from mkfast.mks2.adapters import load_adapters

    return load_adapters(model, directory)


__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "apply_attention", "apply_mks2", "load_mks2", "ops", "remove_attention",
           "remove_mks2", "save_mks2", "use_backend", "__version__"]
