#include <cstdint>
#include <cstring>

#include "cpu/simd/encode_kernels.h"

namespace latentspace::cpu {

const EncodeKernels& encode_kernels(SimdLevel level, EncodePrecision precision) {
  switch (level) {
    case SimdLevel::kAvx512:
      if (precision == EncodePrecision::kBfloat16 && cpu_has_avx512_bf16()) return encode_kernels_avx512_bf16();
      return encode_kernels_avx512();
    case SimdLevel::kAvx2: return encode_kernels_avx2();
    case SimdLevel::kScalar: break;
  }
  return encode_kernels_scalar();
}

float round_to_bfloat16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7F800000u) == 0x7F800000u) return x;  // inf and NaN pass through
  bits += 0x7FFFu + ((bits >> 16) & 1u);              // round to nearest, ties to even
  bits &= 0xFFFF0000u;
  float rounded;
  std::memcpy(&rounded, &bits, sizeof rounded);
  return rounded;
}

}  // namespace latentspace::cpu
