// The scan kernels of the cosine metric, in a file of their own so that the metrics
// compile in parallel (knn_scan_launch.cuh).
#include "cuda/knn_scan_launch.cuh"

namespace latentspace::cuda {

void launch_scan_cosine(KnnStorage storage, KnnPrecision precision, const ScanArgs& args, cudaStream_t stream) {
  launch_scan_for<Metric::kCosine>(storage, precision, args, stream);
}

}  // namespace latentspace::cuda
