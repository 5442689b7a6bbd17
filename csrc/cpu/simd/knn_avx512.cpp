// kNN tile kernels for AVX-512 (F, BW, VL, DQ): 32-vector database panels, 12-query panels,
// so the 12 x 32 accumulator block fills 24 of the 32 zmm registers.
// Compiled with -mavx512*; only reached when the CPU reports AVX-512 (cpu_features.cpp).
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/knn_kernels.h"

namespace latentspace::cpu {
namespace {

using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kPanelWidth = 32;
constexpr int kMaxPanelRows = 12;

inline Vec vec_zero() { return _mm512_setzero_ps(); }
inline Vec vec_load(const float* p) { return _mm512_loadu_ps(p); }
inline void vec_store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vec_set1(float x) { return _mm512_set1_ps(x); }
inline Vec vec_broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline uint32_t vec_less_mask(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }

// In-register transpose of a 16 x 16 block: r[i][j] -> r[j][i].
inline void transpose_16x16(__m512 r[16]) {
  __m512 a[16], b[16];
  // Interleave row pairs within each 128-bit lane: columns 4L..4L+3 of rows i, i+1.
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // Pairs of pairs: b[4g + c], lane L = column 4L + c of rows 4g..4g+3.
  for (int g = 0; g < 16; g += 4) {
    b[g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[g]), _mm512_castps_pd(a[g + 2])));
    b[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[g]), _mm512_castps_pd(a[g + 2])));
    b[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[g + 1]), _mm512_castps_pd(a[g + 3])));
    b[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[g + 1]), _mm512_castps_pd(a[g + 3])));
  }
  // 4 x 4 transpose of 128-bit lanes among b[c], b[4 + c], b[8 + c], b[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512 e0 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x44);
    const __m512 e1 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xEE);
    const __m512 e2 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x44);
    const __m512 e3 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(e0, e2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(e0, e2, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(e1, e3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(e1, e3, 0xDD);
  }
}

void pack_rows(const float* x, int64_t rows, int64_t dim, float* panel, float* sq_norms) {
  for (int64_t first = 0; first < kPanelWidth; first += kLanes) {
    const int64_t count = rows - first < 0 ? 0 : (rows - first > kLanes ? kLanes : rows - first);
    __m512 norms = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim; c += kLanes) {
      const int64_t cols = dim - c < kLanes ? dim - c : kLanes;
      const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1u);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = i < count ? _mm512_maskz_loadu_ps(col_mask, x + (first + i) * dim + c)
                         : _mm512_setzero_ps();
      }
      transpose_16x16(r);
      for (int64_t j = 0; j < cols; ++j) {
        _mm512_storeu_ps(panel + (c + j) * kPanelWidth + first, r[j]);
        norms = _mm512_fmadd_ps(r[j], r[j], norms);
      }
    }
    alignas(64) float lane_norms[kLanes];
    _mm512_store_ps(lane_norms, norms);
    for (int64_t i = 0; i < count; ++i) sq_norms[first + i] = lane_norms[i];
  }
}

#include "cpu/simd/knn_tile_impl.h"

}  // namespace

const KnnKernels& knn_kernels_avx512() {
  static const KnnKernels kernels{SimdLevel::kAvx512, kPanelWidth, kMaxPanelRows,
                                  &pack_rows, &pack_query_panel, &scan};
  return kernels;
}

}  // namespace latentspace::cpu
