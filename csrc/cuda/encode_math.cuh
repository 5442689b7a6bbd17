// The encoder's elementwise activations for the CUDA kernels (cuda/encode.cu), written once for
// the device and the host: tests/cuda_host/encode_math_check.cu runs these very functions on
// the host against long double. The formulas are torch's (ops/encode.h, Activation); each is
// written so that no branch loses accuracy (sigmoid from e^-|x|, GELU's tanh form as a sigmoid),
// as the CPU's SIMD versions (cpu/simd/encode_impl.h) are.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "ops/encode.h"

namespace latentspace::encode_math {

// 1 / (1 + e^-x) from e = e^-|x| <= 1: neither side overflows, and for x << 0 the result keeps
// its relative accuracy (1 - 1 / (1 + e) would cancel).
__host__ __device__ inline float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  const float inverse = 1.0f / (1.0f + e);
  return x < 0.0f ? e * inverse : inverse;
}

// Phi(x), the standard normal CDF, as erfc(-x / sqrt 2) / 2: accurate in both tails (erfc keeps
// the small values that 1 + erf would round away for x << 0).
__host__ __device__ inline float normal_cdf(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }

__host__ __device__ inline float activate(Activation activation, float x, float parameter) {
  switch (activation) {
    case Activation::kIdentity: return x;
    case Activation::kRelu: return x < 0.0f ? 0.0f : x;  // NaN stays NaN, as torch's
    case Activation::kLeakyRelu: return x < 0.0f ? x * parameter : x;
    case Activation::kGelu: return x * normal_cdf(x);
    case Activation::kGeluTanh: {
      // (1 + tanh(y)) / 2 = sigmoid(2 y): the same value without the cancellation for x << 0.
      const float y = 0.7978845608028654f * fmaf(x * x * x, 0.044715f, x);
      return x * sigmoid(y + y);
    }
    case Activation::kTanh: return tanhf(x);
    case Activation::kSigmoid: return sigmoid(x);
    case Activation::kSilu: return x * sigmoid(x);
    case Activation::kElu: return x > 0.0f ? x : parameter * expm1f(x);
  }
  return x;
}

}  // namespace latentspace::encode_math
