// CUDA kernel of mkfast::topk_dedup_native: exact greedy top-k with redundancy filtering
// (semantics in mkfast/ops/topk_dedup.py, which also validates inputs).
//
// Plan per call; no (b, N) score matrix exists on the main path:
//   1. `_fused_scan_kernel`, grid (query blocks of kBlockQueries, or 1 query at b=1, x memory
//      segments): each block streams its segment of rows once, computes the scores of its
//      queries itself (CUDA cores, fp32, the order of topk_select.cuh: it depends on d
//      alone, so identical rows tie exactly whatever their position, segment or batch) and
//      keeps each query's best `pool` eligible keys (score <= threshold, not excluded) in
//      shared memory; a row becomes a candidate only if its key beats the pool's worst,
//      held in a register (one compare rejects almost every row once the pool is warm);
//   2. `_merge_top_keys_kernel`: groups of the segments' keys bitonic-sorted, the best
//      `pool` kept, until one sorted pool per query remains;
//   3. `_walk_pool_kernel`: one warp per query walks its pool, testing each candidate
//      against the rows already taken (warp-parallel dot products);
//   4. queries whose walk ran out of a full pool are redone with a 4x pool, and, past
//      kMaxPool, with every eligible row (the same scan kernel writing its scores, a stable
//      sort): the answer is always the greedy walk over the whole ranked list.
//
// Bytes moved per query block (N rows of d elements of s bytes, b queries):
//   this scan: N*d*s read through L2 per block of kBlockQueries queries (blocks of one
//     segment are launched side by side, so HBM sees the memory about once while they
//     stay together), plus b * segments * pool * 8 bytes of keys (~1 MB at b=64);
//   the cuBLAS path it replaces: the memory read by the GEMM, then b*N*4 bytes of fp32
//     scores written and read back: at N=1e7, d=768, bf16, b=64, 5.1 GB on top of the
//     15.4 GB of memory.
// The scan multiplies on CUDA cores (H100 SXM spec sheet: 67 TFLOP/s fp32 against 989 dense
// bf16 on tensor cores): from a few dozen queries on it is compute-bound, above the HBM
// floor; tensor cores are not used yet. Written without a GPU at hand: compiled here
// (`mkfast audit --kernels cuda` reads its ptxas figures), run by the tests marked `cuda`.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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

#include "topk_dedup_common.h"
#include "topk_select.cuh"

namespace mkfast {
namespace {

using topk::key_index;
using topk::key_score;
using topk::make_key;

// Scan block: one memory row per thread per tile, kTileDims dims of the tile staged in
// shared memory at a time as fp32. A row's stride of kTileDims + 4 words puts the float4
// reads of 8 consecutive threads (one shared-memory wavefront) on distinct banks.
constexpr int kScanThreads = 256;
constexpr int kTileRows = kScanThreads;
constexpr int kTileDims = 32;
constexpr int kTileStride = kTileDims + 4;
// Queries per scan block from 2 queries on: each thread keeps kBlockQueries x 4 partial
// sums; every memory row loaded serves them all.
constexpr int kBlockQueries = 8;
// Scan blocks per SM the grid aims for (segments = this x SMs / query blocks).
constexpr int kScanBlocksPerSm = 4;
// The merge sorts groups of kSortSize keys: 32 KiB of static shared memory.
constexpr int kSortSize = 4096;
constexpr int kSortThreads = 512;
// Largest pool: a merge pass must shrink its input (groups of kSortSize keys become `pool`
// keys), so pool <= kSortSize / 4; and a scan block's pools (8 x 8 KiB at 512) plus its tiles
// (37 KiB) must fit an A100's 163 KiB of shared memory, as 1024 (8 x 16 KiB) would not.
constexpr int64_t kMaxPool = 512;
constexpr int kWarp = 32;

// std::min/max are host functions to nvcc without --expt-relaxed-constexpr.
template <typename T>
__device__ __forceinline__ T smaller(T a, T b) {
  return b < a ? b : a;
}

struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// Four consecutive elements of a row as fp32, zeros past `valid`; one 8- or 16-byte load
// when the row is aligned (fp32, fp16, bf16), element by element otherwise.
template <typename scalar_t>
__device__ __forceinline__ float4 load_four(const scalar_t* source, int valid, bool aligned) {
  if constexpr (sizeof(scalar_t) == 4) {
    if (aligned && valid == 4) return *reinterpret_cast<const float4*>(source);
  } else if constexpr (sizeof(scalar_t) == 2) {
    if (aligned && valid == 4) {
      const uint2 raw = *reinterpret_cast<const uint2*>(source);
      const auto element = [](uint32_t bits) {
        return static_cast<float>(scalar_t(static_cast<uint16_t>(bits), scalar_t::from_bits()));
      };
      return make_float4(element(raw.x & 0xFFFFu), element(raw.x >> 16), element(raw.y & 0xFFFFu),
                         element(raw.y >> 16));
    }
  }
  float values[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) values[j] = j < valid ? static_cast<float>(source[j]) : 0.f;
  return make_float4(values[0], values[1], values[2], values[3]);
}

__device__ __forceinline__ bool is_excluded(const int64_t* excluded, int64_t width, int64_t index) {
  for (int64_t e = 0; e < width; ++e) {
    if (excluded[e] == index) return true;
  }
  return false;
}

// grid (ceil(b / kQueries), segments). queries: (b, dim) fp32; memory: (N, dim).
// kWriteScores: scores_out (b, N) receives every score (the exhaustive path) and nothing is
// selected. Otherwise keys_out (b, segments, pool) receives each segment's best eligible keys,
// sorted, 0 past the last; nan_flags[query] is set to 1 where a score is NaN.
// Dynamic shared memory: the row and query tiles, then kQueries regions of region_length keys.
template <typename scalar_t, int kQueries, bool kWriteScores>
__global__ void __launch_bounds__(kScanThreads)
    _fused_scan_kernel(const float* __restrict__ queries, const scalar_t* __restrict__ memory, int64_t batch,
                       int64_t num_rows, int64_t dim, int64_t rows_per_segment, bool aligned, float threshold,
                       const int64_t* __restrict__ exclude, int64_t exclude_width, int pool, int region_length,
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
  const int64_t first_query = static_cast<int64_t>(blockIdx.x) * kQueries;
  const int queries_here = static_cast<int>(smaller<int64_t>(kQueries, batch - first_query));
  const int64_t segment_start = static_cast<int64_t>(blockIdx.y) * rows_per_segment;
  const int64_t segment_end = smaller(segment_start + rows_per_segment, num_rows);
  if constexpr (!kWriteScores) topk::clear_pools(pools, thread, kScanThreads, sync);

  for (int64_t tile_start = segment_start; tile_start < segment_end; tile_start += kTileRows) {
    const int tile_rows = static_cast<int>(smaller<int64_t>(kTileRows, segment_end - tile_start));
    float partial[kQueries][topk::kScoreLanes] = {};
    for (int64_t dim_start = 0; dim_start < dim; dim_start += kTileDims) {
      const int dims_here = static_cast<int>(smaller<int64_t>(kTileDims, dim - dim_start));
      __syncthreads();  // every thread is done reading the previous tiles
      for (int i = thread; i < kTileRows * (kTileDims / 4); i += kScanThreads) {
        const int row = i / (kTileDims / 4);
        const int column = (i % (kTileDims / 4)) * 4;
        const int valid = row < tile_rows ? smaller(4, dims_here - column) : 0;
        const scalar_t* source = memory + (tile_start + row) * dim + dim_start + column;
        *reinterpret_cast<float4*>(row_tile + row * kTileStride + column) = load_four(source, valid, aligned);
      }
      for (int i = thread; i < kQueries * kTileDims; i += kScanThreads) {
        const int query = i / kTileDims;
        const int column = i % kTileDims;
        query_tile[i] = query < queries_here && column < dims_here
                            ? queries[(first_query + query) * dim + dim_start + column]
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
#pragma unroll
    for (int query = 0; query < kQueries; ++query) {
      if (query >= queries_here || thread >= tile_rows) break;
      const float score = topk::finish_score(partial[query]);
      const int64_t query_row = first_query + query;
      if constexpr (kWriteScores) {
        scores_out[query_row * num_rows + index] = score;
      } else {
        if (isnan(score)) nan_flags[query_row] = 1;  // every writer stores 1: the race is benign
        if (!(score <= threshold)) continue;         // NaN is never eligible
        const uint64_t key = make_key(score, index);
        if (key <= floors[query]) continue;  // one compare rejects almost every row
        if (is_excluded(exclude + query_row * exclude_width, exclude_width, index)) continue;
        topk::append_candidate(pools, query, key);
      }
    }
    if constexpr (!kWriteScores) {
      __syncthreads();
      const bool flush = topk::must_flush(pools, kTileRows);
      __syncthreads();  // every thread has read the counts before a flush or the next tile changes them
      if (flush) topk::flush_pools(pools, thread, kScanThreads, sync);
    }
  }
  if constexpr (!kWriteScores) {
    topk::flush_pools(pools, thread, kScanThreads, sync);
    for (int i = thread; i < queries_here * pool; i += kScanThreads) {
      const int query = i / pool;
      const int slot = i % pool;
      keys_out[((first_query + query) * gridDim.y + blockIdx.y) * pool + slot] =
          pools.regions[query * region_length + slot];
    }
  }
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

// How the scan splits the memory: enough blocks to fill the SMs, segments whole tiles.
struct ScanGrid {
  int64_t query_blocks;
  int64_t segments;
  int64_t rows_per_segment;
};

ScanGrid scan_grid(int64_t batch, int64_t num_rows, int queries_per_block) {
  int device = 0;
  int processors = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device));
  const int64_t query_blocks = (batch + queries_per_block - 1) / queries_per_block;
  const int64_t tiles = (num_rows + kTileRows - 1) / kTileRows;
  const int64_t wanted = std::max<int64_t>(1, (int64_t{kScanBlocksPerSm} * processors) / query_blocks);
  const int64_t segments = std::min<int64_t>({wanted, tiles, 65535});
  const int64_t rows_per_segment = (tiles + segments - 1) / segments * kTileRows;
  return {query_blocks, (num_rows + rows_per_segment - 1) / rows_per_segment, rows_per_segment};
}

// One launch of the scan. scores_out: (b, N) fp32 for kWriteScores, else null.
template <typename scalar_t, int kQueries, bool kWriteScores>
void launch_scan(const at::Tensor& queries, const at::Tensor& memory, const ScanGrid& grid, float threshold,
                 const at::Tensor& exclude, int pool, uint64_t* keys_out, int* nan_flags, float* scores_out) {
  TORCH_CHECK(grid.query_blocks <= std::numeric_limits<int32_t>::max(), "topk_dedup_native: too many queries");
  const int region_length = kWriteScores ? 0 : topk::sort_length(pool + kTileRows);
  const size_t shared = (kTileRows * kTileStride + kQueries * kTileDims) * sizeof(float) +
                        size_t{kQueries} * region_length * sizeof(uint64_t);
  const auto kernel = _fused_scan_kernel<scalar_t, kQueries, kWriteScores>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared)));
  const int64_t dim = memory.size(1);
  const scalar_t* memory_data = memory.data_ptr<scalar_t>();
  const bool aligned = dim % 4 == 0 && reinterpret_cast<uintptr_t>(memory_data) % (4 * sizeof(scalar_t)) == 0;
  const int64_t exclude_width = exclude.defined() ? exclude.size(1) : 0;
  kernel<<<dim3(grid.query_blocks, grid.segments), kScanThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
      queries.data_ptr<float>(), memory_data, queries.size(0), memory.size(0), dim, grid.rows_per_segment,
      aligned, threshold, exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr, exclude_width, pool,
      region_length, keys_out, nan_flags, scores_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The best `pool` eligible keys per query, sorted: (b, pool) int64 holding uint64 keys.
// queries: (b, d) fp32. nan_flags: (b,) int32, set to 1 for a query with a NaN score.
template <typename scalar_t>
at::Tensor top_keys(const at::Tensor& queries, const at::Tensor& memory, int64_t pool, float threshold,
                    const at::Tensor& exclude, at::Tensor& nan_flags) {
  const int64_t batch = queries.size(0);
  const int queries_per_block = batch == 1 ? 1 : kBlockQueries;
  const ScanGrid grid = scan_grid(batch, memory.size(0), queries_per_block);
  const auto key_options = queries.options().dtype(at::kLong);
  at::Tensor merged = at::empty({batch, grid.segments, pool}, key_options);
  int* flags = nan_flags.data_ptr<int>();
  const int pool_size = static_cast<int>(pool);
  if (queries_per_block == 1) {
    launch_scan<scalar_t, 1, false>(queries, memory, grid, threshold, exclude, pool_size, as_keys(merged), flags,
                                    nullptr);
  } else {
    launch_scan<scalar_t, kBlockQueries, false>(queries, memory, grid, threshold, exclude, pool_size,
                                                as_keys(merged), flags, nullptr);
  }
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
// The scores come from the scan kernel, so they are the main path's to the bit.
template <typename scalar_t>
at::Tensor all_ranked_keys(const at::Tensor& queries, const at::Tensor& memory, double threshold,
                           const at::Tensor& exclude, at::Tensor& nan_flags) {
  const int64_t num_rows = memory.size(0);
  at::Tensor scores = at::empty({queries.size(0), num_rows}, queries.options().dtype(at::kFloat));
  const ScanGrid grid = scan_grid(queries.size(0), num_rows, kBlockQueries);
  launch_scan<scalar_t, kBlockQueries, true>(queries, memory, grid, 0.f, at::Tensor(), 0, nullptr, nullptr,
                                             scores.data_ptr<float>());
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
void topk_dedup_cuda_impl(const at::Tensor& queries_f32, const at::Tensor& memory, int64_t k, double threshold,
                          const at::Tensor& exclude_rows, at::Tensor& scores, at::Tensor& indices) {
  const int64_t num_rows = memory.size(0);
  const float threshold_f32 = threshold_as_fp32(threshold);
  at::Tensor pending = at::arange(queries_f32.size(0), queries_f32.options().dtype(at::kLong));
  int64_t pool = std::min(num_rows, next_power_of_two(2 * k + 16));
  while (pending.numel() > 0) {
    const bool exhaustive = pool > kMaxPool;
    const at::Tensor pending_queries = queries_f32.index_select(0, pending).contiguous();
    const at::Tensor pending_exclude = exclude_rows.defined() ? exclude_rows.index_select(0, pending) : at::Tensor();
    at::Tensor nan_flags = at::zeros({pending.numel()}, queries_f32.options().dtype(at::kInt));
    const at::Tensor candidates =
        exhaustive ? all_ranked_keys<scalar_t>(pending_queries, memory, threshold, pending_exclude, nan_flags)
                   : top_keys<scalar_t>(pending_queries, memory, pool, threshold_f32, pending_exclude, nan_flags);
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
    at::Tensor short_flags = at::zeros({count}, queries_f32.options().dtype(at::kBool));
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
  // Queries as fp32 once: the scan multiplies fp32 by the memory's values converted to fp32,
  // the reference's products whatever the two dtypes.
  const at::Tensor queries_f32 = queries.to(at::kFloat).contiguous();
  const at::Tensor memory_rows = memory.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory_rows.scalar_type(), "topk_dedup_cuda", [&] {
    topk_dedup_cuda_impl<scalar_t>(queries_f32, memory_rows, k, threshold, exclude_rows, scores, indices);
  });
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(mkfast, CUDA, m) {
  m.impl("topk_dedup_native", &topk_dedup_cuda);
}

}  // namespace mkfast
