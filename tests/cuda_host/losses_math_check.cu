// Host-side check of the CUDA losses' elementwise formulas and segments (csrc/cuda/
// losses_math.cuh: the code the kernels run, compiled here for the host). Built and run by
// tests/test_cuda_losses.py; no GPU needed. The references are written out independently in
// long double. Prints one line per check and "failures N"; exits 1 on any failure.
//
//   nvcc -std=c++17 -Icsrc -x cu tests/cuda_host/losses_math_check.cu -o check && ./check
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/losses_math.cuh"

using latentspace::ReconstructionKind;
namespace math = latentspace::loss_math;

namespace {

int failures = 0;

struct Reference {
  long double loss, grad;
};

long double clamp_log(long double x) {  // torch's log clamped at -100, NaN kept
  const long double value = std::log(x);
  return value < -100.0L ? -100.0L : value;
}

Reference reference(ReconstructionKind kind, long double r, long double t) {
  switch (kind) {
    case ReconstructionKind::kMse:
      return {(r - t) * (r - t), 2 * (r - t)};
    case ReconstructionKind::kBce: {
      const long double denominator = r * (1 - r) < 1e-12L ? 1e-12L : r * (1 - r);
      const long double denominator_nan = std::isnan(r) ? r : denominator;
      return {-(t * clamp_log(r) + (1 - t) * clamp_log(1 - r)), (r - t) / denominator_nan};
    }
    case ReconstructionKind::kBceLogits:
      break;
  }
  const long double sigmoid = 1 / (1 + std::exp(-r));
  // max(x, 0) - x t + log(1 + exp(-|x|)): an infinite logit gives NaN (inf - inf), as the CPU
  // kernels do (torch gives inf for +inf and NaN for -inf).
  return {(r > 0 ? r : 0) - r * t + std::log1p(std::exp(-std::fabs(r))), sigmoid - t};
}

// |got - expected| within tolerance of the terms' size; NaN where and only where expected.
template <class T>
bool agrees(T got, long double expected, long double size, long double tolerance) {
  if (std::isnan(expected)) return std::isnan(got);
  if (std::isinf(expected)) return got == expected;
  if (!std::isfinite(got)) return false;
  return std::fabs(static_cast<long double>(got) - expected) <= tolerance * (1 + size);
}

template <class T, ReconstructionKind kKind>
void check_kind(const char* type, const char* kind_name, const std::vector<T>& recons, const std::vector<T>& targets,
                long double tolerance) {
  long checked = 0, wrong = 0;
  for (T r : recons) {
    for (T t : targets) {
      T grad;
      const T loss = math::element_loss<kKind>(r, t, &grad);
      const Reference want = reference(kKind, r, t);
      // The size of the terms behind each value: the formulas add terms of about these sizes.
      const long double size = std::fabs(static_cast<long double>(r)) + std::fabs(static_cast<long double>(t));
      const long double loss_size = kKind == ReconstructionKind::kBce ? 100.0L * (1 + std::fabs((long double)t))
                                                                      : size * (1 + size);
      const long double grad_size = std::fabs(want.grad) + size;
      const bool ok = agrees(loss, want.loss, loss_size, tolerance) && agrees(grad, want.grad, grad_size, tolerance);
      ++checked;
      if (!ok) {
        if (++wrong <= 5) {
          std::printf("  %s %s r=%.9g t=%.9g: loss %.12g (want %.12Lg) grad %.12g (want %.12Lg)\n", type, kind_name,
                      static_cast<double>(r), static_cast<double>(t), static_cast<double>(loss), want.loss,
                      static_cast<double>(grad), want.grad);
        }
      }
    }
  }
  std::printf("%s %s: %ld pairs, wrong %ld\n", type, kind_name, checked, wrong);
  failures += wrong > 0;
}

template <class T>
void check_kl(const char* type, const std::vector<T>& values, long double tolerance) {
  long checked = 0, wrong = 0;
  for (T m : values) {
    for (T lv : values) {
      if (std::fabs(static_cast<double>(lv)) > 80) continue;  // exp overflows in float: not this check's subject
      T variance;
      const T term = math::kl_element_term(m, lv, &variance);
      const long double want_variance = std::exp(static_cast<long double>(lv));
      const long double want = 1 + static_cast<long double>(lv) - static_cast<long double>(m) * m - want_variance;
      const long double size = 1 + std::fabs((long double)lv) + (long double)m * m + want_variance;
      ++checked;
      if (!agrees(term, want, size, tolerance) || !agrees(variance, want_variance, want_variance, tolerance)) {
        if (++wrong <= 5) std::printf("  %s kl m=%g lv=%g: %g (want %Lg)\n", type, (double)m, (double)lv, (double)term, want);
      }
    }
  }
  std::printf("%s kl: %ld pairs, wrong %ld\n", type, checked, wrong);
  failures += wrong > 0;
}

// Every element of every row lies in exactly one (row, segment), and the segments of a row
// come in order: the kernels' work items, for row lengths around the segment size.
void check_segments() {
  long wrong = 0;
  const int64_t segment = latentspace::kCudaLossSegment;
  for (int64_t cols : {int64_t{1}, int64_t{31}, int64_t{32}, segment - 1, segment, segment + 1, 2 * segment,
                       2 * segment + 5, int64_t{70001}}) {
    const int64_t rows = 3;
    const int64_t per_row = math::segments_per_row_of(cols);
    std::vector<int> seen(static_cast<size_t>(rows * cols), 0);
    for (int64_t item = 0; item < rows * per_row; ++item) {
      const math::Segment s = math::segment_of(item, per_row, cols);
      if (s.count < 1 || s.count > segment || s.first + s.count > cols) ++wrong;
      for (int64_t i = 0; i < s.count; ++i) ++seen[static_cast<size_t>(s.row * cols + s.first + i)];
    }
    for (int count : seen) wrong += count != 1;
  }
  std::printf("segments: wrong %ld\n", wrong);
  failures += wrong > 0;
}

template <class T>
std::vector<T> logits(std::mt19937_64& random) {
  std::vector<T> values = {T(0), T(-0.0), T(1e-30), T(-1e-30), T(0.5), T(-0.5), T(1), T(-1), T(3), T(-3),
                           T(17), T(-17), T(40), T(-40), T(100), T(-100), T(1e4), T(-1e4),
                           INFINITY, -INFINITY, NAN};
  std::normal_distribution<double> normal(0.0, 5.0);
  for (int i = 0; i < 200; ++i) values.push_back(static_cast<T>(normal(random)));
  return values;
}

template <class T>
std::vector<T> probabilities(std::mt19937_64& random) {
  std::vector<T> values = {T(0), T(1e-40), T(1e-30), T(1e-8), T(1e-3), T(0.25), T(0.5), T(0.75), T(1) - T(1e-7),
                           T(1), NAN};
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int i = 0; i < 200; ++i) values.push_back(static_cast<T>(uniform(random)));
  return values;
}

template <class T>
void check_type(const char* type, long double tolerance, std::mt19937_64& random) {
  const std::vector<T> p = probabilities<T>(random), x = logits<T>(random);
  std::vector<T> targets = {T(0), T(1), T(0.3), NAN};
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int i = 0; i < 20; ++i) targets.push_back(static_cast<T>(uniform(random)));
  check_kind<T, ReconstructionKind::kMse>(type, "mse", x, x, tolerance);
  check_kind<T, ReconstructionKind::kBce>(type, "bce", p, targets, tolerance);
  check_kind<T, ReconstructionKind::kBceLogits>(type, "bce_logits", x, targets, tolerance);
  check_kl<T>(type, x, tolerance);
}

}  // namespace

int main() {
  std::mt19937_64 random(20261127);
  check_type<float>("float32", 4e-6L, random);
  check_type<double>("float64", 1e-14L, random);
  check_segments();
  std::printf("failures %d\n", failures);
  return failures == 0 ? 0 : 1;
}
