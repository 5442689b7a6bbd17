// The pipelined deep tile: DeepMmaTile (knn_deep_tile.cuh) with its block's memory traffic
// moved off the critical path between tiles, and the scan kernel that drives it. Opt-in
// (LATENTSPACE_CUDA_TENSOR_TILE=pipelined; knn_scan_launch.cuh), in the opt-in family only
// (the kernels that the big searches run by default: several splits a query), until a GPU run
// verifies and times it.
//
// Why. DeepMmaTile overlaps a step's copies with the previous step's mma.sync, but not a
// tile's first step: it is issued when the tile starts and waited for at once, so every tile
// waits a whole global-memory round trip before its first mma.sync (four steps a tile at a
// depth of 128, so about one wait in four is not overlapped at all). The scan's epilogue then
// loads each score's norms from global memory: the tile's 8 database norms a thread (64-bit
// address arithmetic for each, about 70 instructions a tile, sm_90 SASS) and its 8 query
// norms, one dependent load a row, though the block's queries never change. As compiled for
// sm_90 (ptxas -v, 2026-11-28) the opt-in family's deep tile kernels over float32 rows spill
// 188-240 bytes at their 128-register bound, the spill loads in that epilogue, and GPU run 12's
// Nsight Compute report found the bf16 scan latency-bound: the issue slots a third busy, half
// an eligible warp a scheduler, 161 million local-memory requests, and the largest share of a
// warp's wait between instructions (3.8 of 12.2 cycles, 31%) spent on data from local or
// global memory (the L1TEX scoreboard; docs/benchmarks.md).
//
// Here:
//   - the next tile's first step, and its database norms, are issued right after the barrier
//     of the tile's last step (where DeepMmaTile issues nothing), so they fly during that
//     step's mma.sync, the epilogue, the cut-backs and the next tile's threshold refresh;
//   - the block's query norms reach shared memory once, with the split's first step;
//   - the database norms reach shared memory by cp.async (4 bytes a thread, 128 threads),
//     double-buffered by tile parity: a tile's epilogue reads its own while the next tile's
//     land; the epilogue reads both from shared memory.
// Where the buffers are safe to overwrite: the landing chunks are each thread's own and were
// rounded before the last barrier; the rounded buffer the next tile's first step writes (a
// direct copy) is the one the last step did not read, read last before that step's barrier;
// a tile's norm buffer was last read by the epilogue two tiles back, which a barrier closes.
// The rounded buffers alternate across tiles (the stage carries over), not from 0 each tile.
//
// The same rounding, mma.sync shapes and order as DeepMmaTile, and the opt-in family's
// epilogue: the same scores and keys bit for bit (tests/gpu/test_knn_pipelined_tile.py).
// Where it does not apply (knn_scan_launch.cuh, pipelined_tile_applies: the deep tile's
// conditions, and no cut-backs by warps, whose histograms would take the staging buffer that
// now holds copies in flight; a dimension of at least 1) the search takes DeepMmaTile.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/knn_deep_tile.cuh"
#include "cuda/knn_scan.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

// 4 bytes from global to shared memory by cp.async (the .ca form: .cg copies 16 bytes only);
// when !exists nothing is read and the 4 bytes are zeroed (the source must still be a valid
// address: pass the base).
__device__ inline void copy_4_async(void* shared_destination, const void* global_source, bool exists) {
  const auto destination = static_cast<uint32_t>(__cvta_generic_to_shared(shared_destination));
  const int bytes = exists ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(destination), "l"(global_source), "r"(bytes)
               : "memory");
}

// 128 norms, rows [first, first + 128) of `source` (0 at and past `end`), into `norms` by
// cp.async, one a thread (threads below 128); nothing for inner products, which have none. Not
// committed. A tile's database norms (from its n0 to the split's end) and a block's query norms.
template <Metric kMetric>
__device__ inline void issue_norms(const float* source, int64_t first, int64_t end, float (&norms)[128], int thread) {
  if constexpr (kMetric != Metric::kInnerProduct) {
    if (thread < 128) {
      const int64_t row = first + thread;
      const bool exists = row < end;
      copy_4_async(&norms[thread], exists ? source + row : source, exists);
    }
  }
}

// Whether an l2 score is above `bound` (a threshold's score: at least 0, or +inf), tested on
// its unclamped form, fma(-2, dot, |q|^2 + |x|^2): offer_tile_scores' fast reject (why it is
// exact: there). Host too: tests/cuda_host/l2_reject_check.cu checks that it rejects no key
// that the deep tile's epilogue takes.
__host__ __device__ inline bool l2_score_above(float dot, float query_norm, float database_norm, float bound) {
  return fmaf(-2.0f, dot, query_norm + database_norm) > bound;
}

template <KnnPrecision kPrecision>
struct PipelinedDeepTile : DeepMmaTile<kPrecision> {
  using Deep = DeepMmaTile<kPrecision>;
  using Deep::kDepth, Deep::kQueries, Deep::kVectors, Deep::kRows, Deep::kCols;
  using Deep::kWarpQueries, Deep::kWarpVectors;

  static constexpr const char* kName = "pipelined";  // (_native._cuda_last_scan)
  static_assert(kQueries == 128 && kVectors == 128, "issue_norms copies 128 norms");
  struct Shared : Deep::Shared {
    float query_norms[kQueries];         // the block's, for its whole split (0 past the queries)
    float database_norms[2][kVectors];   // a tile's, by tile parity (0 past the split's rows)
  };

  // A tile's first step and its database norms (parity: the tile's), one group of copies.
  template <Metric kMetric, KnnStorage kStorage>
  __device__ static void issue_first_step(const TileBounds& t, const float* database_norms, Shared& s, int stage,
                                          int parity, int thread) {
    issue_norms<kMetric>(database_norms, t.n0, t.n_end, s.database_norms[parity], thread);
    const typename Deep::template Copies<kStorage> copies(t, thread);
    Deep::template issue_step<kStorage>(t, copies, s, stage, 0, thread);  // (commits the group)
  }

  // The split's first tile's first step (rounded buffer 0, norm buffer 0) and the block's
  // query norms. All threads call it, before the split's first tile.
  template <Metric kMetric, KnnStorage kStorage>
  __device__ static void issue_split_start(const TileBounds& first, const float* query_norms,
                                           const float* database_norms, Shared& s) {
    const int thread = threadIdx.x;
    issue_norms<kMetric>(query_norms, first.q0, first.num_queries, s.query_norms, thread);
    issue_first_step<kMetric, kStorage>(first, database_norms, s, 0, 0, thread);
  }

  // DeepMmaTile::compute with the tile's first step already in flight (issue_split_start or
  // the previous tile), and the next tile's (n0 + kVectors, where it is in the split) issued
  // after the last step's barrier. stage: the rounded buffer of the tile's first step, on
  // return the next tile's; parity: the tile's norm buffer.
  template <Metric kMetric, KnnStorage kStorage>
  __device__ static void compute(const TileBounds& t, const float* database_norms, Shared& s, int& stage, int parity,
                                 float acc[kRows][kCols]) {
    const int thread = Deep::opaque_thread();
    const int warp = thread / 32;
    const int warp_query = (warp / 4) * kWarpQueries, warp_vector = (warp % 4) * kWarpVectors;
    zero_scores<kRows, kCols>(acc);
    const typename Deep::template Copies<kStorage> copies(t, thread);
    for (int64_t d0 = 0; d0 < t.dim; d0 += kDepth) {
      wait_copies();
      Deep::template round_step<kStorage>(s, stage, thread);
      __syncthreads();
      if (d0 + kDepth < t.dim) {
        Deep::template issue_step<kStorage>(t, copies, s, stage ^ 1, d0 + kDepth, thread);
      } else if (t.n0 + kVectors < t.n_end) {
        TileBounds next = t;
        next.n0 += kVectors;
        issue_first_step<kMetric, kStorage>(next, database_norms, s, stage ^ 1, parity ^ 1, thread);
      }
#pragma unroll
      for (int k0 = 0; k0 < kDepth; k0 += Deep::Traits::kStepDepth) {
        Deep::multiply_step(s, stage, k0, warp_query, warp_vector, acc, thread);
      }
      stage ^= 1;
    }
  }
};

template <KnnPrecision kPrecision>
struct StagingIsDynamic<PipelinedDeepTile<kPrecision>> : std::true_type {};

// The pipelined kernel's epilogue: a tile's scores offered to the lists as offer_scores_first
// (knn_scan.cuh) offers them (each compared as a float with its query's threshold score before
// its key is formed; the same keys, so the same lists), with what the scan kernel's compiled
// epilogue spilled worked out afresh each tile: each score's query and vector offsets
// (Tile::query_of / vector_of) from a thread index hidden from the compiler, which otherwise
// hoists all 16 out of the loop over tiles and spills them (ptxas, sm_90: a local load before
// each score), and the split's end as one mask of the thread's columns instead of a 64-bit
// compare per score. For l2, a score is rejected on fma(-2, dot, |q|^2 + |x|^2) > bound, the
// unclamped score: the threshold's score is at least 0, so that holds exactly when the clamped
// score exceeds it, and 2 dot is exact, so the fma rounds as score_of's subtraction does
// (fused by the compiler or not). Neither 2 dot nor the sum can overflow: every row searched
// passed the row check, squared norms at most FLT_MAX / 8 (ops/norms.h, kMaxSquaredNorm).
//
// (Not done, and why: a copy path without the per-chunk row and dimension tests for whole
// tiles (DeepMmaTile::issue_step spends about 12 instructions a copy, 96 of a step's 220)
// moved the compiler at the 128-register bound either to work the row masks out again every
// step (about 40 instructions, a saving of 15 a step) or, with the step loop compiled once for
// whole and once for edge tiles, to spill 8-108 bytes in every kernel: ptxas sm_90,
// twenty-third session.)
template <Metric kMetric, class Tile, class ListOf>
__device__ __forceinline__ void offer_tile_scores(const ScanArgs& a, ScanShared<Tile>& s,
                                                  const typename Tile::Shared& staging,
                                                  const float (&acc)[Tile::kRows][Tile::kCols], int parity,
                                                  int64_t q0, int64_t n0, int64_t n_end, ListOf list_of) {
  const unsigned thread = Tile::opaque_thread();  // (unsigned: the divisions below become shifts)
  const int warp = static_cast<int>(thread / 32), lane = static_cast<int>(thread % 32);
  // query_of(i) = first_query + (i / 2) * 16 + (i % 2) * 8; vector_of(j) = first_vector + (j / 2) * 8 + j % 2
  // (MmaTile's fragment layout, which the deep tiles share)
  const int first_query = (warp / 4) * Tile::kWarpQueries + lane / 4;
  const int first_vector = (warp % 4) * Tile::kWarpVectors + 2 * (lane % 4);
  const int real_queries = static_cast<int>(min(int64_t{Tile::kQueries}, a.num_queries - q0));
  const int real_vectors = static_cast<int>(min(int64_t{Tile::kVectors}, n_end - n0));
  float database_norms[Tile::kCols];
  unsigned columns = 0;  // bit j: vector_of(j) is in the split
#pragma unroll
  for (int j = 0; j < Tile::kCols; ++j) {
    const int v = first_vector + (j / 2) * 8 + j % 2;
    if (v < real_vectors) columns |= 1u << j;
    database_norms[j] = kMetric == Metric::kInnerProduct ? 0.0f : staging.database_norms[parity][v];
  }
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const int qi = first_query + (i / 2) * 16 + (i % 2) * 8;
    if (qi >= real_queries) continue;
    const uint64_t threshold = s.threshold[qi];
    const float bound = threshold_score(threshold);
    const float query_norm = kMetric == Metric::kInnerProduct ? 0.0f : staging.query_norms[qi];
#pragma unroll
    for (int j = 0; j < Tile::kCols; ++j) {
      if (!(columns >> j & 1u)) continue;
      const bool rejected = kMetric == Metric::kL2
                                ? l2_score_above(acc[i][j], query_norm, database_norms[j], bound)
                                : score_of<kMetric>(acc[i][j], query_norm, database_norms[j]) > bound;
      if (!rejected) {  // rare once the list has filled; a NaN score takes the key's way too
        const float score = score_of<kMetric>(acc[i][j], query_norm, database_norms[j]);
        const int v = first_vector + (j / 2) * 8 + j % 2;
        const uint64_t key = make_key(score, static_cast<uint32_t>(n0 + v));
        if (key < threshold) list_of(qi)[atomicAdd(&s.count[qi], 1)] = key;
      }
    }
  }
}

// The opt-in family's scan kernel (knn_scan.cuh, scan_kernel with kOptIns: thresholds shared
// where a.best_kth is set, scores compared as floats first; not cut-backs by warps) on the
// pipelined tile, or another tile of its contract (issue_split_start, compute, Shared with
// query_norms and database_norms: ResidentQueriesTile, knn_resident_tile.cuh). grid (query
// tiles, database splits), like scan_kernel's; the dimension at least 1, rows 16-byte aligned
// (the launch's checks).
template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, class Tile = PipelinedDeepTile<kPrecision>>
__global__ void __launch_bounds__(kScanThreads, 2) pipelined_scan_kernel(ScanArgs a) {
  __shared__ ScanShared<Tile> s;
  auto& staging = staging_of(s);
  const int64_t q0 = int64_t{blockIdx.x} * Tile::kQueries;
  const int split = blockIdx.y;
  const int64_t n_begin = split * a.split_length;
  const int64_t n_end = min(a.num_database, n_begin + a.split_length);
  auto list_of = [&](int qi) { return a.candidates + ((q0 + qi) * a.splits + split) * int64_t{a.capacity}; };
  auto bounds_at = [&](int64_t n0) {
    return TileBounds{a.queries, a.database, q0, a.num_queries, n0, n_end, a.dim, a.weights};
  };
  const auto thresholds = thresholds_of<true>(a, q0);
  const int real_queries = static_cast<int>(min(int64_t{Tile::kQueries}, a.num_queries - q0));
  // (in flight while the lists start; an empty split issues nothing, so nothing is ever left
  // in flight when the block ends)
  if (n_begin < n_end) {
    Tile::template issue_split_start<kMetric, kStorage>(bounds_at(n_begin), a.query_norms, a.database_norms, staging);
  }
  start_lists(s, Tile::kQueries);

  int stage = 0, parity = 0;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += Tile::kVectors, parity ^= 1) {
    thresholds.tighten(s, real_queries);
    float acc[Tile::kRows][Tile::kCols];
    Tile::template compute<kMetric, kStorage>(bounds_at(n0), a.database_norms, staging, stage, parity, acc);
    offer_tile_scores<kMetric, Tile>(a, s, staging, acc, parity, q0, n0, n_end, list_of);
    __syncthreads();
    cut_back_full_lists(s, list_of, Tile::kQueries, a.capacity, a.k, Tile::kVectors, thresholds);
  }
  finish_lists(s, list_of, Tile::kQueries, a, q0, split, thresholds);
}

}  // namespace latentspace::cuda
