// Exact kNN on the CPU: fused distance + top-k over cache-sized tiles.
//
// Shape of the computation (the Q x N distance matrix never exists):
//   for each block of queries (packed once, sized to stay in L2):
//     for each database panel (panel_width vectors, packed into L1 on the fly):
//       for each query panel: register-blocked inner products over the whole dimension,
//       turned into keys, and only keys that beat the query's current k-th best are
//       offered to its heap (simd/knn_tile_impl.h).
// Threads split the queries when there are many (no merge needed), otherwise the database
// (each thread keeps its own heaps for the block, merged afterwards).
#include "ops/knn.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/interrupt.h"
#include "core/threads.h"
#include "core/topk.h"
#include "cpu/simd/knn_kernels.h"
#include "ops/norms.h"

namespace latentspace {
namespace {

using cpu::DatabasePanel;
using cpu::KnnKernels;
using cpu::QueryPanels;

// Packed queries of one block stay in L2 while the database streams past them.
constexpr int64_t kQueryBlockBytes = 512 * 1024;
// Upper bound on one thread's heaps for one block (query rows x k x 12 bytes).
constexpr int64_t kHeapBytesPerThread = int64_t{64} << 20;
// With at least this many queries per thread, threads split the queries: each reads the
// whole database, and no merge is needed. Fewer queries: threads split the database.
constexpr int64_t kQueriesPerThreadToSplitQueries = 64;
// Splitting the database needs enough panels for every thread.
constexpr int64_t kMinPanelsPerThread = 4;
// Multiply-adds below which a second thread does not pay for itself.
constexpr double kMinWorkPerThread = 1 << 18;
// The row path scans this many database rows between checks for Ctrl-C (32 MiB at D = 128:
// a few milliseconds), so a few queries over a database of many GB stay interruptible.
constexpr int64_t kRowPathRowsPerCheck = int64_t{1} << 16;
// The packed path checks every this many panels: a panel of a few queries at a small
// dimension is tens of nanoseconds of work, and checking each one slowed 16 queries at D = 8
// by 7% (the check reads a clock); 16 panels at D = 2048 and 512 queries are a few ms.
constexpr int64_t kPanelsPerCheck = 16;

// knn_cpu_set_row_query_limit's override; -1: the kernel table's measured max_row_queries.
std::atomic<int> g_row_query_limit{-1};

int row_query_limit(const cpu::KnnKernels& kernels) {
  const int limit = g_row_query_limit.load(std::memory_order_relaxed);
  return limit < 0 ? kernels.max_row_queries : std::min(limit, kernels.row_path_capacity);
}

const char* const kBadRowMessage =
    " contains NaN or Inf, or values so large that squared distances overflow float32 "
    "(squared norm above 4.2e37); clean or rescale the data";
// weighted_l2: the weighted squared norm sum_d w_d x_d^2 must be usable too.
const char* const kBadWeightedRowMessage =
    " contains NaN or Inf, or values so large that squared distances overflow float32 "
    "(squared norm, plain or scaled by the weights, above 4.2e37); clean or rescale the data, "
    "or lower the weights";

// Everything one thread needs, allocated before any parallel region (nothing inside a
// region may allocate or throw).
struct ThreadScratch {
  std::vector<float> packed_queries;  // [block rows * dim], query-split plan only
  std::vector<float> panel;           // [dim][panel_width]
  std::vector<float> sq_norms, key_scale, key_offset;  // [panel_width]
  TopKStorage heaps;
  std::vector<KeyId> merge;  // [parts * k]

  ThreadScratch(const KnnKernels& kernels, int64_t dim, int64_t block_rows, int64_t k,
                int64_t merge_parts, bool packs_queries)
      : packed_queries(packs_queries ? static_cast<size_t>(block_rows * dim) : 0),
        panel(static_cast<size_t>(kernels.panel_width * dim)),
        sq_norms(kernels.panel_width),
        key_scale(kernels.panel_width),
        key_offset(kernels.panel_width),
        merge(static_cast<size_t>(merge_parts * k)) {
    heaps.reset(block_rows, k);
  }
};

// Per-column transform of inner products into keys (smaller is better):
//   l2: |x|^2 - 2<q,x>   (|q|^2 is added when results are written)
//   ip: -<q,x>
//   cosine: -<q,x> / |x|  (zero vectors: 0, i.e. similarity 0 with everything)
void set_key_transform(Metric metric, const float* sq_norms, int64_t valid, int64_t width,
                       float* scale, float* offset) {
  for (int64_t j = 0; j < width; ++j) {
    scale[j] = 0.0f;
    offset[j] = 0.0f;
    if (j >= valid) continue;  // padding columns are masked out by the kernel
    switch (metric) {
      case Metric::kL2:
        scale[j] = -2.0f;
        offset[j] = sq_norms[j];
        break;
      case Metric::kInnerProduct:
        scale[j] = -1.0f;
        break;
      case Metric::kCosine:
        scale[j] = sq_norms[j] > 0.0f ? -1.0f / std::sqrt(sq_norms[j]) : 0.0f;
        break;
    }
  }
}

QueryPanels pack_query_block(const KnnKernels& kernels, const float* queries, int64_t rows,
                             int64_t dim, float* packed) {
  QueryPanels panels;
  panels.packed = packed;
  panels.num_rows = rows;
  panels.num_panels = (rows + kernels.max_panel_rows - 1) / kernels.max_panel_rows;
  panels.dim = dim;
  for (int64_t p = 0; p < panels.num_panels; ++p) {
    const int64_t first = cpu::panel_first_row(panels, p);
    kernels.pack_query_panel(queries + first * dim, cpu::panel_rows(panels, p), dim,
                             packed + first * dim);
  }
  return panels;
}

// sum_d w_d x_d^2 of a packed panel's vectors ([dim][width], in L1 right after packing): the
// weighted metric's |x|_w^2, in place of pack_rows' plain norms. All `width` columns (padding
// is zero): a fixed trip count, and __restrict, let the compiler vectorise the inner loop
// (without them it ran scalar and slowed a 256-query search 1.8x).
void weighted_panel_norms(const float* __restrict panel, int64_t width, int64_t dim,
                          const float* __restrict weights, float* __restrict norms) {
  for (int64_t j = 0; j < width; ++j) norms[j] = 0.0f;
  for (int64_t d = 0; d < dim; ++d) {
    const float w = weights[d];
    const float* __restrict column = panel + d * width;
    for (int64_t j = 0; j < width; ++j) norms[j] += w * column[j] * column[j];
  }
}

// Lowers `first_bad` to `row` if it is smaller (first_bad starts at the database size).
void record_bad_row(std::atomic<int64_t>& first_bad, int64_t row) {
  int64_t seen = first_bad.load();
  while (row < seen && !first_bad.compare_exchange_weak(seen, row)) {
  }
}

// Offers database panels [panel_begin, panel_end) to the heaps of one query block: through
// the row path for one to a few queries, else through packed panels. Stops early once any
// thread has found an unusable database row, or a stop was requested (Ctrl-C).
void scan_database(const KnnKernels& kernels, const float* queries, int64_t num_rows,
                   const QueryPanels* packed_queries, const float* database, int64_t num_database,
                   int64_t dim, int64_t panel_begin, int64_t panel_end, Metric metric,
                   const float* weights, ThreadScratch& scratch, const TopKHeaps& heaps,
                   std::atomic<int64_t>& first_bad_row, Interruption& interruption) {
  const int64_t width = kernels.panel_width;
  if (packed_queries == nullptr) {
    const int64_t end = std::min(panel_end * width, num_database);
    for (int64_t first = panel_begin * width; first < end; first += kRowPathRowsPerCheck) {
      if (interruption.requested()) return;
      const int64_t bad = kernels.scan_rows(queries, num_rows, database, first,
                                            std::min(first + kRowPathRowsPerCheck, end), dim, metric,
                                            weights, heaps);
      if (bad >= 0) {
        record_bad_row(first_bad_row, bad);
        return;
      }
    }
    return;
  }
  DatabasePanel panel;
  panel.packed = scratch.panel.data();
  panel.key_scale = scratch.key_scale.data();
  panel.key_offset = scratch.key_offset.data();
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    // Stop only once a bad row before this panel is known: a thread scanning a later slice
    // may have found one first, and the message must name the first bad row.
    if (first_bad_row.load(std::memory_order_relaxed) < p * width) return;
    if ((p - panel_begin) % kPanelsPerCheck == 0 && interruption.requested()) return;
    panel.first_id = p * width;
    panel.valid = std::min(width, num_database - panel.first_id);
    kernels.pack_rows(database + panel.first_id * dim, panel.valid, dim, scratch.panel.data(),
                      scratch.sq_norms.data());
    int64_t bad = first_unusable_norm(scratch.sq_norms.data(), panel.valid);
    if (bad < 0 && weights) {  // weighted_l2: its norms |x|_w^2 must be usable too
      weighted_panel_norms(scratch.panel.data(), width, dim, weights, scratch.sq_norms.data());
      bad = first_unusable_norm(scratch.sq_norms.data(), panel.valid);
    }
    if (bad >= 0) {
      record_bad_row(first_bad_row, panel.first_id + bad);
      return;
    }
    set_key_transform(metric, scratch.sq_norms.data(), panel.valid, width,
                      scratch.key_scale.data(), scratch.key_offset.data());
    kernels.scan(*packed_queries, panel, heaps);
  }
}

// Is result a (distance, id) better than b in the metric's output order?
inline bool ranks_before(Metric metric, float a_dist, int64_t a_id, float b_dist, int64_t b_id) {
  if (a_dist != b_dist) return metric == Metric::kL2 ? a_dist < b_dist : a_dist > b_dist;
  return a_id < b_id;
}

// Merges heap row `heap_row` of `parts` and writes one query's k results, converting keys
// to the metric's distances and -1 / +-inf padding.
void write_results(Metric metric, const TopKHeaps* parts, int num_parts, int64_t heap_row,
                   int64_t k, float query_sq_norm, KeyId* scratch, float* distances,
                   int64_t* indices) {
  topk_merge_row(parts, num_parts, heap_row, k, scratch, distances, indices);
  const float inverse_query_norm = query_sq_norm > 0.0f ? 1.0f / std::sqrt(query_sq_norm) : 0.0f;
  const float padding = metric == Metric::kL2 ? std::numeric_limits<float>::infinity()
                                              : -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    if (indices[j] == kEmptySlotId) {
      indices[j] = -1;
      distances[j] = padding;
      continue;
    }
    const float key = distances[j];
    switch (metric) {
      case Metric::kL2: distances[j] = std::max(key + query_sq_norm, 0.0f); break;
      case Metric::kInnerProduct: distances[j] = -key; break;
      case Metric::kCosine:
        // + 0.0f turns -0 into +0 (a zero query has similarity 0 with everything).
        distances[j] = std::min(std::max(-key * inverse_query_norm, -1.0f), 1.0f) + 0.0f;
        break;
    }
  }
  // Rounding in the conversion can make two different keys equal distances; restore the
  // documented order (equal distances: lower index first). Nearly sorted: insertion sort.
  for (int64_t j = 1; j < k; ++j) {
    const float d = distances[j];
    const int64_t id = indices[j];
    if (id < 0) break;
    int64_t i = j;
    while (i > 0 && ranks_before(metric, d, id, distances[i - 1], indices[i - 1])) {
      distances[i] = distances[i - 1];
      indices[i] = indices[i - 1];
      --i;
    }
    distances[i] = d;
    indices[i] = id;
  }
}

}  // namespace

void knn_cpu(const float* queries, int64_t num_queries, const float* database,
             int64_t num_database, int64_t dim, int64_t k, Metric metric,
             float* out_distances, int64_t* out_indices, const float* weights) {
  LS_CHECK_VALUE(k >= 1, "k: expected an integer >= 1, got ", k);
  LS_CHECK_VALUE(dim >= 1, "dim: expected >= 1, got ", dim);
  LS_CHECK_VALUE(weights == nullptr || metric == Metric::kL2, "weights: only the weighted squared L2 metric takes weights");
  if (weights) {
    for (int64_t d = 0; d < dim; ++d) {
      LS_CHECK_VALUE(std::isfinite(weights[d]) && weights[d] >= 0.0f, "weights: expected finite values >= 0, got ",
                     weights[d], " at index ", d);
    }
  }
  if (num_queries == 0) return;

  const KnnKernels& kernels = cpu::knn_kernels(active_simd_level());
  std::vector<float> query_sq_norms(static_cast<size_t>(num_queries));
  const int64_t bad_query = sq_norms_cpu(kernels, queries, num_queries, dim, query_sq_norms.data());
  LS_CHECK_VALUE(bad_query < 0, "queries: row ", bad_query, kBadRowMessage);
  // Weighted: sum w (q - x)^2 = |q|_w^2 - 2 <w q, x> + |x|_w^2. The kernels see the queries
  // scaled by w (a copy of the queries only) and, per packed panel, the weighted norms.
  std::vector<float> scaled_queries;
  if (weights) {
    scaled_queries.resize(static_cast<size_t>(num_queries * dim));
    for (int64_t i = 0; i < num_queries; ++i) {
      float norm = 0.0f;
      for (int64_t d = 0; d < dim; ++d) {
        const float q = queries[i * dim + d];
        scaled_queries[i * dim + d] = weights[d] * q;
        norm += weights[d] * q * q;
      }
      LS_CHECK_VALUE(usable_squared_norm(norm), "queries: row ", i, kBadWeightedRowMessage);
      query_sq_norms[i] = norm;
    }
    queries = scaled_queries.data();
  }

  const int64_t kept = std::min(k, num_database);  // heap capacity; the rest is padding
  if (kept == 0) {
    for (int64_t i = 0; i < num_queries * k; ++i) {
      out_indices[i] = -1;
      out_distances[i] = metric == Metric::kL2 ? std::numeric_limits<float>::infinity()
                                               : -std::numeric_limits<float>::infinity();
    }
    return;
  }

  const int64_t width = kernels.panel_width;
  const int64_t num_panels = (num_database + width - 1) / width;
  const int64_t block_rows = std::max<int64_t>(
      1, std::min({num_queries, std::max<int64_t>(kernels.max_panel_rows, kQueryBlockBytes / (dim * 4)),
                   kHeapBytesPerThread / (kept * 12)}));
  // Tiny searches (a few thousand multiply-adds per thread) run on one thread: waking a
  // second costs more than it saves, and far more on a busy machine.
  const double work = static_cast<double>(num_queries) * static_cast<double>(num_database) * dim;
  const int threads = work < kMinWorkPerThread * 2 ? 1 : num_threads();
  const bool split_database = threads > 1 &&
                              num_queries < kQueriesPerThreadToSplitQueries * threads &&
                              num_panels >= kMinPanelsPerThread * threads;
  std::atomic<int64_t> first_bad_row{num_database};
  Interruption interruption;  // Ctrl-C: every thread stops at its next panel
  // Blocks never mix paths: a batch this small is one block.
  const bool use_rows = num_queries <= row_query_limit(kernels);

  if (!split_database) {
    // Each thread owns a contiguous range of queries and scans the whole database.
    const int team = static_cast<int>(std::min<int64_t>(threads, num_queries));
    // A thread's blocks never exceed its share of the queries: scratch sized for the whole
    // batch took threads x 64 MiB of heaps (e.g. 7.8 GB at 256 threads, 2,560 queries, k = 1000).
    const int64_t share_rows = std::min(block_rows, (num_queries + team - 1) / team);
    std::vector<ThreadScratch> scratch;
    scratch.reserve(team);
    for (int t = 0; t < team; ++t) scratch.emplace_back(kernels, dim, share_rows, kept, 1, true);

#pragma omp parallel num_threads(team)
    {
      // OpenMP may start fewer threads than asked (OMP_THREAD_LIMIT, OMP_DYNAMIC, or a search
      // nested in another parallel region: one a signal handler makes while the Ctrl-C poll
      // runs it on thread 0): the work is shared among the threads started, and a thread's
      // larger share goes in blocks of share_rows, the rows its scratch holds.
      const int started = omp_get_num_threads();
      const int t = omp_get_thread_num();
      ThreadScratch& mine = scratch[t];
      const int64_t begin = num_queries * t / started;
      const int64_t end = num_queries * (t + 1) / started;
      for (int64_t first = begin; first < end; first += share_rows) {
        const int64_t rows = std::min(share_rows, end - first);
        const float* block = queries + first * dim;
        QueryPanels panels;
        if (!use_rows) panels = pack_query_block(kernels, block, rows, dim, mine.packed_queries.data());
        mine.heaps.reset(rows, kept);
        const TopKHeaps heaps = mine.heaps.view();
        scan_database(kernels, block, rows, use_rows ? nullptr : &panels, database, num_database,
                      dim, 0, num_panels, metric, weights, mine, heaps, first_bad_row, interruption);
        if (first_bad_row.load() < num_database || interruption.requested()) break;
        for (int64_t i = 0; i < rows; ++i) {
          write_results(metric, &heaps, 1, i, k, query_sq_norms[first + i], mine.merge.data(),
                        out_distances + (first + i) * k, out_indices + (first + i) * k);
        }
      }
    }
  } else {
    // All threads share each query block; thread t scans its slice of the database panels
    // into its own heaps, which are merged per query afterwards.
    std::vector<ThreadScratch> scratch;
    scratch.reserve(threads);
    for (int t = 0; t < threads; ++t) scratch.emplace_back(kernels, dim, block_rows, kept, threads, false);
    std::vector<float> packed_queries(static_cast<size_t>(block_rows * dim));
    std::vector<TopKHeaps> parts(threads);

    for (int64_t first = 0; first < num_queries; first += block_rows) {
      const int64_t rows = std::min(block_rows, num_queries - first);
      const float* block = queries + first * dim;
      QueryPanels panels;
      if (!use_rows) panels = pack_query_block(kernels, block, rows, dim, packed_queries.data());
#pragma omp parallel num_threads(threads)
      {
        const int started = omp_get_num_threads();  // may be fewer than asked, as above
        const int t = omp_get_thread_num();
        scratch[t].heaps.reset(rows, kept);
        parts[t] = scratch[t].heaps.view();
        scan_database(kernels, block, rows, use_rows ? nullptr : &panels, database, num_database,
                      dim, num_panels * t / started, num_panels * (t + 1) / started, metric, weights,
                      scratch[t], parts[t], first_bad_row, interruption);
#pragma omp barrier
        if (first_bad_row.load() == num_database && !interruption.stopped()) {
#pragma omp for schedule(static)
          for (int64_t i = 0; i < rows; ++i) {
            write_results(metric, parts.data(), started, i, k, query_sq_norms[first + i],
                          scratch[t].merge.data(), out_distances + (first + i) * k,
                          out_indices + (first + i) * k);
          }
        }
      }
      if (first_bad_row.load() < num_database || interruption.requested()) break;
    }
  }

  interruption.throw_if_requested();  // the results are incomplete
  const int64_t bad_row = first_bad_row.load();
  LS_CHECK_VALUE(bad_row >= num_database, "database: row ", bad_row,
                 weights ? kBadWeightedRowMessage : kBadRowMessage);
}

void knn_cpu_set_row_query_limit(int limit) {
  const int capacity = cpu::knn_kernels(SimdLevel::kScalar).row_path_capacity;  // the same at every level
  LS_CHECK_VALUE(limit >= -1 && limit <= capacity, "limit: expected -1 (the measured default) or 0 to ", capacity,
                 " queries, got ", limit);
  g_row_query_limit.store(limit, std::memory_order_relaxed);
}

int knn_cpu_row_query_limit() { return row_query_limit(cpu::knn_kernels(active_simd_level())); }

}  // namespace latentspace
