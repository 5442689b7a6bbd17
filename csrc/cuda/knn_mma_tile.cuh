// MmaTile: the tensor-core score tile of the CUDA kNN scan (knn_scan.cuh) written with
// mma.sync instead of WMMA. Same policy interface as the tiles in knn_tiles.cuh (kQueries x
// kVectors, acc[kRows][kCols], query_of / vector_of, Shared, compute), same contract as
// WmmaTile: inputs rounded to the precision while they are staged (queries times the weights
// first), float32 sums.
//
// Why a second tensor-core tile: WmmaTile (64 x 64) loads each query row once per 64 database
// rows, stages one step at a time with the global loads exposed, and reads its scores back
// through shared memory; on an H100 it ran no faster in bf16 than the float32 CUDA-core tile
// (docs/benchmarks.md). MmaTile has SimtTile's shape and pipeline instead, so it reads half as
// much per score:
//   - 128 x 128 tile, 8 warps as 2 (queries) x 4 (vectors); each warp computes 64 x 32 scores
//     as 4 x 4 mma.sync fragments (m16n8k16 for bf16 / fp16, m16n8k8 for tf32);
//   - kDepth (16) dimensions staged per step, double-buffered: the next step's global loads are
//     in flight during the current step's mma.sync (run_staged_steps, shared with SimtTile);
//   - the scores stay in the fragment registers: acc[i][j] is an accumulator element, and
//     query_of / vector_of are the fragment layout of the PTX ISA ("Matrix Fragments for mma").
//
// Fragment layouts used (PTX ISA, warp-level mma): lane = 4 g + t (g = lane / 4, t = lane % 4).
//   A (16 x 16 bf16 / fp16, row-major): register r holds 2 elements of row g + 8 (r % 2), columns
//     2 t + 8 (r / 2) and the next one (low half first).
//   B (16 x 8, "col"): register r holds rows (depth) 2 t + 8 r and the next one, column g.
//   A (16 x 8 tf32): register r is row g + 8 (r % 2), column t + 4 (r / 2).
//   B (8 x 8 tf32): register r is row (depth) t + 4 r, column g.
//   C (16 x 8 float32): element e is row g + 8 (e / 2), column 2 t + e % 2.
// Staged rows are kDepth + padding elements long, so that the 32 lanes' 32-bit fragment loads
// fall in 32 different banks (row stride 12 or 20 words: 12 g + t and 20 g + t are distinct
// mod 32 for g < 8, t < 4).
//
// Status: the default tensor-core tile from GPU run 6 (1.6-1.8x WmmaTile on an H100,
// docs/gpu-runs.md) to run 12, which made DeepMmaTile the default where it applies; MmaTile
// takes every search DeepMmaTile does not (weights, unaligned rows) and
// LATENTSPACE_CUDA_TENSOR_TILE=mma asks for it everywhere, =wmma for WmmaTile (knn_scan_launch.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

// Per precision: the staged element type, how many depth elements one mma.sync consumes, and
// the instruction itself (D = A B + D on the four accumulators).
template <KnnPrecision kPrecision>
struct MmaTraits;

template <>
struct MmaTraits<KnnPrecision::kTf32> {
  using Stored = float;  // tf32 values are float32 bit patterns with the low 13 bits zero
  static constexpr int kStepDepth = 8;
  static constexpr int kPad = 4;  // row stride 20 words
  __device__ static void store4(Stored* at, float4 v) {
    using nvcuda::wmma::__float_to_tf32;  // round to nearest, as WmmaTile's staging
    *reinterpret_cast<float4*>(at) =
        make_float4(__float_to_tf32(v.x), __float_to_tf32(v.y), __float_to_tf32(v.z), __float_to_tf32(v.w));
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// bf16 and fp16: 16-bit elements, m16n8k16, staged as pairs packed in 32-bit words.
template <class Half>
struct HalfMmaTraits {
  using Stored = Half;
  static constexpr bool kBf16 = std::is_same_v<Half, __nv_bfloat16>;
  static constexpr int kStepDepth = 16;
  static constexpr int kPad = 8;  // row stride 12 words
  // Two floats rounded to nearest into one word, the first in the low half.
  __device__ static uint32_t pack(float first, float second) {
    if constexpr (kBf16) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(first, second);
      return *reinterpret_cast<const uint32_t*>(&pair);
    } else {
      const __half2 pair = __floats2half2_rn(first, second);
      return *reinterpret_cast<const uint32_t*>(&pair);
    }
  }
  __device__ static void store4(Stored* at, float4 v) {
    *reinterpret_cast<uint2*>(at) = make_uint2(pack(v.x, v.y), pack(v.z, v.w));
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (kBf16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
  }
};

template <>
struct MmaTraits<KnnPrecision::kBf16> : HalfMmaTraits<__nv_bfloat16> {};
template <>
struct MmaTraits<KnnPrecision::kFp16> : HalfMmaTraits<__half> {};

// The warp's mma.sync of its query block m (A fragment a) with each of its vector blocks n
// (B fragments b[n]), into the accumulators acc[2 m .. 2 m + 1][2 n .. 2 n + 1] (the fragment
// layout of MmaTile::query_of / vector_of). MmaTile and DeepMmaTile (knn_deep_tile.cuh) share it.
template <class Traits, int kCols, int kBlocksN>
__device__ __forceinline__ void mma_query_block(float (*acc)[kCols], int m, const uint32_t (&a)[4],
                                                const uint32_t (&b)[kBlocksN][2]) {
#pragma unroll
  for (int n = 0; n < kBlocksN; ++n) {
    float c[4] = {acc[2 * m][2 * n], acc[2 * m][2 * n + 1], acc[2 * m + 1][2 * n], acc[2 * m + 1][2 * n + 1]};
    Traits::mma(c, a, b[n]);
    acc[2 * m][2 * n] = c[0], acc[2 * m][2 * n + 1] = c[1];
    acc[2 * m + 1][2 * n] = c[2], acc[2 * m + 1][2 * n + 1] = c[3];
  }
}

template <KnnPrecision kPrecision>
struct MmaTile {
  using Traits = MmaTraits<kPrecision>;
  using Stored = typename Traits::Stored;
  static constexpr int kQueries = 128, kVectors = 128;
  static constexpr int kWarpQueries = 64, kWarpVectors = 32;  // 2 x 4 warps
  static constexpr int kBlocksM = kWarpQueries / 16, kBlocksN = kWarpVectors / 8;  // fragments per warp
  static constexpr int kRows = 2 * kBlocksM, kCols = 2 * kBlocksN;                 // 8 x 8 scores per thread
  static constexpr int kDepth = 16;                                               // dimensions per step
  static constexpr int kStride = kDepth + Traits::kPad;                           // staged row length
  static constexpr int kQuadsPerThread = kQueries * kDepth / 4 / kTileThreads;    // per side, per step
  static constexpr int kElementsPerWord = 4 / sizeof(Stored);                     // 2 (half), 1 (tf32)
  static_assert(kQueries == kVectors && kQuadsPerThread * kTileThreads * 4 == kQueries * kDepth);
  static_assert(kTileThreads == 32 * (kQueries / kWarpQueries) * (kVectors / kWarpVectors));
  static_assert(kDepth % Traits::kStepDepth == 0);

  struct Shared {
    alignas(16) Stored queries[2][kQueries][kStride];   // row-major: [query][dimension]
    alignas(16) Stored database[2][kVectors][kStride];  // [vector][dimension]: B column-major
  };

  // acc[i][j] is accumulator element 2 (i % 2) + j % 2 of fragment (i / 2, j / 2) of the warp.
  __device__ static int query_of(int i) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return (warp / 4) * kWarpQueries + (i / 2) * 16 + (i % 2) * 8 + lane / 4;
  }
  __device__ static int vector_of(int j) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return (warp % 4) * kWarpVectors + (j / 2) * 8 + 2 * (lane % 4) + j % 2;
  }

  // The 32-bit word holding elements [column, column + kElementsPerWord) of a staged row.
  __device__ static uint32_t word(const Stored* row, int column) {
    return *reinterpret_cast<const uint32_t*>(row + column);
  }

  template <KnnStorage kStorage, bool kAligned>
  __device__ static void compute(const TileBounds& t, Shared& s, float acc[kRows][kCols]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, tig = lane % 4;
    const int warp_query = (warp / 4) * kWarpQueries, warp_vector = (warp % 4) * kWarpVectors;
    zero_scores<kRows, kCols>(acc);
    auto stash = [&](int buffer, const float4 (&queries)[kQuadsPerThread], const float4 (&database)[kQuadsPerThread]) {
#pragma unroll
      for (int h = 0; h < kQuadsPerThread; ++h) {
        const int e = threadIdx.x + h * kTileThreads, row = e / 4, c = (e % 4) * 4;
        Traits::store4(&s.queries[buffer][row][c], queries[h]);
        Traits::store4(&s.database[buffer][row][c], database[h]);
      }
    };
    auto multiply = [&](int buffer) {
#pragma unroll
      for (int k0 = 0; k0 < kDepth; k0 += Traits::kStepDepth) {
        // The B fragments of the warp's 4 vector blocks, then per query block its A fragment
        // and 4 mma.sync (A loaded per block: fewer live registers beside the 64 scores).
        // Column offsets of the layouts above, in elements: 8 r for half, 4 r for tf32.
        constexpr int kHalfStep = Traits::kStepDepth / 2;
        const int column = k0 + tig * kElementsPerWord;
        uint32_t b[kBlocksN][2];
#pragma unroll
        for (int n = 0; n < kBlocksN; ++n) {
          const Stored* vector = s.database[buffer][warp_vector + n * 8 + g];
          b[n][0] = word(vector, column);
          b[n][1] = word(vector, column + kHalfStep);
        }
#pragma unroll
        for (int m = 0; m < kBlocksM; ++m) {
          const Stored* top = s.queries[buffer][warp_query + m * 16 + g];
          const Stored* bottom = s.queries[buffer][warp_query + m * 16 + g + 8];
          const uint32_t a[4] = {word(top, column), word(bottom, column), word(top, column + kHalfStep),
                                 word(bottom, column + kHalfStep)};
          mma_query_block<Traits>(acc, m, a, b);
        }
      }
    };
    run_staged_steps<kQuadsPerThread, kDepth, kStorage, kAligned>(t, stash, multiply);
  }
};

static_assert(kPlanRows % MmaTile<KnnPrecision::kBf16>::kVectors == 0, "a plan's splits must hold whole tiles");

}  // namespace latentspace::cuda
