// Device query for builds without CUDA (LATENTSPACE_CUDA=OFF, or no nvcc found).
#include "ops/device.h"

namespace latentspace {

bool cuda_compiled() { return false; }
std::string cuda_architectures() { return ""; }
std::vector<CudaDeviceInfo> cuda_devices() { return {}; }
std::string cuda_unavailable_reason() {
  return "latentspace was built without CUDA (rebuild with nvcc available, or with -C cmake.define.LATENTSPACE_CUDA=ON)";
}

}  // namespace latentspace
