// Fused reconstruction losses and the Gaussian KL: value and gradient in one pass over the
// data. One declaration per backend, same signature (the CUDA versions come with the CUDA
// losses issue).
//
// Rows are samples: inputs are [rows][cols], C-contiguous, float32 or float64. The gradient
// written is d(loss)/d(input) * grad_scale (1/numel for a mean, 1 for a sum), so autograd's
// backward only multiplies it by the incoming gradient. NaN propagates (loss and gradient
// become NaN where an input is NaN); nothing is clamped silently except what torch clamps.
#pragma once

#include <cstdint>

namespace latentspace {

enum class ReconstructionKind : int {
  kMse = 0,        // (r - t)^2
  kBce = 1,        // -(t log r + (1 - t) log(1 - r)), logs clamped at -100 (as torch)
  kBceLogits = 2,  // the same with r = sigmoid(logit), computed stably from the logit
};

// Returns the sum of the elementwise losses (accumulated in double across segments).
// row_losses (nullable): per-row sums. grad (nullable): d/d(recon) * grad_scale.
// Throws ValueError for kBce when a recon value lies outside [0, 1] (NaN excepted).
template <class T>
double reconstruction_loss_cpu(const T* recon, const T* target, int64_t rows, int64_t cols,
                               ReconstructionKind kind, T grad_scale, T* grad, double* row_losses);

// KL(N(mu, exp(logvar)) || N(0, 1)) = -0.5 * sum_j (1 + logvar - mu^2 - exp(logvar)) per row.
// Returns the sum over rows; row_losses, grad_mu, grad_logvar nullable.
template <class T>
double kl_normal_cpu(const T* mu, const T* logvar, int64_t rows, int64_t cols, T grad_scale,
                     T* grad_mu, T* grad_logvar, double* row_losses);

}  // namespace latentspace
