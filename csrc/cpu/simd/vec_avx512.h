// AVX-512 (F, BW, VL, DQ) vector primitives for the kernel templates (*_impl.h).
// Include inside an anonymous namespace of a translation unit compiled with -mavx512*, after
// <immintrin.h> and <cstdint>: everything here then has internal linkage (see
// knn_tile_impl.h for why that matters). No #pragma once, on purpose.

using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vec_zero() { return _mm512_setzero_ps(); }
inline Vec vec_load(const float* p) { return _mm512_loadu_ps(p); }
inline void vec_store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vec_set1(float x) { return _mm512_set1_ps(x); }
inline Vec vec_broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline uint32_t vec_less_mask(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline Vec vec_load_partial(const float* p, int64_t n) {
  return n >= kLanes ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
inline void prefetch_ahead(const float* p, uintptr_t bytes) {
  // Integer arithmetic: the address may lie past the end of the data (prefetch never faults).
  // Into L2 (T1): it holds more misses in flight than L1, which is what streaming needs.
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + bytes), _MM_HINT_T1);
}

// Lane i of the result = sum of v[i]'s 16 lanes: a tree of pairwise shuffles and adds
// (pairs of rows, then pairs of pairs, then across 128-bit lanes), 45 instructions.
inline Vec reduce_lanes(const Vec v[16]) {
  __m512 s[8], t[4];
  for (int m = 0; m < 8; ++m) {  // even lanes: partial sums of v[2m], odd lanes: v[2m+1]
    s[m] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * m], v[2 * m + 1]),
                         _mm512_unpackhi_ps(v[2 * m], v[2 * m + 1]));
  }
  for (int p = 0; p < 4; ++p) {  // 128-bit lane L: partial sums of v[4p..4p+3]
    const __m512d a = _mm512_castps_pd(s[2 * p]), b = _mm512_castps_pd(s[2 * p + 1]);
    t[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44), _mm512_shuffle_f32x4(t[0], t[1], 0xEE));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44), _mm512_shuffle_f32x4(t[2], t[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
}

// In-register transpose of a 16 x 16 block: r[i][j] -> r[j][i].
inline void transpose_block(__m512 r[16]) {
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

// ---- elementwise math (losses) ----------------------------------------------------------
inline Vec vec_add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vec_sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vec_mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vec_div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec vec_max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vec_min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec vec_abs(Vec a) { return _mm512_abs_ps(a); }
inline float vec_sum(Vec a) { return _mm512_reduce_add_ps(a); }
// a where mask bit set, else b.
inline Vec vec_select(uint32_t mask, Vec a, Vec b) { return _mm512_mask_blend_ps(static_cast<__mmask16>(mask), b, a); }
inline uint32_t vec_nan_mask(Vec a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
inline uint32_t vec_equal_mask(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline void vec_store_partial(float* p, Vec v, int64_t n) {
  if (n >= kLanes) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
  }
}
// 2^n * y for integral n (any range: underflows to 0, overflows to inf, like ldexp).
inline Vec vec_scale_pow2(Vec y, Vec n) { return _mm512_scalef_ps(y, n); }
inline Vec vec_round(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 1/x to about 1 ulp: the 14-bit estimate refined by one Newton step (cheaper than a divide).
inline Vec vec_reciprocal(Vec x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
}
// x = m * 2^e with m in [1, 2) (denormals included): returns m, sets e. x = 0 gives m = 1,
// e = -150 (so log(0) comes out below -103, as on the other ISAs); NaN gives NaN.
inline Vec vec_split_exponent(Vec x, Vec* e) {
  const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ);
  *e = _mm512_mask_blend_ps(zero, _mm512_getexp_ps(x), _mm512_set1_ps(-150.0f));
  return _mm512_mask_blend_ps(zero, _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src),
                              _mm512_set1_ps(1.0f));
}
