// Float32 units for the encoder's layer kernel (encode_impl.h): one float per 32-bit unit,
// the products by FMA. Include inside the anonymous namespace of an ISA translation unit,
// after vec_*.h. No #pragma once, on purpose.

// pack_row copies a row segment (minus the offset), optionally rounded to bfloat16 (the bf16
// emulation on CPUs without AVX512_BF16), and reports whether every value was finite.
struct Float32Dot {
  using Unit = float;
  static constexpr int kDepthPerUnit = 1;
  static Vec broadcast(const Unit* a) { return vec_broadcast(a); }
  static Vec load(const Unit* b) { return vec_load(b); }
  static Vec accumulate(Vec acc, Vec a, Vec b) { return vec_fmadd(a, b, acc); }
  static bool pack_row(const float* src, const float* offset, int64_t count, bool round, Unit* dst) {
    uint32_t bad = 0;
    int64_t k = 0;
    for (; k + kLanes <= count; k += kLanes) {
      Vec x = vec_load(src + k);
      if (offset) x = vec_sub(x, vec_load(offset + k));
      bad |= vec_nan_mask(vec_sub(x, x));  // inf - inf and NaN - NaN are NaN
      vec_store(dst + k, x);
    }
    for (; k < count; ++k) {
      const float x = offset ? src[k] - offset[k] : src[k];
      bad |= (x - x) != 0.0f ? 1u : 0u;
      dst[k] = x;
    }
    if (round) {
      for (int64_t j = 0; j < count; ++j) dst[j] = round_to_bfloat16(dst[j]);
    }
    return bad == 0;
  }
  static Unit pack_weight(const float* w, int64_t k, int64_t depth, bool round) {
    if (k >= depth) return 0.0f;
    return round ? round_to_bfloat16(w[k]) : w[k];
  }
};

