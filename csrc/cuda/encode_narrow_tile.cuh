// A float32 tile for the CUDA encoder's narrow layers (cuda/encode.cu): 128 rows x 32 outputs.
//
// An encoder's last layer is usually narrow (a latent space of 2 to 32 dimensions; PCA is one
// such layer): on the kNN scan's 128 x 128 SimtTile (knn_tiles.cuh) a 16-wide layer would
// compute 8 times the products it keeps. This tile has the same shape as the scan's tiles
// (kQueries x kVectors, query_of / vector_of, compute<kStorage, kAligned>), so that
// linear_layer_kernel runs any of them. Layout:
//   - 256 threads; thread t owns rows 4 (t / 8) + {0..3} and outputs 4 (t % 8) + {0..3}: 4 x 4
//     sums in registers, its shared reads one float4 of inputs and one of weights per input
//     (16 FMAs for 2 loads; a warp reads 4 distinct input quads and 8 weight quads).
//   - Each step stages 16 inputs of the 128 rows (2 quads per thread) and of the 32 weight rows
//     (1 quad for threads 0..127), transposed into double-buffered shared memory; the next
//     step's global loads are in flight while the current step's FMAs run.
// Rows and inputs past the ends read as zeros, as in the scan's tiles.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/knn_tiles.cuh"

namespace latentspace::cuda {

struct NarrowSimtTile {
  static constexpr int kQueries = 128, kVectors = 32;
  static constexpr int kRows = 4, kCols = 4;
  static constexpr int kDepth = 16;
  static constexpr int kQueryQuads = kQueries * kDepth / 4 / kTileThreads;  // 2 per thread
  static constexpr int kWeightQuadThreads = kVectors * kDepth / 4;          // 128 threads load 1
  static_assert(kQueryQuads * kTileThreads * 4 == kQueries * kDepth && kWeightQuadThreads <= kTileThreads);
  static_assert((kQueries / kRows) * (kVectors / kCols) == kTileThreads);

  // Rows padded by 4 floats: the 4 threads that stash one row's 16 inputs (transposed) then
  // write two banks, not one (a 2-way conflict instead of 4-way), and row starts stay 16-byte
  // aligned for the float4 reads.
  struct Shared {
    alignas(16) float queries[2][kDepth][kQueries + 4];  // transposed: [input][row]
    alignas(16) float weights[2][kDepth][kVectors + 4];  // transposed: [input][output]
  };

  static constexpr int kColumnQuads = kVectors / kCols;  // threads side by side over the outputs
  __device__ static int query_of(int i) { return (threadIdx.x / kColumnQuads) * kRows + i; }
  __device__ static int vector_of(int j) { return (threadIdx.x % kColumnQuads) * kCols + j; }

  template <KnnStorage kStorage, bool kAligned>
  __device__ static void compute(const TileBounds& t, Shared& s, float acc[kRows][kCols]) {
    static_assert(kStorage == KnnStorage::kFloat32, "the encoder's weights are float32");
    zero_scores<kRows, kCols>(acc);
    float4 next_queries[kQueryQuads];
    float4 next_weights = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // Quad e of a side is row e / 4, inputs d0 + 4 (e % 4) .. + 3 (4 threads read one row's 16
    // consecutive inputs).
    const auto fetch = [&](int64_t d0) {
#pragma unroll
      for (int h = 0; h < kQueryQuads; ++h) {
        const int e = threadIdx.x + h * kTileThreads;
        next_queries[h] = staged_query_quad<kAligned>(t, t.q0 + e / 4, d0 + (e % 4) * 4);
      }
      if (threadIdx.x < kWeightQuadThreads) {
        const int64_t n = t.n0 + threadIdx.x / 4;
        next_weights = load_quad<kStorage, kAligned>(t.database, n, n < t.n_end, d0 + (threadIdx.x % 4) * 4, t.dim);
      }
    };
    const auto stash = [&](int buffer) {
#pragma unroll
      for (int h = 0; h < kQueryQuads; ++h) {
        const int e = threadIdx.x + h * kTileThreads, row = e / 4, c = (e % 4) * 4;
        s.queries[buffer][c][row] = next_queries[h].x;
        s.queries[buffer][c + 1][row] = next_queries[h].y;
        s.queries[buffer][c + 2][row] = next_queries[h].z;
        s.queries[buffer][c + 3][row] = next_queries[h].w;
      }
      if (threadIdx.x < kWeightQuadThreads) {
        const int column = threadIdx.x / 4, c = (threadIdx.x % 4) * 4;
        s.weights[buffer][c][column] = next_weights.x;
        s.weights[buffer][c + 1][column] = next_weights.y;
        s.weights[buffer][c + 2][column] = next_weights.z;
        s.weights[buffer][c + 3][column] = next_weights.w;
      }
    };
    const int row_quad = query_of(0), column_quad = vector_of(0);
    fetch(0);
    stash(0);
    __syncthreads();
    int buffer = 0;
    for (int64_t d0 = 0; d0 < t.dim; d0 += kDepth) {
      const bool more = d0 + kDepth < t.dim;
      if (more) fetch(d0 + kDepth);
#pragma unroll
      for (int c = 0; c < kDepth; ++c) {
        const float4 x = *reinterpret_cast<const float4*>(&s.queries[buffer][c][row_quad]);
        const float4 w = *reinterpret_cast<const float4*>(&s.weights[buffer][c][column_quad]);
        const float xs[kRows] = {x.x, x.y, x.z, x.w};
        const float ws[kCols] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
#pragma unroll
          for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(xs[i], ws[j], acc[i][j]);
        }
      }
      // The other buffer was last read in the previous step, which every thread finished
      // before the barrier that ended it: writing it now races with nothing.
      if (more) stash(buffer ^ 1);
      __syncthreads();
      buffer ^= 1;
    }
  }
};

}  // namespace latentspace::cuda
