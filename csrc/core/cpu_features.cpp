#include "core/cpu_features.h"

#include <atomic>
#include <cstdlib>

#include "core/check.h"

namespace latentspace {
namespace {

SimdLevel detect_hardware_level() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // libgcc's checks include the OS's XSAVE state, so a kernel that disabled AVX-512
  // state is reported as lacking it.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return SimdLevel::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::kAvx2;
#endif
  return SimdLevel::kScalar;
}

SimdLevel initial_level() {
  SimdLevel level = hardware_simd_level();
  if (const char* env = std::getenv("LATENTSPACE_SIMD")) {
    // An unknown value must not break `import latentspace`; the Python layer warns about it.
    try {
      SimdLevel requested = parse_simd_level(env, "LATENTSPACE_SIMD");
      if (static_cast<int>(requested) < static_cast<int>(level)) level = requested;
    } catch (const ValueError&) {
    }
  }
  return level;
}

std::atomic<int>& active_level_storage() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

}  // namespace

SimdLevel hardware_simd_level() {
  static const SimdLevel level = detect_hardware_level();
  return level;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = hardware_simd_level() == SimdLevel::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

SimdLevel active_simd_level() {
  return static_cast<SimdLevel>(active_level_storage().load(std::memory_order_relaxed));
}

void set_simd_level(SimdLevel level) {
  LS_CHECK_VALUE(static_cast<int>(level) <= static_cast<int>(hardware_simd_level()),
                 "level: this CPU supports at most '", simd_level_name(hardware_simd_level()),
                 "', cannot use '", simd_level_name(level), "'");
  active_level_storage().store(static_cast<int>(level), std::memory_order_relaxed);
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kScalar: return "scalar";
  }
  return "scalar";
}

SimdLevel parse_simd_level(const std::string& name, const char* argument) {
  if (name == "avx512") return SimdLevel::kAvx512;
  if (name == "avx2") return SimdLevel::kAvx2;
  if (name == "scalar") return SimdLevel::kScalar;
  throw ValueError(concat(argument, ": expected one of 'scalar', 'avx2', 'avx512', got '", name, "'"));
}

}  // namespace latentspace
