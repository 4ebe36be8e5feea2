"""Decode attention in Triton: T new tokens against a ragged KV cache, split-K + combine.

RA-CM3 samples images one VQ token at a time (1024 steps per image), so each
step reads the whole cache for few queries: the work is memory-bound and a
small batch has too few (batch, head) pairs to fill the GPU. Split-K cuts each
row's cache into chunks handled by separate programs; each writes a partial
output and its log-sum-exp to a workspace and takes a ticket from a per-(batch,
kv head) counter, and the last program to arrive merges the chunks in split
order (deterministic) and resets the counter. One launch, no host sync and,
given a workspace and an output, no allocation: a decode step can be captured
in a CUDA graph. With one split the program writes its output directly.

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
def _decode_kernel(
    Q, KCache, VCache, CacheSeqlens, Out, PartialOut, PartialLse, Counters,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    num_kv_heads, num_splits, group, new_tokens, chunk_size, scale_log2,
    IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # (batch, kv head) on axis 0, which holds 2^31 - 1 programs; the few splits (at most two
    # per SM) fit axis 1's 65535. 64-bit from here: batch * stride passes 2^31 in a large
    # cache (B=128, Hkv=32, L=4096, D=128).
    batch_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
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
    row_mask = row_valid[:, None] & d_valid[None, :]
    head = kv_head * group + rows // new_tokens
    token = rows % new_tokens
    seqlen = tl.load(CacheSeqlens + batch).to(tl.int32)
    query_position = seqlen - new_tokens + token  # (BLOCK_M,)

    q = tl.load(Q + batch * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
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
        if IS_FP32:  # noqa: SIM108 - constexpr branch in @triton.jit, kept as a block
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

    # Out is contiguous (B, Hq, T, D); partial buffers (B, Hq, T, num_splits[, D]).
    out_row = (batch * num_kv_heads * group + head) * new_tokens + token
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if num_splits == 1:
        tl.store(Out + out_row[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_safe[:, None]).to(q.dtype),
                 mask=row_mask)
    else:
        # An empty chunk (past the row's length, or all after a query) stores lse = -inf, out = 0.
        lse_log2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(PartialLse + out_row * num_splits + split, lse_log2, mask=row_valid)
        tl.store(PartialOut + (out_row[:, None] * num_splits + split) * HEAD_DIM + offs_d[None, :],
                 acc / l_safe[:, None], mask=row_mask)
        # Every thread's partial stores before the ticket; the ticket's release/acquire makes
        # them visible to the program that draws the last one.
        tl.debug_barrier()
        ticket = tl.atomic_add(Counters + batch_head, 1, sem="acq_rel")
        if ticket == num_splits - 1:
            _decode_combine(PartialOut, PartialLse, Out, out_row, row_valid, row_mask, offs_d, num_splits,
                            BLOCK_M, BLOCK_D, HEAD_DIM)
            tl.store(Counters + batch_head, 0)  # ready for the next call, or the next replay of a graph


@triton.jit
def _decode_combine(PartialOut, PartialLse, Out, out_row, row_valid, row_mask, offs_d, num_splits,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge the splits of these rows in split order: out = sum_s w_s out_s / sum_s w_s, w_s = 2^lse_s."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(num_splits):
        # .cg: straight from L2, where the other programs' stores are, never a stale L1 line.
        lse = tl.load(PartialLse + out_row * num_splits + split, mask=row_valid, other=float("-inf"),
                      cache_modifier=".cg")
        partial = tl.load(PartialOut + (out_row[:, None] * num_splits + split) * HEAD_DIM + offs_d[None, :],
                          mask=row_mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        weight = tl.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + partial * weight[:, None]
        l_i = l_i * alpha + weight
        m_i = m_new
    # Every query sees at least its own key, so some split has weight > 0 (padding rows: 0/1).
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + out_row[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_mask)


def _split_plan(batch: int, num_kv_heads: int, cache_length: int,
                device: torch.device) -> tuple[int, int, int]:
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


def decode_workspace_elements(batch: int, num_heads: int, num_kv_heads: int, new_tokens: int,
                              cache_length: int, head_dim: int, device: torch.device) -> int:
    """fp32 elements of the workspace decode_attention_forward needs for these shapes."""
    num_splits = _split_plan(batch, num_kv_heads, cache_length, device)[0]
    rows = batch * num_heads * new_tokens * num_splits
    return rows * head_dim + rows + batch * num_kv_heads


def decode_workspace(q: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor:
    """A zeroed workspace for decode steps of q's and k_cache's shapes; every call leaves its
    counters at zero again, so one workspace serves any number of steps (and graph replays)."""
    batch, num_heads, new_tokens, head_dim = q.shape
    elements = decode_workspace_elements(batch, num_heads, k_cache.shape[1], new_tokens, k_cache.shape[2],
                                         head_dim, q.device)
    return torch.zeros(elements, dtype=torch.float32, device=q.device)


def decode_attention_forward(q, k_cache, v_cache, cache_seqlens, scale: float, workspace=None, out=None):
    """q: (B, Hq, T, D), caches: (B, Hkv, L_max, D), cache_seqlens: (B,) -> (B, Hq, T, D).

    workspace: from decode_workspace (fp32, at least decode_workspace_elements); out: contiguous,
    q's shape and dtype. Given both, the launch allocates nothing and reads nothing back.
    """
    batch, num_heads, new_tokens, head_dim = q.shape
    num_kv_heads, cache_length = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_splits, chunk_size, block_n = _split_plan(batch, num_kv_heads, cache_length, q.device)
    if workspace is None:
        workspace = decode_workspace(q, k_cache)
    if out is None:
        out = torch.empty((batch, num_heads, new_tokens, head_dim), dtype=q.dtype, device=q.device)
    rows = batch * num_heads * new_tokens * num_splits
    partial_out = workspace[:rows * head_dim]
    partial_lse = workspace[rows * head_dim:rows * (head_dim + 1)]
    counters = workspace[rows * (head_dim + 1):rows * (head_dim + 1) + batch * num_kv_heads].view(torch.int32)
    gpu = q.device.type == "cuda"
    # fp32 at D=256 with 3 stages needs 276+ KB of shared memory (ptxas, sm_90): one stage fewer.
    num_stages = (NUM_STAGES_GPU - (q.dtype == torch.float32)) if gpu else 1
    _decode_kernel[(batch * num_kv_heads, num_splits)](
        q, k_cache, v_cache, cache_seqlens, out, partial_out, partial_lse, counters,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        num_kv_heads, num_splits, group, new_tokens, chunk_size, scale * LOG2_E,
        IS_FP32=q.dtype == torch.float32, BLOCK_M=max(16, triton.next_power_of_2(group * new_tokens)),
        BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HEAD_DIM=head_dim,
        num_warps=NUM_WARPS_GPU if gpu else 4, num_stages=num_stages,
    )
    return out
