// kNN tile kernels for AVX2 + FMA: 16-vector database panels, 6-query panels, so the
// 6 x 16 accumulator block fills 12 of the 16 ymm registers.
// Compiled with -mavx2 -mfma; only reached when the CPU reports both (cpu_features.cpp).
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/knn_kernels.h"

namespace latentspace::cpu {
namespace {

using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kPanelWidth = 16;
constexpr int kMaxPanelRows = 6;

inline Vec vec_zero() { return _mm256_setzero_ps(); }
inline Vec vec_load(const float* p) { return _mm256_loadu_ps(p); }
inline void vec_store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vec_set1(float x) { return _mm256_set1_ps(x); }
inline Vec vec_broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline uint32_t vec_less_mask(Vec a, Vec b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
}

// In-register transpose of an 8 x 8 block: r[i][j] -> r[j][i].
inline void transpose_8x8(__m256 r[8]) {
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

void pack_rows(const float* x, int64_t rows, int64_t dim, float* panel, float* sq_norms) {
  for (int64_t first = 0; first < kPanelWidth; first += kLanes) {
    const int64_t count = rows - first < 0 ? 0 : (rows - first > kLanes ? kLanes : rows - first);
    __m256 norms = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += kLanes) {
      const int64_t cols = dim - c < kLanes ? dim - c : kLanes;
      // Lane j is loaded when its sign bit is set, i.e. when j < cols.
      const __m256i col_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = i < count ? _mm256_maskload_ps(x + (first + i) * dim + c, col_mask)
                         : _mm256_setzero_ps();
      }
      transpose_8x8(r);
      for (int64_t j = 0; j < cols; ++j) {
        _mm256_storeu_ps(panel + (c + j) * kPanelWidth + first, r[j]);
        norms = _mm256_fmadd_ps(r[j], r[j], norms);
      }
    }
    alignas(32) float lane_norms[kLanes];
    _mm256_store_ps(lane_norms, norms);
    for (int64_t i = 0; i < count; ++i) sq_norms[first + i] = lane_norms[i];
  }
}

#include "cpu/simd/knn_tile_impl.h"

}  // namespace

const KnnKernels& knn_kernels_avx2() {
  static const KnnKernels kernels{SimdLevel::kAvx2, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan};
  return kernels;
}

}  // namespace latentspace::cpu
