// Portable "vector" primitives (one lane) for the kernel templates (*_impl.h).
// Include inside an anonymous namespace of a translation unit compiled with the baseline
// flags, after <cstdint>. No #pragma once, on purpose.

using Vec = float;
constexpr int kLanes = 1;
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

// ---- elementwise math (losses) ----------------------------------------------------------
inline Vec vec_add(Vec a, Vec b) { return a + b; }
inline Vec vec_sub(Vec a, Vec b) { return a - b; }
inline Vec vec_mul(Vec a, Vec b) { return a * b; }
inline Vec vec_div(Vec a, Vec b) { return a / b; }
inline Vec vec_sqrt(Vec a) { return __builtin_sqrtf(a); }
inline Vec vec_max(Vec a, Vec b) { return a > b ? a : b; }
inline Vec vec_min(Vec a, Vec b) { return a < b ? a : b; }
inline Vec vec_abs(Vec a) { return __builtin_fabsf(a); }
inline float vec_sum(Vec a) { return a; }
inline Vec vec_select(uint32_t mask, Vec a, Vec b) { return mask & 1u ? a : b; }
inline uint32_t vec_nan_mask(Vec a) { return a != a ? 1u : 0u; }
inline uint32_t vec_equal_mask(Vec a, Vec b) { return a == b ? 1u : 0u; }
inline void vec_store_partial(float* p, Vec v, int64_t n) { if (n > 0) *p = v; }
inline Vec vec_round(Vec a) { return __builtin_nearbyintf(a); }
// ldexp takes an int, and converting a float that has none (NaN, which a NaN input gives n and
// y alike) is undefined behaviour (UBSan's float-cast-overflow, from test_nan_propagates): NaN
// returns NaN without the conversion, and n is clamped as the AVX2 version does (the same
// results: y is near 1, so 2^254 already overflows and 2^-252 underflows).
inline Vec vec_scale_pow2(Vec y, Vec n) {
  if (n != n) return y + n;
  n = n < -252.0f ? -252.0f : (n > 254.0f ? 254.0f : n);
  return __builtin_ldexpf(y, static_cast<int>(n));
}
inline Vec vec_reciprocal(Vec x) { return 1.0f / x; }
// x = m * 2^e with m in [1, 2): returns m, sets e. x = 0 gives e = -150 (log(0) below -103);
// NaN gives NaN.
inline Vec vec_split_exponent(Vec x, Vec* e) {
  if (x == 0.0f) {
    *e = -150.0f;
    return 1.0f;
  }
  int exponent = 0;
  const float m = __builtin_frexpf(x, &exponent);  // m in [0.5, 1)
  *e = static_cast<float>(exponent - 1);
  return 2.0f * m;
}
