// The elementwise formulas of the CUDA losses and how rows are cut into segments, as
// __host__ __device__ functions: losses.cu runs them on the GPU, and
// tests/cuda_host/losses_math_check.cu runs the very same code on the host against long
// double references (no GPU needed). Same formulas, clamps and NaN rules as the CPU kernels
// (cpu/losses.cpp, cpu/simd/losses_impl.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "ops/losses.h"

namespace latentspace::loss_math {

// libm by type (the float overloads: no silent promotion to double).
__host__ __device__ inline float device_exp(float x) { return expf(x); }
__host__ __device__ inline double device_exp(double x) { return exp(x); }
__host__ __device__ inline float device_log(float x) { return logf(x); }
__host__ __device__ inline double device_log(double x) { return log(x); }
__host__ __device__ inline float device_abs(float x) { return fabsf(x); }
__host__ __device__ inline double device_abs(double x) { return fabs(x); }
__host__ __device__ inline float device_log1p(float x) { return log1pf(x); }
__host__ __device__ inline double device_log1p(double x) { return log1p(x); }

// max(value, floor) that keeps NaN (fmax would return the floor), as torch's clamps do.
template <class T>
__host__ __device__ inline T clamp_below(T value, T floor) {
  return value < floor ? floor : value;
}

// Loss and d(loss)/d(recon) of one element.
template <ReconstructionKind kKind, class T>
__host__ __device__ inline T element_loss(T r, T t, T* grad) {
  if constexpr (kKind == ReconstructionKind::kMse) {
    const T d = r - t;
    *grad = d + d;
    return d * d;
  } else if constexpr (kKind == ReconstructionKind::kBce) {
    const T q = T(1) - r;
    const T log_p = clamp_below(device_log(r), T(-100));  // torch clamps the logs at -100
    const T log_q = clamp_below(device_log(q), T(-100));
    *grad = (r - t) / clamp_below(r * q, T(1e-12));  // torch: (p - t) / max(p (1 - p), 1e-12)
    // -(t log p + (1 - t) log q), arranged as the CPU arranges it for the same type (the SIMD
    // float32 kernels factor t out; the float64 code, gradcheck's, does not).
    if constexpr (sizeof(T) == sizeof(float)) return -(t * (log_p - log_q) + log_q);
    return -(t * log_p + (T(1) - t) * log_q);
  } else {
    // r is a logit x: max(x, 0) - x t + log(1 + e), e = exp(-|x|); d/dx = sigmoid(x) - t.
    const T e = device_exp(-device_abs(r));
    const T inverse = T(1) / (T(1) + e);
    const T sigmoid = r < T(0) ? e * inverse : inverse;
    *grad = sigmoid - t;
    return (r > T(0) ? r : T(0)) - r * t + device_log1p(e);
  }
}

// KL's term of one element, 1 + lv - mu^2 - exp(lv) (the row's KL is -0.5 times their sum);
// exp(lv) into *variance, which the logvar gradient reuses.
template <class T>
__host__ __device__ inline T kl_element_term(T m, T lv, T* variance) {
  *variance = device_exp(lv);
  return T(1) + lv - m * m - *variance;
}

// Which (row, segment) a warp works on, and where that segment's elements lie.
struct Segment {
  int64_t row, first, count;
};

__host__ __device__ inline Segment segment_of(int64_t item, int64_t segments_per_row, int64_t cols) {
  // Rows of one segment (the usual widths) skip the 64-bit division and remainder, which cost
  // a short row (a VAE's 8 to 64 latent dimensions) more than its own elements do.
  if (segments_per_row == 1) return Segment{item, 0, cols};
  Segment s;
  s.row = item / segments_per_row;
  s.first = (item % segments_per_row) * kCudaLossSegment;
  s.count = cols - s.first < kCudaLossSegment ? cols - s.first : kCudaLossSegment;
  return s;
}

__host__ __device__ inline int64_t segments_per_row_of(int64_t cols) {
  return cols <= kCudaLossSegment ? 1 : (cols + kCudaLossSegment - 1) / kCudaLossSegment;
}

}  // namespace latentspace::loss_math
