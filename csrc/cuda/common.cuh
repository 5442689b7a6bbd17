// Error checks and small launch helpers shared by the CUDA sources.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/check.h"

namespace latentspace::cuda {

// Every CUDA call and every launch is checked; failures become RuntimeError in Python with
// the call's name and the runtime's message (never an abort).
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(concat("CUDA error in ", what, ": ", cudaGetErrorString(status)));
  }
}

// After a kernel launch: configuration errors show up here at once (execution errors at the
// next synchronising call, which is checked too).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kWarp = 32;

// The sum of a warp's 32 values in double, the same butterfly every time (so the same bits
// from run to run); every lane gets it. All 32 lanes must call it.
__device__ inline double warp_sum(double value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// A two-way setting from the environment, read where it applies (every search): true when the
// variable `name` holds `when_true`, false for `when_false`, `when_unset` when it is unset or
// empty; any other value throws ValueError naming the variable and both values.
inline bool environment_switch(const char* name, const char* when_true, const char* when_false, bool when_unset) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return when_unset;
  if (std::strcmp(value, when_true) == 0) return true;
  LS_CHECK_VALUE(std::strcmp(value, when_false) == 0, name, ": expected '", when_false, "' or '", when_true,
                 "', got '", std::string(value), "'");
  return false;
}

// A three-way setting from the environment: an opt-out default that the library applies
// where GPU runs measured it to pay (kAuto, the variable unset, empty or "auto"), forced on
// everywhere ("1": for tests and experiments) or off ("0"); any other value throws
// ValueError naming the variable and the values.
enum class Setting { kAuto, kOn, kOff };

inline Setting environment_setting(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return Setting::kAuto;
  if (std::strcmp(value, "1") == 0) return Setting::kOn;
  LS_CHECK_VALUE(std::strcmp(value, "0") == 0, name, ": expected 'auto', '0' or '1', got '", std::string(value), "'");
  return Setting::kOff;
}

inline const char* setting_name(Setting setting) {
  return setting == Setting::kAuto ? "auto" : setting == Setting::kOn ? "1" : "0";
}

// An integer setting from the environment, read where it applies: `when_unset` when the
// variable `name` is unset or empty, else its value, which must be a whole number in
// [least, most] (anything else throws ValueError naming the variable and the range).
inline int64_t environment_integer(const char* name, int64_t when_unset, int64_t least, int64_t most) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return when_unset;
  const std::string text(value);
  // Digits only (no sign, no spaces), and few enough that strtoll cannot overflow.
  const bool digits = text.size() <= 18 && text.find_first_not_of("0123456789") == std::string::npos;
  const long long parsed = digits ? std::strtoll(value, nullptr, 10) : -1;
  LS_CHECK_VALUE(digits && parsed >= least && parsed <= most, name, ": expected a whole number from ", least, " to ",
                 most, ", got '", text, "'");
  return parsed;
}

// Carves aligned pieces out of one workspace allocation (torch's caching allocator hands the
// whole block down from Python; nothing here allocates device memory).
class WorkspaceCarver {
 public:
  static constexpr size_t kAlignment = 256;
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base_ ? base_ + used_ : nullptr);
    used_ += (count * sizeof(T) + kAlignment - 1) / kAlignment * kAlignment;
    return p;
  }
  void* take_bytes(size_t bytes) { return take<char>(bytes); }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace latentspace::cuda
