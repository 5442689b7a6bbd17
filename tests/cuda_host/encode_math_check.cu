// Host-side check of the CUDA encoder's activations (csrc/cuda/encode_math.cuh: the very code
// the kernels run, compiled here for the host). Built and run by tests/test_cuda_encoder.py;
// no GPU needed. Each activation is compared with torch's formula written out independently
// in long double, over edge values (0, -0, tiny and denormal values, +-1e4, +-88, +-FLT_MAX,
// +-inf, NaN), their neighbours, and random values (normal at three scales, log-uniform
// magnitudes, and arbitrary bit patterns; a fresh seed each run, printed first as "seed S":
// `./check S` replays it). Prints one line per activation and parameter, "<name>: N values,
// wrong W, worst E ulps (at x)", then "failures N"; exits 1 on any failure.
//
//   nvcc -std=c++17 -Icsrc -x cu tests/cuda_host/encode_math_check.cu -o check && ./check
//
// The error is counted in ulps of the reference rounded to float (2^-149 below FLT_MIN, so a
// denormal result is held to an absolute 2^-149 per ulp). Allowed: 0 for the exact ones
// (identity, relu), half an ulp for one rounding (leaky_relu), a few ulps for the libm calls
// and the roundings around them, plus, where the formula evaluates a function at a rounded
// argument, that rounding times the function's condition number (tolerance_ulps), plus the
// rounding of a factor that underflows into the denormals (underflow_allowance).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/encode_math.cuh"

using latentspace::Activation;
namespace em = latentspace::encode_math;
using Real = long double;

namespace {

int failures = 0;

const Real kSqrt2 = std::sqrt(2.0L);
const Real kPi = std::acos(-1.0L);

// ---- references: torch's formulas (ops/encode.h, Activation), in long double ----

// 1 / (1 + e^-x); e^x fits long double up to x ~ 11356, so no branch is needed for floats
// except far beyond (where 1 / inf = 0 is the right answer).
Real sigmoid_reference(Real x) { return 1.0L / (1.0L + std::exp(-x)); }

// (1 + tanh(u)) / 2. For u < -1 the long double sum 1 + tanh(u) would lose its digits
// (tanh(u) -> -1), so the same quantity is formed as e^2u / (1 + e^2u) there.
Real half_one_plus_tanh(Real u) {
  if (u >= -1.0L) return 0.5L * (1.0L + std::tanh(u));
  const Real e = std::exp(2.0L * u);
  return e / (1.0L + e);
}

// Phi(x) = (1 + erf(x / sqrt 2)) / 2, as erfc(|x| / sqrt 2) / 2 for x < 0 (same reason).
Real normal_cdf_reference(Real x) {
  if (std::isnan(x)) return x;
  return x >= 0 ? 0.5L * (1.0L + std::erf(x / kSqrt2)) : 0.5L * std::erfc(-x / kSqrt2);
}

Real reference(Activation activation, Real x, Real parameter) {
  switch (activation) {
    case Activation::kIdentity: return x;
    case Activation::kRelu: return std::isnan(x) ? x : (x > 0 ? x : 0.0L);  // torch.relu(nan) = nan
    case Activation::kLeakyRelu: return x < 0 ? x * parameter : x;
    case Activation::kGelu: return x * normal_cdf_reference(x);  // x = -inf: -inf * 0 = NaN, as torch
    case Activation::kGeluTanh:
      return x * half_one_plus_tanh(std::sqrt(2.0L / kPi) * (x + 0.044715L * x * x * x));
    case Activation::kTanh: return std::tanh(x);
    case Activation::kSigmoid: return sigmoid_reference(x);
    case Activation::kSilu: return x * sigmoid_reference(x);  // -inf: NaN, as torch
    case Activation::kElu: return x > 0 ? x : parameter * std::expm1(x);
  }
  return NAN;
}

// ---- the allowed error, in ulps ----

// The relative condition number of Phi at x: |x| phi(x) / Phi(x). The kernel forms Phi's
// argument as x * 0.70710678f, one rounding off (plus the constant's own 0.3 ulp): Phi's
// value then moves by about this many times that relative error (x^2 for x << 0, ~0 for
// x >> 0). Any float evaluation of torch's formula carries it.
Real normal_cdf_condition(Real x) {
  if (!std::isfinite(x)) return 0;
  const Real cdf = normal_cdf_reference(x);
  if (cdf == 0) return 0;  // far beyond float's range: the result is 0 either way
  const Real density = std::exp(-0.5L * x * x) / std::sqrt(2.0L * kPi);
  return std::fabs(x) * density / cdf;
}

// GELU's tanh form as the kernel writes it: x * sigmoid(t), t = 2 sqrt(2/pi) (x + 0.044715 x^3).
// t is formed with about 3 roundings (x x x, the fma, the constant's product, and the two
// constants' own errors); sigmoid(t) moves by |t| (1 - sigmoid(t)) times t's relative error.
Real sigmoid_condition_of_tanh_argument(Real x) {
  if (!std::isfinite(x)) return 0;
  const Real t = 2.0L * std::sqrt(2.0L / kPi) * (x + 0.044715L * x * x * x);
  return std::fabs(t) * sigmoid_reference(-t);
}

Real tolerance_ulps(Activation activation, Real x) {
  switch (activation) {
    case Activation::kIdentity:
    case Activation::kRelu: return 0;
    case Activation::kLeakyRelu: return 0.5L;  // one correctly rounded product
    case Activation::kElu: return 3;           // expm1f (<= 1 ulp) times alpha (0.5)
    case Activation::kTanh: return 3;          // tanhf (<= 2 ulps)
    case Activation::kSigmoid: return 4;       // expf, 1 + e, 1 / (), e * () : 1 + 3 x 0.5 ulps
    case Activation::kSilu: return 5;          // sigmoid, times x
    case Activation::kGelu: return 6 + 2 * normal_cdf_condition(x);  // erfcf (<= 4), x * 0.5 *
    case Activation::kGeluTanh: return 6 + 4 * sigmoid_condition_of_tanh_argument(x);
  }
  return 0;
}

// silu, gelu and gelu_tanh are x times a factor in [0, 1] that is itself a float: where the
// factor falls into the denormals (x < -87 or so) it is rounded to a multiple of 2^-149 first,
// an absolute error of up to |x| 2^-150 in the product (torch's float formulas lose more:
// silu = x / (1 + e^-x) is already 0 there).
Real underflow_allowance(Activation activation, Real x) {
  const bool factor_times_x =
      activation == Activation::kSilu || activation == Activation::kGelu || activation == Activation::kGeluTanh;
  return factor_times_x && std::isfinite(x) ? std::fabs(x) * std::ldexp(1.0L, -150) : 0;
}

// One float ulp at the magnitude of `value` (already a float): 2^-149 in the denormal range.
Real ulp_of(float value) {
  const float magnitude = std::fabs(value);
  if (!(magnitude >= FLT_MIN)) return std::ldexp(1.0L, -149);
  return std::ldexp(1.0L, std::ilogb(magnitude) - 23);
}

// |got - want|: 0 for NaN where NaN is expected, infinity for a NaN or an infinity where none
// is expected (a reference beyond float's range must give that infinity).
Real absolute_error(float got, Real want) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got) ? 0 : INFINITY;
  const float rounded = static_cast<float>(want);
  if (std::isinf(rounded) || std::isinf(got)) return got == rounded ? 0 : INFINITY;
  return std::fabs(static_cast<Real>(got) - want);
}

// ---- inputs ----

float from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

std::vector<float> inputs(std::mt19937_64& random) {
  const std::vector<float> edges = {
      0.0f, -0.0f, 1e-30f, -1e-30f, FLT_MIN, -FLT_MIN, 1e-40f, -1e-40f, FLT_TRUE_MIN, -FLT_TRUE_MIN,
      1e-7f, -1e-7f, 0.5f, -0.5f, 1.0f, -1.0f, 2.0f, -2.0f, 3.0f, -3.0f, 5.0f, -5.0f, 8.0f, -8.0f,
      10.0f, -10.0f, 13.0f, -13.0f, 14.0f, -14.0f, 20.0f, -20.0f, 40.0f, -40.0f, 87.0f, -87.0f,
      88.0f, -88.0f, 89.0f, -89.0f, 104.0f, -104.0f, 1e4f, -1e4f, 1e13f, -1e13f, 1e30f, -1e30f,
      FLT_MAX, -FLT_MAX, INFINITY, -INFINITY, NAN};
  std::vector<float> values;
  for (float edge : edges) {  // each edge and its two neighbours
    values.push_back(edge);
    if (std::isfinite(edge)) {
      values.push_back(std::nextafter(edge, INFINITY));
      values.push_back(std::nextafter(edge, -INFINITY));
    }
  }
  for (double scale : {1.0, 4.0, 20.0}) {
    std::normal_distribution<double> normal(0.0, scale);
    for (int i = 0; i < 4000; ++i) values.push_back(static_cast<float>(normal(random)));
  }
  std::uniform_real_distribution<double> exponent(-45.0, 38.5);
  std::bernoulli_distribution negative(0.5);
  for (int i = 0; i < 4000; ++i) {
    const float magnitude = static_cast<float>(std::pow(10.0, exponent(random)));
    values.push_back(negative(random) ? -magnitude : magnitude);
  }
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 4000; ++i) values.push_back(from_bits(bits(random)));  // NaNs and infs too
  return values;
}

// ---- the check ----

void check(const char* name, Activation activation, float parameter, const std::vector<float>& values) {
  long wrong = 0;
  Real worst = 0;
  float worst_at = 0;
  for (float x : values) {
    const float got = em::activate(activation, x, parameter);
    const Real want = reference(activation, x, parameter);
    const Real ulp = ulp_of(static_cast<float>(want));
    const Real error = absolute_error(got, want) / ulp;  // in ulps
    const Real allowed = tolerance_ulps(activation, x) + underflow_allowance(activation, x) / ulp;
    if (error > worst) worst = error, worst_at = x;
    if (!(error <= allowed)) {
      if (++wrong <= 5) {
        std::printf("  %s(%.9g; %g): got %.9g, want %.12Lg (%.3Lg ulps, allowed %.3Lg)\n", name,
                    static_cast<double>(x), static_cast<double>(parameter), static_cast<double>(got), want, error,
                    allowed);
      }
    }
  }
  std::printf("%s: %zu values, wrong %ld, worst %.3Lg ulps (at %.9g)\n", name, values.size(), wrong, worst,
              static_cast<double>(worst_at));
  failures += wrong > 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A fresh seed each run (printed: pass it as the argument to replay a failure).
  const unsigned long long seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : std::random_device{}();
  std::printf("seed %llu\n", seed);
  std::mt19937_64 random(seed);
  const std::vector<float> values = inputs(random);
  check("identity", Activation::kIdentity, 0.0f, values);
  check("relu", Activation::kRelu, 0.0f, values);
  for (float slope : {0.01f, 0.2f, 0.0f, 3.0f}) {
    char name[48];
    std::snprintf(name, sizeof name, "leaky_relu(%g)", static_cast<double>(slope));
    check(name, Activation::kLeakyRelu, slope, values);
  }
  check("gelu", Activation::kGelu, 0.0f, values);
  check("gelu_tanh", Activation::kGeluTanh, 0.0f, values);
  check("tanh", Activation::kTanh, 0.0f, values);
  check("sigmoid", Activation::kSigmoid, 0.0f, values);
  check("silu", Activation::kSilu, 0.0f, values);
  for (float alpha : {1.0f, 0.6f, 2.5f, 0.0f}) {
    char name[48];
    std::snprintf(name, sizeof name, "elu(%g)", static_cast<double>(alpha));
    check(name, Activation::kElu, alpha, values);
  }
  std::printf("failures %d\n", failures);
  return failures == 0 ? 0 : 1;
}
