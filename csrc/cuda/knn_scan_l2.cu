// The scan kernels of the l2 metric, in a file of their own so that the metrics
// compile in parallel (knn_scan_launch.cuh).
#include "cuda/knn_scan_launch.cuh"

namespace latentspace::cuda {

void launch_scan_l2(KnnStorage storage, KnnPrecision precision, const ScanArgs& args, cudaStream_t stream) {
  launch_scan_for<Metric::kL2>(storage, precision, args, stream);
}

}  // namespace latentspace::cuda
