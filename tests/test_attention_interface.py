"""FlashAttention-convention entry points: (B, S, H, D) without copies, varlen with cu_seqlens,
document ids from position_ids resets; each against mkfast.ops.attention_reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import mkfast
from mkfast.ops import attention_reference
from mkfast.ops.attention_interface import (
    attention_bshd,
    attention_varlen,
    document_ids_from_cu_seqlens,
    document_ids_from_position_ids,
)


def _inputs(*shape_q, kv_heads, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    *lead, heads, dim = shape_q
    q = torch.randn(*shape_q, generator=generator, dtype=dtype)
    k = torch.randn(*lead, kv_heads, dim, generator=generator, dtype=dtype)
    v = torch.randn(*lead, kv_heads, dim, generator=generator, dtype=dtype)
    return [tensor.requires_grad_() for tensor in (q, k, v)]


@pytest.mark.parametrize("backend",
                         ["cpu", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_bshd_matches_the_reference_and_passes_views_not_copies(backend, monkeypatch):
    q, k, v = _inputs(2, 13, 6, 24, kv_heads=2)  # (B, S, H, D), GQA 3:1, odd S
    received = []
    import mkfast.ops.attention_interface as interface

    def spy(q_view, k_view, v_view, **kwargs):
        received.append(q_view)
        return mkfast.ops.attention(q_view, k_view, v_view, **kwargs)

    monkeypatch.setattr(interface, "attention", spy)
    with mkfast.use_backend(backend):
        out = attention_bshd(q, k, v, causal=True)
    assert received[0].data_ptr() == q.data_ptr() and received[0].shape == (2, 6, 13, 24)
    expected = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert out.shape == (2, 13, 6, 24)
    assert_close(out, expected)
    grad = torch.randn_like(out)
    actual_grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    for actual, wanted in zip(actual_grads, expected_grads, strict=True):
        assert_close(actual, wanted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_equals_each_sequence_on_its_own(dtype):
    lengths = [5, 1, 9, 4]
    q, k, v = _inputs(sum(lengths), 4, 16, kv_heads=4, dtype=dtype)
    cu_seqlens = torch.tensor([0, 5, 6, 15, 19], dtype=torch.int32)
    out = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths), causal=True)
    assert out.shape == q.shape
    start = 0
    for length in lengths:
        piece = slice(start, start + length)
        expected = attention_reference(*(tensor[piece].transpose(0, 1)[None] for tensor in (q, k, v)))
        assert_close(out[piece], expected[0].transpose(0, 1), dtype=dtype, message=f"sequence at {start}")
        start += length
    out.float().sum().backward()  # gradients flow back to the packed tensors
    assert q.grad.shape == q.shape and torch.isfinite(q.grad.float()).all()


def test_varlen_refuses_different_or_broken_cu_seqlens():
    q, k, v = _inputs(10, 2, 8, kv_heads=2)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k must equal cu_seqlens_q"):
        attention_varlen(q, k, v, cu_seqlens, torch.tensor([0, 5, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q must rise"):
        attention_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), None, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32/int64"):
        attention_varlen(q, k, v, cu_seqlens.float(), cu_seqlens, 6, 6)


def test_document_ids_from_position_ids_and_from_cu_seqlens_agree():
    position_ids = torch.cat([torch.arange(5), torch.arange(1), torch.arange(9)])[None]
    from_positions = document_ids_from_position_ids(position_ids)
    from_boundaries = document_ids_from_cu_seqlens(torch.tensor([0, 5, 6, 15]), 15)
    assert from_positions[0].tolist() == from_boundaries.tolist() == [0] * 5 + [1] + [2] * 9
