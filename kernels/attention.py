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
key/value block and loops over the G query heads of its group, so no atomics
and the gradients are deterministic.
Any D up to 256 (the d axis is padded to a power of two and masked) and any S.

Hopper structure:
  - forward: q, k, v, out through tensor descriptors (TMA on sm_90) when their
    strides allow it, else pointers; the key loop is software-pipelined by one
    block, so the next block's QK^T is issued before this block's softmax and
    the exp2 work overlaps the tensor cores; causal query blocks launch
    heaviest first;
  - backward: dK/dV computes K Q^T and V dO^T (keys on the M side), so a key
    block of 64 or more rows runs on wgmma; dQ is a second pass that recomputes
    P and dP, which keeps the backward free of atomics (the alternatives, fp32
    atomics or a stored dS, are non-deterministic or write S^2 values).
Grids put (batch, head) on axis 0 and blocks on axis 1, so the heaviest blocks
of every head start in the first wave.

Launchers allocate outputs, pick the grid and launch; nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # host-side tensor descriptors (TMA on Hopper): Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer path
    TensorDescriptor = None

LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, bf16 on sm_90a, chosen
# from ptxas (no GPU here, so not timed): the largest tiles with no spill, every dot on
# wgmma, shared memory within an H100's 227 KB; tests/test_attention.py gates all three.
FORWARD_CONFIGS = {64: (128, 128, 8, 3), 128: (128, 64, 8, 3), 256: (64, 64, 4, 2)}
# dK/dV: BLOCK_N keys stay resident and BLOCK_M query rows stream past them. The two fp32
# accumulators (128 x D each) fill most registers, so some cases step by 16 query rows: at
# D=128, 32-row steps spill 24 B in the loop (Triton 3.6 causal, 3.8 with documents), and
# at D=64 with documents 92 B (Triton 3.6); 16-row steps spill nothing under either.
BACKWARD_DKDV_CONFIGS = {64: (32, 128, 8, 3), 128: (16, 128, 8, 2), 256: (16, 64, 8, 2)}
BACKWARD_DKDV_DOCUMENT_CONFIGS = {**BACKWARD_DKDV_CONFIGS, 64: (16, 128, 8, 3)}
# dQ: BLOCK_M query rows stay resident and BLOCK_N keys stream.
BACKWARD_DQ_CONFIGS = {64: (128, 64, 8, 3), 128: (128, 64, 8, 2), 256: (64, 32, 8, 2)}
# The interpreter runs each program in Python: 32x32 tiles still give several
# blocks (and tails) at the test sizes S = 17..257 while keeping tests short.
INTERPRETER_CONFIG = (32, 32, 4, 1)
# The backward's delta pass (rowwise dO . O) on a GPU: 64 query rows per program.
DELTA_BLOCK_M = 64


def _config(table: dict, head_dim: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int,
                                                                                           int]:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    block_m, block_n, num_warps, num_stages = table[max(64, triton.next_power_of_2(head_dim))]
    if dtype == torch.float32:
        # fp32 tiles are twice as large and fp32 dots do not use wgmma: one stage fewer.
        num_stages = max(1, num_stages - 1)
    return block_m, block_n, num_warps, num_stages


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    # fp32 inputs: exact fp32 products (tl.dot would otherwise use tf32 on GPU).
    if IS_FP32:  # noqa: SIM108 - constexpr branch in @triton.jit, kept as a block
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _load_tile(Tensor, batch, head, start, length, stride_b, stride_h, stride_s, stride_d,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of Tensor[batch, head] as (BLOCK, BLOCK_D), zero past S and D.

    USE_TMA: Tensor is a 4-D descriptor with block (1, 1, BLOCK, BLOCK_D) and the
    hardware fills the out-of-bounds part; else a pointer, offsets in 64 bits
    (batch * stride passes 2^31 in a large tensor) except inside the block.
    """
    if USE_TMA:
        tile = Tensor.load([batch, head, start, 0]).reshape(BLOCK, BLOCK_D)
    else:
        offs = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        base = (Tensor + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
                + tl.cast(start, tl.int64) * stride_s)
        tile = tl.load(base + offs[:, None] * stride_s + offs_d[None, :] * stride_d,
                       mask=((start + offs) < length)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _store_tile(Tensor, tile, batch, head, start, length, stride_b, stride_h, stride_s, stride_d,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Store a (BLOCK, BLOCK_D) tile at rows [start, start + BLOCK) of Tensor[batch, head], clipped."""
    if USE_TMA:
        Tensor.store([batch, head, start, 0], tile.reshape(1, 1, BLOCK, BLOCK_D))
    else:
        offs = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        base = (Tensor + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
                + tl.cast(start, tl.int64) * stride_s)
        tl.store(base + offs[:, None] * stride_s + offs_d[None, :] * stride_d, tile,
                 mask=((start + offs) < length)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _allowed(query_positions, key_positions, query_docs, key_docs, offset, query_length, key_length,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr):
    """True where a query may attend a key; the arguments are broadcast against each other
    ((M, 1) with (1, N) in the forward, (1, M) with (N, 1) in the transposed dK/dV).

    MASKED=False: the caller knows the block is inside the causal region and
    has no tails, so only documents remain to check (called with MASKED or HAS_DOCUMENTS).
    """
    if MASKED:
        allowed = (query_positions < query_length) & (key_positions < key_length)
        if CAUSAL:
            allowed = allowed & (key_positions <= query_positions + offset)
        if HAS_DOCUMENTS:
            allowed = allowed & (query_docs == key_docs)
    else:
        allowed = query_docs == key_docs
    return allowed


@triton.jit
def _attn_fwd_softmax(l_i, m_i, scores, start_n, rows, query_docs, doc_base, offset, query_length, key_length,
                      scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Online-softmax step for the key block at start_n given its raw scores q k^T: (p, alpha, l, m)."""
    scores = scores * scale_log2
    if MASKED or HAS_DOCUMENTS:
        cols = start_n + tl.arange(0, BLOCK_N)
        key_docs = cols
        if HAS_DOCUMENTS:
            key_docs = tl.load(doc_base + cols, mask=cols < key_length, other=0)
        allowed = _allowed(rows[:, None], cols[None, :], query_docs[:, None], key_docs[None, :], offset,
                           query_length, key_length, MASKED, CAUSAL, HAS_DOCUMENTS)
        scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = m_new
    if MASKED or HAS_DOCUMENTS:
        # A row with nothing allowed yet keeps m = -inf; subtract 0 instead so
        # exp2 gives 0, never NaN (padding rows, rows outside these documents).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, rows, query_docs, K, V, doc_base, batch, kv_head,
                    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
                    start, end, offset, query_length, key_length, scale_log2,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                    IS_FP32: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Key blocks [start, end), P V lagging one block behind q k^T (FA3's intra-warpgroup overlap).

    Iteration j issues S_j = q k_j^T, then O += P_{j-1} V_{j-1} (both asynchronous
    wgmma on Hopper), then computes P_j from S_j: the softmax's exp2 work runs while
    the tensor cores do P_{j-1} V_{j-1}, and only the rescale O *= alpha_j waits for it.
    """
    num_blocks = tl.cdiv(end - start, BLOCK_N)
    if num_blocks > 0:
        k = _load_tile(K, batch, kv_head, start, key_length, stride_kb, stride_kh, stride_ks, stride_kd,
                       BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        p, alpha, l_i, m_i = _attn_fwd_softmax(l_i, m_i, _dot(q, tl.trans(k), IS_FP32), start, rows,
                                               query_docs, doc_base, offset, query_length, key_length,
                                               scale_log2, MASKED, CAUSAL, HAS_DOCUMENTS, BLOCK_N)
        acc = acc * alpha[:, None]
        for index in range(1, num_blocks):
            start_n = start + index * BLOCK_N
            k = _load_tile(K, batch, kv_head, start_n, key_length, stride_kb, stride_kh, stride_ks, stride_kd,
                           BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
            scores = _dot(q, tl.trans(k), IS_FP32)
            v = _load_tile(V, batch, kv_head, start_n - BLOCK_N, key_length, stride_vb, stride_vh, stride_vs,
                           stride_vd, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
            acc += _dot(p.to(v.dtype), v, IS_FP32)
            p, alpha, l_i, m_i = _attn_fwd_softmax(l_i, m_i, scores, start_n, rows, query_docs, doc_base,
                                                   offset, query_length, key_length, scale_log2, MASKED,
                                                   CAUSAL, HAS_DOCUMENTS, BLOCK_N)
            acc = acc * alpha[:, None]
        last_n = start + (num_blocks - 1) * BLOCK_N
        v = _load_tile(V, batch, kv_head, last_n, key_length, stride_vb, stride_vh, stride_vs, stride_vd,
                       BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        acc += _dot(p.to(v.dtype), v, IS_FP32)
    return acc, l_i, m_i


@triton.jit
def _key_span(query_block, batch, KeyBlockFirst, KeyBlockLast, num_query_blocks, offset, key_length,
              CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """(start_n, full_end, end_n): a query block's key span; [start_n, full_end) needs no causal/tail mask."""
    start_m = query_block * BLOCK_M
    start_n = query_block * 0
    end_n = key_length + start_n
    full_end = key_length // BLOCK_N * BLOCK_N
    if CAUSAL:
        end_n = tl.minimum(end_n, start_m + BLOCK_M + offset)
        full_end = tl.minimum(full_end, (start_m + offset + 1) // BLOCK_N * BLOCK_N)
    if HAS_DOCUMENTS:
        block_index = batch.to(tl.int64) * num_query_blocks + query_block
        start_n = tl.load(KeyBlockFirst + block_index) * BLOCK_N
        end_n = tl.minimum(end_n, tl.load(KeyBlockLast + block_index) * BLOCK_N)
    full_end = tl.maximum(tl.minimum(full_end, end_n), start_n)
    return start_n, full_end, end_n


@triton.jit
def _query_program(DocumentIds, KeyBlockFirst, KeyBlockLast, num_heads, group, query_length, key_length,
                   num_query_blocks, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query block this program owns (forward and dQ): its batch, heads, rows, the key blocks it
    visits and its rows' document ids. Grid: (batch * heads, query blocks)."""
    batch_head = tl.program_id(0)
    query_block = tl.program_id(1)
    if CAUSAL:  # the last query blocks see the most keys: launch them first
        query_block = tl.num_programs(1) - 1 - query_block
    batch = batch_head // num_heads
    head = batch_head % num_heads
    start_m = query_block * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    row_valid = rows < query_length
    offset = key_length - query_length
    doc_base = DocumentIds + batch.to(tl.int64) * key_length
    start_n, full_end, end_n = _key_span(query_block, batch, KeyBlockFirst, KeyBlockLast, num_query_blocks,
                                         offset, key_length, CAUSAL, HAS_DOCUMENTS, BLOCK_M, BLOCK_N)
    query_docs = rows
    if HAS_DOCUMENTS:
        query_docs = tl.load(doc_base + rows, mask=row_valid, other=0)
    return (batch_head, batch, head, head // group, start_m, rows, row_valid, offset, doc_base, start_n,
            full_end, end_n, query_docs)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, DocumentIds, KeyBlockFirst, KeyBlockLast,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, group, query_length, key_length, num_query_blocks, scale_log2,
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    (batch_head, batch, head, kv_head, start_m, rows, row_valid, offset, doc_base, start_n, full_end, end_n,
     query_docs) = _query_program(DocumentIds, KeyBlockFirst, KeyBlockLast, num_heads, group, query_length,
                                  key_length, num_query_blocks, CAUSAL, HAS_DOCUMENTS, BLOCK_M, BLOCK_N)
    q = _load_tile(Q, batch, head, start_m, query_length, stride_qb, stride_qh, stride_qs, stride_qd,
                   BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, rows, query_docs, K, V, doc_base, batch, kv_head,
                                    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
                                    stride_vs, stride_vd, start_n, full_end, offset, query_length,
                                    key_length, scale_log2, False, CAUSAL, HAS_DOCUMENTS, IS_FP32, USE_TMA,
                                    BLOCK_N, BLOCK_D, HEAD_DIM)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, rows, query_docs, K, V, doc_base, batch, kv_head,
                                    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
                                    stride_vs, stride_vd, full_end, end_n, offset, query_length,
                                    key_length, scale_log2,
                                    True, CAUSAL, HAS_DOCUMENTS, IS_FP32, USE_TMA, BLOCK_N, BLOCK_D, HEAD_DIM)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    # Saved in natural log: lse = ln(sum_j exp(scale * q.k_j)).
    lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
    tl.store(Lse + batch_head.to(tl.int64) * query_length + rows, lse, mask=row_valid)
    _store_tile(Out, acc.to(q.dtype), batch, head, start_m, query_length,
                stride_ob, stride_oh, stride_os, stride_od, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)


@triton.jit
def _attn_bwd_delta_kernel(Out, GradOut, Delta, stride_ob, stride_oh, stride_os, stride_od,
                           stride_gb, stride_gh, stride_gs, stride_gd, num_heads, query_length,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta_i = sum_d dO_i * O_i (= sum_j P_ij dP_ij), the softmax-backward correction per row, fp32."""
    batch_head = tl.program_id(0)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    start_m = tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    out = _load_tile(Out, batch, head, start_m, query_length, stride_ob, stride_oh, stride_os, stride_od,
                     BLOCK_M, BLOCK_D, HEAD_DIM, False)
    grad_out = _load_tile(GradOut, batch, head, start_m, query_length, stride_gb, stride_gh, stride_gs,
                          stride_gd, BLOCK_M, BLOCK_D, HEAD_DIM, False)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    tl.store(Delta + batch_head.to(tl.int64) * query_length + rows, delta, mask=rows < query_length)


@triton.jit
def _attn_bwd_dkdv_inner(grad_k, grad_v, k, v, cols, key_docs, Q, GradOut, lse_base, delta_base, doc_base,
                         batch, head, stride_qb, stride_qh, stride_qs, stride_qd,
                         stride_gb, stride_gh, stride_gs, stride_gd,
                         start, end, offset, query_length, key_length, scale_log2,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                         IS_FP32: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Query blocks [start, end) against one key block, all products transposed (keys x queries):
    K Q^T and V dO^T put the key block on the M side, so 64+ keys run on wgmma."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_valid = rows < query_length
        q = _load_tile(Q, batch, head, start_m, query_length, stride_qb, stride_qh, stride_qs, stride_qd,
                       BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)
        lse_log2 = tl.load(lse_base + rows, mask=row_valid, other=0.0) * 1.4426950408889634
        scores_t = _dot(k, tl.trans(q), IS_FP32) * scale_log2  # (N, M)
        p_t = tl.exp2(scores_t - lse_log2[None, :])
        if MASKED or HAS_DOCUMENTS:
            query_docs = rows
            if HAS_DOCUMENTS:
                query_docs = tl.load(doc_base + rows, mask=row_valid, other=0)
            allowed = _allowed(rows[None, :], cols[:, None], query_docs[None, :], key_docs[:, None], offset,
                               query_length, key_length, MASKED, CAUSAL, HAS_DOCUMENTS)
            p_t = tl.where(allowed, p_t, 0.0)
        grad_out = _load_tile(GradOut, batch, head, start_m, query_length, stride_gb, stride_gh, stride_gs,
                              stride_gd, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)
        delta = tl.load(delta_base + rows, mask=row_valid, other=0.0)
        grad_v += _dot(p_t.to(grad_out.dtype), grad_out, IS_FP32)
        grad_p_t = _dot(v, tl.trans(grad_out), IS_FP32)
        grad_s_t = p_t * (grad_p_t - delta[None, :])
        grad_k += _dot(grad_s_t.to(q.dtype), q, IS_FP32)
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
    CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, IS_FP32: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    batch_head = tl.program_id(0)
    key_block = tl.program_id(1)  # with a causal mask the first key blocks see the most queries
    start_n = key_block * BLOCK_N
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    cols = start_n + tl.arange(0, BLOCK_N)
    col_valid = cols < key_length
    offset = key_length - query_length
    # Through TMA, k and v stay in shared memory, where wgmma reads its A operand: loaded into
    # registers they would hold 64 of them per thread at D=128 beside the two fp32 accumulators.
    k = _load_tile(K, batch, kv_head, start_n, key_length, stride_kb, stride_kh, stride_ks, stride_kd,
                   BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
    v = _load_tile(V, batch, kv_head, start_n, key_length, stride_vb, stride_vh, stride_vs, stride_vd,
                   BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
    doc_base = DocumentIds + batch.to(tl.int64) * key_length

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
        block_index = batch.to(tl.int64) * num_key_blocks + key_block
        start_m = tl.maximum(start_m, tl.load(QueryBlockFirst + block_index) * BLOCK_M)
        end_m = tl.minimum(end_m, tl.load(QueryBlockLast + block_index) * BLOCK_M)
    unmasked_end = query_length // BLOCK_M * BLOCK_M
    # A key block with a tail is masked all the way.
    unmasked_end = tl.where(start_n + BLOCK_N <= key_length, unmasked_end, 0)
    unmasked_start = tl.minimum(tl.maximum(unmasked_start, start_m), end_m)
    unmasked_end = tl.maximum(tl.minimum(unmasked_end, end_m), unmasked_start)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for head_in_group in range(group):
        head = kv_head * group + head_in_group
        row_base = (batch.to(tl.int64) * num_heads + head) * query_length
        lse_base = Lse + row_base
        delta_base = Delta + row_base
        grad_k, grad_v = _attn_bwd_dkdv_inner(
            grad_k, grad_v, k, v, cols, key_docs, Q, GradOut, lse_base, delta_base, doc_base, batch, head,
            stride_qb, stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
            start_m, unmasked_start, offset, query_length, key_length, scale_log2,
            True, CAUSAL, HAS_DOCUMENTS, IS_FP32, USE_TMA, BLOCK_M, BLOCK_D, HEAD_DIM)
        grad_k, grad_v = _attn_bwd_dkdv_inner(
            grad_k, grad_v, k, v, cols, key_docs, Q, GradOut, lse_base, delta_base, doc_base, batch, head,
            stride_qb, stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
            unmasked_start, unmasked_end, offset, query_length, key_length, scale_log2,
            False, CAUSAL, HAS_DOCUMENTS, IS_FP32, USE_TMA, BLOCK_M, BLOCK_D, HEAD_DIM)
        grad_k, grad_v = _attn_bwd_dkdv_inner(
            grad_k, grad_v, k, v, cols, key_docs, Q, GradOut, lse_base, delta_base, doc_base, batch, head,
            stride_qb, stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
            unmasked_end, end_m, offset, query_length, key_length, scale_log2,
            True, CAUSAL, HAS_DOCUMENTS, IS_FP32, USE_TMA, BLOCK_M, BLOCK_D, HEAD_DIM)

    # grad_k and grad_v are allocated together, contiguous: one set of strides.
    _store_tile(GradK, (grad_k * scale).to(k.dtype), batch, kv_head, start_n, key_length,
                stride_dkb, stride_dkh, stride_dks, stride_dkd, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
    _store_tile(GradV, grad_v.to(k.dtype), batch, kv_head, start_n, key_length,
                stride_dkb, stride_dkh, stride_dks, stride_dkd, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)


@triton.jit
def _attn_bwd_dq_inner(grad_q, q, grad_out, lse_log2, delta, rows, query_docs, K, V, doc_base, batch, kv_head,
                       stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
                       start, end, offset, query_length, key_length, scale_log2,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                       IS_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       HEAD_DIM: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K, batch, kv_head, start_n, key_length, stride_kb, stride_kh, stride_ks, stride_kd,
                       BLOCK_N, BLOCK_D, HEAD_DIM, False)
        v = _load_tile(V, batch, kv_head, start_n, key_length, stride_vb, stride_vh, stride_vs, stride_vd,
                       BLOCK_N, BLOCK_D, HEAD_DIM, False)
        scores = _dot(q, tl.trans(k), IS_FP32) * scale_log2
        p = tl.exp2(scores - lse_log2[:, None])
        if MASKED or HAS_DOCUMENTS:
            key_docs = cols
            if HAS_DOCUMENTS:
                key_docs = tl.load(doc_base + cols, mask=cols < key_length, other=0)
            allowed = _allowed(rows[:, None], cols[None, :], query_docs[:, None], key_docs[None, :], offset,
                               query_length, key_length, MASKED, CAUSAL, HAS_DOCUMENTS)
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
    (batch_head, batch, head, kv_head, start_m, rows, row_valid, offset, doc_base, start_n, full_end, end_n,
     query_docs) = _query_program(DocumentIds, KeyBlockFirst, KeyBlockLast, num_heads, group, query_length,
                                  key_length, num_query_blocks, CAUSAL, HAS_DOCUMENTS, BLOCK_M, BLOCK_N)
    q = _load_tile(Q, batch, head, start_m, query_length, stride_qb, stride_qh, stride_qs, stride_qd,
                   BLOCK_M, BLOCK_D, HEAD_DIM, False)
    grad_out = _load_tile(GradOut, batch, head, start_m, query_length, stride_gb, stride_gh, stride_gs,
                          stride_gd, BLOCK_M, BLOCK_D, HEAD_DIM, False)
    row_base = batch_head.to(tl.int64) * query_length
    lse_log2 = tl.load(Lse + row_base + rows, mask=row_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row_base + rows, mask=row_valid, other=0.0)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    grad_q = _attn_bwd_dq_inner(grad_q, q, grad_out, lse_log2, delta, rows, query_docs, K, V, doc_base, batch,
                                kv_head, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
                                stride_vs, stride_vd, start_n, full_end, offset, query_length, key_length,
                                scale_log2,
                                False, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_N, BLOCK_D, HEAD_DIM)
    grad_q = _attn_bwd_dq_inner(grad_q, q, grad_out, lse_log2, delta, rows, query_docs, K, V, doc_base, batch,
                                kv_head, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
                                stride_vs, stride_vd, full_end, end_n, offset, query_length, key_length,
                                scale_log2,
                                True, CAUSAL, HAS_DOCUMENTS, IS_FP32, BLOCK_N, BLOCK_D, HEAD_DIM)
    _store_tile(GradQ, (grad_q * scale).to(GradQ.dtype.element_ty), batch, head, start_m, query_length,
                stride_dqb, stride_dqh, stride_dqs, stride_dqd, BLOCK_M, BLOCK_D, HEAD_DIM, False)


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


def _descriptor_ready(tensor: torch.Tensor) -> bool:
    """Whether TMA can address ``tensor``: unit last stride, 16-byte aligned base and other strides."""
    if TensorDescriptor is None or tensor.stride(-1) != 1 or tensor.numel() == 0:
        return False
    try:
        address = tensor.data_ptr()
    except RuntimeError:  # a fake tensor (the sm_90 audit): no storage, its offset decides
        address = tensor.storage_offset() * tensor.element_size()
    return address % 16 == 0 and all(stride * tensor.element_size() % 16 == 0
                                     for stride in tensor.stride()[:-1])


def _descriptors(tensors, blocks, block_d: int):
    """(arguments, use_tma): 4-D descriptors (block (1, 1, rows, BLOCK_D)) when every tensor allows
    TMA, else the tensors themselves for the pointer path. The interpreter runs both."""
    if not all(_descriptor_ready(tensor) for tensor in tensors):
        return list(tensors), False
    return [TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [1, 1, block, block_d])
            for tensor, block in zip(tensors, blocks, strict=True)], True


def attention_forward(q, k, v, causal: bool, document_ids, scale: float):
    """q: (B, Hq, S_q, D), k, v: (B, Hkv, S_kv, D) -> out (B, Hq, S_q, D), lse (B, Hq, S_q) fp32."""
    batch, num_heads, query_length, head_dim = q.shape
    block_m, block_n, num_warps, num_stages = _config(FORWARD_CONFIGS, head_dim, q.device, q.dtype)
    doc_ids, first, last, num_query_blocks = _document_arguments(document_ids, block_m, block_n, q.device)
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, num_heads, query_length), dtype=torch.float32, device=q.device)
    head_dims = _head_dims(head_dim)
    tiles, use_tma = _descriptors((q, k, v, out), (block_m, block_n, block_n, block_m), head_dims["BLOCK_D"])
    grid = (batch * num_heads, triton.cdiv(query_length, block_m))
    _attn_fwd_kernel[grid](
        *tiles, lse, doc_ids, first, last,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_heads, num_heads // k.shape[1], query_length, k.shape[2], num_query_blocks, scale * LOG2_E,
        CAUSAL=causal, HAS_DOCUMENTS=document_ids is not None, IS_FP32=q.dtype == torch.float32,
        USE_TMA=use_tma, BLOCK_M=block_m, BLOCK_N=block_n, **head_dims, num_warps=num_warps,
        num_stages=num_stages,
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
    delta_block = DELTA_BLOCK_M if q.device.type == "cuda" else INTERPRETER_CONFIG[0]
    _attn_bwd_delta_kernel[(batch * num_heads, triton.cdiv(query_length, delta_block))](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), num_heads, query_length,
        BLOCK_M=delta_block, **_head_dims(head_dim),
    )
    grad_q = q.new_empty(q.shape)
    grad_k = k.new_empty(k.shape)
    grad_v = v.new_empty(v.shape)

    table = BACKWARD_DKDV_CONFIGS if document_ids is None else BACKWARD_DKDV_DOCUMENT_CONFIGS
    block_m, block_n, num_warps, num_stages = _config(table, head_dim, q.device, q.dtype)
    doc_ids, first, last, num_key_blocks = _document_arguments(document_ids, block_n, block_m, q.device)
    tiles, use_tma = _descriptors((q, k, v, grad_out, grad_k, grad_v),
                                  (block_m, block_n, block_n, block_m, block_n, block_n), flags["BLOCK_D"])
    q_tile, k_tile, v_tile, grad_out_tile, grad_k_tile, grad_v_tile = tiles
    _attn_bwd_dkdv_kernel[(batch * num_kv_heads, triton.cdiv(key_length, block_n))](
        q_tile, k_tile, v_tile, grad_out_tile, lse, delta, grad_k_tile, grad_v_tile, doc_ids, first, last,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(),
        num_heads, num_kv_heads, num_heads // num_kv_heads, query_length, key_length, num_key_blocks,
        scale, scale * LOG2_E, USE_TMA=use_tma, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        num_warps=num_warps, num_stages=num_stages,
    )

    block_m, block_n, num_warps, num_stages = _config(BACKWARD_DQ_CONFIGS, head_dim, q.device, q.dtype)
    doc_ids, first, last, num_query_blocks = _document_arguments(document_ids, block_m, block_n, q.device)
    _attn_bwd_dq_kernel[(batch * num_heads, triton.cdiv(query_length, block_m))](
        q, k, v, grad_out, lse, delta, grad_q, doc_ids, first, last,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(),
        num_heads, num_heads // num_kv_heads, query_length, key_length, num_query_blocks,
        scale, scale * LOG2_E, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        num_warps=num_warps, num_stages=num_stages,
    )
    return grad_q, grad_k, grad_v
