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
// Up to 5 queries the row path wins against these (AVX2) packed tiles; from 6 on, packing.
// Measured with `python benchmarks/row_cutoff.py 16 avx2` (Zen 4, N = 1M, D = 128, L2, k = 10;
// search read rate as a share of torch.sum over the same buffer, row / packed, one thread):
// 5 queries 0.67 / 0.52, 6 queries 0.39 / 0.48 (two threads alike; docs/benchmarks.md,
// "Row path or packed path"). The AVX-512 table uses this row path with its own cut-off.
constexpr int kMaxRowQueries = 5;
// The row path is compiled for up to 8 queries, so that benchmarks/row_cutoff.py can time it
// against the packed path at 4-8 queries in one process (knn_cpu_set_row_query_limit).
constexpr int kRowPathCapacity = 8;


#include "cpu/simd/knn_tile_impl.h"
#include "cpu/simd/knn_rows_impl.h"

}  // namespace

const KnnKernels& knn_kernels_avx2() {
  static const KnnKernels kernels{SimdLevel::kAvx2, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, kRowPathCapacity, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
