// Fused reconstruction losses and the Gaussian KL: value and gradient in one pass over the
// data. One declaration per backend: the CPU versions (cpu/losses.cpp) return the sum to the
// host; the CUDA versions (cuda/losses.cu) take the same arguments as device pointers and
// leave every result on the device, so a training step never waits for the GPU.
//
// Rows are samples: inputs are [rows][cols], C-contiguous, float32 or float64. The gradient
// written is d(loss)/d(input) * grad_scale (1/numel for a mean, 1 for a sum), so autograd's
// backward only multiplies it by the incoming gradient. NaN propagates (loss and gradient
// become NaN where an input is NaN); nothing is clamped silently except what torch clamps.
#pragma once

#include <cstdint>
#include <cstddef>

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

// --- CUDA -------------------------------------------------------------------------------
// The same sums on the current CUDA device, queued on `stream` (a cudaStream_t); every pointer
// is device memory. Results stay on the device: row_losses (rows doubles, required) and
// total (one double) are written; kBce sets *out_of_range (one uint32 the caller zeroed) to
// 1 when a recon value lies outside [0, 1] (the caller reads it and raises ValueError; it may
// be null for the other kinds). Deterministic: each row is summed in a fixed order (per-lane
// partials in double over segments of kCudaLossSegment elements), then the
// rows in a fixed tree, so two calls on the same inputs give the same bits.
//
// workspace: loss_cuda_workspace_doubles(rows, cols) doubles (the per-segment sums of rows
// longer than one segment; 0, and null accepted, when every row fits one).
constexpr int64_t kCudaLossSegment = 2048;
int64_t loss_cuda_workspace_doubles(int64_t rows, int64_t cols);

template <class T>
void reconstruction_loss_cuda(const T* recon, const T* target, int64_t rows, int64_t cols,
                              ReconstructionKind kind, T grad_scale, T* grad, double* row_losses,
                              double* total, uint32_t* out_of_range, double* workspace, uintptr_t stream);

template <class T>
void kl_normal_cuda(const T* mu, const T* logvar, int64_t rows, int64_t cols, T grad_scale, T* grad_mu,
                    T* grad_logvar, double* row_losses, double* total, double* workspace, uintptr_t stream);

// A backward's scaling of a saved gradient by the incoming one, on the device and in place,
// without reading it back: grad[row][j] *= factors[per_row ? row : 0]. Rows whose factor is
// exactly 1 (a plain loss.backward()) are neither read nor written, so the usual step costs
// one launch and no pass over the gradient.
template <class T>
void scale_rows_unless_one_cuda(T* grad, int64_t rows, int64_t cols, const T* factors, bool per_row,
                                uintptr_t stream);

}  // namespace latentspace
