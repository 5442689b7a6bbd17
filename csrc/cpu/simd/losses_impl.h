// Fused loss + gradient for one segment of float32 data, written once over the vector
// primitives of vec_*.h. Include inside the anonymous namespace of an ISA translation unit,
// after the matching vec_*.h. No #pragma once, on purpose.
//
// exp and log are polynomial approximations on a reduced range (the classic Cephes
// coefficients): about 1 ulp over the range the losses use, NaN in -> NaN out.

constexpr float kLn2High = 0.693359375f;      // ln 2 split in two for an exact reduction
constexpr float kLn2Low = -2.12194440e-4f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kSqrtHalf2 = 1.41421356237f;  // sqrt(2)

inline Vec vec_polynomial(Vec x, const float* c, int count) {
  Vec p = vec_set1(c[0]);
  for (int i = 1; i < count; ++i) p = vec_fmadd(p, x, vec_set1(c[i]));
  return p;
}

// Natural log for x >= 0: log(0) = -inf, log(inf) = inf, NaN -> NaN.
inline Vec vec_log(Vec x) {
  static constexpr float kCoefficients[9] = {
      7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
      -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f};
  Vec e;
  Vec m = vec_split_exponent(x, &e);  // x = m * 2^e, m in [1, 2)
  const uint32_t high = vec_less_mask(vec_set1(kSqrtHalf2), m);  // recentre: m in [sqrt(.5), sqrt(2))
  m = vec_select(high, vec_mul(m, vec_set1(0.5f)), m);
  e = vec_select(high, vec_add(e, vec_set1(1.0f)), e);
  const Vec f = vec_sub(m, vec_set1(1.0f));
  const Vec f2 = vec_mul(f, f);
  Vec y = vec_mul(vec_mul(vec_polynomial(f, kCoefficients, 9), f), f2);  // f^3 P(f)
  y = vec_fmadd(e, vec_set1(kLn2Low), y);
  y = vec_fmadd(f2, vec_set1(-0.5f), y);
  Vec result = vec_fmadd(e, vec_set1(kLn2High), vec_add(f, y));
  result = vec_select(vec_equal_mask(x, vec_zero()), vec_set1(-__builtin_inff()), result);
  result = vec_select(vec_equal_mask(x, vec_set1(__builtin_inff())), x, result);
  return vec_select(vec_nan_mask(x), x, result);
}

// e^x: 0 below -104 (float32 underflow), inf above 88.8, NaN -> NaN.
inline Vec vec_exp(Vec x) {
  static constexpr float kCoefficients[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                             4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  const Vec clamped = vec_max(vec_min(x, vec_set1(89.0f)), vec_set1(-104.0f));
  const Vec n = vec_round(vec_mul(clamped, vec_set1(kLog2e)));
  Vec r = vec_fmadd(n, vec_set1(-kLn2High), clamped);
  r = vec_fmadd(n, vec_set1(-kLn2Low), r);
  const Vec y = vec_fmadd(vec_polynomial(r, kCoefficients, 6), vec_mul(r, r), vec_add(r, vec_set1(1.0f)));
  Vec result = vec_scale_pow2(y, n);
  result = vec_select(vec_less_mask(x, vec_set1(-104.0f)), vec_zero(), result);
  result = vec_select(vec_less_mask(vec_set1(89.0f), x), vec_set1(__builtin_inff()), result);
  return vec_select(vec_nan_mask(x), x, result);
}

// log(1 + e) for e in [0, 1], accurate for tiny e (u - 1 recovers the rounding of 1 + e).
inline Vec vec_log1p_unit(Vec e) {
  const Vec u = vec_add(vec_set1(1.0f), e);
  const Vec d = vec_sub(u, vec_set1(1.0f));
  const uint32_t exact = vec_equal_mask(d, vec_zero());  // 1 + e == 1: log1p(e) = e
  const Vec safe_d = vec_select(exact, vec_set1(1.0f), d);
  return vec_select(exact, e, vec_mul(vec_log(u), vec_div(e, safe_d)));
}

// Loss and d(loss)/d(recon) of one vector of elements.
template <ReconstructionKind kKind>
inline Vec element_loss(Vec r, Vec t, Vec* grad) {
  if constexpr (kKind == ReconstructionKind::kMse) {
    const Vec d = vec_sub(r, t);
    *grad = vec_add(d, d);
    return vec_mul(d, d);
  } else if constexpr (kKind == ReconstructionKind::kBce) {
    const Vec one = vec_set1(1.0f);
    const Vec q = vec_sub(one, r);
    // torch clamps the logs at -100. Operand order matters: vec_max returns its second
    // operand when either is NaN, so a NaN log propagates.
    const Vec log_p = vec_max(vec_set1(-100.0f), vec_log(r));
    const Vec log_q = vec_max(vec_set1(-100.0f), vec_log(q));
    // torch: (p - t) / max(p (1 - p), 1e-12)
    *grad = vec_div(vec_sub(r, t), vec_max(vec_mul(r, q), vec_set1(1e-12f)));
    // -(t log p + (1 - t) log q) = -(t (log p - log q) + log q)
    return vec_sub(vec_zero(), vec_fmadd(t, vec_sub(log_p, log_q), log_q));
  } else {
    // x = logit: max(x, 0) - x t + log(1 + e^-|x|); d/dx = sigmoid(x) - t.
    const Vec e = vec_exp(vec_sub(vec_zero(), vec_abs(r)));
    const Vec inverse = vec_div(vec_set1(1.0f), vec_add(vec_set1(1.0f), e));
    const uint32_t negative = vec_less_mask(r, vec_zero());
    const Vec sigmoid = vec_select(negative, vec_mul(e, inverse), inverse);
    *grad = vec_sub(sigmoid, t);
    return vec_add(vec_sub(vec_max(r, vec_zero()), vec_mul(r, t)), vec_log1p_unit(e));
  }
}

// Lanes of a recon vector outside [0, 1] (NaN is not counted: it propagates instead).
inline uint32_t out_of_unit_interval(Vec r) {
  return vec_less_mask(r, vec_zero()) | vec_less_mask(vec_set1(1.0f), r);
}

template <ReconstructionKind kKind, bool kGrad>
float segment_loss_for(const float* recon, const float* target, int64_t n, float grad_scale,
                       float* grad, uint32_t* out_of_range) {
  const Vec scale = vec_set1(grad_scale);
  Vec total = vec_zero();
  uint32_t bad = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec r = vec_load(recon + i);
    Vec g;
    total = vec_add(total, element_loss<kKind>(r, vec_load(target + i), &g));
    if constexpr (kKind == ReconstructionKind::kBce) bad |= out_of_unit_interval(r);
    if constexpr (kGrad) vec_store(grad + i, vec_mul(g, scale));
  }
  if (i < n) {  // tail: padding lanes read as 0 and are masked out of the sum
    const int64_t count = n - i;
    const Vec r = vec_load_partial(recon + i, count);
    Vec g;
    const Vec loss = element_loss<kKind>(r, vec_load_partial(target + i, count), &g);
    const uint32_t valid = (uint32_t{1} << count) - 1u;
    total = vec_add(total, vec_select(valid, loss, vec_zero()));
    if constexpr (kKind == ReconstructionKind::kBce) bad |= out_of_unit_interval(r) & valid;
    if constexpr (kGrad) vec_store_partial(grad + i, vec_mul(g, scale), count);
  }
  *out_of_range |= bad;
  return vec_sum(total);
}

float segment_loss(const float* recon, const float* target, int64_t n, ReconstructionKind kind,
                   float grad_scale, float* grad, uint32_t* out_of_range) {
  switch (kind) {
    case ReconstructionKind::kMse:
      return grad ? segment_loss_for<ReconstructionKind::kMse, true>(recon, target, n, grad_scale, grad, out_of_range)
                  : segment_loss_for<ReconstructionKind::kMse, false>(recon, target, n, grad_scale, grad, out_of_range);
    case ReconstructionKind::kBce:
      return grad ? segment_loss_for<ReconstructionKind::kBce, true>(recon, target, n, grad_scale, grad, out_of_range)
                  : segment_loss_for<ReconstructionKind::kBce, false>(recon, target, n, grad_scale, grad, out_of_range);
    case ReconstructionKind::kBceLogits: break;
  }
  return grad ? segment_loss_for<ReconstructionKind::kBceLogits, true>(recon, target, n, grad_scale, grad, out_of_range)
              : segment_loss_for<ReconstructionKind::kBceLogits, false>(recon, target, n, grad_scale, grad, out_of_range);
}
