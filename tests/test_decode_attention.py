"""mkfast.ops.decode_attention: split-K Triton kernel against the SDPA reference on ragged caches."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, devices_to_test, interpreter_dtypes, run_opcheck

import mkfast
from mkfast.ops.attention import attention_reference, decode_attention, decode_attention_reference

# (batch, query heads, kv heads, new tokens T, cache length L_max, D)
SHAPES = [
    (3, 4, 2, 1, 70, 64),   # plain sampling, GQA, a cache that is not a multiple of a block
    (2, 8, 2, 3, 100, 128),  # T=3 new tokens attended causally, group of 4
    (4, 2, 2, 2, 33, 24),   # head dim not a power of two
    (1, 4, 1, 1, 5, 32),    # MQA, cache shorter than one block
]


def make_cache(batch, heads, kv_heads, new_tokens, cache_length, head_dim, dtype, device):
    q = torch.randn(batch, heads, new_tokens, head_dim, dtype=dtype, device=device)
    k_cache = torch.randn(batch, kv_heads, cache_length, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn(batch, kv_heads, cache_length, head_dim, dtype=dtype, device=device)
    # Ragged: the shortest legal row (only the new tokens), a full row, random others.
    lengths = torch.randint(new_tokens, cache_length + 1, (batch,), dtype=torch.int32)
    lengths[0] = new_tokens
    lengths[-1] = cache_length if batch > 1 else lengths[-1]
    return q, k_cache, v_cache, lengths.to(device)


@pytest.mark.parametrize("device", devices_to_test())
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_triton_matches_reference_on_ragged_cache(shape, dtype, device):
    q, k_cache, v_cache, lengths = make_cache(*shape, dtype, device)
    with mkfast.use_backend("triton"):
        out = decode_attention(q, k_cache, v_cache, lengths)
    expected = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype=dtype)


def test_reference_agrees_with_causal_attention_on_each_row():
    # Two definitions written independently must agree: decode of row b is causal
    # attention of its T queries over the first len_b keys (queries at the end).
    q, k_cache, v_cache, lengths = make_cache(3, 4, 2, 3, 40, 16, torch.float32, "cpu")
    out = decode_attention_reference(q, k_cache, v_cache, lengths)
    for row, length in enumerate(lengths.tolist()):
        expected = attention_reference(q[row:row + 1], k_cache[row:row + 1, :, :length],
                                       v_cache[row:row + 1, :, :length], causal=True)
        assert_close(out[row:row + 1], expected)


@pytest.mark.interpreter
def test_split_plan_uses_several_splits_and_ignores_cache_past_each_length():
    from mkfast.kernels.decode_attention import _split_plan

    num_splits, chunk_size, _ = _split_plan(1, 1, 200, torch.device("cpu"))
    assert num_splits > 1 and num_splits * chunk_size >= 200
    q, k_cache, v_cache, lengths = make_cache(2, 2, 1, 1, 200, 16, torch.float32, "cpu")
    lengths = torch.tensor([37, 150], dtype=torch.int32)
    with mkfast.use_backend("triton"):
        out = decode_attention(q, k_cache, v_cache, lengths)
        k_cache[0, :, 37:] = float("nan")  # stale entries past a row's length are never read
        v_cache[0, :, 37:] = float("nan")
        assert torch.equal(decode_attention(q, k_cache, v_cache, lengths), out)


@pytest.mark.interpreter
def test_triton_refuses_more_batch_heads_than_one_grid_axis_holds():
    q = torch.zeros(65_536, 1, 1, 16)
    cache = torch.zeros(65_536, 1, 2, 16)
    with mkfast.use_backend("triton"), pytest.raises(ValueError, match="split the batch"):
        decode_attention(q, cache, cache, torch.ones(65_536, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    q, k_cache, v_cache, lengths = make_cache(2, 2, 1, 2, 20, 16, torch.float32, "cpu")
    with mkfast.use_backend(backend):
        run_opcheck(torch.ops.mkfast.decode_attention.default, (q, k_cache, v_cache, lengths, 0.25))


BAD_INPUTS = [
    (lambda q, k, v, n: (q, k, v, torch.tensor([0, 5], dtype=torch.int32)), ValueError, r"in \[T, L_max\]"),
    (lambda q, k, v, n: (q, k, v, torch.tensor([3, 21], dtype=torch.int32)), ValueError, r"in \[T, L_max\]"),
    (lambda q, k, v, n: (q, k, v, n.float()), TypeError, "cache_seqlens must be int32/int64"),
    (lambda q, k, v, n: (q, k, v, n[:1]), ValueError, "cache_seqlens must have length B"),
    (lambda q, k, v, n: (q, k.half(), v, n), TypeError, "k_cache must be float32"),
    (lambda q, k, v, n: (q, k, v[:, :, :7], n), ValueError, "same shape"),
    (lambda q, k, v, n: (q[:, :3], k, v, n), ValueError, "multiple"),
    (lambda q, k, v, n: (q[0], k, v, n), ValueError, "q must be 4-D"),
]


@pytest.mark.parametrize("make_bad, error, message", BAD_INPUTS, ids=[case[2] for case in BAD_INPUTS])
def test_bad_inputs_are_refused_clearly(make_bad, error, message):
    q, k_cache, v_cache, lengths = make_cache(2, 4, 2, 2, 20, 16, torch.float32, "cpu")
    with pytest.raises(error, match=message):
        decode_attention(*make_bad(q, k_cache, v_cache, lengths))


# --------------------------------------------------------------------------- GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_cuda_bf16_at_cm3_cache_length_matches_reference(batch):
    # RA-CM3 image sampling: a 4096-token cache, one new token per row.
    q, k_cache, v_cache, lengths = make_cache(batch, 16, 16, 1, 4096, 128, torch.bfloat16, "cuda")
    out = decode_attention(q, k_cache, v_cache, lengths)
    expected = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths)
    assert_close(out, expected, dtype=torch.bfloat16)
