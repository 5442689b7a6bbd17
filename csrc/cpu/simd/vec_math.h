// Elementwise float32 math over the vector primitives of vec_*.h, shared by the kernel
// templates (losses_impl.h, encode_impl.h). Include inside the anonymous namespace of an ISA
// translation unit, after the matching vec_*.h. No #pragma once, on purpose.
//
// exp is a polynomial on a reduced range (the classic Cephes coefficients); log reduces to
// m in [1, 2) and sums the atanh series. Both about 1 ulp over the range used, NaN in -> NaN
// out. The activations (sigmoid, tanh, expm1, the normal CDF) build on them.

constexpr float kLn2High = 0.693359375f;      // ln 2 split in two for an exact reduction
constexpr float kLn2Low = -2.12194440e-4f;
constexpr float kLog2e = 1.44269504088896341f;

inline Vec vec_polynomial(Vec x, const float* c, int count) {
  Vec p = vec_set1(c[0]);
  for (int i = 1; i < count; ++i) p = vec_fmadd(p, x, vec_set1(c[i]));
  return p;
}

// Odd series of 2 atanh(s) = log((1 + s) / (1 - s)) for s in [0, 1/3], highest term first
// (7 terms: the next is below 1.5e-8 relative).
constexpr float kAtanhSeries[7] = {1.0f / 13, 1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f};

// 2 atanh(s) for s in [0, 1/3].
inline Vec twice_atanh(Vec s) {
  return vec_mul(vec_add(s, s), vec_polynomial(vec_mul(s, s), kAtanhSeries, 7));
}

// log(m) + e ln 2 for m in [1, 2) and integral e: log(m) = 2 atanh((m - 1) / (m + 1)).
inline Vec log_of_split(Vec m, Vec e) {
  const Vec s = vec_mul(vec_sub(m, vec_set1(1.0f)), vec_reciprocal(vec_add(m, vec_set1(1.0f))));
  return vec_fmadd(e, vec_set1(kLn2High), vec_fmadd(e, vec_set1(kLn2Low), twice_atanh(s)));
}

// Natural log for x in [0, 2^127]: log(0) comes out at or below -103 (callers clamp, as the
// losses do at -100); NaN -> NaN. No special-case selects: this is the losses' hot path.
inline Vec vec_log(Vec x) {
  Vec e;
  const Vec m = vec_split_exponent(x, &e);
  return log_of_split(m, e);
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) in [0, 1/3]. Exact in the limit
// of tiny e (s -> e/2), with no exponent to extract.
inline Vec vec_log1p_unit(Vec e) {
  return twice_atanh(vec_mul(e, vec_reciprocal(vec_add(vec_set1(2.0f), e))));
}

// e^x for x <= 0 (and NaN -> NaN): below -104 it returns e^-104 ~ 7e-46 (float32 underflow).
inline Vec vec_exp_nonpositive(Vec x) {
  static constexpr float kCoefficients[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                             4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  x = vec_max(vec_set1(-104.0f), x);  // operand order: NaN propagates
  const Vec n = vec_round(vec_mul(x, vec_set1(kLog2e)));
  Vec r = vec_fmadd(n, vec_set1(-kLn2High), x);
  r = vec_fmadd(n, vec_set1(-kLn2Low), r);
  const Vec y = vec_fmadd(vec_polynomial(r, kCoefficients, 6), vec_mul(r, r), vec_add(r, vec_set1(1.0f)));
  return vec_scale_pow2(y, n);
}

// e^x for any x: e^x for x > 0 is 1 / e^-x; +inf above 88.7 (through the reciprocal of 0).
inline Vec vec_exp(Vec x) {
  const Vec small = vec_exp_nonpositive(vec_sub(vec_zero(), vec_abs(x)));
  const uint32_t positive = vec_less_mask(vec_zero(), x);
  return vec_select(positive, vec_div(vec_set1(1.0f), small), small);
}

// ---- activations (encode_impl.h) --------------------------------------------------------

// 1 / (1 + e^-x), accurate in relative terms on both sides: with e = e^-|x|, 1 / (1 + e) for
// x >= 0 and e / (1 + e) for x < 0 (no 1 - tiny cancellation).
inline Vec vec_sigmoid(Vec x) {
  const Vec e = vec_exp_nonpositive(vec_sub(vec_zero(), vec_abs(x)));
  const Vec inverse = vec_div(vec_set1(1.0f), vec_add(vec_set1(1.0f), e));
  return vec_select(vec_less_mask(x, vec_zero()), vec_mul(e, inverse), inverse);
}

// tanh: below |x| = 0.625 the odd polynomial x + x^3 P(x^2) (Cephes tanhf coefficients, 4e-9
// relative); above, (1 - e) / (1 + e) with e = e^-2|x| (no cancellation there), sign restored.
inline Vec vec_tanh(Vec x) {
  static constexpr float kSmall[5] = {-5.70498872745e-3f, 2.06390887954e-2f, -5.37397155531e-2f,
                                      1.33314422036e-1f, -3.33332819422e-1f};
  const Vec a = vec_abs(x);
  const Vec z = vec_mul(x, x);
  const Vec small = vec_fmadd(vec_mul(x, z), vec_polynomial(z, kSmall, 5), x);
  const Vec e = vec_exp_nonpositive(vec_mul(vec_set1(-2.0f), a));
  const Vec large = vec_div(vec_sub(vec_set1(1.0f), e), vec_add(vec_set1(1.0f), e));
  const Vec signed_large = vec_select(vec_less_mask(x, vec_zero()), vec_sub(vec_zero(), large), large);
  return vec_select(vec_less_mask(a, vec_set1(0.625f)), small, signed_large);
}

// e^x - 1 for x <= 0 (ELU's negative side): the Taylor series to x^8 / 8! below |x| = 0.5
// (relative error < 1e-8, where exp(x) - 1 would cancel), exp(x) - 1 beyond.
inline Vec vec_expm1_nonpositive(Vec x) {
  static constexpr float kSeries[8] = {1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120,
                                       1.0f / 24,    1.0f / 6,    1.0f / 2,   1.0f};
  const Vec series = vec_mul(x, vec_polynomial(x, kSeries, 8));
  const Vec direct = vec_sub(vec_exp_nonpositive(x), vec_set1(1.0f));
  return vec_select(vec_less_mask(vec_set1(-0.5f), x), series, direct);
}

// The standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2, with erfc(u) for u >= 0 from
// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7): Phi(x) = erfc(|x| / sqrt 2) / 2 for
// x < 0 (small values keep their relative accuracy), 1 - that for x >= 0.
inline Vec vec_normal_cdf(Vec x) {
  static constexpr float kErfc[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f,
                                     0.254829592f};
  const Vec u = vec_mul(vec_abs(x), vec_set1(0.70710678118654752f));
  const Vec t = vec_div(vec_set1(1.0f), vec_fmadd(u, vec_set1(0.3275911f), vec_set1(1.0f)));
  const Vec tail = vec_mul(vec_mul(vec_set1(0.5f), vec_mul(t, vec_polynomial(t, kErfc, 5))),
                           vec_exp_nonpositive(vec_sub(vec_zero(), vec_mul(u, u))));
  return vec_select(vec_less_mask(x, vec_zero()), tail, vec_sub(vec_set1(1.0f), tail));
}
