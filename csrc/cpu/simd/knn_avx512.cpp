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
// Up to 6 queries the (AVX2) row path wins against these packed tiles; from 7 on, packing.
// Measured with `python benchmarks/row_cutoff.py 16 avx512` (Zen 4, N = 1M, D = 128, L2,
// k = 10; read rate as a share of torch.sum, row / packed): 6 queries 0.44 / 0.41 on one
// thread, 0.49 / 0.27 and 0.63 / 0.54 on two (fast / slow bandwidth windows); 7 queries
// 0.32 / 0.39 on one thread (docs/benchmarks.md, "Row path or packed path").
constexpr int kMaxRowQueries = 6;

#include "cpu/simd/knn_tile_impl.h"

}  // namespace

// The row path (up to kMaxRowQueries queries) is the AVX2 one: it is bound by memory reads, and on
// Zen 4 (which splits each 512-bit operation in two) 256-bit loads stream faster. Measured
// side by side in one process with `python benchmarks/q1_simd_levels.py 80 avx512,avx2` on the
// build before this choice, N = 1M, D = 128, L2, k = 10, as a share of torch.sum over the same
// buffer, 256-bit against 512-bit: three queries 78% / 48% on one thread, 77% / 45% on two
// in the VM's fast-bandwidth windows, 93% / 61% in slow ones; one query 85% / 81%, 84% / 83%,
// 96% / 95% (docs/benchmarks.md, "Q = 1: 256-bit row path"). On CPUs with two full-width FMA
// units the row path stays bound by memory: a row of D floats costs 2 * D / 8 FMAs per query
// with 256-bit vectors, far fewer cycles than reading its 4 * D bytes from DRAM takes.
const KnnKernels& knn_kernels_avx512() {
  static const KnnKernels kernels{SimdLevel::kAvx512, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, knn_kernels_avx2().row_path_capacity,
                                  knn_kernels_avx2().scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
