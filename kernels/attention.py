"""Flash attention in Triton: forward (online softmax, saves log-sum-exp), backward (dQ, dK, dV).

Masks: causal (queries aligned to the end of the keys when S_kv > S_q) and
per-token document ids. Work the masks remove is skipped at block level:
  - causal: the key loop of a query block stops after the diagonal, the query
    loop of a key block starts at it;
  - documents: the launcher computes each block's [min, max] document id and,
    per query block, the first and last key block whose range meets it (and
    per key block the query blocks); loops run over that span only. No
    assumption that ids are sorted along a row (an unsorted row just gets a
    wider span); with CM3 packing (sorted ids) a 3-document row visits about a
    third of the causal blocks.
Blocks fully inside the allowed region run without the elementwise mask (a
separate, unmasked loop, as in the Triton fused-attention tutorial); only
diagonal, tail and document-boundary blocks pay for it.
GQA: query head h reads key/value head h // G; the dK/dV kernel owns one
key/value block and loops over the G query heads of its group, so no atomics.
Any D up to 256 (the d axis is padded to a power of two and masked) and any S.

Launchers allocate outputs, pick the grid and launch; nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim. From the Triton
# fused-attention tutorial's H100 settings (128x64 tiles, 8 warps at D=128);
# NOT tuned here: written on a machine without a GPU. Compiled for sm_90 with
# ptxas (no GPU needed): loads are pipelined (cp.async) and dots use wgmma; the
# bf16 forward at D=128 takes 129 KB of shared memory. D=256 halves the tiles.
FORWARD_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
# dK/dV keeps a key block resident and streams query blocks (narrow M), dQ the
# opposite (narrow N): the tutorial's asymmetric tiling.
BACKWARD_DKDV_CONFIGS = {64: (32, 128, 4, 3), 128: (32, 64, 4, 3), 256: (16, 32, 4, 2)}
BACKWARD_DQ_CONFIGS = {64: (128, 32, 4, 3), 128: (64, 32, 4, 3), 256: (32, 16, 4, 2)}
# The interpreter runs each program in Python: 32x32 tiles still give several
# blocks (and tails) at the test sizes S = 17..257 while keeping tests short.
INTERPRETER_CONFIG = (32, 32, 4, 1)


def _config(table: dict, head_dim: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    block_m, block_n, num_warps, num_stages = table[max(64, triton.next_power_of_2(head_dim))]
    if dtype == torch.float32:
        # fp32 tiles are twice as large: the fp32 forward at D=128 with 3 stages
        # needs 225 KB of shared memory (ptxas, sm_90), over the limit of A100-class GPUs.
        num_stages = max(1, num_stages - 1)
    return block_m, block_n, num_warps, num_stages


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    # fp32 inputs: exact fp32 products (tl.dot would otherwise use tf32 on GPU).
    if IS_FP32:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _allowed(rows, cols, query_docs, key_docs, offset, query_length, key_length,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True where query ``rows`` may attend key ``cols``.

    MASKED=False: the caller knows the block is inside the causal region and
    has no tails, so only documents remain to check.
    """
    allowed = (rows[:, None] >= 0) & (cols[None, :] >= 0)
    if MASKED:
        allowed = (rows[:, None] < query_length) & (cols[None, :] < key_length)
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + offset)
    if HAS_DOCUMENTS:
        allowed = allowed & (query_docs[:, None] == key_docs[None, :])
    return allowed


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, rows, query_docs, k_base, v_base, doc_base,
                    stride_ks, stride_kd, stride_vs, stride_vd,
                    start, end, offset, query_length, key_length, scale_log2,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                    IS_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < key_length
        block_start = tl.cast(start_n, tl.int64)  # the block's offset in 64 bits, the rest within a block
        k = tl.load(k_base + block_start * stride_ks + offs_n[None, :] * stride_ks
                    + offs_d[:, None] * stride_kd,
                    mask=col_valid[None, :] & d_valid[:, None], other=0.0)
        scores = _dot(q, k, IS_FP32) * scale_log2
        if MASKED or HAS_DOCUMENTS:
            key_docs = cols
            if HAS_DOCUMENTS:
                key_docs = tl.load(doc_base + cols, mask=col_valid, other=0)
            allowed = _allowed(rows, cols, query_docs, key_docs, offset, query_length, key_length,
                               MASKED, CAUSAL, HAS_DOCUMENTS)
            scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with nothing allowed yet keeps m = -inf; subtract 0 instead so
        # exp2 gives 0, never NaN (padding rows, rows outside these documents).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + block_start * stride_vs + offs_n[:, None] * stride_vs
                    + offs_d[None, :] * stride_vd,
                    mask=col_valid[:, None] & d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IS_FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, DocumentIds, KeyBlockFirst, KeyBlockLast,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, group, query_length, key_length, num_query_blocks, scale_log2,
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    query_block = tl.program_id(0)
    start_m = query_block * BLOCK_M
    # 64-bit from here: batch * stride (or a row * stride) passes 2^31 in a large tensor.
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < query_length
    d_valid = offs_d < HEAD_DIM
    offset = key_length - query_length

    q = tl.load(Q + batch * stride_qb + head * stride_qh + start_m.to(tl.int64) * stride_qs
                + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    doc_base = DocumentIds + batch * key_length

    # Key span [start_n, end_n); [start_n, full_end) needs no causal/tail mask.
    start_n = query_block * 0
    end_n = key_length + start_n
    full_end = key_length // BLOCK_N * BLOCK_N
    if CAUSAL:
        end_n = tl.minimum(end_n, start_m + BLOCK_M + offset)
        full_end = tl.minimum(full_end, (start_m + offset + 1) // BLOCK_N * BLOCK_N)
    query_docs = rows
    if HAS_DOCUMENTS:
        query_docs = tl.load(doc_base + rows, mask=row_valid, other=0)
        start_n = tl.load(KeyBlockFirst + batch * num_query_blocks + query_block) * BLOCK_N
        end_n = tl.minimum(end_n, tl.load(KeyBlockLast + batch * num_query_blocks + query_block) * BLOCK_N)
    full_end = tl.maximum(tl.minimum(full_end, end_n), start_n)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, rows, query_docs, k_base, v_base, doc_base,
                                    stride_ks, stride_kd, stride_vs, stride_vd,
                                    start_n, full_end, offset, query_length, key_length, scale_log2,
                                    False, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_N, BLOCK_D, HEAD_DIM)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, rows, query_docs, k_base, v_base, doc_base,
                                    stride_ks, stride_kd, stride_vs, stride_vd,
                                    full_end, end_n, offset, query_length, key_length, scale_log2,
                                    True, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_N, BLOCK_D, HEAD_DIM)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    # Saved in natural log: lse = ln(sum_j exp(scale * q.k_j)).
    lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
    tl.store(Lse + batch_head * query_length + rows, lse, mask=row_valid)
    tl.store(Out + batch * stride_ob + head * stride_oh + start_m.to(tl.int64) * stride_os
             + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _attn_bwd_delta_kernel(Out, GradOut, Delta, stride_ob, stride_oh, stride_os, stride_od,
                           stride_gb, stride_gh, stride_gs, stride_gd, num_heads, query_length,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta_i = sum_d dO_i * O_i (= sum_j P_ij dP_ij), the softmax-backward correction per row, fp32."""
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < query_length)[:, None] & (offs_d < HEAD_DIM)[None, :]
    out = tl.load(Out + batch * stride_ob + head * stride_oh + start_m.to(tl.int64) * stride_os
                  + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    grad_out = tl.load(GradOut + batch * stride_gb + head * stride_gh + start_m.to(tl.int64) * stride_gs
                       + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=mask, other=0.0)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    tl.store(Delta + batch_head * query_length + rows, delta, mask=rows < query_length)


@triton.jit
def _attn_bwd_dkdv_inner(grad_k, grad_v, k, v, cols, key_docs, q_base, g_base, lse_base, delta_base, doc_base,
                         stride_qs, stride_qd, stride_gs, stride_gd,
                         start, end, offset, query_length, key_length, scale_log2,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                         IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_valid = rows < query_length
        row_mask = row_valid[:, None] & d_valid[None, :]
        block_start = tl.cast(start_m, tl.int64)
        q = tl.load(q_base + block_start * stride_qs + offs_m[:, None] * stride_qs
                    + offs_d[None, :] * stride_qd,
                    mask=row_mask, other=0.0)
        grad_out = tl.load(g_base + block_start * stride_gs + offs_m[:, None] * stride_gs
                           + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
        lse_log2 = tl.load(lse_base + rows, mask=row_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_valid, other=0.0)
        scores = _dot(q, tl.trans(k), IS_FP32) * scale_log2  # (M, N)
        p = tl.exp2(scores - lse_log2[:, None])
        if MASKED or HAS_DOCUMENTS:
            query_docs = rows
            if HAS_DOCUMENTS:
                query_docs = tl.load(doc_base + rows, mask=row_valid, other=0)
            allowed = _allowed(rows, cols, query_docs, key_docs, offset, query_length, key_length,
                               MASKED, CAUSAL, HAS_DOCUMENTS)
            p = tl.where(allowed, p, 0.0)
        grad_v += _dot(tl.trans(p.to(grad_out.dtype)), grad_out, IS_FP32)
        grad_p = _dot(grad_out, tl.trans(v), IS_FP32)
        grad_scores = p * (grad_p - delta[:, None])
        grad_k += _dot(tl.trans(grad_scores.to(q.dtype)), q, IS_FP32)
    return grad_k, grad_v


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, DocumentIds, QueryBlockFirst, QueryBlockLast,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    num_heads, num_kv_heads, group, query_length, key_length, num_key_blocks, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    key_block = tl.program_id(0)
    start_n = key_block * BLOCK_N
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    offs_n = tl.arange(0, BLOCK_N)
    cols = start_n + offs_n
    offs_d = tl.arange(0, BLOCK_D)
    col_valid = cols < key_length
    d_valid = offs_d < HEAD_DIM
    offset = key_length - query_length
    kv_mask = col_valid[:, None] & d_valid[None, :]
    block_start = tl.cast(start_n, tl.int64)
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + block_start * stride_ks
                + offs_n[:, None] * stride_ks
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + block_start * stride_vs
                + offs_n[:, None] * stride_vs
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    doc_base = DocumentIds + batch * key_length

    # Query span [start_m, end_m): [start_m, unmasked_start) holds the diagonal,
    # [unmasked_start, unmasked_end) needs no causal/tail mask, the rest is the row tail.
    start_m = key_block * 0
    end_m = query_length + start_m
    unmasked_start = start_m
    if CAUSAL:
        # Query i sees key j iff j <= i + offset.
        start_m = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        unmasked_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    key_docs = cols
    if HAS_DOCUMENTS:
        key_docs = tl.load(doc_base + cols, mask=col_valid, other=0)
        start_m = tl.maximum(start_m, tl.load(QueryBlockFirst + batch * num_key_blocks + key_block) * BLOCK_M)
        end_m = tl.minimum(end_m, tl.load(QueryBlockLast + batch * num_key_blocks + key_block) * BLOCK_M)
    unmasked_end = query_length // BLOCK_M * BLOCK_M
    # A key block with a tail is masked all the way.
    unmasked_end = tl.where(start_n + BLOCK_N <= key_length, unmasked_end, 0)
    unmasked_start = tl.minimum(tl.maximum(unmasked_start, start_m), end_m)
    unmasked_end = tl.maximum(tl.minimum(unmasked_end, end_m), unmasked_start)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for head_in_group in range(group):
        head = kv_head * group + head_in_group
        q_base = Q + batch * stride_qb + head * stride_qh
        g_base = GradOut + batch * stride_gb + head * stride_gh
        row_base = (batch * num_heads + head) * query_length
        grad_k, grad_v = _attn_bwd_dkdv_inner(
            grad_k, grad_v, k, v, cols, key_docs, q_base, g_base, Lse + row_base, Delta + row_base, doc_base,
            stride_qs, stride_qd, stride_gs, stride_gd, start_m, unmasked_start, offset, query_length, key_length,
            scale_log2, True, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_M, BLOCK_D, HEAD_DIM)
        grad_k, grad_v = _attn_bwd_dkdv_inner(
            grad_k, grad_v, k, v, cols, key_docs, q_base, g_base, Lse + row_base, Delta + row_base, doc_base,
            stride_qs, stride_qd, stride_gs, stride_gd, unmasked_start, unmasked_end, offset, query_length,
            key_length, scale_log2, False, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_M, BLOCK_D, HEAD_DIM)
        grad_k, grad_v = _attn_bwd_dkdv_inner(
            grad_k, grad_v, k, v, cols, key_docs, q_base, g_base, Lse + row_base, Delta + row_base, doc_base,
            stride_qs, stride_qd, stride_gs, stride_gd, unmasked_end, end_m, offset, query_length, key_length,
            scale_log2, True, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_M, BLOCK_D, HEAD_DIM)

    # grad_k and grad_v are allocated together, contiguous: one set of strides.
    out_offsets = (batch * stride_dkb + kv_head * stride_dkh + block_start * stride_dks
                   + offs_n[:, None] * stride_dks
                   + offs_d[None, :] * stride_dkd)
    tl.store(GradK + out_offsets, (grad_k * scale).to(GradK.dtype.element_ty), mask=kv_mask)
    tl.store(GradV + out_offsets, grad_v.to(GradV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(grad_q, q, grad_out, lse_log2, delta, rows, query_docs, k_base, v_base, doc_base,
                       stride_ks, stride_kd, stride_vs, stride_vd,
                       start, end, offset, query_length, key_length, scale_log2,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                       IS_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < key_length
        kv_mask = col_valid[:, None] & d_valid[None, :]
        block_start = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + block_start * stride_ks + offs_n[:, None] * stride_ks
                    + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + block_start * stride_vs + offs_n[:, None] * stride_vs
                    + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        scores = _dot(q, tl.trans(k), IS_FP32) * scale_log2
        p = tl.exp2(scores - lse_log2[:, None])
        if MASKED or HAS_DOCUMENTS:
            key_docs = cols
            if HAS_DOCUMENTS:
                key_docs = tl.load(doc_base + cols, mask=col_valid, other=0)
            allowed = _allowed(rows, cols, query_docs, key_docs, offset, query_length, key_length,
                               MASKED, CAUSAL, HAS_DOCUMENTS)
            p = tl.where(allowed, p, 0.0)
        grad_p = _dot(grad_out, tl.trans(v), IS_FP32)
        grad_scores = p * (grad_p - delta[:, None])
        grad_q += _dot(grad_scores.to(k.dtype), k, IS_FP32)
    return grad_q


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, DocumentIds, KeyBlockFirst, KeyBlockLast,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    num_heads, group, query_length, key_length, num_query_blocks, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    query_block = tl.program_id(0)
    start_m = query_block * BLOCK_M
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < query_length
    d_valid = offs_d < HEAD_DIM
    row_mask = row_valid[:, None] & d_valid[None, :]
    offset = key_length - query_length
    block_start = tl.cast(start_m, tl.int64)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + block_start * stride_qs
                + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
    grad_out = tl.load(GradOut + batch * stride_gb + head * stride_gh + block_start * stride_gs
                       + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
    lse_log2 = tl.load(Lse + batch_head * query_length + rows, mask=row_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + batch_head * query_length + rows, mask=row_valid, other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    doc_base = DocumentIds + batch * key_length

    # Same key span as the forward.
    start_n = query_block * 0
    end_n = key_length + start_n
    full_end = key_length // BLOCK_N * BLOCK_N
    if CAUSAL:
        end_n = tl.minimum(end_n, start_m + BLOCK_M + offset)
        full_end = tl.minimum(full_end, (start_m + offset + 1) // BLOCK_N * BLOCK_N)
    query_docs = rows
    if HAS_DOCUMENTS:
        query_docs = tl.load(doc_base + rows, mask=row_valid, other=0)
        start_n = tl.load(KeyBlockFirst + batch * num_query_blocks + query_block) * BLOCK_N
        end_n = tl.minimum(end_n, tl.load(KeyBlockLast + batch * num_query_blocks + query_block) * BLOCK_N)
    full_end = tl.maximum(tl.minimum(full_end, end_n), start_n)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    grad_q = _attn_bwd_dq_inner(grad_q, q, grad_out, lse_log2, delta, rows, query_docs, k_base, v_base, doc_base,
                                stride_ks, stride_kd, stride_vs, stride_vd, start_n, full_end, offset,
                                query_length, key_length, scale_log2,
                                False, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_N, BLOCK_D, HEAD_DIM)
    grad_q = _attn_bwd_dq_inner(grad_q, q, grad_out, lse_log2, delta, rows, query_docs, k_base, v_base, doc_base,
                                stride_ks, stride_kd, stride_vs, stride_vd, full_end, end_n, offset,
                                query_length, key_length, scale_log2,
                                True, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_N, BLOCK_D, HEAD_DIM)
    tl.store(GradQ + batch * stride_dqb + head * stride_dqh + block_start * stride_dqs
             + offs_m[:, None] * stride_dqs
             + offs_d[None, :] * stride_dqd, (grad_q * scale).to(GradQ.dtype.element_ty), mask=row_mask)


def document_block_ranges(document_ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``block`` positions, the min and max document id: two (B, ceil(S / block)).

    The tail block is padded with each row's last id, which changes neither bound.
    """
    batch, length = document_ids.shape
    num_blocks = triton.cdiv(length, block)
    padded = document_ids[:, -1:].expand(batch, num_blocks * block).clone()
    padded[:, :length] = document_ids
    blocks = padded.view(batch, num_blocks, block)
    return blocks.amin(-1), blocks.amax(-1)


def meeting_block_spans(document_ids: torch.Tensor, row_block: int, column_block: int):
    """Per row block, the span [first, last) of column blocks whose document ranges meet it.

    document_ids: (B, S) int32. Returns two (B, ceil(S / row_block)) int32. Never
    empty: a block always meets the block(s) holding its own positions.
    """
    row_min, row_max = document_block_ranges(document_ids, row_block)
    column_min, column_max = document_block_ranges(document_ids, column_block)
    meets = (column_max[:, None, :] >= row_min[:, :, None]) & (column_min[:, None, :] <= row_max[:, :, None])
    meets = meets.to(torch.int32)
    first = meets.argmax(-1)  # argmax returns the first maximal index
    last = meets.shape[-1] - meets.flip(-1).argmax(-1)
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


def _document_arguments(document_ids, row_block, column_block, device):
    """(document_ids, first, last, number of row blocks) kernel arguments; dummies without documents."""
    if document_ids is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy, dummy, 1
    document_ids = document_ids.to(torch.int32).contiguous()
    first, last = meeting_block_spans(document_ids, row_block, column_block)
    return document_ids, first, last, first.shape[1]


def _head_dims(head_dim: int) -> dict:
    return {"BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "HEAD_DIM": head_dim}


def attention_forward(q, k, v, causal: bool, document_ids, scale: float):
    """q: (B, Hq, S_q, D), k, v: (B, Hkv, S_kv, D) -> out (B, Hq, S_q, D), lse (B, Hq, S_q) fp32."""
    batch, num_heads, query_length, head_dim = q.shape
    block_m, block_n, num_warps, num_stages = _config(FORWARD_CONFIGS, head_dim, q.device, q.dtype)
    doc_ids, first, last, num_query_blocks = _document_arguments(document_ids, block_m, block_n, q.device)
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, num_heads, query_length), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(query_length, block_m), batch * num_heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, doc_ids, first, last,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_heads, num_heads // k.shape[1], query_length, k.shape[2], num_query_blocks, scale * LOG2_E,
        CAUSAL=causal, HAS_DOCUMENTS=document_ids is not None, IS_FP32=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, **_head_dims(head_dim), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, causal: bool, document_ids, scale: float):
    """Gradients (dq, dk, dv) shaped like (q, k, v); grad_out (B, Hq, S_q, D), lse contiguous."""
    batch, num_heads, query_length, head_dim = q.shape
    num_kv_heads, key_length = k.shape[1], k.shape[2]
    flags = dict(CAUSAL=causal, HAS_DOCUMENTS=document_ids is not None, IS_FP32=q.dtype == torch.float32,
                 **_head_dims(head_dim))
    delta = torch.empty((batch, num_heads, query_length), dtype=torch.float32, device=q.device)
    # One pass over O and dO instead of two fp32 copies (torch would materialise them).
    delta_block = 64 if q.device.type == "cuda" else INTERPRETER_CONFIG[0]
    _attn_bwd_delta_kernel[(triton.cdiv(query_length, delta_block), batch * num_heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), num_heads, query_length,
        BLOCK_M=delta_block, **_head_dims(head_dim),
    )
    grad_q = q.new_empty(q.shape)
    grad_k = k.new_empty(k.shape)
    grad_v = v.new_empty(v.shape)

    block_m, block_n, num_warps, num_stages = _config(BACKWARD_DKDV_CONFIGS, head_dim, q.device, q.dtype)
    doc_ids, first, last, num_key_blocks = _document_arguments(document_ids, block_n, block_m, q.device)
    _attn_bwd_dkdv_kernel[(triton.cdiv(key_length, block_n), batch * num_kv_heads)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, doc_ids, first, last,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(),
        num_heads, num_kv_heads, num_heads // num_kv_heads, query_length, key_length, num_key_blocks,
        scale, scale * LOG2_E, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        num_warps=num_warps, num_stages=num_stages,
    )

    block_m, block_n, num_warps, num_stages = _config(BACKWARD_DQ_CONFIGS, head_dim, q.device, q.dtype)
    doc_ids, first, last, num_query_blocks = _document_arguments(document_ids, block_m, block_n, q.device)
    _attn_bwd_dq_kernel[(triton.cdiv(query_length, block_m), batch * num_heads)](
        q, k, v, grad_out, lse, delta, grad_q, doc_ids, first, last,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(),
        num_heads, num_heads // num_kv_heads, query_length, key_length, num_query_blocks,
        scale, scale * LOG2_E, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        num_warps=num_warps, num_stages=num_stages,
    )
    return grad_q, grad_k, grad_v
