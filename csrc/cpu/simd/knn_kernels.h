// The per-instruction-set pieces of exact kNN search, behind one table of function pointers.
//
// The search driver (cpu/knn.cpp) is written once; it asks knn_kernels(level) for the
// table of the SIMD level in use. Each table lives in its own translation unit
// (knn_scalar.cpp, knn_avx2.cpp, knn_avx512.cpp) compiled with its own flags; the shared
// tile code is knn_tile_impl.h, included by each of them.
//
// Data layout ("panels", as in a GEMM's packed operands):
//   database panel: panel_width vectors stored column-wise, [dim][panel_width], zero padded;
//   query panel:    rows (<= max_panel_rows) queries stored column-wise, [dim][rows].
// For one to a few queries, packing costs more than it saves: scan_rows reads the database
// rows in place instead, kLanes rows at a time, and reduces each row's vector of partial
// sums horizontally (a transposing add tree). Both paths sum in float32; their rounding
// differs in the last bits, so a query's distances may differ by an ulp between a batch
// of 1 and a batch of 100 (as in faiss). Duplicate vectors still tie exactly.
//
// The kernel computes all panel_width x rows inner products of a query panel and a
// database panel in registers, turns them into keys (smaller is better) and offers only
// the keys that beat each query's current k-th best to the heaps.
#pragma once

#include <cstdint>

#include "core/cpu_features.h"
#include "core/topk.h"
#include "ops/knn.h"

namespace latentspace::cpu {

// Query panels of one block, packed one after another (see pack_query_block()).
struct QueryPanels {
  const float* packed = nullptr;
  int64_t num_rows = 0;    // queries in the block
  int64_t num_panels = 0;  // ceil(num_rows / max_panel_rows), rows balanced between panels
  int64_t dim = 0;
};

// Rows of panel p and the first query row it holds, when num_rows queries are split as
// evenly as possible into num_panels panels. Static (internal linkage): each translation
// unit, whatever its ISA flags, keeps its own copy.
static inline int64_t panel_rows(const QueryPanels& q, int64_t p) {
  return q.num_rows / q.num_panels + (p < q.num_rows % q.num_panels ? 1 : 0);
}
static inline int64_t panel_first_row(const QueryPanels& q, int64_t p) {
  const int64_t extra = q.num_rows % q.num_panels;
  return p * (q.num_rows / q.num_panels) + (p < extra ? p : extra);
}

// pack_rows reads a panel's rows column block by column block, an order the hardware
// prefetchers follow poorly; it prefetches the rows this many bytes ahead, in address
// order: at least two panels, and at least kPrefetchMinBytes so that small dimensions hide
// the memory latency too (measured: one panel ahead left pack_rows waiting on memory).
constexpr int64_t kPrefetchMinBytes = 16384;
static inline uintptr_t prefetch_distance_bytes(int64_t dim, int64_t panel_width) {
  const int64_t panel_bytes = panel_width * dim * 4;
  const int64_t needed = (kPrefetchMinBytes + panel_bytes - 1) / panel_bytes;
  const int64_t panels = needed > 2 ? needed : 2;  // no std::max here: see knn_tile_impl.h
  return static_cast<uintptr_t>(panels * panel_bytes);
}

// One packed database panel and how its inner products become keys:
// key[j] = inner_product[j] * key_scale[j] + key_offset[j].
struct DatabasePanel {
  const float* packed = nullptr;      // [dim][panel_width]
  const float* key_scale = nullptr;   // [panel_width]
  const float* key_offset = nullptr;  // [panel_width]
  int64_t valid = 0;                  // leading columns that hold real vectors
  int64_t first_id = 0;               // database index of column 0
};

struct KnnKernels {
  SimdLevel level;
  int panel_width;     // database vectors per panel
  int max_panel_rows;  // queries per query panel
  // Packs rows (<= panel_width) row-major vectors x[rows][dim] into panel [dim][panel_width],
  // zero padded, and writes their squared L2 norms (float32, summed over d in order) to
  // sq_norms[0..rows).
  void (*pack_rows)(const float* x, int64_t rows, int64_t dim, float* panel, float* sq_norms);
  // Packs rows (<= max_panel_rows) queries q[rows][dim] into [dim][rows].
  void (*pack_query_panel)(const float* q, int64_t rows, int64_t dim, float* panel);
  // Scores every query panel against one database panel; heap row i is query row i.
  void (*scan)(const QueryPanels& queries, const DatabasePanel& database, const TopKHeaps& heaps);
  // Batches of at most this many queries use scan_rows instead of packing (the measured
  // default; knn_cpu_set_row_query_limit overrides it for experiments).
  int max_row_queries;
  // The most queries scan_rows takes in one pass (compiled in; >= max_row_queries).
  int row_path_capacity;
  // Scores queries[num_queries][dim] (row-major) against database rows [begin, end), with
  // heap row i for query i. Returns the first database row whose squared norm is not usable
  // (see ops/norms.h), without scanning past it, or -1. weights (nullable, metric kL2): the
  // weighted norms sum_d w_d x_d^2 key the rows (the queries come already scaled by w).
  int64_t (*scan_rows)(const float* queries, int64_t num_queries, const float* database,
                       int64_t begin, int64_t end, int64_t dim, Metric metric, const float* weights,
                       const TopKHeaps& heaps);
};

const KnnKernels& knn_kernels_scalar();
const KnnKernels& knn_kernels_avx2();
const KnnKernels& knn_kernels_avx512();

// The table for `level` (which must be <= the hardware level).
const KnnKernels& knn_kernels(SimdLevel level);

}  // namespace latentspace::cpu
