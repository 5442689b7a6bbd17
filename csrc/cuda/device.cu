// Device query for CUDA builds. The module links cudart statically, so importing it needs no
// CUDA library; the driver (libcuda) is only loaded by the first call here, and its absence
// is reported as "no GPU", never as an error.
#include <cuda_runtime.h>

#include "core/build_config.h"
#include "ops/device.h"

namespace latentspace {

bool cuda_compiled() { return true; }

std::string cuda_architectures() { return LATENTSPACE_CUDA_ARCHITECTURES; }

std::vector<CudaDeviceInfo> cuda_devices() {
  std::vector<CudaDeviceInfo> devices;
  int count = 0;  // cudaGetDeviceCount leaves it untouched when it fails (no driver)
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return devices;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    CudaDeviceInfo info;
    info.index = i;
    info.name = prop.name;
    info.compute_capability_major = prop.major;
    info.compute_capability_minor = prop.minor;
    info.total_memory_bytes = static_cast<long long>(prop.totalGlobalMem);
    info.multiprocessors = prop.multiProcessorCount;
    devices.push_back(info);
  }
  return devices;
}

std::string cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(status);
  }
  return count > 0 ? "" : "no CUDA device is visible";
}

}  // namespace latentspace
