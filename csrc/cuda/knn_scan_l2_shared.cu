// The scan kernels of the l2 metric, with the thresholds shared by a query's splits (opt-in): a
// file of its own, so that the scan's instantiations compile in parallel (knn_scan_launch.cuh).
#include "cuda/knn_scan_launch.cuh"

namespace latentspace::cuda {

LATENTSPACE_SCAN_INSTANCE(Metric::kL2, true);

}  // namespace latentspace::cuda
