"""mkfast attention inside Hugging Face models: ``attn_implementation="mkfast"``.

    from mkfast.layers.attention import register_transformers_attention
    register_transformers_attention()            # once, before building the model
    model = LlamaForCausalLM(config)             # config._attn_implementation = "mkfast"
    model(input_ids, document_ids=document_ids)  # RA-CM3 packing: per-document attention

Routing inside :func:`mkfast_attention_forward` (query (B, Hq, S_q, D), key/value
(B, Hkv, S_kv, D) as transformers hands them, S_kv >= S_q with a KV cache):
  - ``document_ids`` (B, S) passed as a model kwarg -> ``mkfast.ops.attention``
    with document masking (any 4-D mask transformers built is superseded:
    give padding tokens their own document id);
  - no mask (plain causal, the common case: transformers skips building it) ->
    ``mkfast.ops.attention`` for training and prefill (causal aligned to the end
    of the cache), ``mkfast.ops.decode_attention`` for a few new tokens without
    gradients (generation steps);
  - any other mask (padding in a batch) -> transformers' own SDPA path, which
    handles arbitrary masks; correct, but not our kernel.

Nothing here imports transformers at module import time; registration does.
Works with transformers releases that have ``AttentionInterface`` (4.48+);
mask routing as above needs ``masking_utils`` (4.53+), older releases always
build a 4-D mask and so take the SDPA fallback.
"""

from __future__ import annotations

import torch

from mkfast.ops.attention import attention, decode_attention

ATTENTION_NAME = "mkfast"
# Generation steps use the split-K decode kernel up to this many new tokens per
# row (speculative / multi-token steps); longer queries have enough rows for the
# main kernel's grid.
DECODE_MAX_NEW_TOKENS = 16


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) position ids that restart at 0 for each packed document -> (B, S) int32 document ids.

    A new document starts wherever the position does not continue the previous
    one by +1 (the same rule transformers uses to detect packed sequences).
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"document_ids_from_position_ids: position_ids must be 2-D (B, S), got {got}")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return (starts.cumsum(dim=1) - 1).to(torch.int32)


def mkfast_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    document_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: same signature and output as ``sdpa_attention_forward``.

    Returns (attn_output (B, S_q, Hq, D) contiguous, None).
    """
    if dropout:
        raise ValueError(f"mkfast attention has no attention dropout, got dropout={dropout} "
                         "(set config.attention_dropout = 0.0)")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    query_length, key_length = query.shape[2], key.shape[2]
    if document_ids is not None:
        if query_length != key_length:
            raise ValueError(f"mkfast attention: document_ids needs no KV cache (S_q == S_kv), "
                             f"got S_q={query_length}, S_kv={key_length}")
        out = attention(query, key, value, causal=is_causal, document_ids=document_ids, scale=scaling)
    elif attention_mask is None:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if is_causal and query_length <= DECODE_MAX_NEW_TOKENS and key_length > query_length and not needs_grad:
            # Every row's cache is full here (no mask means no padding): lengths are valid by construction.
            lengths = torch.full((query.shape[0],), key_length, dtype=torch.int32, device=query.device)
            out = decode_attention(query, key, value, lengths, scale=scaling, check_lengths=False)
        else:
            out = attention(query, key, value, causal=is_causal, scale=scaling)
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    return out.transpose(1, 2).contiguous(), None


def register_transformers_attention(name: str = ATTENTION_NAME) -> bool:
    """Register :func:`mkfast_attention_forward` (and SDPA's mask builder) under ``name``.

    Idempotent. Returns False when transformers is missing or too old to have
    an attention-function registry.
    """
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(name, mkfast_attention_forward)
    try:
        # Without a mask builder registered under our name, transformers 5 passes
        # no mask at all (padding would be silently ignored). SDPA's builder
        # returns None for plain causal batches and a 4-D mask otherwise.
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return True
    AttentionMaskInterface.register(name, sdpa_mask)
    return True
