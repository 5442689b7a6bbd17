// The scan kernels of the l2 metric, the opt-in family (shared thresholds, warp cut-backs;
// knn_scan.cuh, kOptIns): a file of its own, so that the scan's instantiations compile in
// parallel (knn_scan_launch.cuh).
#include "cuda/knn_scan_launch.cuh"

namespace latentspace::cuda {

LATENTSPACE_SCAN_INSTANCE(Metric::kL2, true);

}  // namespace latentspace::cuda
