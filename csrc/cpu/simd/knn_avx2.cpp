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
// Up to 3 queries the row path wins; from 4 on, packing (measured on Zen 4 with the AVX-512
// tiles and a 512-bit row path, N = 1M, D = 128, one thread: row path 20.5 / 23.5 / 27.3 /
// 35.6 ms for 1 / 2 / 3 / 4 queries, packed 29.2 / 36.7 / 32.2 ms for 2 / 3 / 4). The AVX-512
// table uses this row path and this count too.
constexpr int kMaxRowQueries = 3;


#include "cpu/simd/knn_tile_impl.h"
#include "cpu/simd/knn_rows_impl.h"

}  // namespace

const KnnKernels& knn_kernels_avx2() {
  static const KnnKernels kernels{SimdLevel::kAvx2, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
