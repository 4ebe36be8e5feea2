// CUDA kernel of mkfast::topk_dedup_native: exact greedy top-k with redundancy
// filtering (semantics in mkfast/ops/topk_dedup.py, which also validates inputs).
//
// Plan per call, memory streamed in chunks so no (b, N) score matrix exists:
//   1. scores of a chunk with one cuBLAS GEMM, fp32 output (fp16/bf16 inputs are
//      multiplied as they are, accumulating in fp32);
//   2. `_segment_top_keys_kernel`: one block per (query, segment of 4096 rows)
//      flags NaN scores (the call then fails as the reference does), turns eligible scores (score <= threshold, not excluded) into 64-bit keys
//      that order like the ranked list (score desc, then index asc), drops keys
//      not better than the query's current pool-th best with one compare, and
//      bitonic-sorts only the survivors in shared memory, keeping the best `pool`;
//   3. `_merge_top_keys_kernel`: the same sort over groups of those keys plus the
//      running pool, until one sorted pool of `pool` keys per query remains;
//   4. `_walk_pool_kernel`: one warp per query walks its pool, testing each
//      candidate against the rows already taken (warp-parallel dot products);
//   5. queries whose walk ran out of a full pool are redone with a 4x pool, and,
//      past kMaxPool, with every eligible row (chunked scores, stable sort): the
//      answer is always the greedy walk over the whole ranked list.
// Written without a GPU at hand: compiled here, run by tests marked `cuda`.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers,
// which a minimal toolkit (nvcc + runtime) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "topk_dedup_common.h"

namespace mkfast {
namespace {

// Keys sorted per block: 4096 x 8 bytes = 32 KiB of static shared memory, under
// the 48 KiB every architecture gives without opt-in.
constexpr int kSortSize = 4096;
constexpr int kSortThreads = 512;
// Largest pool the sort kernels handle: a merge pass must shrink its input
// (groups of kSortSize keys become `pool` keys), so pool <= kSortSize / 4.
constexpr int64_t kMaxPool = kSortSize / 4;
// Bound on the fp32 score block of one chunk (b x rows): 256 MiB.
constexpr int64_t kScoreBlockBytes = int64_t{256} << 20;
constexpr int kWarp = 32;

// Ranked-list order as unsigned keys: high 32 bits the score mapped to an
// unsigned that orders like the float, low 32 bits the inverted row index
// (lower index = larger key). Key 0 means "no candidate": every real key has a
// non-zero high half, because eligible scores are never NaN.
__device__ __forceinline__ uint64_t make_key(float score, int64_t index) {
  // -0.0 ranks as +0.0: the reference compares values, keys compare bits.
  const uint32_t bits = __float_as_uint(score == 0.f ? 0.f : score);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(index));
}

__device__ __forceinline__ float key_score(uint64_t key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (ordered & 0x80000000u) ? (ordered ^ 0x80000000u) : ~ordered;
  return __uint_as_float(bits);
}

__device__ __forceinline__ int64_t key_index(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

// The smallest power of two >= count (at least 2), the length block_sort_descending sorts.
__device__ __forceinline__ int sort_length(int count) {
  int length = 2;
  while (length < count) length <<= 1;
  return length;
}

// Sorts keys[0..length) descending, length a power of two <= kSortSize. Each thread
// takes compare-exchange pairs (i, i + stride), t-th pair i = 2t - t % stride, so
// every thread works at every step (iterating over keys left half of them idle).
__device__ void block_sort_descending(uint64_t* keys, int length) {
  for (int width = 2; width <= length; width <<= 1) {
    for (int stride = width >> 1; stride > 0; stride >>= 1) {
      for (int pair = threadIdx.x; pair < length / 2; pair += blockDim.x) {
        const int i = 2 * pair - (pair & (stride - 1));
        const int partner = i + stride;
        const bool descending = (i & width) == 0;
        const uint64_t a = keys[i];
        const uint64_t b = keys[partner];
        if ((a < b) == descending) {
          keys[i] = b;
          keys[partner] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Writes the best `pool` of keys[0..length) (sorted) to destination, zeros past length.
__device__ void store_best(const uint64_t* keys, int length, int64_t pool, uint64_t* destination) {
  for (int i = threadIdx.x; i < pool; i += blockDim.x) destination[i] = i < length ? keys[i] : 0;
}

// grid (b, segments). scores: (b, rows) of memory rows [row_start, row_start + rows).
// floor_keys: the running pool's last key per query (stride `pool`); out: (b, segments, pool).
__global__ void _segment_top_keys_kernel(const float* __restrict__ scores, int64_t rows, int64_t row_start,
                                         float threshold, const int64_t* __restrict__ exclude,
                                         int64_t exclude_width, const uint64_t* __restrict__ floor_keys,
                                         int64_t pool, uint64_t* __restrict__ out, int64_t segments,
                                         int* __restrict__ nan_flags) {
  __shared__ uint64_t keys[kSortSize];
  __shared__ int kept;
  const int64_t query = blockIdx.x;
  const int64_t segment = blockIdx.y;
  const float* row_scores = scores + query * rows;
  const int64_t* excluded = exclude_width > 0 ? exclude + query * exclude_width : nullptr;
  const uint64_t floor_key = floor_keys[query * pool];
  if (threadIdx.x == 0) kept = 0;
  __syncthreads();
  // One compare against the running pool's worst key rejects most rows of a long
  // memory; the few that beat it are compacted to the front of `keys`.
  for (int i = threadIdx.x; i < kSortSize; i += blockDim.x) {
    const int64_t row = segment * kSortSize + i;
    if (row >= rows) continue;
    const float score = row_scores[row];
    if (isnan(score)) nan_flags[query] = 1;  // every writer stores 1: the race is benign
    const int64_t index = row_start + row;
    bool eligible = score <= threshold;  // false for NaN too
    for (int64_t e = 0; eligible && e < exclude_width; ++e) eligible = excluded[e] != index;
    if (!eligible) continue;
    const uint64_t candidate = make_key(score, index);
    if (candidate > floor_key) keys[atomicAdd(&kept, 1)] = candidate;
  }
  __syncthreads();
  const int count = kept;
  uint64_t* destination = out + (query * segments + segment) * pool;
  // Most segments of a long memory hold nothing better than the running pool: skip their sort.
  if (count == 0) {
    store_best(keys, 0, pool, destination);
    return;
  }
  // Sort only the survivors, padded to a power of two (the atomics left them in any order).
  const int length = sort_length(count);
  for (int i = count + threadIdx.x; i < length; i += blockDim.x) keys[i] = 0;
  __syncthreads();
  block_sort_descending(keys, length);
  store_best(keys, length, pool, destination);
}

// grid (b, groups). in: (b, width) keys; out: (b, groups, pool), the best of each group of kSortSize.
__global__ void _merge_top_keys_kernel(const uint64_t* __restrict__ in, int64_t width, int64_t pool,
                                       uint64_t* __restrict__ out, int64_t groups) {
  __shared__ uint64_t keys[kSortSize];
  const int64_t query = blockIdx.x;
  const int64_t group = blockIdx.y;
  const int64_t left = width - group * kSortSize;
  const int columns = static_cast<int>(left < kSortSize ? left : kSortSize);
  const int length = sort_length(columns);
  for (int i = threadIdx.x; i < length; i += blockDim.x) {
    keys[i] = i < columns ? in[query * width + group * kSortSize + i] : 0;
  }
  __syncthreads();
  block_sort_descending(keys, length);
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

// fp32 scores (b, rows) of queries against memory rows [start, start + rows).
at::Tensor chunk_scores(const at::Tensor& queries, const at::Tensor& memory, int64_t start, int64_t rows) {
  const at::Tensor chunk = memory.narrow(0, start, rows);
  if (queries.scalar_type() == chunk.scalar_type() && chunk.scalar_type() != at::kFloat) {
    return at::mm(queries, chunk.t(), at::kFloat);  // half inputs, fp32 accumulation and output
  }
  return at::mm(queries.to(at::kFloat), chunk.to(at::kFloat).t());
}

// The best `pool` eligible keys per query, sorted: (b, pool) int64 holding uint64 keys.
// nan_flags: (b,) int32, set to 1 for a query with a NaN score.
at::Tensor top_keys(const at::Tensor& queries, const at::Tensor& memory, int64_t pool, float threshold,
                    const at::Tensor& exclude, at::Tensor& nan_flags) {
  const int64_t batch = queries.size(0);
  const int64_t num_rows = memory.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto key_options = queries.options().dtype(at::kLong);
  int64_t rows_per_chunk = std::max<int64_t>(kSortSize, kScoreBlockBytes / (4 * batch) / kSortSize * kSortSize);
  if (queries.scalar_type() != memory.scalar_type()) {
    // chunk_scores copies mixed-dtype chunks to fp32: bound that copy like the score block.
    const int64_t dim = std::max<int64_t>(1, memory.size(1));
    rows_per_chunk = std::min(rows_per_chunk,
                              std::max<int64_t>(kSortSize, kScoreBlockBytes / (4 * dim) / kSortSize * kSortSize));
  }
  at::Tensor running = at::zeros({batch, pool}, key_options);
  const int64_t exclude_width = exclude.defined() ? exclude.size(1) : 0;
  const int64_t* exclude_data = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
  for (int64_t start = 0; start < num_rows; start += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, num_rows - start);
    const at::Tensor scores = chunk_scores(queries, memory, start, rows).contiguous();
    const int64_t segments = (rows + kSortSize - 1) / kSortSize;
    // The chunk's segment tops, then the running pool in the last slot.
    at::Tensor keys = at::empty({batch, segments + 1, pool}, key_options);
    keys.select(1, segments).copy_(running);
    _segment_top_keys_kernel<<<dim3(batch, segments), kSortThreads, 0, stream>>>(
        scores.data_ptr<float>(), rows, start, threshold, exclude_data, exclude_width,
        as_keys(running) + (pool - 1), pool, as_keys(keys), segments, nan_flags.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    int64_t width = (segments + 1) * pool;
    at::Tensor merged = keys;
    while (true) {
      const int64_t groups = (width + kSortSize - 1) / kSortSize;
      at::Tensor next = at::empty({batch, groups, pool}, key_options);
      _merge_top_keys_kernel<<<dim3(batch, groups), kSortThreads, 0, stream>>>(
          as_keys(merged), width, pool, as_keys(next), groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merged = next;
      width = groups * pool;
      if (groups == 1) break;
    }
    running = merged.view({batch, pool});
  }
  return running;
}

// Every eligible row per query, ranked (the exact fallback past kMaxPool): (b, N) keys.
at::Tensor all_ranked_keys(const at::Tensor& queries, const at::Tensor& memory, double threshold,
                           const at::Tensor& exclude, at::Tensor& nan_flags) {
  const int64_t num_rows = memory.size(0);
  at::Tensor scores = at::empty({queries.size(0), num_rows}, queries.options().dtype(at::kFloat));
  const int64_t rows_per_chunk = std::max<int64_t>(kSortSize, kScoreBlockBytes / (4 * queries.size(0)));
  for (int64_t start = 0; start < num_rows; start += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, num_rows - start);
    scores.narrow(1, start, rows).copy_(chunk_scores(queries, memory, start, rows));
  }
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

std::tuple<at::Tensor, at::Tensor> topk_dedup_cuda(const at::Tensor& queries, const at::Tensor& memory,
                                                   int64_t k, double threshold,
                                                   const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(queries.dim() == 2 && memory.dim() == 2, "topk_dedup_native: queries and memory must be 2-D");
  TORCH_CHECK(queries.size(1) == memory.size(1), "topk_dedup_native: queries and memory differ in last dim");
  TORCH_CHECK(k > 0, "topk_dedup_native: k must be positive, got ", k);
  TORCH_CHECK(memory.size(0) < (int64_t{1} << 32) - 1, "topk_dedup_native: CUDA keys hold row indices below 2^32 - 1");
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const int64_t batch = queries.size(0);
  const int64_t num_rows = memory.size(0);
  at::Tensor scores = at::full({batch, k}, -std::numeric_limits<float>::infinity(), queries.options().dtype(at::kFloat));
  at::Tensor indices = at::full({batch, k}, -1, queries.options().dtype(at::kLong));
  if (batch == 0 || num_rows == 0) return {scores, indices};
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "topk_dedup_native: too many queries for one grid");

  at::Tensor exclude_rows;
  if (exclude.has_value() && exclude->numel() > 0) exclude_rows = exclude->contiguous();
  const at::Tensor memory_rows = memory.contiguous();
  const float threshold_f32 = threshold_as_fp32(threshold);

  at::Tensor pending = at::arange(batch, queries.options().dtype(at::kLong));
  int64_t pool = std::min(num_rows, next_power_of_two(2 * k + 16));
  while (pending.numel() > 0) {
    const bool exhaustive = pool > kMaxPool;
    const at::Tensor pending_queries = queries.index_select(0, pending).contiguous();
    const at::Tensor pending_exclude = exclude_rows.defined() ? exclude_rows.index_select(0, pending) : at::Tensor();
    at::Tensor nan_flags = at::zeros({pending.numel()}, queries.options().dtype(at::kInt));
    const at::Tensor candidates =
        exhaustive ? all_ranked_keys(pending_queries, memory_rows, threshold, pending_exclude, nan_flags)
                   : top_keys(pending_queries, memory_rows, pool, threshold_f32, pending_exclude, nan_flags);
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
    at::Tensor short_flags = at::zeros({count}, queries.options().dtype(at::kBool));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory_rows.scalar_type(), "topk_dedup_cuda", [&] {
      _walk_pool_kernel<scalar_t><<<count, kWarp, 0, c10::cuda::getCurrentCUDAStream()>>>(
          as_keys(candidates), width, memory_rows.data_ptr<scalar_t>(), memory_rows.size(1), k, threshold_f32,
          pending_scores.data_ptr<float>(), pending_indices.data_ptr<int64_t>(), short_flags.data_ptr<bool>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scores.index_copy_(0, pending, pending_scores);
    indices.index_copy_(0, pending, pending_indices);
    // A full pool may have left eligible rows outside it: widen and redo those queries.
    if (exhaustive || pool >= num_rows) break;
    pending = pending.masked_select(short_flags);
    pool = std::min(num_rows, pool * 4);
  }
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(mkfast, CUDA, m) {
  m.impl("topk_dedup_native", &topk_dedup_cuda);
}

}  // namespace mkfast
