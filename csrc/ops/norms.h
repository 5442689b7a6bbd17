// Squared L2 norms of rows, and the check that rows are usable for search.
#pragma once

#include <cstdint>

#include "ops/knn.h"

namespace latentspace {

// Largest squared norm a vector may have: with |q|^2 and |x|^2 below FLT_MAX / 8, every
// key and distance the search computes (|x|^2 - 2<q,x> + |q|^2) stays finite.
constexpr float kMaxSquaredNorm = 3.4028234e38f / 8.0f;

// True when a squared norm is finite and at most kMaxSquaredNorm (false for NaN).
// static: internal linkage, so the SIMD translation units keep their own copies.
static inline bool usable_squared_norm(float n) { return n <= kMaxSquaredNorm; }

// Index of the first of `count` squared norms that is not usable, or -1.
static inline int64_t first_unusable_norm(const float* norms, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (!usable_squared_norm(norms[i])) return i;
  }
  return -1;
}

// out[i] = sum_d x[i][d]^2 in float32 (the same arithmetic the search kernels use).
// Returns the first row whose norm is not usable (NaN, Inf, or too large), or -1.
int64_t sq_norms_cpu(const float* x, int64_t rows, int64_t dim, float* out);

// The same check on the current CUDA device (csrc/cuda/norms.cu; a CPU-only build throws
// RuntimeError), queued on `stream` (a cudaStream_t, torch's current stream as an integer);
// returns when the work is queued. rows: [count][dim] elements of type `storage` in device
// memory. out (nullable, device, count floats): the squared norms. weights (nullable, device,
// dim floats): a row is also unusable when its weighted squared norm sum_d w_d x_d^2 is (as
// the CPU search refuses for weighted_l2). first_bad (device, one int64): set to first_row
// plus the first unusable row, or -1. Sums are float32 in another order than the CPU's, so a
// norm within an ulp or two of kMaxSquaredNorm may be judged the other way. The arguments are
// the caller's to check (the Python binding does): count >= 0, dim >= 1, first_row >= 0,
// first_bad not null, rows not null when count > 0, storage one of KnnStorage's.
void sq_norms_cuda(const void* rows, int64_t count, int64_t dim, KnnStorage storage, const float* weights,
                   int64_t first_row, float* out, int64_t* first_bad, uintptr_t stream);

namespace cpu {
struct KnnKernels;
}
// The same with the kernels of a SIMD level the caller already chose: a search reads the level
// once, so that another thread's set_simd_level cannot give its query norms another level's bits.
int64_t sq_norms_cpu(const cpu::KnnKernels& kernels, const float* x, int64_t rows, int64_t dim, float* out);

}  // namespace latentspace
