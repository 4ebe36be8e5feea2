// Host build of csrc/cuda/topk_select.cuh, the selection and score-order pieces of the CUDA top-k:
// run by tests/test_topk_dedup.py, so the logic is checked on a machine without a GPU. The
// device-only parts (the block's threads, atomics, shared memory) are replaced by one host
// thread: every function here is the kernel's own, called with thread 0 of 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cuda/topk_select.cuh"

using namespace mkfast::topk;

namespace {

int failures = 0;

void check(bool condition, const char* what, long long detail = 0) {
  if (!condition) {
    ++failures;
    std::printf("FAILED: %s (%lld)\n", what, detail);
  }
}

struct NoSync {
  void operator()() const {}
};

// The ranked-list order the keys must reproduce: score descending, then index ascending.
bool ranks_before(float score_a, int64_t index_a, float score_b, int64_t index_b) {
  return score_a > score_b || (score_a == score_b && index_a < index_b);
}

void test_keys_order_like_the_ranked_list() {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> scores = {-inf, -3.5f, -1e-40f, -0.f, 0.f, 1e-40f, 0.25f, 0.9f, 0.9f, 7.f, inf};
  const std::vector<int64_t> indices = {0, 1, 2, 7, 4294967294LL};
  for (float a : scores) {
    for (int64_t i : indices) {
      const uint64_t key = make_key(a, i);
      check(key != 0, "a real key is never the empty key 0", i);
      check(key_index(key) == i, "key_index inverts make_key", i);
      check(key_score(key) == a, "key_score inverts make_key (-0 reads as +0)", i);
      for (float b : scores) {
        for (int64_t j : indices) {
          if (i == j && a == b) continue;
          check((key > make_key(b, j)) == ranks_before(a, i, b, j), "keys order like the ranked list", i);
        }
      }
    }
  }
  check(make_key(-0.f, 5) == make_key(0.f, 5), "-0 and +0 give one key", 0);
}

void test_regions_sort_descending_independently() {
  std::mt19937_64 random(1);
  for (int length : {2, 8, 64, 512}) {
    const int regions = 3;
    std::vector<uint64_t> keys(regions * length);
    for (auto& key : keys) key = random() % 50;  // many equal keys
    std::vector<uint64_t> expected = keys;
    for (int r = 0; r < regions; ++r) {
      std::sort(expected.begin() + r * length, expected.begin() + (r + 1) * length, std::greater<uint64_t>());
    }
    sort_regions_descending(keys.data(), regions, length, 0, 1, NoSync{});
    check(keys == expected, "each region sorted descending, none mixed with another", length);
  }
}

// One scan block's selection over rows [start, end), as the scan kernels run it, with one
// host thread holding all scores of a step (queries x rows_per_step <= 64 pending bits).
// `room` free slots per region (the kernels use 64): small ones make keys wait for flushes.
std::vector<std::vector<uint64_t>> scan_segment(const std::vector<std::vector<float>>& scores, int64_t start,
                                                int64_t end, int pool, int room, int rows_per_step,
                                                int* waits) {
  const int queries = static_cast<int>(scores.size());
  const int length = sort_length(pool + room);
  std::vector<uint64_t> regions(queries * length);
  std::vector<uint64_t> floors(queries);
  std::vector<int> counts(queries);
  const ScanPools pools{regions.data(), floors.data(), counts.data(), queries, pool, length};
  clear_pools(pools, 0, 1, NoSync{});
  for (int64_t step = start; step < end; step += rows_per_step) {
    const int rows = static_cast<int>(std::min<int64_t>(rows_per_step, end - step));
    uint64_t pending = rows * queries == 64 ? ~uint64_t{0} : (uint64_t{1} << (rows * queries)) - 1;
    int offers = 0;
    const auto offer = [&](uint64_t waiting) {
      ++offers;
      for (int bit = 0; bit < rows * queries; ++bit) {
        const int q = bit % queries;
        const int64_t row = step + bit / queries;
        const uint64_t key = make_key(scores[q][row], row);
        if (((waiting >> bit) & 1) && (key <= floors[q] || try_store(pools, q, key))) {
          waiting &= ~(uint64_t{1} << bit);
        }
      }
      return waiting;
    };
    select_step(pools, pending, offer, 0, 1, NoSync{});
    *waits += offers - 1;
  }
  flush_pools(pools, 0, 1, NoSync{});
  std::vector<std::vector<uint64_t>> best(queries);
  for (int q = 0; q < queries; ++q) {
    best[q].assign(regions.begin() + q * length, regions.begin() + q * length + pool);
  }
  return best;
}

void test_segment_pools_and_their_merge_equal_a_full_sort() {
  std::mt19937 random(2);
  int waits = 0;
  // Scores on a coarse grid: many exact ties, which must come lower index first. Rising
  // scores for query 1 make late rows beat the floor, so pools are flushed mid-segment.
  for (int pool : {1, 7, 32, 256}) {
    for (int room : {2, 9, 64}) {
      for (int64_t num_rows : {5, 700, 4099}) {
        const int queries = 3;
        const int rows_per_step = 21;  // 63 pending bits
        std::vector<std::vector<float>> scores(queries, std::vector<float>(num_rows));
        for (int q = 0; q < queries; ++q) {
          for (int64_t row = 0; row < num_rows; ++row) {
            const float trend = q == 1 ? static_cast<float>(row) / num_rows : 0.f;
            scores[q][row] = static_cast<float>(random() % 16) / 8.f - 1.f + trend;
          }
        }
        // Segments of 5 steps, the last one ragged, then the merge: one sort of all their keys.
        const int64_t segment_rows = 5 * rows_per_step;
        std::vector<std::vector<uint64_t>> merged(queries);
        for (int64_t start = 0; start < num_rows; start += segment_rows) {
          const auto best = scan_segment(scores, start, std::min(start + segment_rows, num_rows), pool, room,
                                         rows_per_step, &waits);
          for (int q = 0; q < queries; ++q) merged[q].insert(merged[q].end(), best[q].begin(), best[q].end());
        }
        for (int q = 0; q < queries; ++q) {
          std::vector<uint64_t> keys = merged[q];
          keys.resize(sort_length(static_cast<int>(keys.size())), 0);
          sort_regions_descending(keys.data(), 1, static_cast<int>(keys.size()), 0, 1, NoSync{});
          std::vector<uint64_t> expected(num_rows);
          for (int64_t row = 0; row < num_rows; ++row) expected[row] = make_key(scores[q][row], row);
          std::sort(expected.begin(), expected.end(), std::greater<uint64_t>());
          expected.resize(pool, 0);  // pools larger than the memory end in empty keys
          keys.resize(pool);
          check(keys == expected, "segment pools merged = the best `pool` of the whole ranked list", pool);
        }
      }
    }
  }
  check(waits > 0, "some keys waited for a flush and were offered again", waits);
}

// The score of the kernel: dims staged `tile_dims` at a time, zero past `dim`, four lanes.
float tiled_score(const std::vector<float>& query, const std::vector<float>& row, int tile_dims) {
  float partial[kScoreLanes] = {};
  const int dim = static_cast<int>(query.size());
  for (int start = 0; start < dim; start += tile_dims) {
    for (int column = 0; column < tile_dims; column += kScoreLanes) {
      float q[kScoreLanes], m[kScoreLanes];
      for (int lane = 0; lane < kScoreLanes; ++lane) {
        const int d = start + column + lane;
        q[lane] = d < dim ? query[d] : 0.f;
        m[lane] = d < dim ? row[d] : 0.f;
      }
      accumulate_dims(partial, q, m);
    }
  }
  return finish_score(partial);
}

void test_score_order_depends_on_dim_alone() {
  std::mt19937 random(3);
  std::normal_distribution<float> normal;
  for (int dim : {1, 3, 4, 13, 37, 768, 770}) {
    std::vector<float> query(dim), row(dim);
    for (int d = 0; d < dim; ++d) {
      query[d] = normal(random);
      row[d] = normal(random);
    }
    // The definition: lane j sums the dims d = j (mod 4) in increasing order.
    float lanes[kScoreLanes] = {};
    for (int d = 0; d < dim; ++d) lanes[d % kScoreLanes] = std::fma(query[d], row[d], lanes[d % kScoreLanes]);
    const float expected = finish_score(lanes);
    // Zero padding past d and the tile width leave every bit unchanged.
    for (int tile_dims : {4, 32, 64}) {
      check(tiled_score(query, row, tile_dims) == expected, "tiled score = the fixed-order definition", dim);
    }
  }
}

// mma.sync m16n8k16 as the PTX manual lays out its fragments (written apart from the
// kernel's helpers): A 16x16 row-major, B 16x8 column-major, bf16 in, exact here in double.
// a[lane][r], r = 0..3: row lane/4 + 8 (r % 2), k = 2 (lane % 4) + 8 (r / 2) + {0, 1};
// b[lane][r], r = 0..1: column lane/4, k = 2 (lane % 4) + 8 r + {0, 1};
// c[lane][r], r = 0..3: row lane/4 + 8 (r / 2), column 2 (lane % 4) + r % 2. Low half first.
float bf16_value(uint32_t bits) { return bits_float(bits << 16); }

void reference_mma(const uint32_t (*a)[4], const uint32_t (*b)[2], float (*c)[4]) {
  double A[16][16] = {}, B[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r) {
      for (int h = 0; h < 2; ++h) {
        const float value = bf16_value((a[lane][r] >> (16 * h)) & 0xFFFFu);
        A[lane / 4 + 8 * (r % 2)][2 * (lane % 4) + 8 * (r / 2) + h] = value;
      }
    }
    for (int r = 0; r < 2; ++r) {
      for (int h = 0; h < 2; ++h) {
        B[2 * (lane % 4) + 8 * r + h][lane / 4] = bf16_value((b[lane][r] >> (16 * h)) & 0xFFFFu);
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r) {
      double sum = c[lane][r];
      for (int k = 0; k < 16; ++k) sum += A[lane / 4 + 8 * (r / 2)][k] * B[k][2 * (lane % 4) + r % 2];
      c[lane][r] = static_cast<float>(sum);
    }
  }
}

void test_tensor_core_fragments_score_every_query_row_pair() {
  // Small integers in bf16: every product and sum is exact, so any misplaced dim shows.
  std::mt19937 random(4);
  for (int dim : {32, 96, 40, 7}) {
    std::vector<uint16_t> queries(16 * dim), rows(8 * dim);
    const auto small_integer = [&]() {
      return static_cast<uint16_t>(float_bits(static_cast<float>(random() % 9) - 4.f) >> 16);
    };
    for (auto& value : queries) value = small_integer();
    for (auto& value : rows) value = small_integer();
    // A lane's 4 words of dims [first, first + 8) of a row, zero past dim (the kernel's loads).
    const auto words_of = [&](const std::vector<uint16_t>& matrix, int row, int first, uint32_t* words) {
      for (int w = 0; w < 4; ++w) {
        const int d = first + 2 * w;
        const uint32_t low = d < dim ? matrix[row * dim + d] : 0;
        const uint32_t high = d + 1 < dim ? matrix[row * dim + d + 1] : 0;
        words[w] = low | (high << 16);
      }
    };
    float c[32][4] = {};
    for (int chunk = 0; chunk < dim; chunk += 32) {
      uint32_t query_words[32][4], query_words_8[32][4], row_words[32][4];
      for (int lane = 0; lane < 32; ++lane) {
        const int first = chunk + lane_first_dim(lane);
        words_of(queries, lane_row(lane), first, query_words[lane]);
        words_of(queries, lane_row(lane) + 8, first, query_words_8[lane]);
        words_of(rows, lane_row(lane), first, row_words[lane]);
      }
      for (int step = 0; step < 2; ++step) {
        uint32_t a[32][4], b[32][2];
        for (int lane = 0; lane < 32; ++lane) {
          step_fragments(step, query_words[lane], query_words_8[lane], row_words[lane], a[lane], b[lane]);
        }
        reference_mma(a, b, c);
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      for (int r = 0; r < 4; ++r) {
        const int query = accumulator_query(lane, r);
        const int row = accumulator_row(lane, r);
        double expected = 0;
        for (int d = 0; d < dim; ++d) {
          const double product = static_cast<double>(bf16_value(queries[query * dim + d])) *
                                 bf16_value(rows[row * dim + d]);
          expected += product;
        }
        check(c[lane][r] == static_cast<float>(expected), "accumulator = the (query, row) dot product", dim);
      }
    }
  }
}

}  // namespace

int main() {
  test_keys_order_like_the_ranked_list();
  test_regions_sort_descending_independently();
  test_segment_pools_and_their_merge_equal_a_full_sort();
  test_score_order_depends_on_dim_alone();
  test_tensor_core_fragments_score_every_query_row_pair();
  if (failures == 0) std::printf("topk_select: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
