// CPU kernel of mkfast::topk_dedup_native: exact greedy top-k with redundancy
// filtering (semantics in mkfast/ops/topk_dedup.py, which also validates inputs).
//
// Plan per call:
//   1. score memory in chunks with one GEMM per chunk (queries x chunk^T, fp32);
//      from kPrefilterMinBatch queries on, a bf16 GEMM estimates the scores and
//      only rows its error bound cannot rule out are scored in fp32;
//   2. per query (threads over queries), keep a bounded heap of the best
//      `pool_size` rows that can ever be taken (score <= threshold, not excluded):
//      rows above the threshold are always skipped, so they never enter the pool;
//   3. walk the sorted pool, testing each candidate against the rows already taken;
//   4. a query whose walk ran out of pool with fewer than k taken, while rows were
//      left outside the pool, is rescanned with a 4x wider pool. The answer is
//      therefore always the greedy walk over the whole ranked list.
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

// Rows per chunk on the fp32-GEMM path: as many as keep the (b, rows) fp32 score
// block within kScoreBlockBytes (it is re-read at once by the selection, from
// cache), and a fp16/bf16 memory's fp32 copy of the chunk within
// kConvertedChunkBytes. Few, large GEMMs matter at small b: every GEMM is a
// parallel region, and on a loaded 2-core machine each region's barrier cost
// more than the b=1 GEMV itself (fixed 8192-row chunks measured 4x the
// read-once floor at N=1e6, b=1, while one torch GEMV measured 1.1x).
constexpr int64_t kScoreBlockBytes = int64_t{4} << 20;
constexpr int64_t kConvertedChunkBytes = int64_t{32} << 20;
constexpr int64_t kMinRowsPerChunk = 1024;

int64_t rows_per_chunk(int64_t batch, int64_t dim, bool memory_is_fp32) {
  int64_t rows = kScoreBlockBytes / (4 * std::max<int64_t>(batch, 1));
  if (!memory_is_fp32) rows = std::min(rows, kConvertedChunkBytes / (4 * std::max<int64_t>(dim, 1)));
  return std::max(rows, kMinRowsPerChunk);
}
// From this many queries on, scores are first estimated with a bf16 GEMM (AMX /
// AVX512-BF16 where the CPU has them) and only rows the estimate cannot rule out
// are scored exactly in fp32. Measured on 2 busy cores, N=2e5, d=768, min of 6
// interleaved runs: 2.1x faster than the fp32 GEMM path at b=256, equal at b=64;
// at N=1e6, b=64 the benchmark measured it 1.5x slower than torch, so it starts
// at b=128. Rounding a chunk to bf16 costs as much as an fp32 GEMM with few queries.
constexpr int64_t kPrefilterMinBatch = 128;
// Rows per chunk on the prefilter path: 16384 x 768 fp32 = 48 MiB. Fewer chunks
// mean fewer parallel regions (three per chunk), which a loaded machine punishes.
constexpr int64_t kPrefilterRowsPerChunk = 16384;
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

// fp32 dot product with 16 independent partial sums, so the compiler vectorises
// it (a single running sum is a serial dependency chain it may not reorder).
template <typename scalar_t>
float exact_dot(const float* query, const scalar_t* row, int64_t dim) {
  constexpr int kLanes = 16;
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      partial[lane] += query[i + lane] * static_cast<float>(row[i + lane]);
    }
  }
  float acc = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) acc += partial[lane];
  for (; i < dim; ++i) acc += query[i] * static_cast<float>(row[i]);
  return acc;
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
    std::vector<float> row_f32(std::is_same_v<scalar_t, float> ? 0 : static_cast<size_t>(dim));
    for (int64_t r = begin; r < end; ++r) {
      const float* source;
      if constexpr (std::is_same_v<scalar_t, float>) {
        source = rows_data + r * dim;
      } else {
        for (int64_t i = 0; i < dim; ++i) row_f32[i] = static_cast<float>(rows_data[r * dim + i]);
        source = row_f32.data();
      }
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
// every row had been scored in fp32.
template <typename scalar_t>
void scan_with_bf16_prefilter(
    const at::Tensor& batch_queries,
    const at::Tensor& memory,
    float threshold,
    const std::vector<int64_t>& pending,
    const int64_t* exclude_data,
    int64_t exclude_width,
    std::vector<CandidatePool>& pools) {
  const int64_t batch = batch_queries.size(0);
  const int64_t num_rows = memory.size(0);
  const int64_t dim = memory.size(1);
  const scalar_t* memory_data = memory.data_ptr<scalar_t>();
  const float* query_data = batch_queries.data_ptr<float>();
  const at::Tensor queries_bf16 = batch_queries.to(at::kBFloat16);
  const at::Tensor query_norms = batch_queries.norm(2, {1}).contiguous();
  const float* query_norm_data = query_norms.data_ptr<float>();
  const double relative = relative_bound(dim);

  at::Tensor chunk_bf16 = at::empty({std::min(kPrefilterRowsPerChunk, num_rows), dim}, memory.options().dtype(at::kBFloat16));
  uint16_t* chunk_bits = reinterpret_cast<uint16_t*>(chunk_bf16.data_ptr<at::BFloat16>());

  for (int64_t start = 0; start < num_rows; start += kPrefilterRowsPerChunk) {
    const int64_t rows = std::min(kPrefilterRowsPerChunk, num_rows - start);
    const float max_row_norm = round_rows_to_bf16(memory_data + start * dim, rows, dim, chunk_bits);
    const at::Tensor estimates = at::mm(queries_bf16, chunk_bf16.narrow(0, 0, rows).t()).contiguous();
    const at::BFloat16* estimate_data = estimates.data_ptr<at::BFloat16>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t query = pending[q];
        const int64_t* excluded = exclude_data + query * exclude_width;
        const float* query_row = query_data + q * dim;
        // NaN or inf inputs make the bound NaN/inf: no row is skipped, the exact path decides.
        const float bound = static_cast<float>(relative * query_norm_data[q] * max_row_norm);
        CandidatePool& pool = pools[q];
        const at::BFloat16* row_estimates = estimate_data + q * rows;
        for (int64_t r = 0; r < rows; ++r) {
          const float estimate = static_cast<float>(row_estimates[r]);
          if (estimate - bound > threshold) continue;
          if (pool.full() && estimate + bound < pool.worst().score) continue;
          const float score = exact_dot(query_row, memory_data + (start + r) * dim, dim);
          if (!(score <= threshold)) continue;
          const Candidate candidate{score, start + r};
          if (!pool.would_accept(candidate)) continue;
          if (exclude_width > 0 && is_excluded(excluded, exclude_width, candidate.index)) continue;
          pool.insert(candidate);
        }
      }
    });
  }
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

    if (batch >= kPrefilterMinBatch) {
      scan_with_bf16_prefilter<scalar_t>(batch_queries, memory, threshold, pending, exclude_data, exclude_width, pools);
    } else for (int64_t start = 0, chunk_rows = rows_per_chunk(batch, dim, std::is_same_v<scalar_t, float>);
                start < num_rows; start += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, num_rows - start);
      at::Tensor chunk = memory.narrow(0, start, rows).to(at::kFloat);
      at::Tensor chunk_scores = at::mm(batch_queries, chunk.t()).contiguous();
      const float* score_data = chunk_scores.data_ptr<float>();
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t query = pending[q];
          const int64_t* excluded = exclude_data + query * exclude_width;
          CandidatePool& pool = pools[q];
          const float* row_scores = score_data + q * rows;
          for (int64_t r = 0; r < rows; ++r) {
            const float score = row_scores[r];
            // `!(score <= threshold)` also drops NaN scores.
            if (!(score <= threshold)) continue;
            const Candidate candidate{score, start + r};
            if (!pool.would_accept(candidate)) continue;
            if (exclude_width > 0 && is_excluded(excluded, exclude_width, candidate.index)) continue;
            pool.insert(candidate);
          }
        }
      });
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
