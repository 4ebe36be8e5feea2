"""mkfast attention in the FlashAttention ecosystem's conventions.

``mkfast.ops.attention`` takes (B, H, S, D) and dense (B, S) ``document_ids``. Code written
around FlashAttention holds (B, S, H, D) tensors, packs sequences without padding as
``(total_tokens, H, D)`` with ``cu_seqlens``, and transformers marks packed sequences by
``position_ids`` that restart at 0. These entry points take those forms and call the same
op (same backends, same block skipping of document masks):

    attention_bshd(q, k, v, causal=True)                      # flash_attn_func's layout
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,      # flash_attn_varlen_func's
                     max_seqlen_q, max_seqlen_k, causal=True)
    document_ids_from_position_ids(position_ids)               # transformers' packing

A (B, S, H, D) tensor handed to ``mkfast.ops.attention`` cannot be told from a (B, H, S, D)
one when Hq == Hkv and S_q == S_kv (the shapes fit either way): call ``attention_bshd``
for that layout. Layout changes here are views (transposes), never copies; the op's
kernels read any strides.
"""

from __future__ import annotations

import torch

from mkfast.ops._checks import check_tensor
from mkfast.ops.attention import INTEGER_DTYPES, attention

OP = "attention_varlen"


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) position ids that restart at 0 for each packed document -> (B, S) int32 document ids.

    A new document starts wherever the position does not continue the previous
    one by +1 (the rule transformers uses to detect packed sequences). Derive once
    per batch and pass the result to every layer.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        got = (tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor)
               else type(position_ids).__name__)
        raise ValueError(f"document_ids_from_position_ids: position_ids must be 2-D (B, S), got {got}")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return (starts.cumsum(dim=1) - 1).to(torch.int32)


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """(N + 1,) cumulative sequence lengths [0, l_0, l_0 + l_1, ..., total] -> (total,) int32 ids."""
    positions = torch.arange(total_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True).to(torch.int32)


def attention_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``mkfast.ops.attention`` for (B, S, H, D) tensors (flash_attn_func's layout).

    q: (B, S_q, Hq, D), k and v: (B, S_kv, Hkv, D); document_ids (B, S) as in the op.
    Returns (B, S_q, Hq, D) in q's dtype: a transposed view of the op's output (no copy).
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor("attention_bshd", name, tensor, ndim=4, layout="(B, S, H, D)")
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                    document_ids=document_ids, scale=scale)
    return out.transpose(1, 2)


def _check_cu_seqlens(name: str, cu_seqlens: torch.Tensor, total_tokens: int, device: torch.device) -> None:
    check_tensor(OP, name, cu_seqlens, ndim=1, layout="(N + 1,)", dtypes=INTEGER_DTYPES, device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{OP}: {name} must hold at least [0, total], got {cu_seqlens.numel()} values")
    if torch.compiler.is_compiling():
        return
    # One small device sync: boundaries that do not cover [0, total] would silently mix sequences.
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total_tokens or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"{OP}: {name} must rise (never fall) from 0 to the {total_tokens} packed tokens, "
                         f"got {cu_seqlens.tolist()[:8]} (first {first}, last {last})")


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Packed sequences without padding, flash_attn_varlen_func's arguments.

    q: (total, Hq, D), k and v: (total, Hkv, D): sequence i holds tokens
    [cu_seqlens[i], cu_seqlens[i + 1]). Runs as one row of the op with document ids, so
    blocks between sequences are skipped. Self-attention only: ``cu_seqlens_k`` must equal
    ``cu_seqlens_q``. ``max_seqlen_*`` are accepted for signature compatibility (the op
    needs no grid hint). Returns (total, Hq, D), a view of the op's output.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, tensor, ndim=3, layout="(total, H, D)")
    total_tokens = q.shape[0]
    if k.shape[0] != total_tokens:
        raise ValueError(f"{OP}: k must hold the {total_tokens} packed tokens of q (self-attention), "
                         f"got {k.shape[0]}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_tokens, q.device)
    if cu_seqlens_k is not cu_seqlens_q:
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_tokens, q.device)
        if not torch.equal(cu_seqlens_k, cu_seqlens_q):
            raise ValueError(f"{OP}: cu_seqlens_k must equal cu_seqlens_q (packed self-attention; "
                             "a KV cache goes through mkfast.ops.decode_attention)")
    document_ids = document_ids_from_cu_seqlens(cu_seqlens_q, total_tokens)[None]
    out = attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=causal,
                    document_ids=document_ids, scale=scale)
    return out[0].transpose(0, 1)
