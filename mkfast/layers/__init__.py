"""nn.Modules built on mkfast.ops, usable as drop-in layers in any PyTorch model."""

from mkfast.layers.mome import MoMEFFN  # noqa: E402
from mkfast.layers.visual_memory import RMSNorm, VisualMemory  # noqa: E402

__all__ = ["MoMEFFN", "RMSNorm", "VisualMemory"]

from mkfast.layers.attention import (  # noqa: E402
    apply_attention,
    mkfast_attention_forward,
    register_transformers_attention,
    remove_attention,
)

__all__ += ["apply_attention", "mkfast_attention_forward", "register_transformers_attention",
            "remove_attention"]
