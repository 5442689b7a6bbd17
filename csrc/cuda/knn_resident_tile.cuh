// The resident-queries tile: the pipelined deep tile (knn_pipelined_tile.cuh) for bf16 / fp16
// at a dimension of at most 128, with the block's 128 queries rounded once into shared memory
// for its whole split instead of copied and rounded again at every tile. Opt-in
// (LATENTSPACE_CUDA_TENSOR_TILE=resident; knn_scan_launch.cuh), in the opt-in family only,
// until a GPU run verifies and times it.
//
// Why. A block's queries never change along its split, yet DeepMmaTile copies them from global
// memory and rounds them at every step of every tile: half of a step's copies and roundings,
// and, for float32 queries beside a bf16-stored database, two thirds of the bytes the block
// reads from L2 (the big bf16 search: 64 KiB of queries a tile). As compiled for sm_90, a
// step's copies took about 96 of the pipelined loop's 220 instructions a warp and the
// roundings about 56 (ptxas -v and cuobjdump -sass, twenty-third session). Here a step copies
// and rounds the database's rows only, and the A fragments load (ldmatrix) from the resident
// queries at the step's dimension.
//
// Shared memory (dynamic): the resident queries, 128 rows of 136 elements (272 bytes: the 8
// row addresses of an ldmatrix fall on distinct banks and rows start 16-byte aligned), 34 KiB;
// the database's landing chunks (16 KiB, which also land the queries while they are loaded)
// and its double-buffered rounded rows (20 KiB), and the norms (1.5 KiB): 71.5 KiB, two blocks
// a multiprocessor as the deep tile's 72 KiB.
//
// Same rounding (MmaTraits::store4 of the same values), the same mma.sync shapes in the same
// order, zeros past the dimension: the deep tile's scores bit for bit, and the pipelined
// kernel's epilogue (tests/gpu/test_knn_pipelined_tile.py). Where it does not apply (tf32,
// whose resident float32 queries would not leave room for two blocks; a dimension above 128)
// the setting takes the pipelined tile.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/knn_deep_tile.cuh"
#include "cuda/knn_pipelined_tile.cuh"
#include "cuda/knn_scan.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"
#include "cuda/storage_load.cuh"

namespace latentspace::cuda {

template <KnnPrecision kPrecision>
struct ResidentQueriesTile : DeepMmaTile<kPrecision> {
  using Deep = DeepMmaTile<kPrecision>;
  using Stored = typename Deep::Stored;
  using Traits = typename Deep::Traits;
  using Deep::kDepth, Deep::kQueries, Deep::kVectors, Deep::kRows, Deep::kCols;
  using Deep::kWarpQueries, Deep::kWarpVectors;
  static_assert(Deep::kHalf, "bf16 / fp16 only: tf32's resident queries would take 66 KiB");
  static constexpr const char* kName = "resident";  // (_native._cuda_last_scan)
  static constexpr int kMaxDim = 128;
  static constexpr int kResidentStride = kMaxDim + 8;
  static_assert(kResidentStride * sizeof(Stored) % 16 == 0 && kResidentStride * sizeof(Stored) / 16 % 2 == 1,
                "resident rows: 16-byte aligned, an odd number of 16-byte units (ldmatrix without conflicts)");

  template <KnnStorage kStorage>
  using Copies = typename Deep::template Copies<kStorage>;

  struct Shared {
    // A step's chunks as stored, chunk c at [16 c bytes], read back only by the thread that
    // copied it: the database's float32 (or other 16-bit) rows, and the queries while the
    // split starts.
    alignas(16) float landing[kVectors * kDepth];
    alignas(16) Stored queries[kQueries][kResidentStride];         // rounded, zero past the dimension
    alignas(16) Stored database[2][kVectors][Deep::kStride];       // rounded, double-buffered
    float query_norms[kQueries];
    float database_norms[2][kVectors];
  };

  // This thread's copies of the database rows of the step at d0 (DeepMmaTile's, into the
  // landing chunks or, direct, into the rounded rows `stage`), committed.
  template <KnnStorage kStorage>
  __device__ static void issue_database_step(const TileBounds& t, const Copies<kStorage>& copies, Shared& s, int stage,
                                             int64_t d0, int thread) {
    Deep::template issue_database_chunks<kStorage>(t, copies, s.landing, s.database[stage], d0, thread);
    commit_copies();
  }

  // The block's queries, every step of the dimension, copied into the landing chunks and
  // rounded into the resident rows by the thread that copied them (zero past the rows and the
  // dimension), then one barrier. All threads call it, with no copies in flight; it leaves none.
  __device__ static void load_queries(const TileBounds& t, Shared& s, int thread) {
    const Copies<KnnStorage::kFloat32> copies(t, thread);  // (its query chunks: the same for every storage)
    for (int64_t d0 = 0; d0 < t.dim; d0 += kDepth) {
      // The last step's reads of the landing chunks done before these copies overwrite them:
      // they are this thread's own, but the PTX memory model does not order a cp.async after
      // the same thread's earlier shared loads (the deep tile's steps have a barrier there too).
      if (d0 > 0) __syncthreads();
      Deep::template issue_query_chunks<KnnStorage::kFloat32>(t, copies, s.landing, d0, thread);
      commit_copies();
      wait_copies();
      Deep::round_query_chunks(s.landing, s.queries, static_cast<int>(d0), thread);
    }
    __syncthreads();  // every thread's rounded queries visible; the landing chunks free again
  }

  // A tile's first step and its database norms (parity: the tile's), one group of copies.
  template <Metric kMetric, KnnStorage kStorage>
  __device__ static void issue_first_step(const TileBounds& t, const float* database_norms, Shared& s, int stage,
                                          int parity, int thread) {
    issue_norms<kMetric>(database_norms, t.n0, t.n_end, s.database_norms[parity], thread);
    const Copies<kStorage> copies(t, thread);
    issue_database_step<kStorage>(t, copies, s, stage, 0, thread);  // (commits the group)
  }

  // The split's start: the block's queries loaded (load_queries), then the first tile's first
  // step (rounded buffer 0, norm buffer 0) and the block's query norms in flight. All threads
  // call it, before the split's first tile.
  template <Metric kMetric, KnnStorage kStorage>
  __device__ static void issue_split_start(const TileBounds& first, const float* query_norms,
                                           const float* database_norms, Shared& s) {
    const int thread = threadIdx.x;
    load_queries(first, s, thread);
    issue_norms<kMetric>(query_norms, first.q0, first.num_queries, s.query_norms, thread);
    issue_first_step<kMetric, kStorage>(first, database_norms, s, 0, 0, thread);
  }

  // DeepMmaTile::multiply_step with the A fragments from the resident queries at dimension
  // `column` (the step's d0 + k0); the B fragments from the rounded rows `stage` at k0.
  __device__ static void multiply_step(const Shared& s, int stage, int column, int k0, int warp_query,
                                       int warp_vector, float acc[kRows][kCols], int thread) {
    const int lane = thread % 32;
    uint32_t b[Deep::kBlocksN][2];
    const int row = deep_tile_layout::b_row(lane), b_column = k0 + deep_tile_layout::b_column(lane);
#pragma unroll
    for (int p = 0; p < Deep::kBlocksN / 2; ++p) {
      uint32_t r[4];
      load_matrices_x4(r, &s.database[stage][warp_vector + p * 16 + row][b_column]);
      b[2 * p][0] = r[0], b[2 * p][1] = r[1], b[2 * p + 1][0] = r[2], b[2 * p + 1][1] = r[3];
    }
#pragma unroll
    for (int m = 0; m < Deep::kBlocksM; ++m) {
      uint32_t a[4];
      load_matrices_x4(a, &s.queries[warp_query + m * 16 + deep_tile_layout::a_row(lane)]
                                    [column + deep_tile_layout::a_column(lane)]);
      mma_query_block<Traits>(acc, m, a, b);
    }
  }

  // PipelinedDeepTile::compute with the database's steps only: the tile's first step already
  // in flight, the next tile's issued after the last step's barrier.
  template <Metric kMetric, KnnStorage kStorage>
  __device__ static void compute(const TileBounds& t, const float* database_norms, Shared& s, int& stage, int parity,
                                 float acc[kRows][kCols]) {
    const int thread = Deep::opaque_thread();
    const int warp = thread / 32;
    const int warp_query = (warp / 4) * kWarpQueries, warp_vector = (warp % 4) * kWarpVectors;
    zero_scores<kRows, kCols>(acc);
    const Copies<kStorage> copies(t, thread);
    for (int64_t d0 = 0; d0 < t.dim; d0 += kDepth) {
      wait_copies();
      Deep::template round_database_chunks<kStorage>(s.landing, s.database[stage], thread);
      __syncthreads();
      if (d0 + kDepth < t.dim) {
        issue_database_step<kStorage>(t, copies, s, stage ^ 1, d0 + kDepth, thread);
      } else if (t.n0 + kVectors < t.n_end) {
        TileBounds next = t;
        next.n0 += kVectors;
        issue_first_step<kMetric, kStorage>(next, database_norms, s, stage ^ 1, parity ^ 1, thread);
      }
#pragma unroll
      for (int k0 = 0; k0 < kDepth; k0 += Traits::kStepDepth) {
        multiply_step(s, stage, static_cast<int>(d0) + k0, k0, warp_query, warp_vector, acc, thread);
      }
      stage ^= 1;
    }
  }
};

template <KnnPrecision kPrecision>
struct StagingIsDynamic<ResidentQueriesTile<kPrecision>> : std::true_type {};

static_assert(sizeof(ResidentQueriesTile<KnnPrecision::kBf16>::Shared) == 16384 + 34816 + 20480 + 512 + 1024,
              "landing 16 KiB, resident queries 128 x 272 bytes, rounded rows 2 x 128 x 80 bytes, norms");

}  // namespace latentspace::cuda
