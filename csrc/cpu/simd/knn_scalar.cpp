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
constexpr int kMaxRowQueries = 3;


#include "cpu/simd/knn_tile_impl.h"
#include "cpu/simd/knn_rows_impl.h"

}  // namespace

const KnnKernels& knn_kernels_scalar() {
  static const KnnKernels kernels{SimdLevel::kScalar, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
