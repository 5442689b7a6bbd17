// Fused float32 losses for the avx512 instruction set (see losses_impl.h).
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/losses_kernels.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_avx512.h"
#include "cpu/simd/losses_impl.h"

}  // namespace

const LossKernels& loss_kernels_avx512() {
  static const LossKernels kernels{&segment_loss, &kl_segment};
  return kernels;
}

}  // namespace latentspace::cpu
