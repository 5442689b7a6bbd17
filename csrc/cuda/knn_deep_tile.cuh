// DeepMmaTile: a tensor-core score tile of the CUDA kNN scan (knn_scan.cuh) whose inputs reach
// shared memory by cp.async, as they are stored, and are rounded to the precision there, once
// per block. The default tensor-core tile since GPU run 12 verified and timed it (H200: every
// test passed, memcheck clean; 1.06-1.75x MmaTile in the 8 cells timed, docs/gpu-runs.md),
// where it applies (knn_scan_launch.cuh; LATENTSPACE_CUDA_TENSOR_TILE=mma asks for MmaTile).
//
// Why. MmaTile (knn_mma_tile.cuh) stages through registers: each step's global loads land in
// registers, are rounded and stored to shared memory after the step's mma.sync. As compiled for
// sm_90 (ptxas -v and cuobjdump -sass, 2026-11-28), that loop is about 240 instructions a warp
// for its 16 mma.sync per step (24 shared loads for the fragments; per global load a row and a
// dimension bound, each a branch, and registers zeroed ahead of it), and the kernel is at its
// 128-register bound with 120 bytes spilled; a 32-dimension step of the same design spilled
// 900 bytes. At 4 warp instructions a cycle per multiprocessor, 15 instructions per mma.sync
// keep the tensor cores under a third busy whatever the latencies, which fits GPU run 10: bf16
// at 11x the tensor-core GEMM time, and 20x at faiss #3045's depth of 2048, where the epilogue
// is negligible (docs/benchmarks.md). Here, per step of 32 dimensions:
//   - cp.async copies the step's rows from global to shared memory in 16-byte chunks, with no
//     registers held while they are in flight (zero-filled past the rows and the dimension);
//   - each thread rounds the chunks it copied itself (to nearest, as MmaTile rounds: the same
//     inputs, the same mma.sync shapes in the same order, so the same scores bit for bit) into
//     a double-buffered rounded tile, once per block instead of once per warp that reads it;
//     its own chunks need only its own wait, so a step has one barrier;
//   - the next step's copies are issued right after that barrier and fly during the step's
//     mma.sync;
//   - bf16 / fp16 fragments load with ldmatrix: per 16 dimensions one instruction per query
//     block's A fragment and one per two vector blocks' B fragments (6, where MmaTile issues
//     24 word loads); a database stored in the precision's own type is copied straight into
//     the rounded tile.
// The tile, warps and fragments are MmaTile's (128 x 128, 8 warps of 64 x 32, kRows x kCols
// scores per thread, the same query_of / vector_of), so the scan's epilogue is unchanged.
// Shared memory: 72 KiB (bf16 / fp16) or 104 KiB (tf32), more than static shared memory holds,
// so the scan takes it as dynamic shared memory (StagingIsDynamic; knn_scan_launch.cuh sets
// the kernel's limit and the largest carveout); two blocks a multiprocessor fit an H100's
// 228 KiB (an A100's 164 KiB holds two in bf16 / fp16, one in tf32).
//
// Where it applies (the launch checks; MmaTile otherwise): bf16 / fp16 / tf32, the dimension a
// multiple of 4 (8 for 16-bit storage) and below 2^24, with 16-byte aligned bases, no weights (weighted l2
// scales the queries while they are staged), a block's shared memory within what the device
// allows one block (tf32's passes the 99 KiB of sm_86 / sm_89 cards), and no offset or
// nonfinite flag in the bounds (the kNN's never have them; the CUDA encoder does not use this
// tile).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/knn_mma_tile.cuh"
#include "cuda/knn_scan.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

// ---- cp.async (sm_80 and later) -------------------------------------------------------------

// 16 bytes from global to shared memory, not through registers; when !exists nothing is read
// and the 16 bytes are zeroed (the source must still be a valid address: pass the base).
__device__ inline void copy_16_async(void* shared_destination, const void* global_source, bool exists) {
  const auto destination = static_cast<uint32_t>(__cvta_generic_to_shared(shared_destination));
  const int bytes = exists ? 16 : 0;
  // ("memory": no shared access of the compiler's is moved across it; the barriers and
  // wait_copies order the rest)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(global_source), "r"(bytes)
               : "memory");
}

// Closes this thread's copies issued since the last commit into one group.
__device__ inline void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until every group this thread committed has landed in shared memory (other threads'
// copies need a barrier after it).
__device__ inline void wait_copies() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8 x 8 matrices of 16-bit elements from shared memory into one warp's fragments
// (ldmatrix, sm_75 and later): lane l gives the address of row l % 8 of matrix l / 8 (16
// bytes, 16-byte aligned) and receives in r[i] the two elements of matrix i at row l / 4,
// columns 2 (l % 4) and the next one: with the row addresses of deep_tile_layout, the A and B
// fragment layouts of knn_mma_tile.cuh.
__device__ inline void load_matrices_x4(uint32_t (&r)[4], const void* row) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// Where DeepMmaTile's copies and fragment loads fall, as plain functions (host and device):
// tests/cuda_host/deep_tile_layout_check.cu checks them on the host, with ldmatrix emulated as
// the PTX ISA describes it, against the mma.sync fragment layouts of knn_mma_tile.cuh.
namespace deep_tile_layout {

constexpr int kDepth = 32;  // dimensions a step

// Chunk c of a side's copies in a step (16 bytes: 4 float32 or 8 16-bit elements): its row
// and first dimension within the step. Consecutive chunks run along a row, so the threads of a
// warp copy whole 128-byte (float32) or 64-byte rows.
// (Unsigned: a signed division costs a step several instructions more per chunk, sm_90 SASS.)
__host__ __device__ constexpr int chunk_row(unsigned c, unsigned per_chunk) {
  return static_cast<int>(c / (kDepth / per_chunk));
}
__host__ __device__ constexpr int chunk_column(unsigned c, unsigned per_chunk) {
  return static_cast<int>(c % (kDepth / per_chunk) * per_chunk);
}

// ldmatrix.x4's row addresses: lane l gives row l % 8 of matrix l / 8. For an A fragment (16
// rows of a query block from k0): rows 0-15 at k0 (matrices a0, a1), the same rows at k0 + 8
// (a2, a3). For the B fragments of two 8-vector blocks (from k0): vectors 0-7 at k0 and at
// k0 + 8 (b[2p][0], b[2p][1]), then vectors 8-15 likewise (b[2p + 1][0..1]).
__host__ __device__ constexpr int a_row(int lane) { return lane % 16; }
__host__ __device__ constexpr int a_column(int lane) { return (lane / 16) * 8; }
__host__ __device__ constexpr int b_row(int lane) { return (lane / 16) * 8 + lane % 8; }
__host__ __device__ constexpr int b_column(int lane) { return ((lane / 8) % 2) * 8; }

}  // namespace deep_tile_layout

// The staged element type of a storage.
template <KnnStorage kStorage>
using StoredElement = std::conditional_t<kStorage == KnnStorage::kFloat32, float,
                                         std::conditional_t<kStorage == KnnStorage::kFloat16, __half, __nv_bfloat16>>;

template <KnnPrecision kPrecision>
struct DeepMmaTile {
  using Base = MmaTile<kPrecision>;
  using Traits = MmaTraits<kPrecision>;
  using Stored = typename Traits::Stored;  // the precision's element: float (tf32), __half, __nv_bfloat16
  static constexpr int kQueries = Base::kQueries, kVectors = Base::kVectors;
  static constexpr int kWarpQueries = Base::kWarpQueries, kWarpVectors = Base::kWarpVectors;
  static constexpr int kBlocksM = Base::kBlocksM, kBlocksN = Base::kBlocksN;
  static constexpr int kRows = Base::kRows, kCols = Base::kCols;
  static constexpr int kDepth = deep_tile_layout::kDepth;  // dimensions per step
  static constexpr bool kHalf = sizeof(Stored) == 2;
  // Rounded rows: 16-bit rows of 40 elements (80 bytes: ldmatrix's 8 row addresses of one
  // matrix fall on distinct banks, and rows start 16-byte aligned); tf32 rows of 36 words (a
  // warp's word loads, row g and word t, fall on banks 4 g + t).
  static constexpr int kStride = kHalf ? kDepth + 8 : kDepth + 4;
  static_assert(kStride * sizeof(Stored) % 16 == 0, "rounded rows must start 16-byte aligned");
  static_assert(kDepth % Traits::kStepDepth == 0 && kBlocksN % 2 == 0);
  // One step's copies, as 16-byte chunks: 8 float32 chunks a row.
  static constexpr int kFloatChunksPerRow = kDepth / 4;
  static constexpr int kChunksPerThread = kQueries * kFloatChunksPerRow / kTileThreads;  // per side
  static_assert(kQueries == kVectors && kChunksPerThread * kTileThreads == kQueries * kFloatChunksPerRow);

  struct Shared {
    // Where each thread's copies land, as stored, chunk c at [16 c bytes]; read back only by
    // the thread that copied them (after its own wait, no barrier).
    alignas(16) float landing_queries[kQueries * kDepth];
    alignas(16) float landing_database[kVectors * kDepth];  // (16-bit rows use half of it)
    // The values rounded to the precision, double-buffered; the fragments read these.
    alignas(16) Stored queries[2][kQueries][kStride];   // row-major: [query][dimension]
    alignas(16) Stored database[2][kVectors][kStride];  // [vector][dimension]: B column-major
  };

  __device__ static int query_of(int i) { return Base::query_of(i); }
  __device__ static int vector_of(int j) { return Base::vector_of(j); }

  // This thread's index, hidden from the compiler at each tile: the tile's shared and global
  // addresses (all derived from it) are then worked out per tile instead of being hoisted out
  // of the scan's loop over tiles and kept live, spilled, through its epilogue.
  __device__ static int opaque_thread() {
    int thread = threadIdx.x;
    asm volatile("" : "+r"(thread));
    return thread;
  }

  // Whether the database's rows are copied straight into the rounded buffer: stored in the
  // precision's own 16-bit type, they need no rounding.
  template <KnnStorage kStorage>
  static constexpr bool kDirect = kHalf && std::is_same_v<StoredElement<kStorage>, Stored>;

  // This thread's copies in every step of a tile: chunk h of a side is c = thread + h *
  // kTileThreads. Queries and float32 rows: row c / 8, dimensions 4 (c % 8) + 0..3 of the
  // step, into the landing buffer. 16-bit rows: row c / 4, dimensions 8 (c % 4) + 0..7, into
  // the landing buffer, or straight into a rounded buffer (kDirect). Worked out once per tile,
  // so that a step's copies cost a pointer step and a select each (the addresses recomputed
  // per step in 64-bit arithmetic were 100 of a step's instructions in an earlier draft,
  // sm_90 SASS).
  template <KnnStorage kStorage>
  struct Copies {
    using Element = StoredElement<kStorage>;
    static constexpr int kPerChunk = 16 / sizeof(Element);
    static constexpr int kChunksPerRow = kDepth / kPerChunk;
    static constexpr int kDatabaseChunks = kVectors * kChunksPerRow / kTileThreads;
    const float* query;        // chunk 0's query row at the step's first dimension
    const Element* vector;     // chunk 0's database row likewise
    int query_step, vector_step;  // elements from chunk h to h + 1 (32 or 64 rows: dim < 2^24, the launch's check)
    unsigned query_rows = 0, vector_rows = 0;  // bit h: chunk h's row exists
    int query_column, vector_column;           // this thread's first dimension within a step

    __device__ Copies(const TileBounds& t, int thread) {
      using namespace deep_tile_layout;
      const int64_t q = t.q0 + chunk_row(thread, 4), n = t.n0 + chunk_row(thread, kPerChunk);
      query_column = chunk_column(thread, 4);
      vector_column = chunk_column(thread, kPerChunk);
      // (chunk h + 1 is kTileThreads chunks on: the same column, kTileThreads / chunks-a-row rows on)
      query_step = kTileThreads / kFloatChunksPerRow * static_cast<int>(t.dim);
      vector_step = kTileThreads / kChunksPerRow * static_cast<int>(t.dim);
      query = t.queries + q * t.dim + query_column;
      vector = static_cast<const Element*>(t.database) + n * t.dim + vector_column;
#pragma unroll
      for (int h = 0; h < kChunksPerThread; ++h) {
        if (q + h * (kTileThreads / kFloatChunksPerRow) < t.num_queries) query_rows |= 1u << h;
      }
#pragma unroll
      for (int h = 0; h < kDatabaseChunks; ++h) {
        if (n + h * (kTileThreads / kChunksPerRow) < t.n_end) vector_rows |= 1u << h;
      }
    }
  };

  // A step's rounded rows of one side (one stage of Shared::queries or ::database).
  using Rounded = Stored[kQueries][kStride];

  // This thread's copies of the database rows of the step at dimension d0, zero-filled past
  // the rows and the dimension (a multiple of a chunk: see the top), into `landing` (this
  // thread's chunks as stored, chunk c at [16 c bytes]) or, for a direct copy, into `rounded`.
  // Not committed. issue_step's second half; the resident-queries tile's steps
  // (knn_resident_tile.cuh).
  template <KnnStorage kStorage>
  __device__ static void issue_database_chunks(const TileBounds& t, const Copies<kStorage>& copies, void* landing,
                                               Rounded& rounded, int64_t d0, int thread) {
    using C = Copies<kStorage>;
    const bool vector_dims = d0 + copies.vector_column < t.dim;
    const typename C::Element* vector = copies.vector + d0;
#pragma unroll
    for (int h = 0; h < C::kDatabaseChunks; ++h, vector += copies.vector_step) {
      const bool exists = vector_dims && (copies.vector_rows >> h & 1u);
      const int c = thread + h * kTileThreads;
      void* destination;
      if constexpr (kDirect<kStorage>) {
        destination = &rounded[deep_tile_layout::chunk_row(c, C::kPerChunk)][copies.vector_column];
      } else {
        destination = static_cast<unsigned char*>(landing) + c * 16;
      }
      copy_16_async(destination, exists ? vector : t.database, exists);
    }
  }

  // This thread's copies of the query rows of the step at dimension d0, zero-filled past the
  // rows and the dimension, into `landing` (chunk c at [4 c floats]). Not committed.
  // issue_step's first half; the resident-queries tile's loading of its queries.
  template <KnnStorage kStorage>
  __device__ static void issue_query_chunks(const TileBounds& t, const Copies<kStorage>& copies, float* landing,
                                            int64_t d0, int thread) {
    const bool query_dims = d0 + copies.query_column < t.dim;
    const float* query = copies.query + d0;
#pragma unroll
    for (int h = 0; h < kChunksPerThread; ++h, query += copies.query_step) {
      const bool exists = query_dims && (copies.query_rows >> h & 1u);
      copy_16_async(&landing[(thread + h * kTileThreads) * 4], exists ? query : t.queries, exists);
    }
  }

  // This thread's copies of the step at dimension d0, zero-filled past the rows and the
  // dimension (a multiple of a chunk: see the top); `stage` is the rounded buffer a direct copy
  // goes to.
  template <KnnStorage kStorage>
  __device__ static void issue_step(const TileBounds& t, const Copies<kStorage>& copies, Shared& s, int stage,
                                    int64_t d0, int thread) {
    issue_query_chunks<kStorage>(t, copies, s.landing_queries, d0, thread);
    issue_database_chunks<kStorage>(t, copies, s.landing_database, s.database[stage], d0, thread);
    commit_copies();
  }

  // This thread's landed database chunks of one step (issue_database_chunks' `landing`),
  // rounded into `rounded` (to nearest, as MmaTile rounds while it stages: MmaTraits::store4);
  // nothing for a direct copy. Call after wait_copies. round_step's second half.
  template <KnnStorage kStorage>
  __device__ static void round_database_chunks(const void* landing, Rounded& rounded, int thread) {
    using Element = StoredElement<kStorage>;
    using deep_tile_layout::chunk_column, deep_tile_layout::chunk_row;
    if constexpr (std::is_same_v<Element, float>) {
#pragma unroll
      for (int h = 0; h < kChunksPerThread; ++h) {
        const int c = thread + h * kTileThreads, row = chunk_row(c, 4), column = chunk_column(c, 4);
        Traits::store4(&rounded[row][column], *reinterpret_cast<const float4*>(static_cast<const float*>(landing) + c * 4));
      }
    } else if constexpr (!kDirect<kStorage>) {
      // 16-bit rows of the other 16-bit type (or for tf32): 8 elements a chunk, widened and rounded.
#pragma unroll
      for (int h = 0; h < kVectors * (kDepth / 8) / kTileThreads; ++h) {
        const int c = thread + h * kTileThreads, row = chunk_row(c, 8), column = chunk_column(c, 8);
        const unsigned char* chunk = static_cast<const unsigned char*>(landing) + c * 16;
        Traits::store4(&rounded[row][column], load_four<kStorage>(chunk, 0));
        Traits::store4(&rounded[row][column + 4], load_four<kStorage>(chunk, 4));
      }
    }
  }

  // This thread's landed query chunks of one step (issue_query_chunks' `landing`), rounded into
  // `rows` (rows of 128 queries, any length) from column `first` on. Call after wait_copies.
  // round_step's first half; the resident-queries tile's loading of its queries.
  template <class Rows>
  __device__ static void round_query_chunks(const float* landing, Rows& rows, int first, int thread) {
    using deep_tile_layout::chunk_column, deep_tile_layout::chunk_row;
#pragma unroll
    for (int h = 0; h < kChunksPerThread; ++h) {
      const int c = thread + h * kTileThreads, row = chunk_row(c, 4), column = first + chunk_column(c, 4);
      Traits::store4(&rows[row][column], *reinterpret_cast<const float4*>(&landing[c * 4]));
    }
  }

  // This thread's landed chunks of one step, rounded into the rounded buffer `stage` (to
  // nearest, as MmaTile rounds while it stages: MmaTraits::store4). Call after wait_copies.
  template <KnnStorage kStorage>
  __device__ static void round_step(Shared& s, int stage, int thread) {
    round_query_chunks(s.landing_queries, s.queries[stage], 0, thread);
    round_database_chunks<kStorage>(s.landing_database, s.database[stage], thread);
  }

  // The fragments of one mma.sync depth step (k0) of the rounded buffer `stage`, and the warp's
  // 4 x 4 mma.sync on them.
  __device__ static void multiply_step(const Shared& s, int stage, int k0, int warp_query, int warp_vector,
                                       float acc[kRows][kCols], int thread) {
    const int lane = thread % 32;
    uint32_t b[kBlocksN][2];
    if constexpr (kHalf) {
      // ldmatrix (deep_tile_layout): b[2p][0..1], b[2p + 1][0..1] from one instruction.
      const int row = deep_tile_layout::b_row(lane), column = k0 + deep_tile_layout::b_column(lane);
#pragma unroll
      for (int p = 0; p < kBlocksN / 2; ++p) {
        uint32_t r[4];
        load_matrices_x4(r, &s.database[stage][warp_vector + p * 16 + row][column]);
        b[2 * p][0] = r[0], b[2 * p][1] = r[1], b[2 * p + 1][0] = r[2], b[2 * p + 1][1] = r[3];
      }
    } else {
      // tf32 B (8 x 8): register r is depth t + 4 r of vector g (knn_mma_tile.cuh).
      const int g = lane / 4, t = lane % 4;
#pragma unroll
      for (int n = 0; n < kBlocksN; ++n) {
        const Stored* vector = s.database[stage][warp_vector + n * 8 + g];
        b[n][0] = __float_as_uint(vector[k0 + t]);
        b[n][1] = __float_as_uint(vector[k0 + t + 4]);
      }
    }
#pragma unroll
    for (int m = 0; m < kBlocksM; ++m) {
      uint32_t a[4];
      if constexpr (kHalf) {
        // ldmatrix (deep_tile_layout): a[0..3] of the A layout from one instruction.
        load_matrices_x4(a, &s.queries[stage][warp_query + m * 16 + deep_tile_layout::a_row(lane)]
                                      [k0 + deep_tile_layout::a_column(lane)]);
      } else {
        // tf32 A (16 x 8): register r is row g + 8 (r % 2), depth t + 4 (r / 2).
        const int g = lane / 4, t = lane % 4;
        const Stored* top = s.queries[stage][warp_query + m * 16 + g];
        const Stored* bottom = s.queries[stage][warp_query + m * 16 + g + 8];
        a[0] = __float_as_uint(top[k0 + t]), a[1] = __float_as_uint(bottom[k0 + t]);
        a[2] = __float_as_uint(top[k0 + t + 4]), a[3] = __float_as_uint(bottom[k0 + t + 4]);
      }
      mma_query_block<Traits>(acc, m, a, b);
    }
  }

  // Per step: wait for this thread's copies, round them, one barrier (every thread's rounded
  // values visible; every warp done with the previous step), issue the next step's copies
  // (the landing chunks are this thread's own, already rounded; a direct copy goes to the
  // other rounded buffer, last read before that barrier), then the step's mma.sync while
  // they are in flight.
  template <KnnStorage kStorage, bool kAligned>
  __device__ static void compute(const TileBounds& t, Shared& s, float acc[kRows][kCols]) {
    static_assert(kAligned, "cp.async moves 16-byte chunks: the launch takes this tile for aligned rows only");
    const int thread = opaque_thread();
    const int warp = thread / 32;
    const int warp_query = (warp / 4) * kWarpQueries, warp_vector = (warp % 4) * kWarpVectors;
    zero_scores<kRows, kCols>(acc);
    // The previous tile's last step read a rounded buffer that the first step may overwrite
    // (a direct copy): the scan's epilogue has barriers in between, and so does this.
    __syncthreads();
    const Copies<kStorage> copies(t, thread);
    if (t.dim > 0) issue_step<kStorage>(t, copies, s, 0, 0, thread);  // (no copies left in flight past the tile)
    int stage = 0;
    for (int64_t d0 = 0; d0 < t.dim; d0 += kDepth) {
      wait_copies();
      round_step<kStorage>(s, stage, thread);
      __syncthreads();
      if (d0 + kDepth < t.dim) issue_step<kStorage>(t, copies, s, stage ^ 1, d0 + kDepth, thread);
#pragma unroll
      for (int k0 = 0; k0 < kDepth; k0 += Traits::kStepDepth) {
        multiply_step(s, stage, k0, warp_query, warp_vector, acc, thread);
      }
      stage ^= 1;
    }
  }
};

template <KnnPrecision kPrecision>
struct StagingIsDynamic<DeepMmaTile<kPrecision>> : std::true_type {};

static_assert(sizeof(DeepMmaTile<KnnPrecision::kBf16>::Shared) == 32768 + 40960,
              "landing: 2 sides x 128 rows x 32 float32; rounded: 2 buffers x 2 sides x 128 rows x 80 bytes");

}  // namespace latentspace::cuda
