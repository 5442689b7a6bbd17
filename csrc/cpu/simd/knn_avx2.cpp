// kNN tile kernels for AVX2 + FMA: 16-vector database panels, 6-query panels, so the
// 6 x 16 accumulator block fills 12 of the 16 ymm registers.
// Compiled with -mavx2 -mfma; only reached when the CPU reports both (cpu_features.cpp).
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/knn_kernels.h"
#include "ops/norms.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_avx2.h"

constexpr int kPanelWidth = 16;
constexpr int kMaxPanelRows = 6;
constexpr int kMaxRowQueries = 3;  // the AVX-512 crossover (docs/benchmarks.md), not measured apart


#include "cpu/simd/knn_tile_impl.h"

}  // namespace

const KnnKernels& knn_kernels_avx2() {
  static const KnnKernels kernels{SimdLevel::kAvx2, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
