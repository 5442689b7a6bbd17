// The CUDA row check's entry point for builds without CUDA: a clear error instead of a missing symbol.
#include "cuda/stub_error.h"
#include "ops/norms.h"

namespace latentspace {

void sq_norms_cuda(const void*, int64_t, int64_t, KnnStorage, const float*, int64_t, float*, int64_t*, uintptr_t) {
  throw_built_without_cuda();
}

}  // namespace latentspace
