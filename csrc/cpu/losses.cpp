// Fused losses on the CPU: OpenMP over (row, segment) work items; float32 through the SIMD
// tables (simd/losses_*.cpp), float64 (for gradcheck) through plain C++ with libm.
#include "ops/losses.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "core/check.h"
#include "core/threads.h"
#include "cpu/simd/losses_kernels.h"

namespace latentspace {
namespace {

// Elements summed in float32 before the sum moves to double: keeps long rows accurate.
constexpr int64_t kSegment = 4096;
// Below this many elements per thread, waking another thread costs more than it saves (a
// training step on a 32 x 64 batch ran many times slower on two threads of a busy machine).
constexpr int64_t kMinElementsPerThread = 32768;

int threads_for(int64_t elements, int64_t work_items) {
  const int64_t useful = std::max<int64_t>(1, elements / kMinElementsPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({num_threads(), work_items, useful})));
}

// float64 elementwise loss and gradient: the formulas of simd/losses_impl.h, in libm.
double element_loss_double(ReconstructionKind kind, double r, double t, double* grad) {
  switch (kind) {
    case ReconstructionKind::kMse:
      *grad = 2.0 * (r - t);
      return (r - t) * (r - t);
    case ReconstructionKind::kBce: {
      const double log_p = std::max(std::log(r), -100.0);
      const double log_q = std::max(std::log(1.0 - r), -100.0);
      *grad = (r - t) / std::max(r * (1.0 - r), 1e-12);
      return -(t * log_p + (1.0 - t) * log_q);
    }
    case ReconstructionKind::kBceLogits: break;
  }
  const double e = std::exp(-std::fabs(r));
  const double sigmoid = r >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
  *grad = sigmoid - t;
  return std::max(r, 0.0) - r * t + std::log1p(e);
}

double segment_loss_double(const double* recon, const double* target, int64_t n,
                           ReconstructionKind kind, double grad_scale, double* grad,
                           uint32_t* out_of_range) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (kind == ReconstructionKind::kBce && (recon[i] < 0.0 || recon[i] > 1.0)) *out_of_range = 1;
    double g;
    total += element_loss_double(kind, recon[i], target[i], &g);
    if (grad) grad[i] = g * grad_scale;
  }
  return total;
}

// kernels: the SIMD table of the level the call read once (see reconstruction_loss_cpu).
double segment_loss(const cpu::LossKernels& kernels, const float* recon, const float* target, int64_t n,
                    ReconstructionKind kind, float grad_scale, float* grad, uint32_t* out_of_range) {
  const float sum = kernels.segment_loss(recon, target, n, kind, grad_scale, grad, out_of_range);
  if (std::isfinite(sum)) return sum;
  // The float32 sum overflowed (or an element is NaN / Inf): the segment's losses summed again
  // in double (the gradient is written already), so that a total past float32's range but a
  // mean within it ("mean" over 1e6 elements of 9e36) is not inf. Rare: no cost otherwise.
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double unused_grad;
    total += element_loss_double(kind, recon[i], target[i], &unused_grad);
  }
  return total;
}
double segment_loss(const cpu::LossKernels&, const double* recon, const double* target, int64_t n,
                    ReconstructionKind kind, double grad_scale, double* grad, uint32_t* out_of_range) {
  return segment_loss_double(recon, target, n, kind, grad_scale, grad, out_of_range);
}

}  // namespace

template <class T>
double reconstruction_loss_cpu(const T* recon, const T* target, int64_t rows, int64_t cols,
                               ReconstructionKind kind, T grad_scale, T* grad, double* row_losses) {
  const int64_t segments_per_row = std::max<int64_t>(1, (cols + kSegment - 1) / kSegment);
  const int64_t items = rows * segments_per_row;
  std::vector<double> item_sums(static_cast<size_t>(items), 0.0);
  std::atomic<uint32_t> out_of_range{0};
  const int threads = threads_for(rows * cols, items);
  // The SIMD level, read once: every segment of one call summed by the same kernels, even when
  // another thread calls set_simd_level meanwhile (read per segment, a call mixed levels).
  const cpu::LossKernels& kernels = cpu::loss_kernels(active_simd_level());

#pragma omp parallel num_threads(threads)
  {
    uint32_t local_bad = 0;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t row = item / segments_per_row;
      const int64_t first = (item % segments_per_row) * kSegment;
      const int64_t count = std::min(kSegment, cols - first);
      const int64_t offset = row * cols + first;
      item_sums[item] = segment_loss(kernels, recon + offset, target + offset, count, kind, grad_scale,
                                     grad ? grad + offset : nullptr, &local_bad);
    }
    if (local_bad) out_of_range.fetch_or(1u);
  }
  LS_CHECK_VALUE(out_of_range.load() == 0,
                 "recon: kind='bce' expects probabilities in [0, 1], got values outside; "
                 "pass logits with kind='bce_logits' instead");

  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) {
    double row_sum = 0.0;
    for (int64_t s = 0; s < segments_per_row; ++s) row_sum += item_sums[row * segments_per_row + s];
    if (row_losses) row_losses[row] = row_sum;
    total += row_sum;
  }
  return total;
}

namespace {

// One row of the KL sum: float32 through the SIMD table, float64 in plain C++.
double kl_row(const cpu::LossKernels& kernels, const float* mu, const float* logvar, int64_t n, float grad_scale,
              float* grad_mu, float* grad_logvar) {
  const float sum = kernels.kl_segment(mu, logvar, n, grad_scale, grad_mu, grad_logvar);
  if (std::isfinite(sum)) return sum;
  // As segment_loss: the float32 sum overflowed (or an input is NaN / Inf), summed again in
  // double (the gradients are written already), so that a row's KL within range is not inf.
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double m = mu[j], lv = logvar[j];
    total += 1.0 + lv - m * m - std::exp(lv);
  }
  return total;
}
double kl_row(const cpu::LossKernels&, const double* mu, const double* logvar, int64_t n, double grad_scale,
              double* grad_mu, double* grad_logvar) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double variance = std::exp(logvar[j]);
    sum += 1.0 + logvar[j] - mu[j] * mu[j] - variance;
    if (grad_mu) grad_mu[j] = mu[j] * grad_scale;
    if (grad_logvar) grad_logvar[j] = 0.5 * (variance - 1.0) * grad_scale;
  }
  return sum;
}

}  // namespace

template <class T>
double kl_normal_cpu(const T* mu, const T* logvar, int64_t rows, int64_t cols, T grad_scale,
                     T* grad_mu, T* grad_logvar, double* row_losses) {
  std::vector<double> sums(static_cast<size_t>(rows), 0.0);
  const int threads = threads_for(rows * cols, rows);
  const cpu::LossKernels& kernels = cpu::loss_kernels(active_simd_level());  // once: see reconstruction_loss_cpu
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t offset = row * cols;
    sums[row] = -0.5 * kl_row(kernels, mu + offset, logvar + offset, cols, grad_scale,
                              grad_mu ? grad_mu + offset : nullptr,
                              grad_logvar ? grad_logvar + offset : nullptr);
  }
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) {
    if (row_losses) row_losses[row] = sums[row];
    total += sums[row];
  }
  return total;
}

template double reconstruction_loss_cpu<float>(const float*, const float*, int64_t, int64_t,
                                               ReconstructionKind, float, float*, double*);
template double reconstruction_loss_cpu<double>(const double*, const double*, int64_t, int64_t,
                                                ReconstructionKind, double, double*, double*);
template double kl_normal_cpu<float>(const float*, const float*, int64_t, int64_t, float, float*,
                                     float*, double*);
template double kl_normal_cpu<double>(const double*, const double*, int64_t, int64_t, double,
                                      double*, double*, double*);

}  // namespace latentspace
