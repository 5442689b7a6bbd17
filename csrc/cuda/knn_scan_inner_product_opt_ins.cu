// The scan kernels of the inner product metric, the opt-in family (shared thresholds, warp cut-backs;
// knn_scan.cuh, kOptIns): a file of its own, so that the scan's instantiations compile in
// parallel (knn_scan_launch.cuh).
#include "cuda/knn_scan_launch.cuh"

namespace latentspace::cuda {

LATENTSPACE_SCAN_INSTANCE(Metric::kInnerProduct, true);

}  // namespace latentspace::cuda
