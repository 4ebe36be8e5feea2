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
MKFAST_HOST_DEVICE void sort_regions_descending(uint64_t* keys, int regions, int length, int thread, int threads,
                                                const Sync& sync) {
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

// Per-query candidate pools of one scan block. Region q (length `length`, a power of two
// >= pool + rows_per_tile) holds the query's best `pool` keys so far, sorted, in
// [0, pool), and the tile's candidates appended after them. A key enters only if it beats
// floors[q], the pool's worst key, held in a register by every thread: once the pool is
// warm one compare rejects almost every row (FAISS's BlockSelect idea).
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

// Appends `key` to query q's candidates; the caller has checked key > floors[q].
MKFAST_HOST_DEVICE void append_candidate(const ScanPools& pools, int query, uint64_t key) {
  pools.regions[query * pools.length + pools.pool + claim_slot(pools.counts + query)] = key;
}

// Whether a region could overflow during the next tile (`rows_per_tile` more candidates).
MKFAST_HOST_DEVICE bool must_flush(const ScanPools& pools, int rows_per_tile) {
  for (int q = 0; q < pools.queries; ++q) {
    if (pools.counts[q] > pools.length - pools.pool - rows_per_tile) return true;
  }
  return false;
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

// Folds the appended candidates into the pools: zero the slots past them, sort each region,
// and raise the floors to the new worst kept key (0 while a pool is not full).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Sync>
MKFAST_HOST_DEVICE void flush_pools(const ScanPools& pools, int thread, int threads, const Sync& sync) {
  const int tail = pools.length - pools.pool;
  for (int i = thread; i < pools.queries * tail; i += threads) {
    const int q = i / tail;
    const int slot = i % tail;
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

}  // namespace topk
}  // namespace mkfast
