"""Triton kernels of topk_dedup: fused scan (scores + per-program top-pool) and the filter walk.

Semantics (mkfast/ops/topk_dedup.py): rank memory rows by q·m descending (ties:
lower index first), walk the list skipping rows with q·m > threshold or m·m_s >
threshold for a row s already taken, stop at k.

Plan of one call:
  1. `_topk_dedup_scan_kernel`, grid (query blocks of 16, or 64 from 64 queries on,
     x splits of the memory): scores tile by tile with tl.dot (fp32 accumulation,
     never written to memory); the best `pool` eligible rows (<= threshold, not
     excluded) per query kept in registers as int64 keys that order like the ranked
     list, a row entering only if its score beats the pool's worst (one compare).
     N = 1e7 never needs a (b, N) score matrix: only (b, splits, pool) keys.
  2. merge the splits' keys with torch.topk (exact: keys are unique);
  3. `_topk_dedup_walk_kernel`, one program per query: the candidates' pool x pool
     Gram matrix with tl.dot, then the greedy walk over it;
  4. queries whose walk ran out of a full pool are redone with a 4x pool; past
     MAX_POOL the launcher hands them to `exhaustive_fallback` (the compiled kernel
     or the reference), so the answer is always the walk over the whole list.
"""

from __future__ import annotations

import numpy
import torch
import triton
import triton.language as tl

# tl.dot needs every dimension >= 16; a Hopper wgmma computes 64 rows per warpgroup.
# From WIDE_BATCH queries on, programs take WIDE_BLOCK_QUERIES queries, so the memory
# is streamed once per 64 queries on wgmma (16-query blocks streamed it 16 times at
# b=256, on mma.sync); fewer queries take 16-row blocks (a 64-row block would be mostly padding).
BLOCK_QUERIES = 16
WIDE_BLOCK_QUERIES = 64
WIDE_BATCH = 64
# Warps per scan program: one warpgroup while the (queries, pool) running int64 keys fit
# SCAN_KEYS_PER_WARPGROUP entries (8 registers per thread), else two, which halves the registers
# per thread the keys and the score tile take. At 16 queries x pool 128 one warpgroup compiled to
# 128 registers and spilled inside the row loop under Triton 3.6 (ptxas sm_90a; pool 64 spilled
# outside it under 3.6 and 3.8); two compile without a spill under both.
SCAN_KEYS_PER_WARPGROUP = 512
BLOCK_ROWS = 64
BLOCK_DIM = 64
# The walk holds a pool x pool fp32 Gram matrix in registers: 128 x 128 = 64 KiB
# per program over 8 warps is the most that does not spill badly; larger pools go
# to the exhaustive fallback.
MAX_POOL = 128
WALK_WARPS = 8
# Programs per SM for the scan grid: enough to hide memory latency.
PROGRAMS_PER_SM = 4
# Splits of the memory under the interpreter: more than one, so that tests on
# small memories exercise the merge.
INTERPRETER_SPLITS = 3
# "No candidate" key, below every real key. A constexpr: jit code may read only constexpr globals.
INT64_MIN = tl.constexpr(-(2**63))
# "No row" in the selection's row reductions; the launcher keeps rows below it.
NO_ROW = tl.constexpr(2**31 - 1)


@triton.jit
def _ranked_keys(scores, rows):
    """int64 keys ordering like the ranked list: fp32 score bits (made monotone), then inverted row."""
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    low_half = tl.full(rows.shape, 0xFFFFFFFF, tl.int64)
    return (ordered.to(tl.int64) << 32) | (low_half - rows.to(tl.int64))


@triton.jit
def _decoded_keys(keys):
    """(score, row) of keys made by _ranked_keys; the inverse on both halves."""
    ordered = (keys >> 32).to(tl.int32)
    scores = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    rows = (tl.full(keys.shape, 0xFFFFFFFF, tl.int64) - (keys & 0xFFFFFFFF)).to(tl.int32)
    return scores, rows


@triton.jit
def _topk_dedup_scan_kernel(
    queries_ptr, memory_ptr, exclude_ptr, keys_out_ptr, nan_out_ptr,
    batch, num_rows, dim, exclude_width, rows_per_split, num_splits, threshold,
    stride_query, stride_memory,
    POOL: tl.constexpr, BLOCK_QUERIES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr,
    UPCAST_MEMORY: tl.constexpr,
):
    """keys_out: (batch, num_splits, POOL) int64, each program's best eligible keys (unsorted);
    nan_out: (batch, num_splits) int8, 1 where a score of the query in this split is NaN."""
    query_block = tl.program_id(0)
    split = tl.program_id(1)
    query_offsets = query_block * BLOCK_QUERIES + tl.arange(0, BLOCK_QUERIES)
    query_mask = query_offsets < batch
    pool_offsets = tl.arange(0, POOL)
    best = tl.full((BLOCK_QUERIES, POOL), INT64_MIN, tl.int64)
    nan_seen = tl.zeros((BLOCK_QUERIES,), tl.int32)
    split_start = split * rows_per_split
    split_end = tl.minimum(split_start + rows_per_split, num_rows)
    for tile_start in range(split_start, split_end, BLOCK_ROWS):
        row_offsets = tile_start + tl.arange(0, BLOCK_ROWS)
        row_mask = row_offsets < split_end
        scores = tl.zeros((BLOCK_QUERIES, BLOCK_ROWS), tl.float32)
        for dim_start in range(0, dim, BLOCK_DIM):
            dim_offsets = dim_start + tl.arange(0, BLOCK_DIM)
            dim_mask = dim_offsets < dim
            query_tile = tl.load(queries_ptr + query_offsets[:, None] * stride_query + dim_offsets[None, :],
                                 mask=query_mask[:, None] & dim_mask[None, :], other=0.0)
            memory_tile = tl.load(memory_ptr + row_offsets[:, None].to(tl.int64) * stride_memory
                                  + dim_offsets[None, :],
                                  mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            if UPCAST_MEMORY:
                memory_tile = memory_tile.to(tl.float32)
            # "ieee": no TF32 for fp32 inputs, so scores match the fp32 reference.
            scores += tl.dot(query_tile, tl.trans(memory_tile), input_precision="ieee")
        # -0.0 ranks as +0.0 (the reference compares values; keys compare bits).
        scores = tl.where(scores == 0.0, 0.0, scores)
        in_range = row_mask[None, :] & query_mask[:, None]
        nan_seen = tl.maximum(nan_seen, tl.max(((scores != scores) & in_range).to(tl.int32), axis=1))
        eligible = (scores <= threshold) & in_range  # NaN is never eligible; the launcher raises for it
        for slot in range(exclude_width):
            excluded = tl.load(exclude_ptr + query_offsets * exclude_width + slot, mask=query_mask, other=-1)
            eligible = eligible & (row_offsets[None, :] != excluded[:, None])
        # Selection in registers, as FAISS's BlockSelect: one compare per score against the
        # pool's worst (decoded from its key) rejects almost every row once the pool is warm;
        # the rows that beat it are inserted best first. No (queries, rows) int64 key tile.
        worst = tl.min(best, axis=1)
        worst_score, worst_row = _decoded_keys(worst)
        has_room = worst == INT64_MIN
        ranks_before_worst = (scores > worst_score[:, None]) | (
            (scores == worst_score[:, None]) & (row_offsets[None, :] < worst_row[:, None]))
        improving = eligible & (has_room[:, None] | ranks_before_worst)
        steps = tl.minimum(tl.max(tl.sum(improving.to(tl.int32), axis=1), axis=0), POOL)
        for _ in range(steps):
            top_score = tl.max(tl.where(improving, scores, float("-inf")), axis=1)
            at_top = improving & (scores == top_score[:, None])
            top_row = tl.min(tl.where(at_top, row_offsets[None, :], NO_ROW), axis=1)
            candidate = tl.where(top_row != NO_ROW, _ranked_keys(top_score, top_row), INT64_MIN)
            worst = tl.min(best, axis=1)
            worst_position = tl.argmin(best, axis=1)
            replace = (pool_offsets[None, :] == worst_position[:, None]) & (candidate > worst)[:, None]
            best = tl.where(replace, candidate[:, None], best)
            improving = improving & (row_offsets[None, :] != top_row[:, None])
    out_offsets = (query_offsets[:, None].to(tl.int64) * num_splits + split) * POOL + pool_offsets[None, :]
    tl.store(keys_out_ptr + out_offsets, best, mask=query_mask[:, None])
    tl.store(nan_out_ptr + query_offsets * num_splits + split, nan_seen.to(tl.int8), mask=query_mask)


@triton.jit
def _topk_dedup_walk_kernel(
    keys_ptr, memory_ptr, scores_out_ptr, indices_out_ptr, short_out_ptr,
    dim, k, threshold, stride_memory,
    POOL: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    """keys: (b, POOL) sorted best first; outputs (b, k) pre-filled with -inf / -1, short: (b,) int8."""
    query = tl.program_id(0)
    offsets = tl.arange(0, POOL)
    keys = tl.load(keys_ptr + query * POOL + offsets)
    valid = keys != INT64_MIN
    low_half = tl.full((POOL,), 0xFFFFFFFF, tl.int64)
    rows = tl.where(valid, low_half - (keys & low_half), 0)
    gram = tl.zeros((POOL, POOL), tl.float32)
    for dim_start in range(0, dim, BLOCK_DIM):
        dim_offsets = dim_start + tl.arange(0, BLOCK_DIM)
        candidates = tl.load(memory_ptr + rows[:, None] * stride_memory + dim_offsets[None, :],
                             mask=valid[:, None] & (dim_offsets < dim)[None, :], other=0.0)
        gram += tl.dot(candidates, tl.trans(candidates), input_precision="ieee")
    taken = tl.zeros((POOL,), tl.int32)
    slot = tl.zeros((POOL,), tl.int32)
    count = tl.sum(tl.zeros((POOL,), tl.int32), axis=0)
    for position in range(POOL):
        selector = offsets == position
        gram_row = tl.sum(tl.where(selector[:, None], gram, 0.0), axis=0)
        redundant = tl.max(tl.where((taken > 0) & (gram_row > threshold), 1, 0), axis=0)
        is_valid = tl.max(tl.where(selector & valid, 1, 0), axis=0)
        take = is_valid * (1 - redundant) * (count < k).to(tl.int32)
        taken = tl.where(selector, take, taken)
        slot = tl.where(selector, count, slot)
        count += take
    ordered = (keys >> 32).to(tl.int32)
    scores = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    tl.store(scores_out_ptr + query * k + slot, scores, mask=taken > 0)
    tl.store(indices_out_ptr + query * k + slot, rows, mask=taken > 0)
    pool_was_full = tl.max(tl.where((offsets == POOL - 1) & valid, 1, 0), axis=0)
    tl.store(short_out_ptr + query, ((count < k).to(tl.int32) * pool_was_full).to(tl.int8))


def threshold_as_fp32(threshold: float) -> float:
    """The largest fp32 not above ``threshold``: fp32 ``s <= it`` equals the exact ``s <= threshold``."""
    rounded = numpy.float32(threshold)
    if float(rounded) > threshold:
        rounded = numpy.nextafter(rounded, numpy.float32(-numpy.inf))
    return float(rounded)


def scan_warps(block_queries: int, pool: int) -> int:
    return 4 if block_queries * pool <= SCAN_KEYS_PER_WARPGROUP else 8


def _num_splits(num_rows: int, query_blocks: int, device: torch.device) -> int:
    tiles = triton.cdiv(num_rows, BLOCK_ROWS)
    if device.type == "cuda":
        programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(1, programs // query_blocks)
    else:
        wanted = INTERPRETER_SPLITS
    return max(1, min(tiles, wanted))


def top_pool_keys(queries, memory, pool, threshold, exclude):
    """(b, pool) int64 keys of the best eligible rows per query, best first (INT64_MIN = none),
    and (b,) bool, True where a score of the query is NaN."""
    batch, dim = queries.shape
    num_rows = memory.shape[0]
    block_queries = WIDE_BLOCK_QUERIES if batch >= WIDE_BATCH else BLOCK_QUERIES
    query_blocks = triton.cdiv(batch, block_queries)
    splits = _num_splits(num_rows, query_blocks, queries.device)
    rows_per_split = triton.cdiv(triton.cdiv(num_rows, splits), BLOCK_ROWS) * BLOCK_ROWS
    splits = triton.cdiv(num_rows, rows_per_split)
    keys = torch.empty((batch, splits, pool), dtype=torch.int64, device=queries.device)
    nan_seen = torch.empty((batch, splits), dtype=torch.int8, device=queries.device)
    exclude_width = 0 if exclude is None else exclude.shape[1]
    exclude_rows = exclude if exclude is not None else keys  # never read when exclude_width == 0
    _topk_dedup_scan_kernel[(query_blocks, splits)](
        queries, memory, exclude_rows, keys, nan_seen,
        batch, num_rows, dim, exclude_width, rows_per_split, splits, threshold,
        queries.stride(0), memory.stride(0),
        POOL=pool, BLOCK_QUERIES=block_queries, BLOCK_ROWS=BLOCK_ROWS, BLOCK_DIM=BLOCK_DIM,
        num_warps=scan_warps(block_queries, pool),
        UPCAST_MEMORY=queries.dtype != memory.dtype,
    )
    top_keys = torch.topk(keys.view(batch, splits * pool), pool, dim=1, sorted=True).values
    return top_keys, nan_seen.bool().any(1)


def topk_dedup_triton(queries, memory, k, threshold, exclude, exhaustive_fallback, nan_score_error):
    """Launcher: scan, merge, walk, widen. Returns scores (b, k) fp32, indices (b, k) int64.

    queries: (b, d), memory: (N, d), exclude: (b, E) int64 or None.
    exhaustive_fallback(queries, memory, k, threshold, exclude) answers queries
    whose candidates would need a pool above MAX_POOL; nan_score_error(query)
    is the exception raised for a query with a NaN score.
    """
    batch, num_rows = queries.shape[0], memory.shape[0]
    if num_rows >= 2**31 - 1:
        raise ValueError(f"topk_dedup: the triton backend indexes rows below 2^31 - 1, got N={num_rows}")
    scores = torch.full((batch, k), float("-inf"), dtype=torch.float32, device=queries.device)
    indices = torch.full((batch, k), -1, dtype=torch.int64, device=queries.device)
    if batch == 0 or num_rows == 0:
        return scores, indices
    memory = memory.contiguous()
    # Same-dtype fp16/bf16 inputs go to tensor cores as they are; otherwise both in fp32.
    queries = queries.contiguous() if queries.dtype == memory.dtype else queries.float().contiguous()
    threshold_fp32 = threshold_as_fp32(threshold)
    pending = torch.arange(batch, device=queries.device)
    pool = max(16, triton.next_power_of_2(2 * k + 16))
    while len(pending):
        if pool > MAX_POOL:
            pending_exclude = None if exclude is None else exclude[pending]
            fallback_scores, fallback_indices = exhaustive_fallback(queries[pending], memory, k, threshold,
                                                                    pending_exclude)
            scores[pending], indices[pending] = fallback_scores, fallback_indices
            break
        pending_exclude = None if exclude is None else exclude[pending].contiguous()
        keys, nan_seen = top_pool_keys(queries[pending].contiguous(), memory, pool, threshold_fp32,
                                       pending_exclude)
        if bool(nan_seen.any()):
            raise nan_score_error(int(pending[nan_seen.nonzero()[0, 0]]))
        pending_scores = torch.full((len(pending), k), float("-inf"), dtype=torch.float32,
                                    device=queries.device)
        pending_indices = torch.full((len(pending), k), -1, dtype=torch.int64, device=queries.device)
        short = torch.zeros(len(pending), dtype=torch.int8, device=queries.device)
        _topk_dedup_walk_kernel[(len(pending),)](
            keys, memory, pending_scores, pending_indices, short,
            memory.shape[1], k, threshold_fp32, memory.stride(0),
            POOL=pool, BLOCK_DIM=BLOCK_DIM,
            num_warps=WALK_WARPS,
        )
        scores[pending], indices[pending] = pending_scores, pending_indices
        # A pool holding every row cannot have missed one.
        if pool >= num_rows:
            break
        pending = pending[short.bool()]
        pool *= 4
    return scores, indices
