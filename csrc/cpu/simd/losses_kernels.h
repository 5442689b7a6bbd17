// Per-instruction-set pieces of the fused float32 losses, behind a table of function
// pointers (the same scheme as knn_kernels.h; implementations in losses_{scalar,avx2,avx512}.cpp,
// shared code in losses_impl.h).
#pragma once

#include <cstdint>

#include "core/cpu_features.h"
#include "ops/losses.h"

namespace latentspace::cpu {

struct LossKernels {
  // Sum of the elementwise losses of n elements; grad (nullable) gets d/d(recon) * grad_scale.
  // Sets *out_of_range to nonzero when kind is kBce and some recon is outside [0, 1].
  float (*segment_loss)(const float* recon, const float* target, int64_t n,
                        ReconstructionKind kind, float grad_scale, float* grad,
                        uint32_t* out_of_range);
  // Sum over n elements of (1 + logvar - mu^2 - exp(logvar)); the gradients (nullable) get
  // d(KL)/d(mu) * grad_scale = mu * grad_scale and d(KL)/d(logvar) * grad_scale =
  // (exp(logvar) - 1) / 2 * grad_scale.
  float (*kl_segment)(const float* mu, const float* logvar, int64_t n, float grad_scale,
                      float* grad_mu, float* grad_logvar);
};

const LossKernels& loss_kernels_scalar();
const LossKernels& loss_kernels_avx2();
const LossKernels& loss_kernels_avx512();
const LossKernels& loss_kernels(SimdLevel level);

}  // namespace latentspace::cpu
