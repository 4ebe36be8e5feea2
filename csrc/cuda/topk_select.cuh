// Selection and score-order pieces of the CUDA top-k (csrc/cuda/topk_dedup_cuda.cu), written as
// __host__ __device__ functions so that a plain C++ build tests them without a GPU
// (tests/csrc/topk_select_test.cpp, run by tests/test_topk_dedup.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define MKFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MKFAST_HOST_DEVICE inline
#endif

namespace mkfast {
namespace topk {

// Dims the scan kernel reads from shared memory at once (a float4), and so the number of
// partial sums of a score: partial j sums the products of dims d = j (mod kScoreLanes) in
// increasing d. The order depends on d alone, so identical rows score identically
// wherever they sit, in any segment, tile or batch; four independent chains instead of one
// keep the FMA pipe busy.
constexpr int kScoreLanes = 4;

// Adds the products of four consecutive dims (the first one a multiple of kScoreLanes).
MKFAST_HOST_DEVICE void accumulate_dims(float* partial, const float* query, const float* row) {
  for (int lane = 0; lane < kScoreLanes; ++lane) partial[lane] = fmaf(query[lane], row[lane], partial[lane]);
}

MKFAST_HOST_DEVICE float finish_score(const float* partial) {
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

MKFAST_HOST_DEVICE uint32_t float_bits(float value) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

MKFAST_HOST_DEVICE float bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// Ranked-list order as unsigned keys: high 32 bits the score mapped to an unsigned that
// orders like the float, low 32 bits the inverted row index (lower index = larger key).
// Key 0 means "no candidate": every real key has a non-zero high half, because eligible
// scores are never NaN.
MKFAST_HOST_DEVICE uint64_t make_key(float score, int64_t index) {
  // -0.0 ranks as +0.0: the reference compares values, keys compare bits.
  const uint32_t bits = float_bits(score == 0.f ? 0.f : score);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

MKFAST_HOST_DEVICE float key_score(uint64_t key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  return bits_float((ordered & 0x80000000u) ? (ordered ^ 0x80000000u) : ~ordered);
}

MKFAST_HOST_DEVICE int64_t key_index(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

// The smallest power of two >= count (at least 2).
MKFAST_HOST_DEVICE int sort_length(int count) {
  int length = 2;
  while (length < count) length <<= 1;
  return length;
}

// Sorts `regions` independent arrays keys[r * length .. (r + 1) * length) descending in one
// bitonic network, length a power of two. Pair p of a step compares i and i + stride with
// i = 2p - p % stride inside its region, so all `threads` work at every step. `sync` is
// __syncthreads on the device (every thread of the block calls this), a no-op on the host.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Sync>
MKFAST_HOST_DEVICE void sort_regions_descending(uint64_t* keys, int regions, int length, int thread,
                                                int threads, const Sync& sync) {
  const int pairs_per_region = length / 2;
  for (int width = 2; width <= length; width <<= 1) {
    for (int stride = width >> 1; stride > 0; stride >>= 1) {
      for (int pair = thread; pair < regions * pairs_per_region; pair += threads) {
        const int local_pair = pair % pairs_per_region;
        const int i = 2 * local_pair - (local_pair & (stride - 1));
        uint64_t* region = keys + (pair / pairs_per_region) * length;
        const bool descending = (i & width) == 0;
        const uint64_t a = region[i];
        const uint64_t b = region[i + stride];
        if ((a < b) == descending) {
          region[i] = b;
          region[i + stride] = a;
        }
      }
      sync();
    }
  }
}

// Per-query candidate pools of one scan block. Region q (length `length`, a power of two)
// holds the query's best `pool` keys so far, sorted, in [0, pool), and room for
// length - pool appended candidates after them. A key is offered only if it beats
// floors[q], the pool's worst key: once the pool is warm one compare rejects almost every
// row (FAISS's BlockSelect idea). A key that finds its region full waits in its thread
// (a bit of a pending mask) until the next flush, so the room needed does not grow with
// the rows a block scores at once.
struct ScanPools {
  uint64_t* regions;
  uint64_t* floors;
  int* counts;
  int queries;
  int pool;
  int length;
};

// The slot for a new candidate of one region (atomic across the block on the device).
MKFAST_HOST_DEVICE int claim_slot(int* count) {
#ifdef __CUDA_ARCH__
  return atomicAdd(count, 1);
#else
  return (*count)++;
#endif
}

// Stores a candidate of query q that beats floors[q]; false if the region is full (the
// claimed count then exceeds the room, which tells the block to flush).
MKFAST_HOST_DEVICE bool try_store(const ScanPools& pools, int query, uint64_t key) {
  const int slot = claim_slot(pools.counts + query);
  if (slot >= pools.length - pools.pool) return false;
  pools.regions[query * pools.length + pools.pool + slot] = key;
  return true;
}

// Whether a region is full or half full: flushing then keeps later keys from waiting.
MKFAST_HOST_DEVICE bool must_flush(const ScanPools& pools) {
  for (int q = 0; q < pools.queries; ++q) {
    if (2 * pools.counts[q] >= pools.length - pools.pool) return true;
  }
  return false;
}

// Whether any thread of the block passes `value` (a barrier on the device).
MKFAST_HOST_DEVICE bool block_any(bool value) {
#ifdef __CUDA_ARCH__
  return __syncthreads_or(value) != 0;
#else
  return value;
#endif
}

// Empties every region: zero keys, zero floors (nothing to beat), no candidates.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Sync>
MKFAST_HOST_DEVICE void clear_pools(const ScanPools& pools, int thread, int threads, const Sync& sync) {
  for (int i = thread; i < pools.queries * pools.length; i += threads) pools.regions[i] = 0;
  for (int q = thread; q < pools.queries; q += threads) {
    pools.floors[q] = 0;
    pools.counts[q] = 0;
  }
  sync();
}

// Folds the stored candidates into the pools: zero the slots past them, sort each region,
// and raise the floors to the new worst kept key (0 while a pool is not full).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Sync>
MKFAST_HOST_DEVICE void flush_pools(const ScanPools& pools, int thread, int threads, const Sync& sync) {
  const int room = pools.length - pools.pool;
  for (int i = thread; i < pools.queries * room; i += threads) {
    const int q = i / room;
    const int slot = i % room;
    if (slot >= pools.counts[q]) pools.regions[q * pools.length + pools.pool + slot] = 0;
  }
  sync();
  sort_regions_descending(pools.regions, pools.queries, pools.length, thread, threads, sync);
  for (int q = thread; q < pools.queries; q += threads) {
    pools.floors[q] = pools.regions[q * pools.length + pools.pool - 1];
    pools.counts[q] = 0;
  }
  sync();
}

// One scan step's selection: every thread offers its pending keys (`offer(pending)` returns
// the bits still waiting for room), the pools are flushed when a key waits or a region is
// half full, and the waiting keys are offered again against the raised floors until none is
// left. Every thread of the block calls this.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Offer, typename Sync>
MKFAST_HOST_DEVICE void select_step(const ScanPools& pools, uint64_t pending, const Offer& offer, int thread,
                                    int threads, const Sync& sync) {
  while (true) {
    pending = offer(pending);
    const bool waiting = block_any(pending != 0);
    const bool flush = waiting || must_flush(pools);
    sync();  // every thread has read the counts before a flush or the next step changes them
    if (flush) flush_pools(pools, thread, threads, sync);
    if (!waiting) return;
  }
}

// Tensor-core fragments of mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate). Lane
// l = 4g + t loads 8 consecutive dims [8t, 8t + 8) of a 32-dim chunk as 4 words (2 dims
// each) from memory row g of an 8-row tile (B) and from query rows g and g + 8 of a
// 16-query tile (A). Step s (0, 1) of the chunk contracts words 2s and 2s + 1 of every
// lane: A = {query g: w[2s], query g+8: w[2s], query g: w[2s+1], query g+8: w[2s+1]},
// B = {row g: w[2s], w[2s+1]}. The hardware pairs A's and B's k positions, so both see the
// same dims; which dims meet in which step is fixed, so a score's order depends on d alone.
MKFAST_HOST_DEVICE int lane_row(int lane) { return lane >> 2; }
MKFAST_HOST_DEVICE int lane_first_dim(int lane) { return 8 * (lane & 3); }

MKFAST_HOST_DEVICE void step_fragments(int step, const uint32_t* query_words, const uint32_t* query_words_8,
                                       const uint32_t* row_words, uint32_t* a, uint32_t* b) {
  a[0] = query_words[2 * step];
  a[1] = query_words_8[2 * step];
  a[2] = query_words[2 * step + 1];
  a[3] = query_words_8[2 * step + 1];
  b[0] = row_words[2 * step];
  b[1] = row_words[2 * step + 1];
}

// The (query in the 16-query tile, row in the 8-row tile) of a lane's accumulator c (0..3).
MKFAST_HOST_DEVICE int accumulator_query(int lane, int c) { return (lane >> 2) + 8 * (c >> 1); }
MKFAST_HOST_DEVICE int accumulator_row(int lane, int c) { return 2 * (lane & 3) + (c & 1); }

}  // namespace topk
}  // namespace mkfast
