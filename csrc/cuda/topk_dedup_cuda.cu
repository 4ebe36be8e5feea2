// CUDA kernel of mkfast::topk_dedup_native: exact greedy top-k with redundancy filtering
// (semantics in mkfast/ops/topk_dedup.py, which also validates inputs).
//
// Plan per call; no (b, N) score matrix exists on the main path:
//   1. a scan, grid (query blocks x memory segments of whole 256-row tiles): each block
//      streams its segment once, scores its queries against every row itself and keeps each
//      query's best `pool` eligible keys (score <= threshold, not excluded) in shared memory.
//      A key is offered only if it beats the pool's worst (one compare rejects almost every
//      row once the pool is warm, FAISS's BlockSelect idea); a key finding its query's
//      region full waits in its thread's registers for the next flush (topk_select.cuh).
//      - `_scan_tensor_core_kernel`, fp16/bf16 queries and memory of one dtype: mma.sync
//        m16n8k16 with fp32 accumulation, 16 queries per block (64 from 17 queries on);
//      - `_scan_cuda_core_kernel`, every other dtype pair: fp32 FMAs in four lanes by
//        d mod 4, 8 queries per block (1 at b=1).
//      Each score is one fixed sequence of operations over d, whatever the row's position,
//      segment, block or batch size: identical rows score identically and tie exactly;
//   2. `_merge_top_keys_kernel`: groups of the segments' keys bitonic-sorted, the best
//      `pool` kept, until one sorted pool per query remains;
//   3. `_walk_pool_kernel`: one warp per query walks its pool, testing each candidate
//      against the rows already taken (warp-parallel dot products);
//   4. queries whose walk ran out of a full pool are redone with a 4x pool, and, past
//      kMaxPool, with every eligible row (the same scan writing its scores, a stable sort):
//      the answer is always the greedy walk over the whole ranked list.
//
// Bytes moved (N rows of d elements of s bytes, b queries; N=1e7, d=768, bf16, b=64):
//   this scan: N*d*s read through L2 once per query block (one block of 64 at b=64:
//     15.4 GB), plus b * segments * pool * 8 bytes of keys, written and read back by the
//     merge (8.7 MB at b=64: 528 segments on an H100's 132 SMs, pool 32);
//   the cuBLAS path it replaced: the memory read by the GEMM, then b*N*4 bytes of fp32
//     scores written and read back: 5.1 GB on top of the 15.4 GB.
// The blocks of one segment run side by side (the query block is the fast grid index), so
// with several query blocks HBM still sees the memory about once while they stay together.
// Written without a GPU at hand: compiled here (`mkfast audit --kernels cuda` reads the ptxas
// figures), run by the tests marked `cuda`; no speed has been measured.
#include <ATen/ATen.h>
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers,
// which a minimal toolkit (nvcc + runtime) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "topk_dedup_common.h"
#include "topk_select.cuh"

namespace mkfast {
namespace {

using topk::key_index;
using topk::key_score;
using topk::make_key;

// Scan block: 256 threads, tiles of 256 rows (tensor cores: 32 rows per warp; CUDA cores: one
// row per thread, kTileDims dims staged in shared memory at a time as fp32, a row's stride of
// kTileDims + 4 words putting the float4 reads of 8 consecutive threads on distinct banks).
constexpr int kScanThreads = 256;
constexpr int kTileRows = kScanThreads;
constexpr int kTileDims = 32;
constexpr int kTileStride = kTileDims + 4;
// Queries per CUDA-core scan block from 2 queries on: each thread keeps kBlockQueries x 4
// partial sums; every memory row loaded serves them all.
constexpr int kBlockQueries = 8;
// Queries per tensor-core scan block: one m16 tile up to 16 queries (and for pools past
// kMaxWidePool), four from 17 queries on, so the memory is streamed once per 64 queries.
constexpr int kNarrowTensorQueries = 16;
constexpr int kWideTensorQueries = 64;
constexpr int64_t kMaxWidePool = 128;
// Free slots after each query's pool in the scan's shared memory: keys that find them full
// wait in their threads for a flush, so this bounds the pools' memory, not correctness.
// 64 queries x (128 + 64 -> 256 keys) x 8 bytes = 128 KiB at most.
constexpr int kRegionRoom = 64;
// Scan blocks per SM the grid aims for (segments = this x SMs / query blocks).
constexpr int kScanBlocksPerSm = 4;
// The merge sorts groups of kSortSize keys: 32 KiB of static shared memory.
constexpr int kSortSize = 4096;
constexpr int kSortThreads = 512;
// Largest pool: a merge pass must shrink its input (groups of kSortSize keys become `pool`
// keys), so pool <= kSortSize / 4; and a scan block's pools must fit an A100's 163 KiB of
// shared memory: at 512, 16 x 8 KiB (tensor cores) or 8 x 8 KiB + 37 KiB of tiles (CUDA cores).
constexpr int64_t kMaxPool = 512;
constexpr int kWarp = 32;

// std::min/max are host functions to nvcc without --expt-relaxed-constexpr.
template <typename T>
__device__ __forceinline__ T smaller(T a, T b) {
  return b < a ? b : a;
}

// Shared memory of a CUDA-core scan block before its pools: the row and query tiles.
constexpr size_t cuda_core_tile_bytes(int queries) {
  return (size_t{kTileRows} * kTileStride + size_t{kTileDims} * queries) * sizeof(float);
}

struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// Four consecutive elements of a row as fp32. kWhole: one 8- or 16-byte load (fp16/bf16, fp32;
// the caller checked the alignment), else element by element with zeros past `valid`.
template <bool kWhole, typename scalar_t>
__device__ __forceinline__ float4 load_four(const scalar_t* source, int valid) {
  if constexpr (kWhole && sizeof(scalar_t) == 4) {
    return __ldg(reinterpret_cast<const float4*>(source));
  } else if constexpr (kWhole && sizeof(scalar_t) == 2) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(source));
    const auto element = [](uint32_t bits) {
      return static_cast<float>(scalar_t(static_cast<uint16_t>(bits), scalar_t::from_bits()));
    };
    return make_float4(element(raw.x & 0xFFFFu), element(raw.x >> 16), element(raw.y & 0xFFFFu),
                       element(raw.y >> 16));
  } else {
    float values[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) values[j] = j < valid ? static_cast<float>(source[j]) : 0.f;
    return make_float4(values[0], values[1], values[2], values[3]);
  }
}

__device__ __forceinline__ bool is_excluded(const int64_t* excluded, int64_t width, int64_t index) {
  for (int64_t e = 0; e < width; ++e) {
    if (excluded[e] == index) return true;
  }
  return false;
}

// Offers the score of (query `query` of the block, memory row `index`) to the block's pools;
// true once it is settled (rejected or stored), false while it waits for room.
__device__ __forceinline__ bool settle_score(const topk::ScanPools& pools, int query, int64_t query_row,
                                             float score, int64_t index, float threshold,
                                             const int64_t* exclude, int64_t exclude_width, int* nan_flags) {
  if (isnan(score)) nan_flags[query_row] = 1;  // every writer stores 1: the race is benign
  if (!(score <= threshold)) return true;      // NaN is never eligible
  const uint64_t key = make_key(score, index);
  if (key <= pools.floors[query]) return true;  // one compare rejects almost every row
  if (is_excluded(exclude + query_row * exclude_width, exclude_width, index)) return true;
  return topk::try_store(pools, query, key);
}

// The queries and memory rows of one scan block: grid (query blocks, segments).
struct ScanBlock {
  int64_t first_query;
  int queries_here;
  int64_t segment_start;
  int64_t segment_end;
};

__device__ __forceinline__ ScanBlock scan_block(int queries_per_block, int64_t batch, int64_t num_rows,
                                                int64_t rows_per_segment) {
  const int64_t first_query = static_cast<int64_t>(blockIdx.x) * queries_per_block;
  const int64_t segment_start = static_cast<int64_t>(blockIdx.y) * rows_per_segment;
  const int queries_here = static_cast<int>(smaller<int64_t>(queries_per_block, batch - first_query));
  return {first_query, queries_here, segment_start, smaller(segment_start + rows_per_segment, num_rows)};
}

// After a block's last step: the final flush, then each query's best `pool` keys, sorted,
// to keys_out (b, segments, pool).
__device__ void store_pools(const topk::ScanPools& pools, int queries_here, int64_t first_query,
                            uint64_t* __restrict__ keys_out) {
  topk::flush_pools(pools, threadIdx.x, blockDim.x, BlockSync{});
  for (int i = threadIdx.x; i < queries_here * pools.pool; i += blockDim.x) {
    const int query = i / pools.pool;
    const int slot = i % pools.pool;
    keys_out[((first_query + query) * gridDim.y + blockIdx.y) * pools.pool + slot] =
        pools.regions[query * pools.length + slot];
  }
}

// grid (ceil(b / kQueries), segments). queries: (b, dim) fp32; memory: (N, dim).
// kWriteScores: scores_out (b, N) receives every score (the exhaustive path) and nothing is
// selected. Otherwise keys_out (b, segments, pool) receives each segment's best eligible keys,
// sorted, 0 past the last; nan_flags[query] is set to 1 where a score is NaN.
// Dynamic shared memory: the row and query tiles, then kQueries regions of region_length keys.
template <typename scalar_t, int kQueries, bool kWriteScores>
__global__ void __launch_bounds__(kScanThreads)
    _scan_cuda_core_kernel(const float* __restrict__ queries, const scalar_t* __restrict__ memory,
                           int64_t batch, int64_t num_rows, int64_t dim, int64_t rows_per_segment,
                           bool aligned, float threshold, const int64_t* __restrict__ exclude,
                           int64_t exclude_width, int pool, int region_length,
                           uint64_t* __restrict__ keys_out, int* __restrict__ nan_flags,
                           float* __restrict__ scores_out) {
  extern __shared__ __align__(16) unsigned char shared[];
  float* row_tile = reinterpret_cast<float*>(shared);
  float* query_tile = row_tile + kTileRows * kTileStride;
  __shared__ uint64_t floors[kQueries];
  __shared__ int counts[kQueries];
  const topk::ScanPools pools{reinterpret_cast<uint64_t*>(query_tile + kQueries * kTileDims), floors, counts,
                              kQueries, pool, region_length};
  const BlockSync sync;
  const int thread = threadIdx.x;
  const ScanBlock block = scan_block(kQueries, batch, num_rows, rows_per_segment);
  if constexpr (!kWriteScores) topk::clear_pools(pools, thread, kScanThreads, sync);

  for (int64_t tile_start = block.segment_start; tile_start < block.segment_end; tile_start += kTileRows) {
    const int tile_rows = static_cast<int>(smaller<int64_t>(kTileRows, block.segment_end - tile_start));
    float partial[kQueries][topk::kScoreLanes] = {};
    for (int64_t dim_start = 0; dim_start < dim; dim_start += kTileDims) {
      const int dims_here = static_cast<int>(smaller<int64_t>(kTileDims, dim - dim_start));
      __syncthreads();  // every thread is done reading the previous tiles
      // Rows past the segment read its last row (their scores are never used); whole aligned
      // chunks (all but a ragged last one) take straight-line vector loads.
      const auto stage_rows = [&](auto whole) {
#pragma unroll
        for (int i = thread; i < kTileRows * (kTileDims / 4); i += kScanThreads) {
          const int row = i / (kTileDims / 4);
          const int column = (i % (kTileDims / 4)) * 4;
          const int64_t memory_row = tile_start + smaller(row, tile_rows - 1);
          const scalar_t* source = memory + memory_row * dim + dim_start + column;
          *reinterpret_cast<float4*>(row_tile + row * kTileStride + column) =
              load_four<decltype(whole)::value>(source, dims_here - column);
        }
      };
      if (aligned && dims_here == kTileDims) {
        stage_rows(std::true_type{});
      } else {
        stage_rows(std::false_type{});
      }
      for (int i = thread; i < kQueries * kTileDims; i += kScanThreads) {
        const int query = i / kTileDims;
        const int column = i % kTileDims;
        query_tile[i] = query < block.queries_here && column < dims_here
                            ? queries[(block.first_query + query) * dim + dim_start + column]
                            : 0.f;
      }
      __syncthreads();
      const float* row = row_tile + thread * kTileStride;
#pragma unroll
      for (int column = 0; column < kTileDims; column += topk::kScoreLanes) {
        const float4 row_dims = *reinterpret_cast<const float4*>(row + column);
        const float row_values[4] = {row_dims.x, row_dims.y, row_dims.z, row_dims.w};
#pragma unroll
        for (int query = 0; query < kQueries; ++query) {
          const float4 query_dims = *reinterpret_cast<const float4*>(query_tile + query * kTileDims + column);
          const float query_values[4] = {query_dims.x, query_dims.y, query_dims.z, query_dims.w};
          topk::accumulate_dims(partial[query], query_values, row_values);
        }
      }
    }

    const int64_t index = tile_start + thread;
    if constexpr (kWriteScores) {
#pragma unroll
      for (int query = 0; query < kQueries; ++query) {
        if (query >= block.queries_here || thread >= tile_rows) break;
        scores_out[(block.first_query + query) * num_rows + index] = topk::finish_score(partial[query]);
      }
    } else {
      uint64_t pending = 0;
      for (int query = 0; query < block.queries_here && thread < tile_rows; ++query) {
        pending |= uint64_t{1} << query;
      }
      const auto offer = [&](uint64_t waiting) {
#pragma unroll
        for (int query = 0; query < kQueries; ++query) {
          if (((waiting >> query) & 1) &&
              settle_score(pools, query, block.first_query + query, topk::finish_score(partial[query]), index,
                           threshold, exclude, exclude_width, nan_flags)) {
            waiting &= ~(uint64_t{1} << query);
          }
        }
        return waiting;
      };
      topk::select_step(pools, pending, offer, thread, kScanThreads, sync);
    }
  }
  if constexpr (!kWriteScores) store_pools(pools, block.queries_here, block.first_query, keys_out);
}

// 8 consecutive fp16/bf16 elements of a row as 4 words (2 elements each), zeros past `valid`,
// element by element (a ragged or unaligned chunk).
template <typename scalar_t>
__device__ __forceinline__ uint4 load_eight(const scalar_t* source, int valid) {
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t low = 2 * w < valid ? source[2 * w].x : 0;
    const uint32_t high = 2 * w + 1 < valid ? source[2 * w + 1].x : 0;
    words[w] = low | (high << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// c += a * b on the tensor cores, one m16n8k16 tile, fp32 accumulation.
template <typename scalar_t>
__device__ __forceinline__ void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// The tensor-core scan, for fp16/bf16 queries and memory of one dtype: as
// _scan_cuda_core_kernel, but each warp scores 32 rows of a 256-row tile against 16 x
// kQueryTiles queries with mma.sync, fragments loaded from global memory (16 bytes per lane,
// topk_select.cuh's layout). Every score is the same sequence of mma steps over 32-dim chunks,
// whatever the row's or query's place in a tile, the segment or kQueryTiles.
// Dynamic shared memory: 16 x kQueryTiles regions of region_length keys.
template <typename scalar_t, int kQueryTiles, bool kWriteScores>
__global__ void __launch_bounds__(kScanThreads)
    _scan_tensor_core_kernel(const scalar_t* __restrict__ queries, const scalar_t* __restrict__ memory,
                             int64_t batch, int64_t num_rows, int64_t dim, int64_t rows_per_segment,
                             bool aligned, float threshold, const int64_t* __restrict__ exclude,
                             int64_t exclude_width, int pool, int region_length,
                             uint64_t* __restrict__ keys_out, int* __restrict__ nan_flags,
                             float* __restrict__ scores_out) {
  constexpr int kQueries = 16 * kQueryTiles;
  constexpr int kRowTiles = kTileRows / (kScanThreads / kWarp) / 8;  // 8-row mma tiles per warp and step
  extern __shared__ __align__(16) unsigned char shared[];
  __shared__ uint64_t floors[kQueries];
  __shared__ int counts[kQueries];
  const topk::ScanPools pools{reinterpret_cast<uint64_t*>(shared), floors, counts, kQueries, pool,
                              region_length};
  const BlockSync sync;
  const int thread = threadIdx.x;
  const int lane = thread % kWarp;
  const int group = topk::lane_row(lane);
  const int first_dim = topk::lane_first_dim(lane);
  const ScanBlock block = scan_block(kQueries, batch, num_rows, rows_per_segment);
  if constexpr (!kWriteScores) topk::clear_pools(pools, thread, kScanThreads, sync);

  for (int64_t tile_start = block.segment_start; tile_start < block.segment_end; tile_start += kTileRows) {
    const int64_t warp_start = tile_start + (thread / kWarp) * (kRowTiles * 8);
    static_assert(kRowTiles * 8 * (kScanThreads / kWarp) == kTileRows, "the warps cover the tile");
    float accumulators[kQueryTiles][kRowTiles][4] = {};
    // Rows past the segment and queries past the batch read the last real one (their scores
    // are never used), so a chunk's loads need no per-row test.
    const scalar_t* row_data[kRowTiles];
#pragma unroll
    for (int n = 0; n < kRowTiles; ++n) {
      row_data[n] = memory + smaller(warp_start + 8 * n + group, block.segment_end - 1) * dim + first_dim;
    }
    const scalar_t* query_data[kQueryTiles][2];
#pragma unroll
    for (int m = 0; m < kQueryTiles; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int query = smaller(16 * m + 8 * half + group, block.queries_here - 1);
        query_data[m][half] = queries + (block.first_query + query) * dim + first_dim;
      }
    }
    // A lane's 8 dims of a 32-dim chunk from each of `count` rows: straight-line 16-byte loads
    // for whole aligned chunks (all but a ragged last one), element by element otherwise.
    const auto load_chunk = [&](const scalar_t* const* sources, int count, int64_t dim_start,
                                uint32_t (*words)[4]) {
      const auto keep = [](const uint4& loaded, uint32_t* destination) {
        destination[0] = loaded.x;
        destination[1] = loaded.y;
        destination[2] = loaded.z;
        destination[3] = loaded.w;
      };
      if (aligned && dim_start + 32 <= dim) {
#pragma unroll
        for (int i = 0; i < count; ++i) {
          keep(__ldg(reinterpret_cast<const uint4*>(sources[i] + dim_start)), words[i]);
        }
      } else {
        const int valid = static_cast<int>(smaller<int64_t>(8, dim - dim_start - first_dim));
#pragma unroll
        for (int i = 0; i < count; ++i) keep(load_eight(sources[i] + dim_start, valid), words[i]);
      }
    };
    // The memory rows of the next chunk are loaded before this chunk's mma, so they are in
    // flight while the tensor cores work (one block of 8 warps per SM at 64 queries).
    uint32_t row_words[kRowTiles][4];
    load_chunk(row_data, kRowTiles, 0, row_words);
    for (int64_t dim_start = 0; dim_start < dim; dim_start += 32) {
      uint32_t next_words[kRowTiles][4];
      const bool more = dim_start + 32 < dim;
      if (more) load_chunk(row_data, kRowTiles, dim_start + 32, next_words);
#pragma unroll
      for (int m = 0; m < kQueryTiles; ++m) {
        uint32_t query_words[2][4];  // the queries are hot in L1: loaded per m-tile, not all at once
        load_chunk(query_data[m], 2, dim_start, query_words);
#pragma unroll
        for (int step = 0; step < 2; ++step) {
#pragma unroll
          for (int n = 0; n < kRowTiles; ++n) {
            uint32_t a[4], b[2];
            topk::step_fragments(step, query_words[0], query_words[1], row_words[n], a, b);
            mma_m16n8k16<scalar_t>(accumulators[m][n], a, b);
          }
        }
      }
      if (more) {
#pragma unroll
        for (int n = 0; n < kRowTiles; ++n) {
#pragma unroll
          for (int w = 0; w < 4; ++w) row_words[n][w] = next_words[n][w];
        }
      }
    }

    // Accumulator c of tile (m, n) is (query 16m + accumulator_query, row 8n + accumulator_row).
    const auto query_of = [&](int m, int c) { return 16 * m + topk::accumulator_query(lane, c); };
    const auto row_of = [&](int n, int c) { return warp_start + 8 * n + topk::accumulator_row(lane, c); };
    if constexpr (kWriteScores) {
#pragma unroll
      for (int m = 0; m < kQueryTiles; ++m) {
#pragma unroll
        for (int n = 0; n < kRowTiles; ++n) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (query_of(m, c) < block.queries_here && row_of(n, c) < block.segment_end) {
              const int64_t query_row = block.first_query + query_of(m, c);
              scores_out[query_row * num_rows + row_of(n, c)] = accumulators[m][n][c];
            }
          }
        }
      }
    } else {
      static_assert(kQueryTiles * kRowTiles * 4 <= 64, "one pending bit per accumulator");
      uint64_t pending = 0;
#pragma unroll
      for (int m = 0; m < kQueryTiles; ++m) {
#pragma unroll
        for (int n = 0; n < kRowTiles; ++n) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const bool valid_score = query_of(m, c) < block.queries_here && row_of(n, c) < block.segment_end;
            if (valid_score) pending |= uint64_t{1} << ((m * kRowTiles + n) * 4 + c);
          }
        }
      }
      const auto offer = [&](uint64_t waiting) {
#pragma unroll
        for (int m = 0; m < kQueryTiles; ++m) {
#pragma unroll
          for (int n = 0; n < kRowTiles; ++n) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint64_t bit = uint64_t{1} << ((m * kRowTiles + n) * 4 + c);
              if ((waiting & bit) && settle_score(pools, query_of(m, c), block.first_query + query_of(m, c),
                                                  accumulators[m][n][c], row_of(n, c), threshold, exclude,
                                                  exclude_width, nan_flags)) {
                waiting &= ~bit;
              }
            }
          }
        }
        return waiting;
      };
      topk::select_step(pools, pending, offer, thread, kScanThreads, sync);
    }
  }
  if constexpr (!kWriteScores) store_pools(pools, block.queries_here, block.first_query, keys_out);
}

// Writes the best `pool` of keys[0..length) (sorted) to destination, zeros past length.
__device__ void store_best(const uint64_t* keys, int length, int64_t pool, uint64_t* destination) {
  for (int i = threadIdx.x; i < pool; i += blockDim.x) destination[i] = i < length ? keys[i] : 0;
}

// grid (b, groups). in: (b, width) keys; out: (b, groups, pool), the best of each group of kSortSize.
__global__ void _merge_top_keys_kernel(const uint64_t* __restrict__ in, int64_t width, int64_t pool,
                                       uint64_t* __restrict__ out, int64_t groups) {
  __shared__ uint64_t keys[kSortSize];
  const int64_t query = blockIdx.x;
  const int64_t group = blockIdx.y;
  const int64_t left = width - group * kSortSize;
  const int columns = static_cast<int>(left < kSortSize ? left : kSortSize);
  const int length = topk::sort_length(columns);
  for (int i = threadIdx.x; i < length; i += blockDim.x) {
    keys[i] = i < columns ? in[query * width + group * kSortSize + i] : 0;
  }
  __syncthreads();
  topk::sort_regions_descending(keys, 1, length, threadIdx.x, blockDim.x, BlockSync{});
  store_best(keys, length, pool, out + (query * groups + group) * pool);
}

// grid (n); the ranked (score, index) lists of the fallback path as keys (0 where index < 0).
__global__ void _keys_from_ranked_kernel(const float* __restrict__ scores, const int64_t* __restrict__ indices,
                                         int64_t count, uint64_t* __restrict__ keys) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) keys[i] = indices[i] >= 0 ? make_key(scores[i], indices[i]) : 0;
}

// grid (b), one warp per query. candidates: (b, pool) sorted keys; outputs (b, k), pre-filled with -inf / -1.
template <typename scalar_t>
__global__ void _walk_pool_kernel(const uint64_t* __restrict__ candidates, int64_t pool,
                                  const scalar_t* __restrict__ memory, int64_t dim, int64_t k, float threshold,
                                  float* __restrict__ scores_out, int64_t* __restrict__ indices_out,
                                  bool* __restrict__ short_out) {
  const int64_t query = blockIdx.x;
  const int lane = threadIdx.x;
  const uint64_t* ranked = candidates + query * pool;
  float* query_scores = scores_out + query * k;
  int64_t* query_indices = indices_out + query * k;
  int64_t taken = 0;
  for (int64_t c = 0; c < pool && taken < k; ++c) {
    const uint64_t key = ranked[c];
    if (key == 0) break;  // keys are sorted: nothing eligible follows
    const int64_t index = key_index(key);
    const scalar_t* row = memory + index * dim;
    bool redundant = false;
    for (int64_t t = 0; t < taken && !redundant; ++t) {
      const scalar_t* other = memory + query_indices[t] * dim;
      float dot = 0.f;
      for (int64_t i = lane; i < dim; i += kWarp) dot += static_cast<float>(row[i]) * static_cast<float>(other[i]);
      for (int offset = kWarp / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      // One lane's sum for all, so the whole warp takes the same branch.
      redundant = __shfl_sync(0xffffffffu, dot, 0) > threshold;
    }
    if (redundant) continue;
    if (lane == 0) {
      query_scores[taken] = key_score(key);
      query_indices[taken] = index;
    }
    __syncwarp();  // the next candidate's lanes read query_indices[taken]
    ++taken;
  }
  if (lane == 0) short_out[query] = taken < k && ranked[pool - 1] != 0;
}

uint64_t* as_keys(const at::Tensor& tensor) {
  return reinterpret_cast<uint64_t*>(tensor.data_ptr<int64_t>());
}

// Scores on the tensor cores for fp16/bf16 queries and memory of one dtype (exact products,
// fp32 accumulation); otherwise on CUDA cores in fp32, the queries converted once. Either way
// the choice depends on the dtypes alone, never on the batch or the pool.
bool uses_tensor_cores(const at::Tensor& queries, const at::Tensor& memory) {
  const auto dtype = memory.scalar_type();
  return queries.scalar_type() == dtype && (dtype == at::kHalf || dtype == at::kBFloat16);
}

// How the scan splits the work: queries per block, then enough blocks to fill the SMs,
// segments of whole tiles.
struct ScanGrid {
  int queries_per_block;
  int64_t query_blocks;
  int64_t segments;
  int64_t rows_per_segment;
};

ScanGrid scan_grid(const at::Tensor& queries, const at::Tensor& memory, int64_t pool) {
  const int64_t batch = queries.size(0);
  const int64_t num_rows = memory.size(0);
  int queries_per_block = batch == 1 ? 1 : kBlockQueries;
  if (queries.scalar_type() != at::kFloat) {
    queries_per_block = batch > kNarrowTensorQueries && pool <= kMaxWidePool ? kWideTensorQueries
                                                                              : kNarrowTensorQueries;
  }
  int device = 0;
  int processors = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device));
  const int64_t query_blocks = (batch + queries_per_block - 1) / queries_per_block;
  TORCH_CHECK(query_blocks <= std::numeric_limits<int32_t>::max(), "topk_dedup_native: too many queries");
  const int64_t tiles = (num_rows + kTileRows - 1) / kTileRows;
  const int64_t wanted = std::max<int64_t>(1, (int64_t{kScanBlocksPerSm} * processors) / query_blocks);
  const int64_t segments = std::min<int64_t>({wanted, tiles, 65535});
  const int64_t rows_per_segment = (tiles + segments - 1) / segments * kTileRows;
  return {queries_per_block, query_blocks, (num_rows + rows_per_segment - 1) / rows_per_segment,
          rows_per_segment};
}

// One launch of the scan. queries: (b, d) fp32 (CUDA cores) or memory's fp16/bf16 (tensor
// cores). kWriteScores: scores_out (b, N) fp32 receives every score; else keys_out
// (b, segments, pool) each segment's best keys.
template <typename scalar_t, bool kWriteScores>
void launch_scan(const at::Tensor& queries, const at::Tensor& memory, const ScanGrid& grid, int64_t pool,
                 float threshold, const at::Tensor& exclude, uint64_t* keys_out, int* nan_flags,
                 float* scores_out) {
  const int region_length = kWriteScores ? 0 : topk::sort_length(static_cast<int>(pool) + kRegionRoom);
  const int64_t dim = memory.size(1);
  const scalar_t* memory_data = memory.data_ptr<scalar_t>();
  const auto run = [&](auto kernel, const auto* query_data, size_t tile_bytes, bool aligned) {
    const size_t shared = tile_bytes + size_t{sizeof(uint64_t)} * grid.queries_per_block * region_length;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared)));
    const dim3 blocks(grid.query_blocks, grid.segments);
    kernel<<<blocks, kScanThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        query_data, memory_data, queries.size(0), memory.size(0), dim, grid.rows_per_segment, aligned,
        threshold, exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr,
        exclude.defined() ? exclude.size(1) : 0, static_cast<int>(pool), region_length, keys_out, nan_flags,
        scores_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto aligned_to = [](const void* pointer, size_t bytes) {
    return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
  };
  if (queries.scalar_type() == at::kFloat) {
    const bool aligned = dim % 4 == 0 && aligned_to(memory_data, 4 * sizeof(scalar_t));
    const float* query_data = queries.data_ptr<float>();
    if (grid.queries_per_block == 1) {
      run(_scan_cuda_core_kernel<scalar_t, 1, kWriteScores>, query_data, cuda_core_tile_bytes(1), aligned);
    } else {
      run(_scan_cuda_core_kernel<scalar_t, kBlockQueries, kWriteScores>, query_data,
          cuda_core_tile_bytes(kBlockQueries), aligned);
    }
  } else if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    const scalar_t* query_data = queries.data_ptr<scalar_t>();
    const bool aligned = dim % 8 == 0 && aligned_to(memory_data, 16) && aligned_to(query_data, 16);
    constexpr int kWide = kWideTensorQueries / 16;
    constexpr int kNarrow = kNarrowTensorQueries / 16;
    if (grid.queries_per_block == kWideTensorQueries) {
      run(_scan_tensor_core_kernel<scalar_t, kWide, kWriteScores>, query_data, 0, aligned);
    } else {
      run(_scan_tensor_core_kernel<scalar_t, kNarrow, kWriteScores>, query_data, 0, aligned);
    }
  } else {
    TORCH_CHECK(false, "topk_dedup_native: tensor-core scan of a ", memory.scalar_type(), " memory");
  }
}

// The best `pool` eligible keys per query, sorted: (b, pool) int64 holding uint64 keys.
// nan_flags: (b,) int32, set to 1 for a query with a NaN score.
template <typename scalar_t>
at::Tensor top_keys(const at::Tensor& queries, const at::Tensor& memory, int64_t pool, float threshold,
                    const at::Tensor& exclude, at::Tensor& nan_flags) {
  const int64_t batch = queries.size(0);
  const ScanGrid grid = scan_grid(queries, memory, pool);
  const auto key_options = nan_flags.options().dtype(at::kLong);
  at::Tensor merged = at::empty({batch, grid.segments, pool}, key_options);
  launch_scan<scalar_t, false>(queries, memory, grid, pool, threshold, exclude, as_keys(merged),
                               nan_flags.data_ptr<int>(), nullptr);
  int64_t width = grid.segments * pool;
  while (width > pool) {
    const int64_t groups = (width + kSortSize - 1) / kSortSize;
    at::Tensor next = at::empty({batch, groups, pool}, key_options);
    _merge_top_keys_kernel<<<dim3(batch, groups), kSortThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        as_keys(merged), width, pool, as_keys(next), groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merged = next;
    width = groups * pool;
  }
  return merged.view({batch, pool});
}

// Every eligible row per query, ranked (the exact fallback past kMaxPool): (b, N) keys.
// The scores come from the scan kernels, so they are the main path's to the bit.
template <typename scalar_t>
at::Tensor all_ranked_keys(const at::Tensor& queries, const at::Tensor& memory, double threshold,
                           const at::Tensor& exclude, at::Tensor& nan_flags) {
  const int64_t num_rows = memory.size(0);
  at::Tensor scores = at::empty({queries.size(0), num_rows}, nan_flags.options().dtype(at::kFloat));
  launch_scan<scalar_t, true>(queries, memory, scan_grid(queries, memory, 0), 0, 0.f, at::Tensor(), nullptr,
                              nullptr, scores.data_ptr<float>());
  nan_flags.bitwise_or_(at::isnan(scores).any(1).to(at::kInt));
  at::Tensor eligible = scores.to(at::kDouble).le(threshold);  // exact comparison, NaN is not eligible
  if (exclude.defined() && exclude.size(1) > 0) {
    // Padding and out-of-range ids go to a spare last column; every write is `true`,
    // so repeated indices cannot race.
    const at::Tensor inside = exclude.ge(0).logical_and(exclude.lt(num_rows));
    at::Tensor excluded = at::zeros({exclude.size(0), num_rows + 1}, eligible.options());
    excluded.scatter_(1, at::where(inside, exclude, num_rows), true);
    eligible.logical_and_(excluded.narrow(1, 0, num_rows).logical_not());
  }
  const float negative_infinity = -std::numeric_limits<float>::infinity();
  scores.masked_fill_(eligible.logical_not(), negative_infinity);
  auto [sorted_scores, order] = scores.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true);
  order.masked_fill_(sorted_scores.eq(negative_infinity), -1);
  at::Tensor keys = at::empty_like(order);
  const int64_t count = keys.numel();
  constexpr int kThreads = 256;
  _keys_from_ranked_kernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sorted_scores.contiguous().data_ptr<float>(), order.contiguous().data_ptr<int64_t>(), count, as_keys(keys));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keys;
}

int64_t next_power_of_two(int64_t value) {
  int64_t power = 1;
  while (power < value) power <<= 1;
  return power;
}

template <typename scalar_t>
void topk_dedup_cuda_impl(const at::Tensor& scan_queries, const at::Tensor& memory, int64_t k,
                          double threshold, const at::Tensor& exclude_rows, at::Tensor& scores,
                          at::Tensor& indices) {
  const int64_t num_rows = memory.size(0);
  const float threshold_f32 = threshold_as_fp32(threshold);
  at::Tensor pending = at::arange(scan_queries.size(0), scan_queries.options().dtype(at::kLong));
  int64_t pool = std::min(num_rows, next_power_of_two(2 * k + 16));
  while (pending.numel() > 0) {
    const bool exhaustive = pool > kMaxPool;
    const at::Tensor pending_queries = scan_queries.index_select(0, pending).contiguous();
    const at::Tensor pending_exclude = exclude_rows.defined() ? exclude_rows.index_select(0, pending) : at::Tensor();
    at::Tensor nan_flags = at::zeros({pending.numel()}, scan_queries.options().dtype(at::kInt));
    const at::Tensor candidates =
        exhaustive ? all_ranked_keys<scalar_t>(pending_queries, memory, threshold, pending_exclude, nan_flags)
                   : top_keys<scalar_t>(pending_queries, memory, pool, threshold_f32, pending_exclude,
                                         nan_flags);
    // A NaN score cannot be ranked: the reference's error (one sync, as the widening loop has anyway).
    const at::Tensor nan_queries = pending.masked_select(nan_flags.to(at::kBool));
    TORCH_CHECK_VALUE(nan_queries.numel() == 0, "topk_dedup: a score of query ",
                      nan_queries.numel() > 0 ? nan_queries.min().item<int64_t>() : -1,
                      " is NaN (NaN in queries or memory, or inf times 0): NaN rows cannot be ranked; "
                      "remove or fix them");
    const int64_t width = candidates.size(1);
    const int64_t count = pending.numel();
    at::Tensor pending_scores = at::full({count, k}, -std::numeric_limits<float>::infinity(), scores.options());
    at::Tensor pending_indices = at::full({count, k}, -1, indices.options());
    at::Tensor short_flags = at::zeros({count}, scan_queries.options().dtype(at::kBool));
    _walk_pool_kernel<scalar_t><<<count, kWarp, 0, c10::cuda::getCurrentCUDAStream()>>>(
        as_keys(candidates), width, memory.data_ptr<scalar_t>(), memory.size(1), k, threshold_f32,
        pending_scores.data_ptr<float>(), pending_indices.data_ptr<int64_t>(), short_flags.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scores.index_copy_(0, pending, pending_scores);
    indices.index_copy_(0, pending, pending_indices);
    // A full pool may have left eligible rows outside it: widen and redo those queries.
    if (exhaustive || pool >= num_rows) break;
    pending = pending.masked_select(short_flags);
    pool = std::min(num_rows, pool * 4);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_dedup_cuda(const at::Tensor& queries, const at::Tensor& memory,
                                                   int64_t k, double threshold,
                                                   const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(queries.dim() == 2 && memory.dim() == 2, "topk_dedup_native: queries and memory must be 2-D");
  TORCH_CHECK(queries.size(1) == memory.size(1), "topk_dedup_native: queries and memory differ in last dim");
  TORCH_CHECK(k > 0, "topk_dedup_native: k must be positive, got ", k);
  TORCH_CHECK(memory.size(0) < (int64_t{1} << 32) - 1, "topk_dedup_native: CUDA keys hold row indices below 2^32 - 1");
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const int64_t batch = queries.size(0);
  at::Tensor scores = at::full({batch, k}, -std::numeric_limits<float>::infinity(), queries.options().dtype(at::kFloat));
  at::Tensor indices = at::full({batch, k}, -1, queries.options().dtype(at::kLong));
  if (batch == 0 || memory.size(0) == 0) return {scores, indices};

  at::Tensor exclude_rows;
  if (exclude.has_value() && exclude->numel() > 0) exclude_rows = exclude->contiguous();
  // The queries the scan reads: as they are for the tensor cores, else as fp32 once (the
  // CUDA cores multiply fp32 by the memory's values converted to fp32, the reference's products).
  const at::Tensor memory_rows = memory.contiguous();
  const at::Tensor scan_queries =
      uses_tensor_cores(queries, memory_rows) ? queries.contiguous() : queries.to(at::kFloat).contiguous();
  // The dtypes the op accepts (mkfast/ops/topk_dedup.py checks them first).
  const auto run = [&]<typename scalar_t>() {
    topk_dedup_cuda_impl<scalar_t>(scan_queries, memory_rows, k, threshold, exclude_rows, scores, indices);
  };
  switch (memory_rows.scalar_type()) {
    case at::kFloat:
      run.template operator()<float>();
      break;
    case at::kHalf:
      run.template operator()<at::Half>();
      break;
    case at::kBFloat16:
      run.template operator()<at::BFloat16>();
      break;
    default:
      TORCH_CHECK_TYPE(false, "topk_dedup_native: memory must be float32/float16/bfloat16 on CUDA, got ",
                       memory_rows.scalar_type());
  }
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(mkfast, CUDA, m) {
  m.impl("topk_dedup_native", &topk_dedup_cuda);
}

}  // namespace mkfast
