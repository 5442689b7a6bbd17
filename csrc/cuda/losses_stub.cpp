// The CUDA loss entry points for builds without CUDA: clear errors instead of missing symbols.
#include "cuda/stub_error.h"
#include "ops/losses.h"

namespace latentspace {

int64_t loss_cuda_workspace_doubles(int64_t, int64_t) { throw_built_without_cuda(); }

template <class T>
void reconstruction_loss_cuda(const T*, const T*, int64_t, int64_t, ReconstructionKind, T, T*, double*, double*,
                              uint32_t*, double*, uintptr_t) {
  throw_built_without_cuda();
}

template <class T>
void kl_normal_cuda(const T*, const T*, int64_t, int64_t, T, T*, T*, double*, double*, double*, uintptr_t) {
  throw_built_without_cuda();
}

template <class T>
void scale_rows_unless_one_cuda(T*, int64_t, int64_t, const T*, bool, uintptr_t) {
  throw_built_without_cuda();
}

template void scale_rows_unless_one_cuda<float>(float*, int64_t, int64_t, const float*, bool, uintptr_t);
template void scale_rows_unless_one_cuda<double>(double*, int64_t, int64_t, const double*, bool, uintptr_t);
template void reconstruction_loss_cuda<float>(const float*, const float*, int64_t, int64_t, ReconstructionKind,
                                              float, float*, double*, double*, uint32_t*, double*, uintptr_t);
template void reconstruction_loss_cuda<double>(const double*, const double*, int64_t, int64_t, ReconstructionKind,
                                               double, double*, double*, double*, uint32_t*, double*, uintptr_t);
template void kl_normal_cuda<float>(const float*, const float*, int64_t, int64_t, float, float*, float*, double*,
                                    double*, double*, uintptr_t);
template void kl_normal_cuda<double>(const double*, const double*, int64_t, int64_t, double, double*, double*,
                                     double*, double*, double*, uintptr_t);

}  // namespace latentspace
