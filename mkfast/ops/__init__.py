"""Public ops. Each module holds one op: reference, custom op, fake impl, autograd, dispatch."""

from mkfast.ops.topk_dedup import topk_dedup, topk_dedup_reference

__all__ = ["topk_dedup", "topk_dedup_reference"]

from mkfast.ops.attention import (  # noqa: E402
    attention,
    attention_reference,
    decode_attention,
    decode_attention_reference,
)

__all__ += ["attention", "attention_reference", "decode_attention", "decode_attention_reference"]

from mkfast.ops.mome import mome_ffn, mome_ffn_reference  # noqa: E402

__all__ += ["mome_ffn", "mome_ffn_reference"]

from mkfast.ops.attention_interface import (  # noqa: E402
    attention_bshd,
    attention_varlen,
    document_ids_from_position_ids,
)

__all__ += ["attention_bshd", "attention_varlen", "document_ids_from_position_ids"]
