// What the CUDA backend can see: compiled in or not, and the GPUs visible now.
// Implemented by cuda/device.cu in CUDA builds and by cuda/device_stub.cpp otherwise, so
// callers never need #ifdefs.
#pragma once

#include <string>
#include <vector>

namespace latentspace {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  long long total_memory_bytes = 0;
  int multiprocessors = 0;
};

bool cuda_compiled();
// Architectures the CUDA sources were compiled for, e.g. "80;90" (empty without CUDA).
std::string cuda_architectures();
// Visible GPUs; empty (never an error) with no driver, no GPU, or a CPU-only build.
std::vector<CudaDeviceInfo> cuda_devices();
// Why no GPU is visible (the CUDA runtime's error string), or "" when one is.
std::string cuda_unavailable_reason();

}  // namespace latentspace
