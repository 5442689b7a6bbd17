// The dot products of one score tile of the CUDA kNN scan (knn_scan.cuh), in each precision.
// A tile is a policy with the same shape in every precision:
//   kQueries x kVectors   the tile (queries of the block x database rows of one step)
//   kRows x kCols         the scores each thread ends with, in acc[kRows][kCols]
//   query_of(i), vector_of(j)  which tile row / column the thread's acc[i][j] belongs to
//   Shared                its shared memory
//   compute<kStorage, kAligned>(bounds, shared, acc)
// The CUDA encoder's layers (cuda/encode.cu) use the same tiles: inputs as the queries, the
// layer's weights (outputs x inputs) as the database.
// Policies:
//   SimtTile      float32, exact: CUDA-core FMA, 128 x 128, 8 x 8 scores per thread in
//                 registers, staged through double-buffered shared memory 16 dimensions at a
//                 time, the next step's global loads in flight during the current step's FMAs
//   WmmaTile<P>   tf32 / bf16 / fp16 on tensor cores (WMMA 16 x 16 fragments, float32
//                 accumulation), 64 x 64; the inputs are rounded while they are staged, the
//                 scores land in a shared tile that each thread reads 4 x 4 of
// kAligned: the dimension is a multiple of 4 and both bases are 16-byte aligned (8 for half
// storage), so 4 consecutive elements load at once; otherwise element by element.
// Rows and dimensions past the ends read as zeros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "cuda/storage_load.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

constexpr int kTileThreads = 256;  // 16 x 16 threads (SIMT), 8 warps (WMMA)

// Elements d .. d + 3 of row `row` (zeros past the dimension, or for a row that does not exist).
template <KnnStorage kStorage, bool kAligned>
__device__ inline float4 load_quad(const void* base, int64_t row, bool row_exists, int64_t d, int64_t dim) {
  float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (!row_exists) return v;
  const int64_t at = row * dim + d;
  if constexpr (kAligned) {
    if (d < dim) v = load_four<kStorage>(base, at);  // dim % 4 == 0: the whole quad exists
  } else {
    if (d < dim) v.x = load_element<kStorage>(base, at);
    if (d + 1 < dim) v.y = load_element<kStorage>(base, at + 1);
    if (d + 2 < dim) v.z = load_element<kStorage>(base, at + 2);
    if (d + 3 < dim) v.w = load_element<kStorage>(base, at + 3);
  }
  return v;
}

// Where a tile starts and how much of it is real.
struct TileBounds {
  const float* queries;
  const void* database;  // elements of the scan's storage type
  int64_t q0, num_queries;  // query rows [q0, num_queries) exist
  int64_t n0, n_end;        // database rows [n0, n_end) belong to this block
  int64_t dim;
  const float* weights;  // nullable: query values are multiplied by weights[d] when staged
  // nullable: offset[d] is subtracted from query values when staged, before the weights (the
  // CUDA encoder's PCA mean, cuda/encode.cu: x - mean is formed before the products).
  const float* offset = nullptr;
  // nullable: set to 1 when a staged query value (minus the offset) is NaN or Inf, so that the
  // CUDA encoder checks its inputs in the pass that reads them (nothing more is read).
  uint32_t* nonfinite = nullptr;
};

// Queries d .. d + 3 of query row q as staged: zeros outside, minus the offset and times the
// weights when given. (Past the dimension the offset reads as 0 too; rows past the end may
// stage -offset, and their scores are never used.)
template <bool kAligned>
__device__ inline float4 staged_query_quad(const TileBounds& t, int64_t q, int64_t d) {
  float4 v = load_quad<KnnStorage::kFloat32, kAligned>(t.queries, q, q < t.num_queries, d, t.dim);
  if (t.offset) {
    const float4 m = load_quad<KnnStorage::kFloat32, kAligned>(t.offset, 0, true, d, t.dim);
    v.x -= m.x, v.y -= m.y, v.z -= m.z, v.w -= m.w;
  }
  if (t.nonfinite != nullptr && !(isfinite(v.x) && isfinite(v.y) && isfinite(v.z) && isfinite(v.w))) {
    atomicOr(t.nonfinite, 1u);  // (only ever for bad rows: no contention in the common case)
  }
  if (t.weights) {
    const float4 w = load_quad<KnnStorage::kFloat32, kAligned>(t.weights, 0, true, d, t.dim);
    v.x *= w.x, v.y *= w.y, v.z *= w.z, v.w *= w.w;
  }
  return v;
}

// One staging step's global loads for a 128-row tile pipeline (SimtTile, MmaTile): this
// thread's quad h is tile row e / 4 (e = thread + h * kTileThreads), dimensions d0 + 4 (e % 4)
// .. + 3 (four threads read one row's 16 consecutive dimensions), for queries and database.
template <int kQuads, KnnStorage kStorage, bool kAligned>
__device__ inline void fetch_step(const TileBounds& t, int64_t d0, float4 (&queries)[kQuads],
                                  float4 (&database)[kQuads]) {
#pragma unroll
  for (int h = 0; h < kQuads; ++h) {
    const int e = threadIdx.x + h * kTileThreads, row = e / 4;
    const int64_t d = d0 + (e % 4) * 4;
    queries[h] = staged_query_quad<kAligned>(t, t.q0 + row, d);
    const int64_t n = t.n0 + row;
    database[h] = load_quad<kStorage, kAligned>(t.database, n, n < t.n_end, d, t.dim);
  }
}

// The double-buffered staging pipeline of the 128-row tiles (SimtTile, MmaTile): step 0 is
// loaded and stashed; then for each step of kDepth dimensions the next step's global loads are
// issued, multiply(buffer) works on the current buffer while they are in flight, and they are
// stashed into the other buffer. stash(buffer, queries, database) writes one step's quads
// (fetch_step's layout) into shared memory.
template <int kQuads, int kDepth, KnnStorage kStorage, bool kAligned, class Stash, class Multiply>
__device__ inline void run_staged_steps(const TileBounds& t, Stash stash, Multiply multiply) {
  float4 next_queries[kQuads], next_database[kQuads];
  fetch_step<kQuads, kStorage, kAligned>(t, 0, next_queries, next_database);
  stash(0, next_queries, next_database);
  __syncthreads();
  int buffer = 0;
  for (int64_t d0 = 0; d0 < t.dim; d0 += kDepth) {
    const bool more = d0 + kDepth < t.dim;
    if (more) fetch_step<kQuads, kStorage, kAligned>(t, d0 + kDepth, next_queries, next_database);
    multiply(buffer);
    // The other buffer was last read in the previous step, which every thread finished
    // before the barrier that ended it: writing it now races with nothing.
    if (more) stash(buffer ^ 1, next_queries, next_database);
    __syncthreads();
    buffer ^= 1;
  }
}

template <int kRows, int kCols>
__device__ inline void zero_scores(float (*acc)[kCols]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[i][j] = 0.0f;
  }
}

// ---- float32 on CUDA cores ----------------------------------------------------------------

struct SimtTile {
  static constexpr int kQueries = 128, kVectors = 128;
  static constexpr int kRows = 8, kCols = 8;
  static constexpr int kDepth = 16;             // dimensions staged per step
  static constexpr int kStride = kQueries + 4;  // row starts stay 16-byte aligned
  // Each step stages kQueries x kDepth query values and as many database values, as quads
  // of 4 dimensions: kQuadsPerThread of each per thread.
  static constexpr int kQuadsPerThread = kQueries * kDepth / 4 / kTileThreads;
  static_assert(kQueries == kVectors && kQuadsPerThread * kTileThreads * 4 == kQueries * kDepth);

  struct Shared {
    alignas(16) float queries[2][kDepth][kStride];  // transposed: [dimension][query]
    alignas(16) float database[2][kDepth][kStride];
  };

  // Thread (tx, ty) = (thread % 16, thread / 16) owns queries 4 ty + {0..3} and 64 + 4 ty +
  // {0..3}, vectors likewise with tx: its shared reads are float4s, conflict-free in a warp.
  __device__ static int query_of(int i) { return (i / 4) * 64 + (threadIdx.x / 16) * 4 + i % 4; }
  __device__ static int vector_of(int j) { return (j / 4) * 64 + (threadIdx.x % 16) * 4 + j % 4; }

  template <KnnStorage kStorage, bool kAligned>
  __device__ static void compute(const TileBounds& t, Shared& s, float acc[kRows][kCols]) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    zero_scores<kRows, kCols>(acc);
    // Transposed into shared memory ([dimension][row]): each thread's reads are float4s.
    auto stash = [&](int buffer, const float4 (&queries)[kQuadsPerThread], const float4 (&database)[kQuadsPerThread]) {
#pragma unroll
      for (int h = 0; h < kQuadsPerThread; ++h) {
        const int e = threadIdx.x + h * kTileThreads, row = e / 4, c = (e % 4) * 4;
        s.queries[buffer][c][row] = queries[h].x;
        s.queries[buffer][c + 1][row] = queries[h].y;
        s.queries[buffer][c + 2][row] = queries[h].z;
        s.queries[buffer][c + 3][row] = queries[h].w;
        s.database[buffer][c][row] = database[h].x;
        s.database[buffer][c + 1][row] = database[h].y;
        s.database[buffer][c + 2][row] = database[h].z;
        s.database[buffer][c + 3][row] = database[h].w;
      }
    };
    auto multiply = [&](int buffer) {
#pragma unroll
      for (int c = 0; c < kDepth; ++c) {
        const float4 q_lo = *reinterpret_cast<const float4*>(&s.queries[buffer][c][ty * 4]);
        const float4 q_hi = *reinterpret_cast<const float4*>(&s.queries[buffer][c][64 + ty * 4]);
        const float4 x_lo = *reinterpret_cast<const float4*>(&s.database[buffer][c][tx * 4]);
        const float4 x_hi = *reinterpret_cast<const float4*>(&s.database[buffer][c][64 + tx * 4]);
        const float q[kRows] = {q_lo.x, q_lo.y, q_lo.z, q_lo.w, q_hi.x, q_hi.y, q_hi.z, q_hi.w};
        const float x[kCols] = {x_lo.x, x_lo.y, x_lo.z, x_lo.w, x_hi.x, x_hi.y, x_hi.z, x_hi.w};
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
#pragma unroll
          for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(q[i], x[j], acc[i][j]);
        }
      }
    };
    run_staged_steps<kQuadsPerThread, kDepth, kStorage, kAligned>(t, stash, multiply);
  }
};

// ---- tensor cores (WMMA) ------------------------------------------------------------------

// Per precision: the staged element type, the fragment depth, and the WMMA element type.
template <KnnPrecision kPrecision>
struct WmmaTraits;
template <>
struct WmmaTraits<KnnPrecision::kTf32> {
  using Stored = float;
  using Fragment = nvcuda::wmma::precision::tf32;
  static constexpr int kDepth = 8;
  __device__ static Stored convert(float x) { return nvcuda::wmma::__float_to_tf32(x); }
};
template <>
struct WmmaTraits<KnnPrecision::kBf16> {
  using Stored = __nv_bfloat16;
  using Fragment = __nv_bfloat16;
  static constexpr int kDepth = 16;
  __device__ static Stored convert(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct WmmaTraits<KnnPrecision::kFp16> {
  using Stored = __half;
  using Fragment = __half;
  static constexpr int kDepth = 16;
  __device__ static Stored convert(float x) { return __float2half_rn(x); }
};

template <KnnPrecision kPrecision>
struct WmmaTile {
  static constexpr int kQueries = 64, kVectors = 64;
  static constexpr int kRows = 4, kCols = 4;
  static constexpr int kDepthChunk = 32;  // dimensions staged in shared memory at a time
  // Row strides padded by 8 elements: fragment loads need 32-byte aligned starts (16 rows x
  // stride and the depth offsets are multiples of 32 bytes) and the padding spreads banks.
  static constexpr int kStagedStride = kDepthChunk + 8;
  static constexpr int kScoreStride = kVectors + 4;
  using Traits = WmmaTraits<kPrecision>;
  using Stored = typename Traits::Stored;

  struct Shared {
    alignas(32) Stored queries[kQueries][kStagedStride];    // row-major A: query x depth
    alignas(32) Stored database[kVectors][kStagedStride];   // column-major B: depth x vector
    alignas(32) float scores[kQueries][kScoreStride];
  };

  __device__ static int query_of(int i) { return (threadIdx.x / 16) * 4 + i; }
  __device__ static int vector_of(int j) { return (threadIdx.x % 16) * 4 + j; }

  // scores[i][j] = dot(query q0 + i, vector n0 + j) with rounded inputs, float32 sums. Warp w
  // owns the fragments in row w / 2, columns 2 (w % 2) and 2 (w % 2) + 1 of the 4 x 4 grid.
  template <KnnStorage kStorage, bool kAligned>
  __device__ static void compute(const TileBounds& t, Shared& s, float acc[kRows][kCols]) {
    namespace wmma = nvcuda::wmma;
    constexpr int kDepth = Traits::kDepth;
    const int warp = threadIdx.x / 32;
    const int fragment_row = warp / 2, fragment_column = (warp % 2) * 2;
    wmma::fragment<wmma::accumulator, 16, 16, kDepth, float> sums[2];
    wmma::fill_fragment(sums[0], 0.0f);
    wmma::fill_fragment(sums[1], 0.0f);
    for (int64_t d0 = 0; d0 < t.dim; d0 += kDepthChunk) {
      // kQueries x kDepthChunk values of each side as quads: 2 per thread.
      for (int e = threadIdx.x; e < kQueries * kDepthChunk / 4; e += kTileThreads) {
        const int row = e / (kDepthChunk / 4), col = (e % (kDepthChunk / 4)) * 4;
        const int64_t n = t.n0 + row, d = d0 + col;
        const float4 q = staged_query_quad<kAligned>(t, t.q0 + row, d);
        const float4 x = load_quad<kStorage, kAligned>(t.database, n, n < t.n_end, d, t.dim);
        s.queries[row][col] = Traits::convert(q.x);
        s.queries[row][col + 1] = Traits::convert(q.y);
        s.queries[row][col + 2] = Traits::convert(q.z);
        s.queries[row][col + 3] = Traits::convert(q.w);
        s.database[row][col] = Traits::convert(x.x);
        s.database[row][col + 1] = Traits::convert(x.y);
        s.database[row][col + 2] = Traits::convert(x.z);
        s.database[row][col + 3] = Traits::convert(x.w);
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kDepthChunk; c += kDepth) {
        wmma::fragment<wmma::matrix_a, 16, 16, kDepth, typename Traits::Fragment, wmma::row_major> a;
        wmma::load_matrix_sync(a, &s.queries[fragment_row * 16][c], kStagedStride);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, kDepth, typename Traits::Fragment, wmma::col_major> b;
          wmma::load_matrix_sync(b, &s.database[(fragment_column + f) * 16][c], kStagedStride);
          wmma::mma_sync(sums[f], a, b, sums[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      wmma::store_matrix_sync(&s.scores[fragment_row * 16][(fragment_column + f) * 16], sums[f], kScoreStride,
                              wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = s.scores[query_of(i)][vector_of(j)];
    }
  }
};

// The tile of each precision.
template <KnnPrecision kPrecision>
struct TileFor {
  using type = WmmaTile<kPrecision>;
};
template <>
struct TileFor<KnnPrecision::kFloat32> {
  using type = SimtTile;
};

// Database rows a plan's split length is a multiple of: every tile's kVectors divides it.
constexpr int kPlanRows = 128;
static_assert(kPlanRows % SimtTile::kVectors == 0 && kPlanRows % WmmaTile<KnnPrecision::kBf16>::kVectors == 0);

}  // namespace latentspace::cuda
