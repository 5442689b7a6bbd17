// The scan kernels of the inner product metric, each split with its own thresholds (the default):
// a file of its own, so that the scan's instantiations compile in parallel (knn_scan_launch.cuh).
#include "cuda/knn_scan_launch.cuh"

namespace latentspace::cuda {

LATENTSPACE_SCAN_INSTANCE(Metric::kInnerProduct, false);

}  // namespace latentspace::cuda
