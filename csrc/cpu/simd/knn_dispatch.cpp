#include "cpu/simd/knn_kernels.h"

namespace latentspace::cpu {

const KnnKernels& knn_kernels(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return knn_kernels_avx512();
    case SimdLevel::kAvx2: return knn_kernels_avx2();
    case SimdLevel::kScalar: break;
  }
  return knn_kernels_scalar();
}

}  // namespace latentspace::cpu
