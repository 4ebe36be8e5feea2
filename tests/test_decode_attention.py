"""mkfast.ops.decode_attention: split-K Triton kernel against the SDPA reference on ragged caches."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, devices_to_test, interpreter_dtypes, run_opcheck

import mkfast
from mkfast.ops.attention import (
    attention_reference,
    decode_attention,
    decode_attention_reference,
    decode_attention_workspace,
)

# (batch, query heads, kv heads, new tokens T, cache length L_max, D)
SHAPES = [
    (3, 4, 2, 1, 70, 64),   # plain sampling, GQA, a cache that is not a multiple of a block
    (2, 8, 2, 3, 100, 128),  # T=3 new tokens attended causally, group of 4
    (4, 2, 2, 2, 33, 24),   # head dim not a power of two
    (1, 4, 1, 1, 5, 32),    # MQA, cache shorter than one block
    (1, 4, 1, 3, 90, 64),   # one row: several splits merged by the last program to finish
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
def test_workspace_and_out_give_the_same_result_and_stay_reusable():
    q, k_cache, v_cache, lengths = make_cache(1, 4, 2, 2, 100, 32, torch.float32, "cpu")
    workspace = decode_attention_workspace(q, k_cache)
    out = torch.empty_like(q)
    with mkfast.use_backend("triton"):
        for step in range(2):  # the last program of each call resets the counters for the next
            q_step = q + step
            result = decode_attention(q_step, k_cache, v_cache, lengths, workspace=workspace, out=out)
            assert result is out
            assert_close(out, decode_attention_reference(q_step, k_cache, v_cache, lengths))
    counters = workspace[-k_cache.shape[0] * k_cache.shape[1]:].view(torch.int32)
    assert torch.equal(counters, torch.zeros_like(counters))


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"decode_attention called Tensor.{name}: a host sync on a GPU")
    return refuse


def test_a_step_with_workspace_makes_no_host_sync_and_allocates_nothing(monkeypatch):
    q, k_cache, v_cache, lengths = make_cache(1, 4, 1, 1, 64, 32, torch.float32, "cpu")
    workspace = decode_attention_workspace(q, k_cache)
    out = torch.empty_like(q)
    step = dict(check_lengths=False, workspace=workspace, out=out)
    with mkfast.use_backend("triton"):
        decode_attention(q, k_cache, v_cache, lengths, **step)  # first call: Triton's caches fill
        with monkeypatch.context() as patch:
            for name in ("item", "cpu", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                patch.setattr(torch.Tensor, name, _refuse(name))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as profile:
                decode_attention(q, k_cache, v_cache, lengths, **step)
    allocations = [(event.name, event.cpu_memory_usage) for event in profile.events()
                   if event.cpu_memory_usage > 0]
    assert not allocations, allocations
    assert_close(out, decode_attention_reference(q, k_cache, v_cache, lengths))


def test_bad_workspace_and_out_are_refused_clearly():
    q, k_cache, v_cache, lengths = make_cache(1, 2, 1, 1, 40, 16, torch.float32, "cpu")
    workspace = decode_attention_workspace(q, k_cache)
    with mkfast.use_backend("triton"):
        with pytest.raises(ValueError, match="workspace must hold at least"):
            decode_attention(q, k_cache, v_cache, lengths, workspace=workspace[:3])
        with pytest.raises(TypeError, match="workspace must be float32"):
            decode_attention(q, k_cache, v_cache, lengths, workspace=workspace.double())
        with pytest.raises(ValueError, match="out must be contiguous"):
            strided = torch.empty(1, 2, 1, 32)[..., ::2]
            decode_attention(q, k_cache, v_cache, lengths, workspace=workspace, out=strided)
        with pytest.raises(ValueError, match="only with a workspace"):
            decode_attention(q, k_cache, v_cache, lengths, out=torch.empty_like(q))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    q, k_cache, v_cache, lengths = make_cache(2, 2, 1, 2, 20, 16, torch.float32, "cpu")
    with mkfast.use_backend(backend):
        run_opcheck(torch.ops.mkfast.decode_attention.default, (q, k_cache, v_cache, lengths, 0.25))
        run_opcheck(torch.ops.mkfast.decode_attention_into.default,
                    (q, k_cache, v_cache, lengths, 0.25, decode_attention_workspace(q, k_cache),
                     torch.empty_like(q)))


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
def test_cuda_decode_step_is_captured_and_replayed_in_a_cuda_graph():
    q, k_cache, v_cache, lengths = make_cache(2, 16, 4, 1, 4096, 128, torch.bfloat16, "cuda")
    workspace = decode_attention_workspace(q, k_cache)
    out = torch.empty_like(q)
    step = dict(check_lengths=False, workspace=workspace, out=out)
    decode_attention(q, k_cache, v_cache, lengths, **step)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k_cache, v_cache, lengths, **step)
    for _ in range(2):  # new queries and lengths in place, as a sampling loop would write them
        q.copy_(torch.randn_like(q))
        lengths.copy_(torch.randint(1, 4097, lengths.shape, device="cuda", dtype=lengths.dtype))
        graph.replay()
        expected = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths)
        assert_close(out, expected, dtype=torch.bfloat16)



@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_cuda_bf16_at_cm3_cache_length_matches_reference(batch):
    # RA-CM3 image sampling: a 4096-token cache, one new token per row.
    q, k_cache, v_cache, lengths = make_cache(batch, 16, 16, 1, 4096, 128, torch.bfloat16, "cuda")
    out = decode_attention(q, k_cache, v_cache, lengths)
    expected = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths)
    assert_close(out, expected, dtype=torch.bfloat16)
