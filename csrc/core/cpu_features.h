// Which SIMD instruction set the CPU kernels use, chosen at run time.
//
// The hardware level is detected once (CPUID + OS support, via __builtin_cpu_supports).
// The level in use may be capped lower, from the LATENTSPACE_SIMD environment variable at
// import or from set_simd_level(), so every kernel path can be tested on one machine.
#pragma once

#include <string>

namespace latentspace {

enum class SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Highest level this CPU (and OS) supports.
SimdLevel hardware_simd_level();
// Level the kernels use now (<= hardware level).
SimdLevel active_simd_level();
// Caps the level in use; throws ValueError if the CPU lacks the requested level.
void set_simd_level(SimdLevel level);

// Whether the CPU has the AVX512_BF16 dot product (VDPBF16PS), for the opt-in bf16 encoder.
bool cpu_has_avx512_bf16();

const char* simd_level_name(SimdLevel level);
// Parses "scalar" / "avx2" / "avx512"; throws ValueError naming `argument` otherwise.
SimdLevel parse_simd_level(const std::string& name, const char* argument);

}  // namespace latentspace
