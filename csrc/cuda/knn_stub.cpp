// The CUDA kNN entry points for builds without CUDA: clear errors instead of missing symbols.
#include "cuda/stub_error.h"
#include "ops/knn.h"

namespace latentspace {
namespace {
[[noreturn]] void no_cuda() { throw_built_without_cuda(); }
}  // namespace

size_t knn_cuda_workspace_bytes(int64_t, int64_t, int64_t, int, size_t, int64_t) { no_cuda(); }

KnnCudaPlan knn_cuda_plan(int64_t, int64_t, int64_t, int, size_t, int64_t) { no_cuda(); }

KnnCudaPlan knn_cuda_plan_for(int64_t, int64_t, int64_t, int, size_t, size_t, int64_t) { no_cuda(); }

int64_t knn_cuda_rows_per_neighbour(int64_t) { no_cuda(); }

int64_t knn_cuda_few_query_splits() { no_cuda(); }

int64_t knn_cuda_list_room() { no_cuda(); }

int knn_cuda_single_query_rows() { no_cuda(); }

const char* knn_cuda_tree_merge() { no_cuda(); }

bool knn_cuda_warp_cut_backs() { no_cuda(); }

bool knn_cuda_float_thresholds() { no_cuda(); }

bool knn_cuda_fitted_plan() { no_cuda(); }

const char* knn_cuda_tensor_tile() { no_cuda(); }
const char* knn_cuda_last_scan() { no_cuda(); }

bool knn_cuda_fused_finish() { no_cuda(); }

bool knn_cuda_early_norms() { no_cuda(); }

const char* knn_cuda_shared_thresholds() { no_cuda(); }

void knn_cuda(const float*, int64_t, const void*, int64_t, int64_t, int64_t, Metric, KnnPrecision, float*, int64_t*,
              void*, size_t, uintptr_t, const float*, KnnStorage, const float*) {
  no_cuda();
}

}  // namespace latentspace
