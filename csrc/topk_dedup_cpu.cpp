// CPU kernel of mkfast::topk_dedup_native: exact greedy top-k with redundancy
// filtering (semantics in mkfast/ops/topk_dedup.py, which also validates inputs).
//
// Every score the kernel ranks or returns is `score_dot`: one fp32 dot product
// whose summation order depends on d only, never on the row's position or the
// batch, so identical rows tie exactly and ties go to the lower index (a GEMM's
// output rounds rows differently by position and batch size).
//
// Plan per call:
//   1. below kPrefilterMinBatch queries: one pass over memory, threads over row
//      ranges, every (query, row) scored with score_dot (at b=1 this is the read
//      of the memory, the floor); from kPrefilterMinBatch on, a bf16 GEMM
//      estimates the scores and only rows its error bound cannot rule out are
//      scored with score_dot;
//   2. per query, a bounded heap of the best `pool_size` rows that can ever be
//      taken (score <= threshold, not excluded): rows above the threshold are
//      always skipped, so they never enter the pool;
//   3. walk the sorted pool, testing each candidate against the rows already taken;
//   4. a query whose walk ran out of pool with fewer than k taken, while rows were
//      left outside the pool, is rescanned with a 4x wider pool. The answer is
//      therefore always the greedy walk over the whole ranked list.
// A NaN score cannot be ranked: the call fails with the message of the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "topk_dedup_common.h"

namespace mkfast {
namespace {

// From this many queries on, scores are first estimated with a bf16 GEMM (AMX /
// AVX512-BF16 where the CPU has them) and only rows the estimate cannot rule out
// are scored exactly. Below it, every score is computed exactly in one pass over
// memory. Measured on 2 shared cores (N=2e5, d=768, min of 3 interleaved runs,
// ms exact/prefilter): b=1 193/470, b=8 510/500, b=16 787/565, b=64 1727/806.
constexpr int64_t kPrefilterMinBatch = 8;
// Rows a thread rounds to bf16 and multiplies at once on the prefilter path:
// 4096 x 768 bf16 = 6 MiB, its (4096, b) estimates 512 KiB at b=64.
constexpr int64_t kPrefilterRowsPerBlock = 4096;
// bf16 unit roundoff (8 significant bits, round to nearest).
constexpr double kBf16Roundoff = 1.0 / 256.0;

struct Candidate {
  float score;
  int64_t index;
};

// Ranked-list order: higher score first, ties broken by lower index.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// Fixed-capacity heap whose front is the worst candidate kept.
class CandidatePool {
 public:
  explicit CandidatePool(int64_t capacity) : capacity_(capacity) {
    heap_.reserve(static_cast<size_t>(capacity));
  }

  bool full() const { return static_cast<int64_t>(heap_.size()) >= capacity_; }

  // Cheap rejection used on every scored row before the exclusion test.
  bool would_accept(const Candidate& c) const {
    return !full() || ranks_before(c, heap_.front());
  }

  void insert(const Candidate& c) {
    if (full()) {
      std::pop_heap(heap_.begin(), heap_.end(), ranks_before);
      heap_.back() = c;
    } else {
      heap_.push_back(c);
    }
    std::push_heap(heap_.begin(), heap_.end(), ranks_before);
  }

  // The candidate a new row has to beat (only meaningful when full()).
  const Candidate& worst() const { return heap_.front(); }

  const std::vector<Candidate>& entries() const { return heap_; }

  std::vector<Candidate> sorted() const {
    std::vector<Candidate> ranked = heap_;
    std::sort(ranked.begin(), ranked.end(), ranks_before);
    return ranked;
  }

 private:
  int64_t capacity_;
  std::vector<Candidate> heap_;
};

template <typename scalar_t>
float row_dot(const scalar_t* a, const scalar_t* b, int64_t dim) {
  float acc = 0.f;
  for (int64_t i = 0; i < dim; ++i) {
    acc += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  }
  return acc;
}

// The score of every path: fp32 dot product with 16 independent partial sums,
// so the compiler vectorises it (a single running sum is a serial dependency
// chain it may not reorder). Its order depends on `dim` only: identical rows
// get identical scores. target_clones picks one build per machine at load time,
// so every call of a process computes the same function.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
float score_dot(const float* query, const float* row, int64_t dim) {
  constexpr int kLanes = 16;
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      partial[lane] += query[i + lane] * row[i + lane];
    }
  }
  float acc = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) acc += partial[lane];
  for (; i < dim; ++i) acc += query[i] * row[i];
  return acc;
}

// A memory row as fp32: the row itself for fp32 memory, else converted (exactly) into `buffer`.
template <typename scalar_t>
const float* row_as_fp32(const scalar_t* row, int64_t dim, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t i = 0; i < dim; ++i) buffer[i] = static_cast<float>(row[i]);
    return buffer.data();
  }
}

// Relative error bound of the bf16 estimate against the exact fp32 score:
// |estimate - score| <= relative_bound(dim) * |q| * |m|. Terms: rounding q and
// m to bf16 (2u + u^2), fp32 accumulation of the estimate and of the exact score
// (2 gamma_d, gamma_d = d 2^-24 / (1 - d 2^-24)), rounding the GEMM's output to
// bf16 (u (1 + ...)); the 1.25 factor covers the second-order terms with room.
inline double relative_bound(int64_t dim) {
  const double unit = kBf16Roundoff;
  const double fp32_unit = std::ldexp(1.0, -24);
  const double gamma = dim * fp32_unit / (1.0 - dim * fp32_unit);
  return 1.25 * (3.0 * unit + 4.0 * unit * unit + 3.0 * gamma);
}

bool is_excluded(const int64_t* excluded, int64_t count, int64_t index) {
  for (int64_t e = 0; e < count; ++e) {
    if (excluded[e] == index) return true;
  }
  return false;
}

// Offers one exactly scored row to a query's pool. Returns false for a NaN score.
inline bool offer(CandidatePool& pool, float score, int64_t index, float threshold, const int64_t* excluded,
                  int64_t exclude_width) {
  if (std::isnan(score)) return false;
  if (score > threshold) return true;
  const Candidate candidate{score, index};
  if (!pool.would_accept(candidate)) return true;
  if (exclude_width > 0 && is_excluded(excluded, exclude_width, index)) return true;
  pool.insert(candidate);
  return true;
}

// Greedy walk of one query's ranked pool. Returns how many rows it took.
template <typename scalar_t>
int64_t walk_pool(
    const std::vector<Candidate>& ranked,
    const scalar_t* memory,
    int64_t dim,
    int64_t k,
    float threshold,
    float* scores_out,
    int64_t* indices_out) {
  int64_t taken = 0;
  for (const Candidate& candidate : ranked) {
    const scalar_t* row = memory + candidate.index * dim;
    bool redundant = false;
    for (int64_t t = 0; t < taken && !redundant; ++t) {
      redundant = row_dot(row, memory + indices_out[t] * dim, dim) > threshold;
    }
    if (redundant) continue;
    scores_out[taken] = candidate.score;
    indices_out[taken] = candidate.index;
    if (++taken == k) break;
  }
  return taken;
}

// Runs `scan_range(first, last, pools, nan_seen)` over contiguous row ranges, one
// per thread in a single parallel region (a loaded 2-core machine charges every
// region's barrier), each range with its own copy of the pools, then merges them:
// a pool's content does not depend on the order rows are offered (the ranking is total).
template <typename ScanRange>
void scan_row_ranges(int64_t num_rows, int64_t ranges, std::vector<CandidatePool>& pools,
                     std::vector<char>& nan_seen, const ScanRange& scan_range) {
  const size_t batch = pools.size();
  std::vector<std::vector<CandidatePool>> range_pools(static_cast<size_t>(ranges), pools);
  std::vector<std::vector<char>> range_nan(static_cast<size_t>(ranges), std::vector<char>(batch, 0));
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t range = begin; range < end; ++range) {
      const int64_t first = num_rows * range / ranges;
      const int64_t last = num_rows * (range + 1) / ranges;
      scan_range(first, last, range_pools[range], range_nan[range]);
    }
  });
  pools.swap(range_pools[0]);
  nan_seen.swap(range_nan[0]);
  for (int64_t range = 1; range < ranges; ++range) {
    for (size_t q = 0; q < batch; ++q) {
      nan_seen[q] |= range_nan[range][q];
      for (const Candidate& candidate : range_pools[range][q].entries()) {
        if (pools[q].would_accept(candidate)) pools[q].insert(candidate);
      }
    }
  }
}

// As many ranges as threads, fewer for a small problem: a parallel region costs
// more than scoring kMinScoresPerThread (query, row) pairs.
constexpr int64_t kMinScoresPerThread = int64_t{1} << 14;

int64_t ranges_for(int64_t num_rows, int64_t batch) {
  const int64_t by_work = std::max<int64_t>(1, num_rows * batch / kMinScoresPerThread);
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), by_work, num_rows}));
}

// One pass over memory scoring every (query, row) with score_dot. At b=1 this is
// the read of the memory; the row, once loaded, serves every query from cache.
template <typename scalar_t>
void scan_exact(
    const at::Tensor& batch_queries,
    const at::Tensor& memory,
    float threshold,
    const std::vector<int64_t>& pending,
    const int64_t* exclude_data,
    int64_t exclude_width,
    std::vector<CandidatePool>& pools,
    std::vector<char>& nan_seen) {
  const int64_t batch = batch_queries.size(0);
  const int64_t num_rows = memory.size(0);
  const int64_t dim = memory.size(1);
  const scalar_t* memory_data = memory.data_ptr<scalar_t>();
  const float* query_data = batch_queries.data_ptr<float>();
  scan_row_ranges(num_rows, ranges_for(num_rows, batch), pools, nan_seen,
                  [&](int64_t first, int64_t last, std::vector<CandidatePool>& local,
                      std::vector<char>& local_nan) {
    std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : static_cast<size_t>(dim));
    for (int64_t r = first; r < last; ++r) {
      const float* row = row_as_fp32(memory_data + r * dim, dim, buffer);
      for (int64_t q = 0; q < batch; ++q) {
        const float score = score_dot(query_data + q * dim, row, dim);
        if (!offer(local[q], score, r, threshold, exclude_data + pending[q] * exclude_width, exclude_width)) {
          local_nan[q] = 1;
        }
      }
    }
  });
}

// Rounds one row to bf16 (nearest even) into `bf16_bits` and returns its squared
// L2 norm. 16 partial sums and branch-free integer rounding let the compiler
// vectorise the loop; target_clones adds AVX-512 and AVX2 builds picked at load
// time (the extension is otherwise compiled for baseline x86-64). A NaN/inf
// value makes the result NaN/inf, which disables skipping downstream.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
float round_row_to_bf16(const float* source, int64_t dim, uint16_t* destination) {
  constexpr int kLanes = 16;
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const float value = source[i + lane];
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof(bits));
      destination[i + lane] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
      partial[lane] += value * value;
    }
  }
  float sum_of_squares = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) sum_of_squares += partial[lane];
  for (; i < dim; ++i) {
    const float value = source[i];
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    destination[i] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    sum_of_squares += value * value;
  }
  return sum_of_squares;
}

// A chunk of rows rounded to bf16; returns the largest row L2 norm (NaN if any is NaN).
// at::Tensor::to(kBFloat16) plus a separate norm pass measured slower than the
// fp32 GEMM they were meant to replace at b=64, hence this one-pass loop.
template <typename scalar_t>
float round_rows_to_bf16(const scalar_t* rows_data, int64_t rows, int64_t dim, uint16_t* bf16_bits) {
  std::vector<float> row_norms(static_cast<size_t>(rows));
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : static_cast<size_t>(dim));
    for (int64_t r = begin; r < end; ++r) {
      const float* source = row_as_fp32(rows_data + r * dim, dim, buffer);
      row_norms[static_cast<size_t>(r)] = std::sqrt(round_row_to_bf16(source, dim, bf16_bits + r * dim));
    }
  });
  float largest = 0.f;
  for (const float norm : row_norms) {
    if (!(norm <= largest)) largest = norm;  // NaN propagates
  }
  return largest;
}

// One pass over memory filling each pending query's pool, scoring exactly only
// the rows that a bf16 estimate cannot rule out. A row is skipped when its
// estimate, widened by the error bound, is certainly above the threshold or
// certainly below the pool's worst candidate: the pools end up exactly as if
// every row had been scored with score_dot. Each thread rounds a block of its
// rows to bf16 and multiplies it by the queries itself (a GEMM inside the one
// parallel region runs on its thread): blocks stay in cache between the rounding,
// the GEMM and the selection.
template <typename scalar_t>
void scan_with_bf16_prefilter(
    const at::Tensor& batch_queries,
    const at::Tensor& memory,
    float threshold,
    const std::vector<int64_t>& pending,
    const int64_t* exclude_data,
    int64_t exclude_width,
    std::vector<CandidatePool>& pools,
    std::vector<char>& nan_seen) {
  const int64_t batch = batch_queries.size(0);
  const int64_t num_rows = memory.size(0);
  const int64_t dim = memory.size(1);
  const scalar_t* memory_data = memory.data_ptr<scalar_t>();
  const float* query_data = batch_queries.data_ptr<float>();
  const at::Tensor queries_bf16_t = batch_queries.to(at::kBFloat16).t();  // (d, b)
  const at::Tensor query_norms = batch_queries.norm(2, {1}).contiguous();
  const float* query_norm_data = query_norms.data_ptr<float>();
  const double relative = relative_bound(dim);
  scan_row_ranges(num_rows, ranges_for(num_rows, batch), pools, nan_seen,
                  [&](int64_t first, int64_t last, std::vector<CandidatePool>& local,
                      std::vector<char>& local_nan) {
    std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : static_cast<size_t>(dim));
    std::vector<float> bounds(static_cast<size_t>(batch));
    at::Tensor block_bf16 = at::empty({std::min(kPrefilterRowsPerBlock, last - first), dim},
                                      memory.options().dtype(at::kBFloat16));
    uint16_t* block_bits = reinterpret_cast<uint16_t*>(block_bf16.data_ptr<at::BFloat16>());
    for (int64_t start = first; start < last; start += kPrefilterRowsPerBlock) {
      const int64_t rows = std::min(kPrefilterRowsPerBlock, last - start);
      const float max_row_norm = round_rows_to_bf16(memory_data + start * dim, rows, dim, block_bits);
      const at::Tensor estimates = at::mm(block_bf16.narrow(0, 0, rows), queries_bf16_t);  // (rows, b)
      const at::BFloat16* estimate_data = estimates.data_ptr<at::BFloat16>();
      for (int64_t q = 0; q < batch; ++q) {
        // NaN or inf inputs make the bound NaN/inf: no row is skipped, the exact path decides.
        bounds[q] = static_cast<float>(relative * query_norm_data[q] * max_row_norm);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const at::BFloat16* row_estimates = estimate_data + r * batch;
        const float* row = nullptr;
        for (int64_t q = 0; q < batch; ++q) {
          const float estimate = static_cast<float>(row_estimates[q]);
          CandidatePool& pool = local[q];
          if (estimate - bounds[q] > threshold) continue;
          if (pool.full() && estimate + bounds[q] < pool.worst().score) continue;
          if (row == nullptr) row = row_as_fp32(memory_data + (start + r) * dim, dim, buffer);
          const float score = score_dot(query_data + q * dim, row, dim);
          const int64_t* excluded = exclude_data + pending[q] * exclude_width;
          if (!offer(pool, score, start + r, threshold, excluded, exclude_width)) {
            local_nan[q] = 1;
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void topk_dedup_cpu_impl(
    const at::Tensor& queries_f32,
    const at::Tensor& memory,
    int64_t k,
    float threshold,
    const at::Tensor& exclude,
    at::Tensor& scores,
    at::Tensor& indices) {
  const int64_t num_rows = memory.size(0);
  const int64_t dim = memory.size(1);
  const scalar_t* memory_data = memory.data_ptr<scalar_t>();
  const int64_t exclude_width = exclude.defined() ? exclude.size(1) : 0;
  const int64_t* exclude_data = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;

  std::vector<int64_t> pending(static_cast<size_t>(queries_f32.size(0)));
  for (size_t i = 0; i < pending.size(); ++i) pending[i] = static_cast<int64_t>(i);
  int64_t pool_size = std::min(num_rows, 2 * k + 16);

  while (!pending.empty()) {
    const int64_t batch = static_cast<int64_t>(pending.size());
    at::Tensor batch_queries =
        queries_f32.index_select(0, at::tensor(pending, at::TensorOptions().dtype(at::kLong)));
    std::vector<CandidatePool> pools(static_cast<size_t>(batch), CandidatePool(pool_size));
    std::vector<char> nan_seen(static_cast<size_t>(batch), 0);
    if (batch >= kPrefilterMinBatch) {
      scan_with_bf16_prefilter<scalar_t>(batch_queries, memory, threshold, pending, exclude_data, exclude_width,
                                         pools, nan_seen);
    } else {
      scan_exact<scalar_t>(batch_queries, memory, threshold, pending, exclude_data, exclude_width, pools, nan_seen);
    }
    for (int64_t q = 0; q < batch; ++q) {
      TORCH_CHECK_VALUE(!nan_seen[q], "topk_dedup: a score of query ", pending[q],
                        " is NaN (NaN in queries or memory, or inf times 0): NaN rows cannot be ranked; "
                        "remove or fix them");
    }

    std::vector<int64_t> still_short;
    std::vector<char> short_flags(static_cast<size_t>(batch), 0);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t query = pending[q];
        // A rescan rewrites the query's whole row: clear what the shorter walk wrote.
        std::fill_n(scores.data_ptr<float>() + query * k, k, -std::numeric_limits<float>::infinity());
        std::fill_n(indices.data_ptr<int64_t>() + query * k, k, int64_t{-1});
        const int64_t taken = walk_pool(
            pools[q].sorted(), memory_data, dim, k, threshold,
            scores.data_ptr<float>() + query * k, indices.data_ptr<int64_t>() + query * k);
        // A full pool may have left eligible rows outside it: widen and rescan.
        short_flags[q] = taken < k && pools[q].full() && pool_size < num_rows;
      }
    });
    for (int64_t q = 0; q < batch; ++q) {
      if (short_flags[q]) still_short.push_back(pending[q]);
    }
    pending.swap(still_short);
    pool_size = std::min(num_rows, pool_size * 4);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_dedup_cpu(
    const at::Tensor& queries,
    const at::Tensor& memory,
    int64_t k,
    double threshold,
    const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(queries.dim() == 2 && memory.dim() == 2, "topk_dedup_native: queries and memory must be 2-D");
  TORCH_CHECK(queries.size(1) == memory.size(1), "topk_dedup_native: queries and memory differ in last dim");
  TORCH_CHECK(k > 0, "topk_dedup_native: k must be positive, got ", k);
  const int64_t batch = queries.size(0);
  at::Tensor scores = at::full({batch, k}, -std::numeric_limits<float>::infinity(), queries.options().dtype(at::kFloat));
  at::Tensor indices = at::full({batch, k}, -1, queries.options().dtype(at::kLong));
  if (batch == 0 || memory.size(0) == 0) return {scores, indices};

  at::Tensor exclude_rows;
  if (exclude.has_value() && exclude->numel() > 0) {
    TORCH_CHECK(exclude->dim() == 2 && exclude->size(0) == batch && exclude->scalar_type() == at::kLong,
                "topk_dedup_native: exclude must be (b, E) int64");
    exclude_rows = exclude->contiguous();
  }
  const at::Tensor queries_f32 = queries.to(at::kFloat).contiguous();
  const at::Tensor memory_rows = memory.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory_rows.scalar_type(), "topk_dedup_cpu", [&] {
    topk_dedup_cpu_impl<scalar_t>(queries_f32, memory_rows, k, threshold_as_fp32(threshold),
                                  exclude_rows, scores, indices);
  });
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(mkfast, CPU, m) {
  m.impl("topk_dedup_native", &topk_dedup_cpu);
}

}  // namespace mkfast
