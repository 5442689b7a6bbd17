// Portable kNN tile kernels: plain C++ for any CPU (compiled with the baseline flags only).
// Same panel scheme as the SIMD versions, with narrow panels the compiler can keep in
// SSE registers.
#include <cstdint>

#include "cpu/simd/knn_kernels.h"
#include "ops/norms.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_scalar.h"

constexpr int kPanelWidth = 8;
constexpr int kMaxPanelRows = 4;
constexpr int kMaxRowQueries = 3;  // not re-measured for the portable kernels
// The row path is compiled for up to 8 queries, so that benchmarks/row_cutoff.py can time it
// against the packed path at 4-8 queries in one process (knn_cpu_set_row_query_limit).
constexpr int kRowPathCapacity = 8;


#include "cpu/simd/knn_tile_impl.h"
#include "cpu/simd/knn_rows_impl.h"

}  // namespace

const KnnKernels& knn_kernels_scalar() {
  static const KnnKernels kernels{SimdLevel::kScalar, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, kRowPathCapacity, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
