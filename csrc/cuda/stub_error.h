// The one error every CUDA entry point raises in a build without CUDA (the *_stub.cpp files):
// a clear message instead of a missing symbol.
#pragma once

#include <stdexcept>

namespace latentspace {

[[noreturn]] inline void throw_built_without_cuda() {
  throw std::runtime_error(
      "latentspace was built without CUDA: device='cuda' needs a build with nvcc available "
      "(or -C cmake.define.LATENTSPACE_CUDA=ON)");
}

}  // namespace latentspace
