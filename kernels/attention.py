"""Flash attention in Triton: forward (online softmax, saves log-sum-exp), backward (dQ, dK, dV).

Masks: causal (queries aligned to the end of the keys when S_kv > S_q) and
per-token document ids. Whole blocks the masks remove are skipped:
  - causal: the key loop stops at the diagonal, the query loop starts there;
  - documents: each key block's (and query block's) [min, max] document id is
    computed once per launch; a block pair whose ranges cannot intersect is
    skipped. This makes no assumption that ids are sorted along a row, and is
    exact when they are (CM3 packing), where a 3-document row visits roughly a
    third of the causal blocks.
GQA: query head h reads key/value head h // G; the dK/dV kernel owns one
key/value block and loops over the G query heads of its group, so no atomics.
Any D up to 256 (the d axis is padded to a power of two and masked) and any S.

Launchers allocate outputs, pick the grid and launch; nothing else.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction

# Block sizes and warps per head dim, (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Chosen from the Triton fused-attention tutorial's H100 settings (128x64 tiles,
# 8 warps at D=128; 3 stages keep shared memory under 228 KB at D=128); NOT tuned
# here: this was written on a machine without a GPU. D=256 halves the tiles so
# K and V blocks still fit in shared memory.
FORWARD_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
# dK/dV keeps a key block resident and streams query blocks (narrow M), dQ the
# opposite (narrow N): the tutorial's asymmetric tiling.
BACKWARD_DKDV_CONFIGS = {64: (32, 128, 4, 3), 128: (32, 64, 4, 3), 256: (16, 32, 4, 2)}
BACKWARD_DQ_CONFIGS = {64: (128, 32, 4, 3), 128: (64, 32, 4, 3), 256: (32, 16, 4, 2)}
# The interpreter runs each program in Python: 32x32 tiles still give several
# blocks (and tails) at the test sizes S = 17..257 while keeping tests short.
INTERPRETER_CONFIG = (32, 32, 4, 1)


def _config(table: dict, head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    padded = max(64, triton.next_power_of_2(head_dim))
    return table[padded]


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    # fp32 inputs: exact fp32 products (tl.dot would otherwise use tf32 on GPU).
    if IS_FP32:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _allowed(offs_m, offs_n, query_docs, key_docs, offset, query_length, key_length,
             CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True where query offs_m may attend key offs_n."""
    allowed = (offs_m[:, None] < query_length) & (offs_n[None, :] < key_length)
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + offset)
    if HAS_DOCUMENTS:
        allowed = allowed & (query_docs[:, None] == key_docs[None, :])
    return allowed


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, DocumentIds, KeyBlockMin, KeyBlockMax,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, group, query_length, key_length, head_dim, num_key_blocks, scale_log2,
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < query_length
    d_valid = offs_d < head_dim
    offset = key_length - query_length

    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    end_n = key_length
    if CAUSAL:
        end_n = tl.minimum(key_length, start_m + BLOCK_M + offset)
    query_docs = offs_m
    key_docs = offs_n
    query_doc_min = 0
    query_doc_max = 0
    if HAS_DOCUMENTS:
        query_docs = tl.load(DocumentIds + batch * query_length + offs_m, mask=row_valid, other=0)
        query_doc_min = tl.min(tl.where(row_valid, query_docs, 2147483647), 0)
        query_doc_max = tl.max(tl.where(row_valid, query_docs, -2147483647), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        visit = True
        if HAS_DOCUMENTS:
            block = start_n // BLOCK_N
            key_min = tl.load(KeyBlockMin + batch * num_key_blocks + block)
            key_max = tl.load(KeyBlockMax + batch * num_key_blocks + block)
            visit = (key_max >= query_doc_min) & (key_min <= query_doc_max)
        if visit:
            cols = start_n + offs_n
            col_valid = cols < key_length
            k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                        mask=col_valid[None, :] & d_valid[:, None], other=0.0)
            if HAS_DOCUMENTS:
                key_docs = tl.load(DocumentIds + batch * query_length + cols, mask=col_valid, other=0)
            scores = _dot(q, k, IS_FP32) * scale_log2
            allowed = _allowed(offs_m, cols, query_docs, key_docs, offset, query_length, key_length,
                               CAUSAL, HAS_DOCUMENTS)
            scores = tl.where(allowed, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # A row with nothing allowed yet keeps m = -inf; subtract 0 instead so
            # exp2 gives 0, never NaN (padding rows of the last query block).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=col_valid[:, None] & d_valid[None, :], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IS_FP32)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    # Saved in natural log: lse = ln(sum_j exp(scale * q.k_j)).
    lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
    tl.store(Lse + batch_head * query_length + offs_m, lse, mask=row_valid)
    tl.store(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, DocumentIds, QueryBlockMin, QueryBlockMax,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    num_heads, num_kv_heads, group, query_length, key_length, head_dim, num_query_blocks, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_valid = cols < key_length
    d_valid = offs_d < head_dim
    offset = key_length - query_length
    kv_mask = col_valid[:, None] & d_valid[None, :]
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)

    # Causal: query i sees key j iff j <= i + offset, so start at the block holding i = start_n - offset.
    start_m_first = 0
    if CAUSAL:
        start_m_first = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
    key_docs = cols
    query_docs = offs_m
    key_doc_min = 0
    key_doc_max = 0
    if HAS_DOCUMENTS:
        key_docs = tl.load(DocumentIds + batch * key_length + cols, mask=col_valid, other=0)
        key_doc_min = tl.min(tl.where(col_valid, key_docs, 2147483647), 0)
        key_doc_max = tl.max(tl.where(col_valid, key_docs, -2147483647), 0)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for head_in_group in range(0, group):
        head = kv_head * group + head_in_group
        q_base = Q + batch * stride_qb + head * stride_qh
        g_base = GradOut + batch * stride_gb + head * stride_gh
        row_base = (batch * num_heads + head) * query_length
        for start_m in range(start_m_first, query_length, BLOCK_M):
            visit = True
            if HAS_DOCUMENTS:
                block = start_m // BLOCK_M
                query_min = tl.load(QueryBlockMin + batch * num_query_blocks + block)
                query_max = tl.load(QueryBlockMax + batch * num_query_blocks + block)
                visit = (query_max >= key_doc_min) & (query_min <= key_doc_max)
            if visit:
                rows = start_m + offs_m
                row_valid = rows < query_length
                row_mask = row_valid[:, None] & d_valid[None, :]
                q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
                grad_out = tl.load(g_base + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                                   mask=row_mask, other=0.0)
                lse_log2 = tl.load(Lse + row_base + rows, mask=row_valid, other=0.0) * 1.4426950408889634
                delta = tl.load(Delta + row_base + rows, mask=row_valid, other=0.0)
                if HAS_DOCUMENTS:
                    query_docs = tl.load(DocumentIds + batch * key_length + rows, mask=row_valid, other=0)
                allowed = _allowed(rows, cols, query_docs, key_docs, offset, query_length, key_length,
                                   CAUSAL, HAS_DOCUMENTS)
                scores = _dot(q, tl.trans(k), IS_FP32) * scale_log2  # (M, N)
                p = tl.where(allowed, tl.exp2(scores - lse_log2[:, None]), 0.0)
                grad_v += _dot(tl.trans(p.to(grad_out.dtype)), grad_out, IS_FP32)
                grad_p = _dot(grad_out, tl.trans(v), IS_FP32)
                grad_scores = p * (grad_p - delta[:, None])
                grad_k += _dot(tl.trans(grad_scores.to(q.dtype)), q, IS_FP32)

    # grad_k and grad_v are allocated together, contiguous: one set of strides.
    out_offsets = batch * stride_dkb + kv_head * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(GradK + out_offsets, (grad_k * scale).to(GradK.dtype.element_ty), mask=kv_mask)
    tl.store(GradV + out_offsets, grad_v.to(GradV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, DocumentIds, KeyBlockMin, KeyBlockMax,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    num_heads, group, query_length, key_length, head_dim, num_key_blocks, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < query_length
    d_valid = offs_d < head_dim
    row_mask = row_valid[:, None] & d_valid[None, :]
    offset = key_length - query_length
    q_offsets = batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(Q + q_offsets, mask=row_mask, other=0.0)
    grad_out = tl.load(GradOut + batch * stride_gb + head * stride_gh + rows[:, None] * stride_gs
                       + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
    lse_log2 = tl.load(Lse + batch_head * query_length + rows, mask=row_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + batch_head * query_length + rows, mask=row_valid, other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    end_n = key_length
    if CAUSAL:
        end_n = tl.minimum(key_length, start_m + BLOCK_M + offset)
    query_docs = rows
    key_docs = offs_n
    query_doc_min = 0
    query_doc_max = 0
    if HAS_DOCUMENTS:
        query_docs = tl.load(DocumentIds + batch * query_length + rows, mask=row_valid, other=0)
        query_doc_min = tl.min(tl.where(row_valid, query_docs, 2147483647), 0)
        query_doc_max = tl.max(tl.where(row_valid, query_docs, -2147483647), 0)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        visit = True
        if HAS_DOCUMENTS:
            block = start_n // BLOCK_N
            key_min = tl.load(KeyBlockMin + batch * num_key_blocks + block)
            key_max = tl.load(KeyBlockMax + batch * num_key_blocks + block)
            visit = (key_max >= query_doc_min) & (key_min <= query_doc_max)
        if visit:
            cols = start_n + offs_n
            col_valid = cols < key_length
            kv_mask = col_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if HAS_DOCUMENTS:
                key_docs = tl.load(DocumentIds + batch * query_length + cols, mask=col_valid, other=0)
            allowed = _allowed(rows, cols, query_docs, key_docs, offset, query_length, key_length,
                               CAUSAL, HAS_DOCUMENTS)
            scores = _dot(q, tl.trans(k), IS_FP32) * scale_log2
            p = tl.where(allowed, tl.exp2(scores - lse_log2[:, None]), 0.0)
            grad_p = _dot(grad_out, tl.trans(v), IS_FP32)
            grad_scores = p * (grad_p - delta[:, None])
            grad_q += _dot(grad_scores.to(k.dtype), k, IS_FP32)

    grad_q_offsets = (batch * stride_dqb + head * stride_dqh + rows[:, None] * stride_dqs
                      + offs_d[None, :] * stride_dqd)
    tl.store(GradQ + grad_q_offsets, (grad_q * scale).to(GradQ.dtype.element_ty), mask=row_mask)


def document_block_ranges(document_ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``block`` positions, the min and max document id: two (B, ceil(S / block)) int32.

    The tail block is padded with each row's last id, which changes neither bound.
    """
    batch, length = document_ids.shape
    num_blocks = triton.cdiv(length, block)
    padded = document_ids[:, -1:].expand(batch, num_blocks * block).clone()
    padded[:, :length] = document_ids
    blocks = padded.view(batch, num_blocks, block)
    return blocks.amin(-1).contiguous(), blocks.amax(-1).contiguous()


def _document_arguments(document_ids, block, device):
    if document_ids is None:
        empty = torch.empty(1, dtype=torch.int32, device=device)
        return empty, empty, empty, 1
    block_min, block_max = document_block_ranges(document_ids, block)
    return document_ids, block_min, block_max, block_min.shape[1]


def _prepare_document_ids(document_ids):
    return None if document_ids is None else document_ids.to(torch.int32).contiguous()


def attention_forward(q, k, v, causal: bool, document_ids, scale: float):
    """q: (B, Hq, S_q, D), k, v: (B, Hkv, S_kv, D) -> out (B, Hq, S_q, D), lse (B, Hq, S_q) fp32."""
    batch, num_heads, query_length, head_dim = q.shape
    key_length = k.shape[2]
    block_m, block_n, num_warps, num_stages = _config(FORWARD_CONFIGS, head_dim, q.device)
    document_ids = _prepare_document_ids(document_ids)
    doc_ids, key_min, key_max, num_key_blocks = _document_arguments(document_ids, block_n, q.device)
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, num_heads, query_length), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(query_length, block_m), batch * num_heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, doc_ids, key_min, key_max,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_heads, num_heads // k.shape[1], query_length, key_length, head_dim, num_key_blocks, scale * LOG2_E,
        CAUSAL=causal, HAS_DOCUMENTS=document_ids is not None, IS_FP32=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, causal: bool, document_ids, scale: float):
    """Gradients (dq, dk, dv) shaped like (q, k, v); grad_out is contiguous (B, Hq, S_q, D)."""
    batch, num_heads, query_length, head_dim = q.shape
    num_kv_heads, key_length = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    is_fp32 = q.dtype == torch.float32
    has_documents = document_ids is not None
    document_ids = _prepare_document_ids(document_ids)
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax-backward correction per row.
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    grad_q = q.new_empty(q.shape)
    grad_k = k.new_empty(k.shape)
    grad_v = v.new_empty(v.shape)

    block_m, block_n, num_warps, num_stages = _config(BACKWARD_DKDV_CONFIGS, head_dim, q.device)
    doc_ids, query_min, query_max, num_query_blocks = _document_arguments(document_ids, block_m, q.device)
    grid = (triton.cdiv(key_length, block_n), batch * num_kv_heads)
    _attn_bwd_dkdv_kernel[grid](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, doc_ids, query_min, query_max,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(),
        num_heads, num_kv_heads, group, query_length, key_length, head_dim, num_query_blocks, scale, scale * LOG2_E,
        CAUSAL=causal, HAS_DOCUMENTS=has_documents, IS_FP32=is_fp32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )

    block_m, block_n, num_warps, num_stages = _config(BACKWARD_DQ_CONFIGS, head_dim, q.device)
    doc_ids, key_min, key_max, num_key_blocks = _document_arguments(document_ids, block_n, q.device)
    grid = (triton.cdiv(query_length, block_m), batch * num_heads)
    _attn_bwd_dq_kernel[grid](
        q, k, v, grad_out, lse, delta, grad_q, doc_ids, key_min, key_max,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(),
        num_heads, group, query_length, key_length, head_dim, num_key_blocks, scale, scale * LOG2_E,
        CAUSAL=causal, HAS_DOCUMENTS=has_documents, IS_FP32=is_fp32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )
    return grad_q, grad_k, grad_v
