"""Decode attention in Triton: T new tokens against a ragged KV cache, split-K + combine.

RA-CM3 samples images one VQ token at a time (1024 steps per image), so each
step reads the whole cache for few queries: the work is memory-bound and a
small batch has too few (batch, head) pairs to fill the GPU. Split-K cuts each
row's cache into chunks handled by separate programs (each writes a partial
output and its log-sum-exp), and a combine kernel merges the chunks.

GQA: one program holds all G*T query rows of a key/value head (row r is query
head r // T, new token r % T), so each cache block is read once per group.
Query t of a row with filled length L sits at position L - T + t and sees keys
[0, L - T + t] (causal at the end of the row's cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634

# Keys per cache block; 64 at D<=128 keeps a K and V tile of 64x128 fp16 (32 KB)
# double-buffered well under shared memory. Not tuned: written without a GPU.
BLOCK_N_GPU = 64
NUM_WARPS_GPU = 4
NUM_STAGES_GPU = 3
# Aim for about two programs per SM across (splits x batch x kv heads), so a
# batch of 1 with 8 kv heads still uses the whole GPU.
PROGRAMS_PER_SM = 2
# The interpreter gains nothing from more programs; 4 splits still exercise the combine.
INTERPRETER_MAX_SPLITS = 4
INTERPRETER_BLOCK_N = 16


@triton.jit
def _decode_split_kernel(
    Q, KCache, VCache, CacheSeqlens, PartialOut, PartialLse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    num_kv_heads, num_splits, group, new_tokens, chunk_size, scale_log2,
    IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    split = tl.program_id(0)
    # 64-bit from here: batch * stride passes 2^31 in a large cache (B=128, Hkv=32, L=4096, D=128).
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    rows = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < group * new_tokens
    # HEAD_DIM is a compile-time constant so this mask folds away when D is a
    # power of two: a runtime mask along the contiguous axis stops the loads from
    # being vectorised and pipelined (cp.async), checked with ptxas for sm_90.
    d_valid = offs_d < HEAD_DIM
    head = kv_head * group + rows // new_tokens
    token = rows % new_tokens
    seqlen = tl.load(CacheSeqlens + batch).to(tl.int32)
    query_position = seqlen - new_tokens + token  # (BLOCK_M,)

    q = tl.load(Q + batch * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = KCache + batch * stride_kb + kv_head * stride_kh
    v_base = VCache + batch * stride_vb + kv_head * stride_vh
    chunk_start = split * chunk_size
    chunk_end = tl.minimum(chunk_start + chunk_size, seqlen)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(chunk_start, chunk_end, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < chunk_end
        block_start = tl.cast(start_n, tl.int64)  # a row * stride can pass 2^31 too; within a block it cannot
        k = tl.load(k_base + block_start * stride_ks + offs_n[None, :] * stride_ks
                    + offs_d[:, None] * stride_kd,
                    mask=col_valid[None, :] & d_valid[:, None], other=0.0)
        if IS_FP32:
            scores = tl.dot(q, k, input_precision="ieee")
        else:
            scores = tl.dot(q, k)
        allowed = col_valid[None, :] & (cols[None, :] <= query_position[:, None]) & row_valid[:, None]
        scores = tl.where(allowed, scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet: no NaN
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + block_start * stride_vs + offs_n[:, None] * stride_vs
                    + offs_d[None, :] * stride_vd,
                    mask=col_valid[:, None] & d_valid[None, :], other=0.0)
        if IS_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty chunk (past the row's length, or all after a query) stores lse = -inf, out = 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse_log2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    # Partial buffers are (B, Hq, T, num_splits[, D]) contiguous.
    partial_row = ((batch * num_kv_heads * group + head) * new_tokens + token) * num_splits + split
    tl.store(PartialLse + partial_row, lse_log2, mask=row_valid)
    tl.store(PartialOut + partial_row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _decode_combine_kernel(
    PartialOut, PartialLse, Out, num_splits,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one (batch, query head, new token); Out is contiguous (B, Hq, T, D)
    splits = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    split_valid = splits < num_splits
    d_valid = offs_d < HEAD_DIM
    lse = tl.load(PartialLse + row * num_splits + splits, mask=split_valid, other=float("-inf"))
    # Every query sees at least its own key, so one split has a finite lse.
    weights = tl.exp2(lse - tl.max(lse, 0))
    partial = tl.load(PartialOut + (row * num_splits + splits[:, None]) * HEAD_DIM + offs_d[None, :],
                      mask=split_valid[:, None] & d_valid[None, :], other=0.0)
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=d_valid)


def _split_plan(batch: int, num_kv_heads: int, cache_length: int, device: torch.device) -> tuple[int, int, int]:
    """(num_splits, chunk_size, block_n) from static shapes only: no device sync."""
    if device.type == "cuda":
        block_n = BLOCK_N_GPU
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        max_splits = triton.cdiv(cache_length, block_n)
    else:
        block_n = INTERPRETER_BLOCK_N
        target = INTERPRETER_MAX_SPLITS
        max_splits = min(INTERPRETER_MAX_SPLITS, triton.cdiv(cache_length, block_n))
    wanted = max(1, min(max_splits, triton.cdiv(target, batch * num_kv_heads)))
    chunk_size = triton.cdiv(triton.cdiv(cache_length, wanted), block_n) * block_n
    return triton.cdiv(cache_length, chunk_size), chunk_size, block_n


def decode_attention_forward(q, k_cache, v_cache, cache_seqlens, scale: float) -> torch.Tensor:
    """q: (B, Hq, T, D), caches: (B, Hkv, L_max, D), cache_seqlens: (B,) -> (B, Hq, T, D)."""
    batch, num_heads, new_tokens, head_dim = q.shape
    num_kv_heads, cache_length = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_splits, chunk_size, block_n = _split_plan(batch, num_kv_heads, cache_length, q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = max(16, triton.next_power_of_2(group * new_tokens))
    partial_out = torch.empty((batch, num_heads, new_tokens, num_splits, head_dim), dtype=torch.float32,
                              device=q.device)
    partial_lse = torch.empty((batch, num_heads, new_tokens, num_splits), dtype=torch.float32, device=q.device)
    gpu = q.device.type == "cuda"
    # fp32 at D=256 with 3 stages needs 276+ KB of shared memory (ptxas, sm_90): one stage fewer.
    num_stages = (NUM_STAGES_GPU - (q.dtype == torch.float32)) if gpu else 1
    _decode_split_kernel[(num_splits, batch * num_kv_heads)](
        q, k_cache, v_cache, cache_seqlens, partial_out, partial_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        num_kv_heads, num_splits, group, new_tokens, chunk_size, scale * LOG2_E,
        IS_FP32=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
        num_warps=NUM_WARPS_GPU if gpu else 4, num_stages=num_stages,
    )
    out = torch.empty((batch, num_heads, new_tokens, head_dim), dtype=q.dtype, device=q.device)
    _decode_combine_kernel[(batch * num_heads * new_tokens,)](
        partial_out, partial_lse, out, num_splits,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d, HEAD_DIM=head_dim,
    )
    return out
