// The scan of the CUDA kNN (knn.cu): a block's walk over its database split, offering scores
// to per-query candidate lists, and the list helpers the row scan (knn_rows.cuh) shares.
#pragma once

#include <cuda/atomic>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

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
  uint64_t* best_kth;  // [num_queries], or null: SharedThresholds below
  // The opt-in family's switches (last, so that the default kernels see the same parameter
  // layout): cut-backs by one warp per list (warp_cut_back below, the tile scan's), and
  // float_thresholds, which only picks the family: its tile scan always compares scores
  // with a float threshold before forming their keys (offer_scores_first below).
  bool warp_cut_backs;
  bool float_thresholds;
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

// Whether a tile's shared memory (Tile::Shared) is taken as dynamic shared memory: only
// DeepMmaTile's (knn_deep_tile.cuh), which passes the 48 KiB static shared memory holds.
// launch_tile_scan (knn_scan_launch.cuh) sizes the launch's dynamic shared memory to it.
template <class Tile>
struct StagingIsDynamic : std::false_type {};

struct DynamicStaging {};  // ScanShared's placeholder for a tile whose staging is dynamic

template <class Tile>
using StaticStagingOf = std::conditional_t<StagingIsDynamic<Tile>::value, DynamicStaging, typename Tile::Shared>;

template <class Tile>
struct ScanShared {
  StaticStagingOf<Tile> staging;
  uint64_t threshold[Tile::kQueries];
  int count[Tile::kQueries];
  SelectShared select;
};

// The tile's staging: in the block's static ScanShared, or at the start of its dynamic shared
// memory (StagingIsDynamic).
template <class Tile>
__device__ inline typename Tile::Shared& staging_of(ScanShared<Tile>& s) {
  if constexpr (StagingIsDynamic<Tile>::value) {
    extern __shared__ __align__(16) unsigned char scan_dynamic_shared[];
    return *reinterpret_cast<typename Tile::Shared*>(scan_dynamic_shared);
  } else {
    return s.staging;
  }
}

// ---- per-query candidate lists, shared by the tile scan and the row scan (knn_rows.cuh) ----
// Each block keeps, per query, a threshold and a count in shared memory (a Shared with members
// threshold[], count[] and select) and appends candidates to the query's list in the workspace.

// Where a list's threshold comes from. By default (SplitThresholds) each split's list knows only
// its own rows: a split starts by accepting every row, and then about k ln(rows / k) more, so a
// query searched in S splits collects S times the candidates (and cut-backs) of one long scan.
//
// SharedThresholds (the opt-in family's, kOptIns below; taken where knn.cu sets best_kth: by
// default where a query has several splits in the tile scan, since GPU run 8,
// LATENTSPACE_CUDA_SHARED_THRESHOLDS): every cut-back also lowers best_kth[query], the least k-th best key any split of
// the query has cut its list back to, and the scans take it as their threshold whenever it is
// lower than their own: at the start (blocks of later waves start with the bound earlier ones
// published) and after every tile or round. Exact, because any k keys of the query's rows bound
// its true k-th best key from above: a key above best_kth cannot be among the k best, and keys
// are unique (score, then index), so no row ties with a bound from another split. A split may
// then finish with fewer than k keys; the merge takes the k best over all of them.
struct SplitThresholds {
  __device__ void publish(int, uint64_t) const {}
  // The threshold after a cut-back to `kth`: the list's own k-th best.
  __device__ uint64_t after_cut_back(uint64_t kth, uint64_t) const { return kth; }
  template <class Shared>
  __device__ void tighten(Shared&, int) const {}
};

struct SharedThresholds {
  uint64_t* best_kth;  // from the block's first query; null: not shared (each split its own)
  // Thread-safe across blocks: the bound only ever falls.
  __device__ void publish(int qi, uint64_t kth) const {
    if (best_kth) atomicMin(reinterpret_cast<unsigned long long*>(best_kth + qi), static_cast<unsigned long long>(kth));
  }
  // The list's own k-th best, or the shared bound taken before when that is lower still: the
  // bound may be tighter than what this split has seen, and a cut-back must not loosen it.
  __device__ uint64_t after_cut_back(uint64_t kth, uint64_t current) const { return kth < current ? kth : current; }
  // Each of the block's first `queries` thresholds (those of real queries) to the shared bound
  // when that is lower. A relaxed atomic load at device scope: other blocks' atomicMin race
  // with it, and only an atomic load is sure to read a whole 64-bit key (the PTX memory model
  // promises nothing for a plain load in a race); a value read late is only a looser bound.
  // All threads call it; it ends with a barrier.
  template <class Shared>
  __device__ void tighten(Shared& s, int queries) const {
    if (!best_kth) return;  // (uniform: nothing written, so no barrier needed)
    for (int qi = threadIdx.x; qi < queries; qi += blockDim.x) {
      const uint64_t bound = ::cuda::atomic_ref<uint64_t, ::cuda::thread_scope_device>(best_kth[qi]).load(
          ::cuda::memory_order_relaxed);
      if (bound < s.threshold[qi]) s.threshold[qi] = bound;
    }
    __syncthreads();
  }
};

template <bool kOptIns>
using ThresholdsFor = std::conditional_t<kOptIns, SharedThresholds, SplitThresholds>;

// The block's thresholds policy; q0 is its first query. The opt-in family's shares its bounds
// when the search set a.best_kth.
template <bool kOptIns>
__device__ inline ThresholdsFor<kOptIns> thresholds_of(const ScanArgs& a, int64_t q0) {
  if constexpr (kOptIns) {
    return SharedThresholds{a.best_kth ? a.best_kth + q0 : nullptr};
  } else {
    return SplitThresholds{};
  }
}

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

// Cuts query qi's list back to its k best keys and sets its threshold to the k-th (and offers
// that to the shared bound, with SharedThresholds). All threads of the block call it.
template <class Shared, class Thresholds>
__device__ void cut_back(Shared& s, uint64_t* list, int qi, int k, const Thresholds& thresholds) {
  const CandidateLists one{list, &s.count[qi], 1, 0, s.count[qi]};
  const uint64_t kth = block_select(one, k, s.select);
  const int kept = block_compact(one, kth, list, s.select);
  if (threadIdx.x == 0) {
    s.count[qi] = kept;  // == k: keys are unique
    s.threshold[qi] = thresholds.after_cut_back(kth, s.threshold[qi]);
    thresholds.publish(qi, kth);
  }
  __syncthreads();
}

// Query qi's list cut back to its k best keys by one warp (opt-in, the tile scan's), the same
// result as cut_back: the same radix select of the same keys (knn_select.cuh, warp_select).
// Every lane of the warp calls it; histogram: the warp's 256 counters.
template <class Shared, class Thresholds>
__device__ void warp_cut_back(Shared& s, uint64_t* list, int qi, int k, const Thresholds& thresholds,
                              unsigned* histogram) {
  const int count = s.count[qi];
  const uint64_t kth = warp_select(list, count, k, histogram);
  const int kept = warp_compact(list, count, kth);
  if (threadIdx.x % 32 == 0) {
    s.count[qi] = kept;  // == k: keys are unique
    s.threshold[qi] = thresholds.after_cut_back(kth, s.threshold[qi]);
    thresholds.publish(qi, kth);
  }
  __syncwarp();
}

// The lists that need(count) cut back by the block's 8 warps, 8 lists at a time (opt-in,
// LATENTSPACE_CUDA_WARP_CUT_BACKS=1, until a GPU run verifies and times it), instead of by
// the whole block one after another (cut_back). Why: a block-wide select pays about 5 barriers
// per digit pass and 2 per chunk of its compaction, and at k = 1024 a block cuts back its 128
// queries' lists several times each (docs/benchmarks.md); a warp's select needs no block
// barrier, and the lists of a tile tend to fill together. warp_histograms: 8 x 256 counters
// in shared memory that is free during the cut-backs (the tile's staging buffer). All threads
// call it; it ends with a barrier.
template <class Shared, class ListOf, class Thresholds, class Needs>
__device__ inline void warp_cut_back_lists(Shared& s, ListOf list_of, int queries, int k, const Thresholds& thresholds,
                                           unsigned* warp_histograms, Needs needs) {
  const int warp = threadIdx.x / 32;
  for (int qi = warp; qi < queries; qi += kScanThreads / 32) {
    if (needs(s.count[qi])) warp_cut_back(s, list_of(qi), qi, k, thresholds, warp_histograms + warp * kWarpHistogramBins);
  }
  __syncthreads();
}

// After a round that offered at most `round` keys per query (and a __syncthreads): a list
// that might overflow with the next round is cut back to k. Capacity is k + max(k, 512), so
// there is room again afterwards, or the split's length, which the list cannot outgrow (then
// it is cut only when above k). One barrier tells the block whether any list needs it.
// warp_histograms: null (the block cuts back), or the warps' (warp_cut_back_lists).
template <class Shared, class ListOf, class Thresholds>
__device__ inline void cut_back_full_lists(Shared& s, ListOf list_of, int queries, int capacity, int k, int round,
                                           const Thresholds& thresholds, unsigned* warp_histograms = nullptr) {
  bool any = false;
  for (int qi = threadIdx.x; qi < queries; qi += blockDim.x) {
    const int count = s.count[qi];
    any |= count > capacity - round && count > k;
  }
  if (!__syncthreads_or(any)) return;
  if (warp_histograms) {
    warp_cut_back_lists(s, list_of, queries, k, thresholds, warp_histograms,
                        [=](int count) { return count > capacity - round && count > k; });
    return;
  }
  for (int qi = 0; qi < queries; ++qi) {
    const int count = s.count[qi];
    if (count > capacity - round && count > k) cut_back(s, list_of(qi), qi, k, thresholds);
  }
}

// At the end of the block's split: every list cut to at most k, its length recorded.
template <class Shared, class ListOf, class Thresholds>
__device__ inline void finish_lists(Shared& s, ListOf list_of, int queries, const ScanArgs& a, int64_t q0, int split,
                                    const Thresholds& thresholds, unsigned* warp_histograms = nullptr) {
  if (warp_histograms) {
    const int k = a.k;
    warp_cut_back_lists(s, list_of, queries, k, thresholds, warp_histograms, [=](int count) { return count > k; });
  } else {
    for (int qi = 0; qi < queries; ++qi) {
      if (s.count[qi] > a.k) cut_back(s, list_of(qi), qi, a.k, thresholds);
    }
  }
  for (int qi = threadIdx.x; qi < queries; qi += blockDim.x) {
    if (q0 + qi < a.num_queries) a.counts[(q0 + qi) * a.splits + split] = s.count[qi];
  }
}

// The score a threshold key stands for (its high 32 bits), so that a score can be compared
// with the threshold before its 64-bit key is formed; +inf for the empty key (take every row).
// Host too: tests/cuda_host/float_threshold_check.cu checks it where there is no GPU.
__host__ __device__ inline float threshold_score(uint64_t threshold) {
  return threshold == kEmptyKey ? INFINITY : from_order_preserving_bits(static_cast<uint32_t>(threshold >> 32));
}

// A tile's scores offered to the lists, each first compared as a float with its query's
// threshold score: the opt-in family's tile scan (picked by any of its settings, alone by
// LATENTSPACE_CUDA_FLOAT_THRESHOLDS=1, until a GPU run verifies and times it). Why: the
// default forms every score's key (order-preserving bits, 64-bit key, 64-bit compare: about
// 10 instructions) though nearly all are rejected; on the tensor-core tile those instructions
// outnumber the mma.sync's (docs/benchmarks.md, inferred). Here a rejected score costs its
// score and one float compare. Exact: the order-preserving map is strictly increasing (with
// -0 as +0), so a score below the threshold score has a smaller key, one above a larger key,
// and only an equal score needs its key (the lower index wins), which the kept check
// `key < threshold` decides (tests/cuda_host/float_threshold_check.cu checks it on the host:
// equal scores, -0, denormals, NaN and the empty key among its pairs). A full-tile version
// without the per-score row bound spilled registers (ptxas), so the bound stays.
// query_norm_of(qi): the norm term of the block's query qi (not called for inner products).
template <Metric kMetric, class Tile, class ListOf, class QueryNormOf>
__device__ __forceinline__ void offer_scores_first(const ScanArgs& a, ScanShared<Tile>& s,
                                                   const float (&acc)[Tile::kRows][Tile::kCols],
                                                   const float (&database_norms)[Tile::kCols], int64_t q0, int64_t n0,
                                                   int64_t n_end, ListOf list_of, QueryNormOf query_norm_of) {
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const int qi = Tile::query_of(i);
    if (q0 + qi >= a.num_queries) continue;
    const uint64_t threshold = s.threshold[qi];
    const float bound = threshold_score(threshold);
    const float query_norm = kMetric == Metric::kInnerProduct ? 0.0f : query_norm_of(qi);
#pragma unroll
    for (int j = 0; j < Tile::kCols; ++j) {
      const int64_t n = n0 + Tile::vector_of(j);
      if (n >= n_end) continue;
      const float score = score_of<kMetric>(acc[i][j], query_norm, database_norms[j]);
      if (!(score > bound)) {  // rare once the list has filled; a NaN score takes the key's way too
        const uint64_t key = make_key(score, static_cast<uint32_t>(n));
        if (key < threshold) list_of(qi)[atomicAdd(&s.count[qi], 1)] = key;
      }
    }
  }
}

// grid (query tiles, database splits). kAligned: see knn_tiles.cuh. Tile: the precision's
// tile (TileFor), or another policy of the same precision (knn_mma_tile.cuh).
// kOptIns: the opt-in family, compiled apart (knn_scan_<metric>_opt_ins.cu) so that the
// default kernels stay as a GPU run verified them: scores compared before their keys are
// formed (offer_scores_first, always), thresholds shared across splits where a.best_kth is
// set (SharedThresholds above), cut-backs by warps where a.warp_cut_backs.
template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, bool kAligned,
          class Tile = typename TileFor<kPrecision>::type, bool kOptIns = false>
__global__ void __launch_bounds__(kScanThreads, 2) scan_kernel(ScanArgs a) {
  __shared__ ScanShared<Tile> s;
  const int64_t q0 = int64_t{blockIdx.x} * Tile::kQueries;
  const int split = blockIdx.y;
  const int64_t n_begin = split * a.split_length;
  const int64_t n_end = min(a.num_database, n_begin + a.split_length);
  auto list_of = [&](int qi) { return a.candidates + ((q0 + qi) * a.splits + split) * int64_t{a.capacity}; };
  const auto thresholds = thresholds_of<kOptIns>(a, q0);
  const int real_queries = static_cast<int>(min(int64_t{Tile::kQueries}, a.num_queries - q0));
  // Warp cut-backs (opt-in family) count digits in the staging buffer: the tile's inputs are
  // read by then (the barrier after the offers), and the next tile's stash follows the
  // barrier that ends the cut-backs.
  unsigned* warp_histograms = nullptr;
  if constexpr (kOptIns) {
    static_assert(sizeof(typename Tile::Shared) >= kScanThreads / 32 * kWarpHistogramBins * sizeof(unsigned),
                  "the warps' histograms must fit the staging buffer");
    if constexpr (StagingIsDynamic<Tile>::value) {
      if (a.warp_cut_backs) warp_histograms = reinterpret_cast<unsigned*>(&staging_of(s));
    } else {
      if (a.warp_cut_backs) warp_histograms = reinterpret_cast<unsigned*>(&s.staging);
    }
  }
  start_lists(s, Tile::kQueries);

  for (int64_t n0 = n_begin; n0 < n_end; n0 += Tile::kVectors) {
    thresholds.tighten(s, real_queries);  // (the previous barrier: start_lists' or the cut-backs')
    const TileBounds bounds{a.queries, a.database, q0, a.num_queries, n0, n_end, a.dim, a.weights};
    float acc[Tile::kRows][Tile::kCols];
    if constexpr (StagingIsDynamic<Tile>::value) {
      Tile::template compute<kStorage, kAligned>(bounds, staging_of(s), acc);
    } else {  // (s.staging named here, not through staging_of: the SASS stays as GPU runs verified it)
      Tile::template compute<kStorage, kAligned>(bounds, s.staging, acc);
    }
    float database_norms[Tile::kCols];
#pragma unroll
    for (int j = 0; j < Tile::kCols; ++j) {
      const int64_t n = n0 + Tile::vector_of(j);
      database_norms[j] = kMetric == Metric::kInnerProduct || n >= n_end ? 0.0f : a.database_norms[n];
    }
    // Offer the tile's scores: only keys below the query's threshold enter its list (the
    // thresholds change only in cut-backs and tighten, behind barriers: one read per query row).
    auto offer_keys = [&] {
#pragma unroll
      for (int i = 0; i < Tile::kRows; ++i) {
        const int qi = Tile::query_of(i);
        if (q0 + qi >= a.num_queries) continue;
        const uint64_t threshold = s.threshold[qi];
        // (read here, not kept for the split: registers are scarce while the tile computes)
        const float query_norm = kMetric == Metric::kInnerProduct ? 0.0f : a.query_norms[q0 + qi];
#pragma unroll
        for (int j = 0; j < Tile::kCols; ++j) {
          const int64_t n = n0 + Tile::vector_of(j);
          if (n >= n_end) continue;
          const uint64_t key =
              make_key(score_of<kMetric>(acc[i][j], query_norm, database_norms[j]), static_cast<uint32_t>(n));
          if (key < threshold) list_of(qi)[atomicAdd(&s.count[qi], 1)] = key;
        }
      }
    };
    if constexpr (kOptIns) {
      // Always in the opt-in family: with a run-time choice between the two ways the tile
      // kernels spilled registers (ptxas, sm_90: 300 bytes in the float32 tile, none without).
      offer_scores_first<kMetric, Tile>(a, s, acc, database_norms, q0, n0, n_end, list_of,
                                        [&](int qi) { return a.query_norms[q0 + qi]; });
    } else {
      offer_keys();
    }
    __syncthreads();
    cut_back_full_lists(s, list_of, Tile::kQueries, a.capacity, a.k, Tile::kVectors, thresholds, warp_histograms);
  }
  finish_lists(s, list_of, Tile::kQueries, a, q0, split, thresholds, warp_histograms);
}

}  // namespace latentspace::cuda
