// The row scan of the CUDA kNN, for a handful of queries (at most kRowQueries): a score tile
// would compute mostly padding, so instead each warp reads whole database rows, front to back
// and coalesced, and every lane multiplies its slice of the row with all the queries (held in
// shared memory); a butterfly of shuffles sums each query's dot product. Memory-bound like the
// search itself: the database is read once, four rows per warp in flight at a time, and the
// rows' norms are summed in the same pass when the caller keeps none (kOwnNorms). Same lists,
// keys and results as the tile scan (knn_scan.cuh); always exact float32 products (a reduced
// precision buys nothing here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/check.h"
#include "cuda/knn_scan.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

constexpr int kRowQueries = 8;  // queries per row scan
constexpr int kRowWarps = kScanThreads / 32;
constexpr int kRowsInFlight = 4;  // rows a warp reads at once (two steps of them a round)
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

// A row's norm as norms_kernel (knn.cu) gives it: the squared norm (l2: sum w x^2 with weights),
// or 1 / norm, 0 for a zero vector (cosine).
template <Metric kMetric>
__device__ inline float finish_norm(float sum) {
  if constexpr (kMetric == Metric::kCosine) return sum > 0.0f ? 1.0f / sqrtf(sum) : 0.0f;
  return sum;
}

// The blocks of a scan with `rows` rows a warp in flight that a multiprocessor must hold
// (__launch_bounds__): the single-query scan's registers capped so that its rows in flight
// add up. ptxas, sm_90, float32 rows with kept norms: uncapped, 87 registers a thread at 8
// rows, which leaves 2 blocks (64 KiB of rows in flight a multiprocessor), and 154 at 16
// rows, which leaves 1 (64 KiB); capped, 80 registers (4 bytes spilled) and 3 blocks (96 KiB),
// and 128 (52 bytes spilled) and 2 blocks (128 KiB); the row scan: 80 registers, 3 blocks,
// 48 KiB. The row scan's own (4 rows): 0, no cap, as GPU runs timed it (its SASS, sm_90, is
// the same as with no second __launch_bounds__ argument; a 1 there reorders its instructions).
constexpr int row_scan_min_blocks(int rows) { return rows > 8 ? 2 : rows > 4 ? 3 : 0; }

// The rows a warp reads at once in the scan of one query (row_scan_kernel's kRows, launched
// by knn_scan_launch.cuh): LATENTSPACE_CUDA_SINGLE_QUERY_ROWS. Unset, empty or "8": the single-query scan (one
// query's registers, 8 rows a warp in one step a round, norms loaded ahead) where one query's
// rows load in quads (kAligned), the default since GPU run 10 (an H200, the profile's q1 sweep:
// its scan of one query over 1M x 128 took 0.216 ms against the row scan's 0.356, a
// FlatIndex search 0.450 ms against 0.556; bit-identical results in every GPU test); "16": 16
// rows (no faster in run 10); "4": the row scan, as runs 1-9 timed it; any other value throws
// ValueError. Read at every search.
inline int single_query_rows() {
  const char* value = std::getenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "8") == 0) return 8;
  if (std::strcmp(value, "4") == 0) return kRowsInFlight;
  LS_CHECK_VALUE(std::strcmp(value, "16") == 0, "LATENTSPACE_CUDA_SINGLE_QUERY_ROWS: expected '4', '8' or '16', got '",
                 std::string(value), "'");
  return 16;
}

// The splits of a call of one query (plan_for): a whole number of waves of the single-query
// scan's resident blocks. Its launch bound (row_scan_min_blocks) holds 3 blocks of 8 rows a
// warp on a multiprocessor, and ptxas (sm_90) gives the float32 kernels 80 registers, which
// leaves exactly 3: the plan's own 521 splits over 1M rows on an H200's 132 multiprocessors
// ran as a full wave of 396 and a tail of 125. Both q1 sweeps (GPU runs 10 and 12, the scan
// kernel's time from torch.profiler) timed 391 splits, one wave, at 0.165 and 0.163 ms against
// 0.216 and 0.218 ms for 521, and 782 (two waves) at 0.176 and 0.175 ms. 0 where the call
// does not take the single-query scan at 8 rows (more queries, or another
// LATENTSPACE_CUDA_SINGLE_QUERY_ROWS). (The plan does not know whether the query's rows load
// in quads: one that does not takes the row scan, 3 or 4 resident blocks a multiprocessor by
// ptxas, which these splits leave at one wave or less, no tail either.)
inline int64_t single_query_wave(int64_t num_queries, int64_t dim, int multiprocessors) {
  if (num_queries != 1 || (dim > 0 && !use_row_scan(num_queries, dim)) || single_query_rows() != 8) return 0;
  return int64_t{row_scan_min_blocks(8)} * multiprocessors;
}

// grid (1, splits); dynamic shared memory: num_queries * dim floats (the queries, scaled by
// the weights for weighted l2). kAligned: see knn_tiles.cuh. kOwnNorms: a.database_norms is
// null and the scan sums each row's norm itself (l2, cosine).
// kEarlyNorms (opt-in, LATENTSPACE_CUDA_EARLY_NORMS=1, until a GPU run verifies and times it):
// the norms are loaded ahead, not where a score needs them. Without it, the SASS (sm_90) loads
// a row's kept norm and each query's norm from global memory right before its score, after the
// previous candidate's store, so each row waits for two loads in turn; a FlatIndex's single
// query read its database at 1.4 TB/s in GPU run 7, half of torch.sum's rate. With it, lane q
// keeps query q's norm in a register (lane q offers query q's keys) and the kept norms of a
// step's rows are loaded with the rows.
// kOptIns: the opt-in family (knn_scan.cuh, scan_kernel): thresholds shared across splits
// where a.best_kth is set. Its cut-backs stay the block's (a.warp_cut_backs is the tile
// scan's: the row scan has no staging buffer to count in, and 8 queries at most).
// kQueries, kRows, kSteps: the queries a block can hold (registers for that many dot products
// a row), the rows a warp reads at once, and the steps of kRows rows a warp takes between two
// list checks. The row scan: kRowQueries, kRowsInFlight, 2. The single-query scan (the
// default for one aligned query since GPU run 10, LATENTSPACE_CUDA_SINGLE_QUERY_ROWS,
// knn_scan_launch.cuh): 1 query, 8 or 16 rows, 1 step, norms loaded ahead. Why: GPU run 8
// timed the row scan of one query over 1M x 128 at 1.44 TB/s, a third of what the H200 reads; with 80 registers a thread (ptxas, sm_90) a
// multiprocessor holds 24 warps, each with 2 KiB of rows in flight at most, while registers
// for 8 queries' dot products go unused. One query's registers hold 2 to 4 times the rows.
template <Metric kMetric, KnnStorage kStorage, bool kAligned, bool kOwnNorms, bool kEarlyNorms = false,
          bool kOptIns = false, int kQueries = kRowQueries, int kRows = kRowsInFlight, int kSteps = 2>
__global__ void __launch_bounds__(kScanThreads, row_scan_min_blocks(kRows)) row_scan_kernel(ScanArgs a) {
  static_assert(kQueries >= 1 && kQueries <= kRowQueries, "RowShared holds kRowQueries queries' lists");
  constexpr int kRound = kRowWarps * kRows * kSteps;  // rows between two list checks
  static_assert(kRound <= 512, "a list has room for 512 keys beyond k (knn.cu, kExtraCapacityTiles)");
  extern __shared__ float4 query_quads[];  // [num_queries][dim] floats, 16-byte aligned
  float* queries = reinterpret_cast<float*>(query_quads);
  __shared__ RowShared s;
  const int split = blockIdx.y;
  const int64_t n_begin = split * a.split_length;
  const int64_t n_end = min(a.num_database, n_begin + a.split_length);
  const int nq = static_cast<int>(a.num_queries);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto list_of = [&](int qi) { return a.candidates + (int64_t{qi} * a.splits + split) * int64_t{a.capacity}; };
  const auto thresholds = thresholds_of<kOptIns>(a, 0);
  for (int64_t i = threadIdx.x; i < a.num_queries * a.dim; i += blockDim.x) {
    const float value = a.queries[i];
    queries[i] = a.weights ? value * a.weights[i % a.dim] : value;
  }
  start_lists(s, kRowQueries);  // (its barrier also publishes the queries)
  float lane_query_norm = 0.0f;  // kEarlyNorms: query `lane`'s norm
  if constexpr (kEarlyNorms && kMetric != Metric::kInnerProduct) {
    if (lane < nq) lane_query_norm = a.query_norms[lane];
  }

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kRound) {
    thresholds.tighten(s, nq);  // (the previous barrier: start_lists' or the cut-backs')
    // A round: kRound rows, kSteps steps of kRows consecutive rows per warp, so at most kRound
    // keys per query are offered between two list checks.
#pragma unroll 1
    for (int step = 0; step < kSteps; ++step) {
      const int64_t first = n0 + (step * kRowWarps + warp) * kRows;
      if (first >= n_end) break;  // uniform across the warp
      float dot[kRows][kQueries], norm[kRows];
      float kept_norm[kRows];  // kEarlyNorms: the rows' kept norms, loaded with the rows
      if constexpr (kEarlyNorms && !kOwnNorms && kMetric != Metric::kInnerProduct) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) kept_norm[r] = first + r < n_end ? a.database_norms[first + r] : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        norm[r] = 0.0f;
#pragma unroll
        for (int q = 0; q < kQueries; ++q) dot[r][q] = 0.0f;
      }
      // Lane l takes dimensions 4 l .. 4 l + 3 of every 128 (quads), or l of every 32.
      constexpr int kPerLane = kAligned ? 4 : 1;
      for (int64_t d = lane * kPerLane; d < a.dim; d += 32 * kPerLane) {
        float4 x[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int64_t n = first + r;
          if constexpr (kAligned) {
            x[r] = load_quad<kStorage, true>(a.database, n, n < n_end, d, a.dim);
          } else {
            x[r] = make_float4(n < n_end ? load_element<kStorage>(a.database, n * a.dim + d) : 0.0f, 0.0f, 0.0f, 0.0f);
          }
        }
        if constexpr (kOwnNorms) {
          float4 w = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
          if (a.weights) {
            w = kAligned ? load_four<KnnStorage::kFloat32>(a.weights, d) : make_float4(a.weights[d], 0.0f, 0.0f, 0.0f);
          }
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            norm[r] = fmaf(w.x * x[r].x, x[r].x, norm[r]);
            norm[r] = fmaf(w.y * x[r].y, x[r].y, norm[r]);
            norm[r] = fmaf(w.z * x[r].z, x[r].z, norm[r]);
            norm[r] = fmaf(w.w * x[r].w, x[r].w, norm[r]);
          }
        }
#pragma unroll
        for (int q = 0; q < kQueries; ++q) {
          if (q >= nq) break;  // uniform
          float4 query;
          if constexpr (kAligned) {
            query = *reinterpret_cast<const float4*>(&queries[q * a.dim + d]);
          } else {
            query = make_float4(queries[q * a.dim + d], 0.0f, 0.0f, 0.0f);
          }
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            dot[r][q] = fmaf(query.x, x[r].x, dot[r][q]);
            dot[r][q] = fmaf(query.y, x[r].y, dot[r][q]);
            dot[r][q] = fmaf(query.z, x[r].z, dot[r][q]);
            dot[r][q] = fmaf(query.w, x[r].w, dot[r][q]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int q = 0; q < kQueries; ++q) {
          if (q >= nq) break;
          for (int offset = 16; offset > 0; offset /= 2) dot[r][q] += __shfl_xor_sync(0xFFFFFFFFu, dot[r][q], offset);
        }
        if constexpr (kOwnNorms) {
          for (int offset = 16; offset > 0; offset /= 2) norm[r] += __shfl_xor_sync(0xFFFFFFFFu, norm[r], offset);
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t n = first + r;
        if (n >= n_end) break;
        float database_norm = 0.0f;
        if constexpr (kOwnNorms) {
          database_norm = finish_norm<kMetric>(norm[r]);
        } else if constexpr (kMetric != Metric::kInnerProduct) {
          database_norm = kEarlyNorms ? kept_norm[r] : a.database_norms[n];
        }
#pragma unroll
        for (int q = 0; q < kQueries; ++q) {
          if (q < nq && lane == q) {  // lane q offers query q's key: constant register index
            const float query_norm = kMetric == Metric::kInnerProduct ? 0.0f
                                     : kEarlyNorms                    ? lane_query_norm
                                                                      : a.query_norms[q];
            offer(s, list_of(q), q, make_key(score_of<kMetric>(dot[r][q], query_norm, database_norm),
                                             static_cast<uint32_t>(n)));
          }
        }
      }
    }
    __syncthreads();
    cut_back_full_lists(s, list_of, nq, a.capacity, a.k, kRound, thresholds);
  }
  finish_lists(s, list_of, nq, a, 0, split, thresholds);
}

}  // namespace latentspace::cuda
