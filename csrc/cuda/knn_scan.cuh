// The scan of the CUDA kNN (knn.cu): a block's walk over its database split, offering scores
// to per-query candidate lists, and the list helpers the row scan (knn_rows.cuh) shares.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/knn_select.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

constexpr int kScanThreads = kSelectThreads;
static_assert(kScanThreads == kTileThreads, "the scan's tiles and selection share one block");

struct ScanArgs {
  const float* weights;  // nullable (weighted l2)
  const float* queries;
  const void* database;  // elements of the scan's storage type
  const float* query_norms;
  const float* database_norms;
  int64_t num_queries, num_database, dim;
  int k, capacity, splits;
  int64_t split_length;
  uint64_t* candidates;
  int* counts;
};

// Score to minimise: the squared distance, or minus the similarity.
template <Metric kMetric>
__device__ inline float score_of(float dot, float query_norm, float database_norm) {
  if constexpr (kMetric == Metric::kL2) {
    return fmaxf(query_norm + database_norm - 2.0f * dot, 0.0f);
  } else if constexpr (kMetric == Metric::kInnerProduct) {
    return -dot;
  } else {
    // Inverse norms, 0 for zero vectors; clamped like the CPU's (rounding can pass 1), before
    // the key is formed, so values clamped together still order by index.
    return -fminf(fmaxf(dot * query_norm * database_norm, -1.0f), 1.0f);
  }
}

// The tile staging of a precision: registers + transposed staging (float32), or the WMMA
// staging with its shared score tile.
template <KnnPrecision kPrecision>
struct StagingFor {
  using type = WmmaStaging<kPrecision>;
};
template <>
struct StagingFor<KnnPrecision::kFloat32> {
  using type = SimtStaging;
};

template <KnnPrecision kPrecision>
struct ScanShared {
  typename StagingFor<kPrecision>::type staging;
  uint64_t threshold[kQueryTile];
  int count[kQueryTile];
  SelectShared select;
};

// ---- per-query candidate lists, shared by the tile scan and the row scan (knn_rows.cuh) ----
// Each block keeps, per query, a threshold and a count in shared memory (a Shared with members
// threshold[], count[] and select) and appends candidates to the query's list in the workspace.

template <class Shared>
__device__ inline void start_lists(Shared& s, int queries) {
  for (int i = threadIdx.x; i < queries; i += blockDim.x) {
    s.threshold[i] = kEmptyKey;  // accepts everything until the list first fills
    s.count[i] = 0;
  }
  __syncthreads();
}

// Appends key to query qi's list when it beats the query's current k-th best.
template <class Shared>
__device__ inline void offer(Shared& s, uint64_t* list, int qi, uint64_t key) {
  if (key < s.threshold[qi]) {
    const int position = atomicAdd(&s.count[qi], 1);  // < capacity: see cut_back_full_lists
    list[position] = key;
  }
}

// Cuts query qi's list back to its k best keys and sets its threshold to the k-th. All
// threads of the block call it.
template <class Shared>
__device__ void cut_back(Shared& s, uint64_t* list, int qi, int k) {
  const CandidateLists one{list, &s.count[qi], 1, 0};
  const uint64_t kth = block_select(one, k, s.select);
  const int kept = block_compact(one, kth, list, s.select);
  if (threadIdx.x == 0) {
    s.count[qi] = kept;  // == k: keys are unique
    s.threshold[qi] = kth;
  }
  __syncthreads();
}

// After a round that offered at most kDatabaseTile keys per query (and a __syncthreads): a
// list that might overflow with the next round is cut back to k. Capacity is k + max(k, 256),
// so there is room again afterwards, or the split's length, which the list cannot outgrow
// (then it is cut only when above k).
template <class Shared, class ListOf>
__device__ inline void cut_back_full_lists(Shared& s, ListOf list_of, int queries, int capacity, int k) {
  for (int qi = 0; qi < queries; ++qi) {
    const int count = s.count[qi];
    if (count > capacity - kDatabaseTile && count > k) cut_back(s, list_of(qi), qi, k);
  }
}

// At the end of the block's split: every list cut to at most k, its length recorded.
template <class Shared, class ListOf>
__device__ inline void finish_lists(Shared& s, ListOf list_of, int queries, const ScanArgs& a, int64_t q0, int split) {
  for (int qi = 0; qi < queries; ++qi) {
    if (s.count[qi] > a.k) cut_back(s, list_of(qi), qi, a.k);
  }
  for (int qi = threadIdx.x; qi < queries; qi += blockDim.x) {
    if (q0 + qi < a.num_queries) a.counts[(q0 + qi) * a.splits + split] = s.count[qi];
  }
}

template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage>
__global__ void __launch_bounds__(kScanThreads) scan_kernel(ScanArgs a) {
  __shared__ ScanShared<kPrecision> s;
  const int64_t q0 = int64_t{blockIdx.x} * kQueryTile;
  const int split = blockIdx.y;
  const int64_t n_begin = split * a.split_length;
  const int64_t n_end = min(a.num_database, n_begin + a.split_length);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  auto list_of = [&](int qi) { return a.candidates + ((q0 + qi) * a.splits + split) * int64_t{a.capacity}; };
  start_lists(s, kQueryTile);

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kDatabaseTile) {
    const TileBounds bounds{a.queries, a.database, q0, a.num_queries, n0, n_end, a.dim, a.weights};
    float acc[4][4];
    if constexpr (kPrecision == KnnPrecision::kFloat32) {
      simt_tile<kStorage>(bounds, s.staging, acc);
    } else {
      wmma_tile<kPrecision, kStorage>(bounds, s.staging);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = s.staging.scores[ty * 4 + i][tx * 4 + j];
      }
    }
    // Offer the tile's scores: only keys below the query's threshold enter its list.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int qi = ty * 4 + i;
      const int64_t q = q0 + qi;
      if (q >= a.num_queries) continue;
      const float query_norm = kMetric == Metric::kInnerProduct ? 0.0f : a.query_norms[q];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx * 4 + j;
        if (n >= n_end) continue;
        const float database_norm = kMetric == Metric::kInnerProduct ? 0.0f : a.database_norms[n];
        offer(s, list_of(qi), qi, make_key(score_of<kMetric>(acc[i][j], query_norm, database_norm),
                                           static_cast<uint32_t>(n)));
      }
    }
    __syncthreads();
    cut_back_full_lists(s, list_of, kQueryTile, a.capacity, a.k);
  }
  finish_lists(s, list_of, kQueryTile, a, q0, split);
}


}  // namespace latentspace::cuda
