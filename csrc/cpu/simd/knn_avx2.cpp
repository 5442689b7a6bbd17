// kNN tile kernels for AVX2 + FMA: 16-vector database panels, 6-query panels, so the
// 6 x 16 accumulator block fills 12 of the 16 ymm registers.
// Compiled with -mavx2 -mfma; only reached when the CPU reports both (cpu_features.cpp).
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/knn_kernels.h"
#include "ops/norms.h"

namespace latentspace::cpu {
namespace {

using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kPanelWidth = 16;
constexpr int kMaxPanelRows = 6;
constexpr int kMaxRowQueries = 3;  // the AVX-512 crossover (docs/benchmarks.md), not measured apart

inline Vec vec_zero() { return _mm256_setzero_ps(); }
inline Vec vec_load(const float* p) { return _mm256_loadu_ps(p); }
inline void vec_store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vec_set1(float x) { return _mm256_set1_ps(x); }
inline Vec vec_broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline uint32_t vec_less_mask(Vec a, Vec b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
}
// Mask with the sign bit set in lanes j < n.
inline __m256i first_lanes_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec vec_load_partial(const float* p, int64_t n) {
  return n >= kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes_mask(n));
}
inline void prefetch_ahead(const float* p, uintptr_t bytes) {
  // Integer arithmetic: the address may lie past the end of the data (prefetch never faults).
  // Into L2 (T1): it holds more misses in flight than L1, which is what streaming needs.
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + bytes), _MM_HINT_T1);
}

// Lane i of the result = sum of v[i]'s 8 lanes: pairwise shuffles and adds.
inline Vec reduce_lanes(const Vec v[8]) {
  __m256 s[4], t[2];
  for (int m = 0; m < 4; ++m) {
    s[m] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * m], v[2 * m + 1]),
                         _mm256_unpackhi_ps(v[2 * m], v[2 * m + 1]));
  }
  for (int p = 0; p < 2; ++p) {
    const __m256d a = _mm256_castps_pd(s[2 * p]), b = _mm256_castps_pd(s[2 * p + 1]);
    t[p] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                         _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(t[0], t[1], 0x20), _mm256_permute2f128_ps(t[0], t[1], 0x31));
}

// In-register transpose of an 8 x 8 block: r[i][j] -> r[j][i].
inline void transpose_block(__m256 r[8]) {
  __m256 a[8], b[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    a[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // b[4g + c], 128-bit lane L = column 4L + c of rows 4g..4g+3.
  for (int g = 0; g < 8; g += 4) {
    b[g + 0] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a[g]), _mm256_castps_pd(a[g + 2])));
    b[g + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a[g]), _mm256_castps_pd(a[g + 2])));
    b[g + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a[g + 1]), _mm256_castps_pd(a[g + 3])));
    b[g + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a[g + 1]), _mm256_castps_pd(a[g + 3])));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x31);
  }
}

#include "cpu/simd/knn_tile_impl.h"

}  // namespace

const KnnKernels& knn_kernels_avx2() {
  static const KnnKernels kernels{SimdLevel::kAvx2, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan,
                                  kMaxRowQueries, &scan_rows};
  return kernels;
}

}  // namespace latentspace::cpu
