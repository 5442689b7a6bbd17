// The batched MLP encoder's bfloat16 layer kernel (AVX512_BF16, see encode_impl.h): packed units
// are pairs of bfloat16 (consecutive depth indices) and VDPBF16PS multiplies a pair and adds
// both products into a float32 lane, twice the work of an FMA per instruction.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/simd/encode_kernels.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_avx512.h"

constexpr int kTileRows = 12;
constexpr int kPanelVecs = 2;
constexpr int kBlockTiles = 8;  // 96-row blocks

inline uint32_t bfloat16_bits(float x) {
  const float rounded = round_to_bfloat16(x);
  uint32_t bits;
  std::memcpy(&bits, &rounded, sizeof bits);
  return bits >> 16;
}

struct Bf16PairDot {
  using Unit = uint32_t;  // low half: depth index 2u, high half: 2u + 1
  static constexpr int kDepthPerUnit = 2;
  static Vec broadcast(const Unit* a) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(*a)));
  }
  static Vec load(const Unit* b) { return _mm512_loadu_ps(reinterpret_cast<const float*>(b)); }
  static Vec accumulate(Vec acc, Vec a, Vec b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(b));
  }
  // count floats (minus offset) -> ceil(count / 2) units, rounded to nearest even; the high
  // half of a last, odd unit is zero. `round` is implied.
  static bool pack_row(const float* src, const float* offset, int64_t count, bool, Unit* dst) {
    uint32_t bad = 0;
    for (int64_t k = 0; k < count; k += 32) {
      const int64_t left = count - k;
      const Vec lo = vec_load_partial(src + k, left);
      const Vec hi = left > 16 ? vec_load_partial(src + k + 16, left - 16) : vec_zero();
      Vec x0 = lo, x1 = hi;
      if (offset) {
        x0 = vec_sub(lo, vec_load_partial(offset + k, left));
        x1 = left > 16 ? vec_sub(hi, vec_load_partial(offset + k + 16, left - 16)) : vec_zero();
      }
      bad |= vec_nan_mask(vec_sub(x0, x0)) | vec_nan_mask(vec_sub(x1, x1));
      const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
      const int64_t units = left >= 32 ? 16 : (left + 1) / 2;
      _mm512_mask_storeu_epi32(dst + k / 2, static_cast<__mmask16>((1u << units) - 1u), pairs);
    }
    return bad == 0;
  }
  static Unit pack_weight(const float* w, int64_t k, int64_t depth, bool) {
    if (k >= depth) return 0;
    const uint32_t high = k + 1 < depth ? bfloat16_bits(w[k + 1]) : 0;
    return bfloat16_bits(w[k]) | (high << 16);
  }
};

using Dot = Bf16PairDot;
#include "cpu/simd/encode_impl.h"

}  // namespace

const EncodeKernels& encode_kernels_avx512_bf16() { return make_kernels("avx512_bf16"); }

}  // namespace latentspace::cpu
