// The encoder's LayerNorm stage (ops/encode.h, RowNorm): torch.nn.LayerNorm's eval forward on
// rows of a block, run by encode.cpp after a layer's kernel has written the block (or on the
// input rows, for a model that starts with nn.LayerNorm). O(width) per row, small next to the
// layer's product, so plain loops, not per-instruction-set kernels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ops/encode.h"

namespace latentspace::cpu {

// A RowNorm with the encoder's own copies of its parameters.
struct RowNormStage {
  NormPlace place = NormPlace::kNone;
  double eps = 0.0;
  std::vector<float> scale;  // empty: 1 (elementwise_affine=False)
  std::vector<float> shift;  // empty: 0 (no bias)
};

// Copies norm for rows of `width` values. Throws ValueError naming `name` for an eps that is
// not positive and finite, or a scale / shift holding NaN or Inf.
RowNormStage copy_row_norm(const RowNorm& norm, int64_t width, const std::string& name);

// out[r] = LayerNorm(in[r]) for r < rows, rows of `width` values (row strides ld_in, ld_out;
// in may be out). Mean and variance are accumulated in double over the float32 values, two
// passes (the variance of values far from 0 does not cancel), and each output is formed in
// double and rounded once to float32: the result is the float64 LayerNorm of the float32
// inputs, to float32 rounding. A constant row gives (h - mean) / sqrt(eps) = 0 (+ shift), as
// torch. A row holding NaN or Inf comes out all NaN (its mean is not finite: a double sum of
// finite floats cannot overflow); returns the lowest such row, -1 when all were finite.
int64_t normalize_rows(const RowNormStage& norm, const float* in, int64_t ld_in, float* out, int64_t ld_out,
                       int64_t rows, int64_t width);

}  // namespace latentspace::cpu
