// torch.nn.LayerNorm for the CPU encoder (see encode_row_norm.h).
#include "cpu/encode_row_norm.h"

#include <cmath>

#include "core/check.h"

namespace latentspace::cpu {
namespace {

// Four partial sums: the additions of one row need not wait for each other (the order
// differs from a single running sum only in double's rounding, far below float32's).
constexpr int kPartialSums = 4;

double row_sum(const float* h, int64_t width) {
  double partial[kPartialSums] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + kPartialSums <= width; j += kPartialSums) {
    for (int k = 0; k < kPartialSums; ++k) partial[k] += h[j + k];
  }
  for (; j < width; ++j) partial[0] += h[j];
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

double row_squared_deviation(const float* h, int64_t width, double mean) {
  double partial[kPartialSums] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + kPartialSums <= width; j += kPartialSums) {
    for (int k = 0; k < kPartialSums; ++k) {
      const double d = h[j + k] - mean;
      partial[k] += d * d;
    }
  }
  for (; j < width; ++j) {
    const double d = h[j] - mean;
    partial[0] += d * d;
  }
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

}  // namespace

RowNormStage copy_row_norm(const RowNorm& norm, int64_t width, const std::string& name) {
  // eps = 0 would make a constant row 0 / 0 = NaN codes (torch's answer too): torch takes any
  // eps, the exporter leaves eps <= 0 to torch.
  LS_CHECK_VALUE(std::isfinite(norm.eps) && norm.eps > 0.0, name, ": expected eps > 0 (finite), got ", norm.eps);
  RowNormStage stage;
  stage.place = norm.place;
  stage.eps = norm.eps;
  if (norm.scale) stage.scale.assign(norm.scale, norm.scale + width);
  if (norm.shift) stage.shift.assign(norm.shift, norm.shift + width);
  for (const float v : stage.scale) {
    LS_CHECK_VALUE(std::isfinite(v), name, ": the scale (weight) contains NaN or Inf; the encoder needs finite values");
  }
  for (const float v : stage.shift) {
    LS_CHECK_VALUE(std::isfinite(v), name, ": the shift (bias) contains NaN or Inf; the encoder needs finite values");
  }
  return stage;
}

int64_t normalize_rows(const RowNormStage& norm, const float* in, int64_t ld_in, float* out, int64_t ld_out,
                       int64_t rows, int64_t width) {
  const float* scale = norm.scale.empty() ? nullptr : norm.scale.data();
  const float* shift = norm.shift.empty() ? nullptr : norm.shift.data();
  const double n = static_cast<double>(width);
  int64_t first_bad = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const float* h = in + r * ld_in;
    float* y = out + r * ld_out;
    const double mean = row_sum(h, width) / n;
    if (!std::isfinite(mean) && first_bad < 0) first_bad = r;
    const double inverse_std = 1.0 / std::sqrt(row_squared_deviation(h, width, mean) / n + norm.eps);
    for (int64_t j = 0; j < width; ++j) {
      double v = (h[j] - mean) * inverse_std;
      if (scale) v *= scale[j];
      if (shift) v += shift[j];
      y[j] = static_cast<float>(v);
    }
  }
  return first_bad;
}

}  // namespace latentspace::cpu
