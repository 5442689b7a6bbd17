// The dot products of one 64-query x 64-vector tile of the CUDA kNN scan, in each precision:
//   float32  exact: CUDA-core FMA, 4 x 4 scores per thread in registers
//   tf32, bf16, fp16  tensor cores (WMMA 16 x 16 fragments, float32 accumulation); the
//            inputs are rounded to the precision while they are staged in shared memory, and
//            the scores land in a shared-memory tile
// Both read the same float32 inputs and zero-fill rows and dimensions past the ends.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "ops/knn.h"

namespace latentspace::cuda {

constexpr int kTileThreads = 256;  // 16 x 16 threads (SIMT), 8 warps (WMMA)
constexpr int kQueryTile = 64;
constexpr int kDatabaseTile = 64;
constexpr int kDepthChunk = 32;  // dimensions staged in shared memory at a time
static_assert(kQueryTile == kDatabaseTile, "the staging loops fill both tiles with one index");

// One database element widened to float32, for each storage type.
template <KnnStorage kStorage>
__device__ inline float load_element(const void* base, int64_t i) {
  if constexpr (kStorage == KnnStorage::kFloat16) {
    return __half2float(static_cast<const __half*>(base)[i]);
  } else if constexpr (kStorage == KnnStorage::kBfloat16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  } else {
    return static_cast<const float*>(base)[i];
  }
}

// Where a tile starts and how much of it is real.
struct TileBounds {
  const float* queries;
  const void* database;  // elements of the scan's storage type
  int64_t q0, num_queries;  // query rows [q0, num_queries) exist
  int64_t n0, n_end;        // database rows [n0, n_end) belong to this block
  int64_t dim;
  const float* weights;  // nullable: query values are multiplied by weights[d] when staged
};

__device__ inline float staged_query(const TileBounds& t, int64_t q, int64_t d) {
  if (q >= t.num_queries || d >= t.dim) return 0.0f;
  const float value = t.queries[q * t.dim + d];
  return t.weights ? value * t.weights[d] : value;
}

// ---- float32 on CUDA cores ----------------------------------------------------------------

struct SimtStaging {
  float queries[kDepthChunk][kQueryTile + 1];  // transposed; +1: the stores hit distinct banks
  float database[kDepthChunk][kDatabaseTile + 1];
};

template <KnnStorage kStorage>
__device__ inline float staged_database(const TileBounds& t, int64_t n, int64_t d) {
  return n < t.n_end && d < t.dim ? load_element<kStorage>(t.database, n * t.dim + d) : 0.0f;
}

// acc[i][j] = dot(query q0 + 4 ty + i, vector n0 + 4 tx + j), with tx, ty = thread % 16, / 16.
template <KnnStorage kStorage>
__device__ inline void simt_tile(const TileBounds& t, SimtStaging& s, float acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  for (int64_t d0 = 0; d0 < t.dim; d0 += kDepthChunk) {
    for (int e = threadIdx.x; e < kQueryTile * kDepthChunk; e += kTileThreads) {
      const int row = e / kDepthChunk, col = e % kDepthChunk;  // a warp reads one row: coalesced
      const int64_t q = t.q0 + row, n = t.n0 + row, d = d0 + col;
      s.queries[col][row] = staged_query(t, q, d);
      s.database[col][row] = staged_database<kStorage>(t, n, d);
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kDepthChunk; ++c) {
      float qv[4], xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = s.queries[c][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) xv[j] = s.database[c][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(qv[i], xv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
}

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

// Row strides padded by 8 elements: fragment loads need 32-byte aligned starts (16 rows x
// stride and the depth offsets are multiples of 32 bytes) and the padding spreads banks.
constexpr int kStagedStride = kDepthChunk + 8;
constexpr int kScoreStride = kDatabaseTile + 4;

template <KnnPrecision kPrecision>
struct WmmaStaging {
  using Stored = typename WmmaTraits<kPrecision>::Stored;
  alignas(32) Stored queries[kQueryTile][kStagedStride];    // row-major A: query x depth
  alignas(32) Stored database[kDatabaseTile][kStagedStride];  // column-major B: depth x vector
  alignas(32) float scores[kQueryTile][kScoreStride];
};

// scores[i][j] = dot(query q0 + i, vector n0 + j) with rounded inputs, float32 sums. Warp w
// owns the fragments in row w / 2, columns 2 (w % 2) and 2 (w % 2) + 1 of the 4 x 4 grid.
template <KnnPrecision kPrecision, KnnStorage kStorage>
__device__ inline void wmma_tile(const TileBounds& t, WmmaStaging<kPrecision>& s) {
  namespace wmma = nvcuda::wmma;
  using Traits = WmmaTraits<kPrecision>;
  constexpr int kDepth = Traits::kDepth;
  const int warp = threadIdx.x / 32;
  const int fragment_row = warp / 2, fragment_column = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, kDepth, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int64_t d0 = 0; d0 < t.dim; d0 += kDepthChunk) {
    for (int e = threadIdx.x; e < kQueryTile * kDepthChunk; e += kTileThreads) {
      const int row = e / kDepthChunk, col = e % kDepthChunk;
      const int64_t q = t.q0 + row, n = t.n0 + row, d = d0 + col;
      s.queries[row][col] = Traits::convert(staged_query(t, q, d));
      s.database[row][col] = Traits::convert(staged_database<kStorage>(t, n, d));
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
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    wmma::store_matrix_sync(&s.scores[fragment_row * 16][(fragment_column + f) * 16], acc[f], kScoreStride,
                            wmma::mem_row_major);
  }
  __syncthreads();
}

}  // namespace latentspace::cuda
