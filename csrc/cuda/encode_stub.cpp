// The CUDA encoder for builds without CUDA: a clear error instead of missing symbols.
#include "cuda/stub_error.h"
#include "ops/encode.h"

namespace latentspace {

struct CudaMlpEncoder::Impl {};

CudaMlpEncoder::CudaMlpEncoder(const std::vector<LayerWeights>&, const float*, EncodePrecision, const RowNorm*) {
  throw_built_without_cuda();
}
CudaMlpEncoder::~CudaMlpEncoder() = default;
int64_t CudaMlpEncoder::input_dim() const { throw_built_without_cuda(); }
int64_t CudaMlpEncoder::output_dim() const { throw_built_without_cuda(); }
int64_t CudaMlpEncoder::num_layers() const { throw_built_without_cuda(); }
EncodePrecision CudaMlpEncoder::precision() const { throw_built_without_cuda(); }
const char* CudaMlpEncoder::kernel_name() const { throw_built_without_cuda(); }
int64_t CudaMlpEncoder::workspace_floats(int64_t) const { throw_built_without_cuda(); }
void CudaMlpEncoder::encode(const float*, int64_t, float*, float*, uint32_t*, uintptr_t) const {
  throw_built_without_cuda();
}

}  // namespace latentspace
