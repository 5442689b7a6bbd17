// Fused loss + gradient for one segment of float32 data, written once over the vector
// primitives of vec_*.h. Include inside the anonymous namespace of an ISA translation unit,
// after the matching vec_*.h. No #pragma once, on purpose.
//
// The exp / log it needs come from vec_math.h.

#include "cpu/simd/vec_math.h"

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
    *grad = vec_mul(vec_sub(r, t), vec_reciprocal(vec_max(vec_mul(r, q), vec_set1(1e-12f))));
    // -(t log p + (1 - t) log q) = -(t (log p - log q) + log q)
    return vec_sub(vec_zero(), vec_fmadd(t, vec_sub(log_p, log_q), log_q));
  } else {
    // x = logit: max(x, 0) - x t + log(1 + e), e = exp(-|x|); d/dx = sigmoid(x) - t.
    const Vec e = vec_exp_nonpositive(vec_sub(vec_zero(), vec_abs(r)));
    const Vec u = vec_add(vec_set1(1.0f), e);
    const Vec inverse = vec_reciprocal(u);  // 1 / (1 + e)
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

float kl_segment(const float* mu, const float* logvar, int64_t n, float grad_scale,
                 float* grad_mu, float* grad_logvar) {
  const Vec scale = vec_set1(grad_scale), half_scale = vec_set1(0.5f * grad_scale);
  Vec total = vec_zero();
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t count = n - i < kLanes ? n - i : kLanes;
    const Vec m = vec_load_partial(mu + i, count);
    const Vec lv = vec_load_partial(logvar + i, count);
    const Vec variance = vec_exp(lv);
    // 1 + lv - m^2 - variance; padding lanes (m = lv = 0) contribute 1 + 0 - 0 - 1 = 0.
    total = vec_add(total, vec_sub(vec_sub(vec_add(vec_set1(1.0f), lv), vec_mul(m, m)), variance));
    if (grad_mu) vec_store_partial(grad_mu + i, vec_mul(m, scale), count);
    if (grad_logvar) {
      vec_store_partial(grad_logvar + i, vec_mul(vec_sub(variance, vec_set1(1.0f)), half_scale), count);
    }
  }
  return vec_sum(total);
}
