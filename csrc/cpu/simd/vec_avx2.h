// AVX2 + FMA vector primitives for the kernel templates (*_impl.h).
// Include inside an anonymous namespace of a translation unit compiled with -mavx2 -mfma,
// after <immintrin.h> and <cstdint>: everything here then has internal linkage (see
// knn_tile_impl.h for why that matters). No #pragma once, on purpose.

using Vec = __m256;
constexpr int kLanes = 8;
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

// ---- elementwise math (losses) ----------------------------------------------------------
inline Vec vec_add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vec_sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vec_mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vec_div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vec_sqrt(Vec a) { return _mm256_sqrt_ps(a); }
inline Vec vec_max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vec_min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec vec_abs(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline float vec_sum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Expands the low 8 bits of mask into a lane mask (sign bit set where the bit is set).
inline __m256 lanes_from_bits(uint32_t mask) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(mask)), bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, bit));
}
inline Vec vec_select(uint32_t mask, Vec a, Vec b) { return _mm256_blendv_ps(b, a, lanes_from_bits(mask)); }
inline uint32_t vec_nan_mask(Vec a) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
}
inline uint32_t vec_equal_mask(Vec a, Vec b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)));
}
inline void vec_store_partial(float* p, Vec v, int64_t n) {
  if (n >= kLanes) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, first_lanes_mask(n), v);
  }
}
inline Vec vec_round(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n * y for integral n (underflows to 0, overflows to inf, like ldexp), in two steps so that
// n down to -252 and up to 254 stay exact.
inline Vec vec_scale_pow2(Vec y, Vec n) {
  n = _mm256_max_ps(_mm256_min_ps(n, _mm256_set1_ps(254.0f)), _mm256_set1_ps(-252.0f));
  const __m256 half = _mm256_round_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const auto pow2 = [](__m256 k) {  // 2^k for k in [-126, 127]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(y, pow2(half)), pow2(_mm256_sub_ps(n, half)));
}
// 1/x to about 1 ulp: the 12-bit estimate refined by two Newton steps (cheaper than a divide).
inline Vec vec_reciprocal(Vec x) {
  __m256 r = _mm256_rcp_ps(x);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0f)));
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0f)));
}
// x = m * 2^e with m in [1, 2) (denormals included, scaled up first): returns m, sets e.
// x = 0 gives e = -150 (so log(0) comes out below -103); NaN gives m = NaN.
inline Vec vec_split_exponent(Vec x, Vec* e) {
  const __m256 denormal = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  x = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), denormal);  // * 2^23
  const __m256i bits = _mm256_castps_si256(x);
  const __m256 exponent = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7f800000)), 23), _mm256_set1_epi32(127)));
  *e = _mm256_sub_ps(exponent, _mm256_and_ps(denormal, _mm256_set1_ps(23.0f)));
  const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  return _mm256_blendv_ps(m, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
