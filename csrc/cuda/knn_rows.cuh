// The row scan of the CUDA kNN, for a handful of queries (at most kRowQueries): a 64 x 64 tile
// would compute mostly padding, so instead each warp reads whole database rows, front to back
// and coalesced, and every lane multiplies its slice of the row with all the queries (held in
// shared memory); a butterfly of shuffles sums each query's dot product. Memory-bound like the
// search itself: the database is read once. Same lists, keys and results as the tile scan
// (knn_scan.cuh); always exact float32 products (a reduced precision buys nothing here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/knn_scan.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

constexpr int kRowQueries = 8;           // queries per row scan
constexpr int kRowWarps = kScanThreads / 32;
// The queries in dynamic shared memory: with RowShared (static, about 1.2 KiB) this stays under
// the 48 KiB a block may use without opting in (cudaFuncSetAttribute).
constexpr int kRowQueryBytes = 44 * 1024;

// Whether the row scan takes a search: few queries, small enough to sit in shared memory.
inline bool use_row_scan(int64_t num_queries, int64_t dim) {
  return num_queries <= kRowQueries && num_queries * dim * int64_t{sizeof(float)} <= kRowQueryBytes;
}

struct RowShared {
  uint64_t threshold[kRowQueries];
  int count[kRowQueries];
  SelectShared select;
};
static_assert(kRowQueryBytes + sizeof(RowShared) <= 48 * 1024, "the row scan's shared memory must fit the default");

// grid (1, splits); dynamic shared memory: num_queries * dim floats (the queries, scaled by
// the weights for weighted l2).
template <Metric kMetric, KnnStorage kStorage>
__global__ void __launch_bounds__(kScanThreads) row_scan_kernel(ScanArgs a) {
  extern __shared__ float queries[];  // [num_queries][dim]
  __shared__ RowShared s;
  const int split = blockIdx.y;
  const int64_t n_begin = split * a.split_length;
  const int64_t n_end = min(a.num_database, n_begin + a.split_length);
  const int nq = static_cast<int>(a.num_queries);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto list_of = [&](int qi) { return a.candidates + (int64_t{qi} * a.splits + split) * int64_t{a.capacity}; };
  for (int64_t i = threadIdx.x; i < a.num_queries * a.dim; i += blockDim.x) {
    const float value = a.queries[i];
    queries[i] = a.weights ? value * a.weights[i % a.dim] : value;
  }
  start_lists(s, kRowQueries);  // (its barrier also publishes the queries)

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kDatabaseTile) {
    // A round: kDatabaseTile rows, kDatabaseTile / kRowWarps per warp, so at most
    // kDatabaseTile keys per query are offered between two cut-backs (as in the tile scan).
    for (int r = warp; r < kDatabaseTile; r += kRowWarps) {
      const int64_t n = n0 + r;
      if (n >= n_end) break;  // uniform across the warp
      float dot[kRowQueries];
#pragma unroll
      for (int q = 0; q < kRowQueries; ++q) dot[q] = 0.0f;
      for (int64_t d = lane; d < a.dim; d += 32) {
        const float x = load_element<kStorage>(a.database, n * a.dim + d);
#pragma unroll
        for (int q = 0; q < kRowQueries; ++q) {
          if (q < nq) dot[q] = fmaf(queries[q * a.dim + d], x, dot[q]);
        }
      }
#pragma unroll
      for (int q = 0; q < kRowQueries; ++q) {
        for (int offset = 16; offset > 0; offset /= 2) dot[q] += __shfl_xor_sync(0xFFFFFFFFu, dot[q], offset);
      }
      const float database_norm = kMetric == Metric::kInnerProduct ? 0.0f : a.database_norms[n];
#pragma unroll
      for (int q = 0; q < kRowQueries; ++q) {
        if (q < nq && lane == q) {  // lane q offers query q's key: constant register index
          const float query_norm = kMetric == Metric::kInnerProduct ? 0.0f : a.query_norms[q];
          offer(s, list_of(q), q, make_key(score_of<kMetric>(dot[q], query_norm, database_norm),
                                           static_cast<uint32_t>(n)));
        }
      }
    }
    __syncthreads();
    cut_back_full_lists(s, list_of, nq, a.capacity, a.k);
  }
  finish_lists(s, list_of, nq, a, 0, split);
}

}  // namespace latentspace::cuda
