#include "cpu/simd/losses_kernels.h"

namespace latentspace::cpu {

const LossKernels& loss_kernels(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return loss_kernels_avx512();
    case SimdLevel::kAvx2: return loss_kernels_avx2();
    case SimdLevel::kScalar: break;
  }
  return loss_kernels_scalar();
}

}  // namespace latentspace::cpu
