// Fused float32 losses for the scalar instruction set (see losses_impl.h).
#include <cstdint>

#include "cpu/simd/losses_kernels.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_scalar.h"
#include "cpu/simd/losses_impl.h"

}  // namespace

const LossKernels& loss_kernels_scalar() {
  static const LossKernels kernels{&segment_loss, &kl_segment};
  return kernels;
}

}  // namespace latentspace::cpu
