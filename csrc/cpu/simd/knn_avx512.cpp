// kNN tile kernels for AVX-512 (F, BW, VL, DQ): 32-vector database panels, 12-query panels,
// so the 12 x 32 accumulator block fills 24 of the 32 zmm registers.
// Compiled with -mavx512*; only reached when the CPU reports AVX-512 (cpu_features.cpp).
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/knn_kernels.h"
#include "ops/norms.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_avx512.h"

constexpr int kPanelWidth = 32;
constexpr int kMaxPanelRows = 12;
// Up to 3 queries the row path wins; from 4 on, packing (measured on Zen 4, N = 1M, D = 128,
// one thread: row path 20.5 / 23.5 / 27.3 / 35.6 ms for 1 / 2 / 3 / 4 queries, packed
// 29.2 / 36.7 / 32.2 ms for 2 / 3 / 4).
constexpr int kMaxRowQueries = 3;


#include "cpu/simd/knn_tile_impl.h"

}  // namespace

const KnnKernels& knn_kernels_avx512() {
  static const KnnKernels kernels{SimdLevel::kAvx512, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
