// CPU kernel of mkfast::topk_dedup_native: exact greedy top-k with redundancy
// filtering (semantics in mkfast/ops/topk_dedup.py, which also validates inputs).
//
// Plan per call:
//   1. score memory in chunks with one GEMM per chunk (queries x chunk^T, fp32);
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
#include <limits>
#include <vector>

#include "topk_dedup_common.h"

namespace mkfast {
namespace {

// 8192 rows x 768 fp32 = 24 MiB per chunk: large enough that GEMM overhead is
// negligible, small enough that the (b, chunk) score block stays in cache for b<=64.
constexpr int64_t kRowsPerChunk = 8192;

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

    for (int64_t start = 0; start < num_rows; start += kRowsPerChunk) {
      const int64_t rows = std::min(kRowsPerChunk, num_rows - start);
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
