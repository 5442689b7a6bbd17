// Portable kNN tile kernels: plain C++ for any CPU (compiled with the baseline flags only).
// Same panel scheme as the SIMD versions, with narrow panels the compiler can keep in
// SSE registers.
#include <cstdint>

#include "cpu/simd/knn_kernels.h"
#include "ops/norms.h"

namespace latentspace::cpu {
namespace {

using Vec = float;
constexpr int kLanes = 1;
constexpr int kPanelWidth = 8;
constexpr int kMaxPanelRows = 4;
constexpr int kMaxRowQueries = 3;

inline Vec vec_zero() { return 0.0f; }
inline Vec vec_load(const float* p) { return *p; }
inline void vec_store(float* p, Vec v) { *p = v; }
inline Vec vec_set1(float x) { return x; }
inline Vec vec_broadcast(const float* p) { return *p; }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return a * b + c; }
inline uint32_t vec_less_mask(Vec a, Vec b) { return a < b ? 1u : 0u; }
inline Vec vec_load_partial(const float* p, int64_t) { return *p; }
inline void prefetch_ahead(const float*, uintptr_t) {}
inline Vec reduce_lanes(const Vec v[1]) { return v[0]; }
inline void transpose_block(Vec[1]) {}

#include "cpu/simd/knn_tile_impl.h"

}  // namespace

const KnnKernels& knn_kernels_scalar() {
  static const KnnKernels kernels{SimdLevel::kScalar, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
