// Fused losses on a CUDA GPU: the loss, its gradient and the per-row sums in one pass over
// the data, the same formulas as the CPU kernels (cpu/losses.cpp, cpu/simd/losses_impl.h).
//
// Two launches per call, both on the caller's stream:
// 1. segment_sums_kernel: one warp per (row, segment of kCudaLossSegment elements). Each lane
//    walks the segment with a stride of 32 (coalesced loads and stores), writes the gradient
//    and keeps a partial sum in double; the 32 partials are added with a butterfly (the same
//    order every time). Double, not T: float32 elements within range can sum past it (64
//    elements of 9e36 in one lane), and the CPU kernels sum such a segment again in double
//    (cpu/losses.cpp), so a float32 mean within range must not come out inf here either. The
//    loop is memory-bound; one double add per element is far below any GPU's FP64 rate. A
//    segment whose sum still comes out inf or NaN (an element's own loss past float32, mse of
//    2e19) is summed again with each element in double, as the CPU does.
// 2. finish_kernel: one block adds each row's segments in order (row_losses) and the rows in a
//    fixed tree (total).
// Memory-bound: the data is read once and the gradient written once; nothing is atomic
// except the rare out-of-range flag, so results are the same bits from run to run.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/losses_math.cuh"
#include "ops/losses.h"

namespace latentspace {
namespace {

using namespace loss_math;  // the elementwise formulas and the segments (losses_math.cuh)

using cuda::kWarp;
using cuda::warp_sum;
constexpr int kSegmentWarpsPerBlock = 8;
constexpr int kFinishThreads = 1024;
// Enough blocks to fill any current GPU many times over; larger inputs loop (grid stride).
constexpr int64_t kMaxSegmentBlocks = int64_t{1} << 20;
// The in-place scaling: a grid-stride loop over the elements (its blocks mostly leave at once).
constexpr int kScaleThreads = 256;
constexpr int64_t kMaxScaleBlocks = 4096;


// A warp's segment of losses summed again with each element's loss in double (its gradient is
// written already): a float32 element whose own loss passes float32's range (mse of 2e19: 4e38)
// is inf in T, while its segment's mean may fit, as the CPU's fallback finds
// (cpu/losses.cpp, segment_loss). Called only where the sum came out inf or NaN, warp-uniformly
// (warp_sum's butterfly leaves every lane the same bits): no cost otherwise.
template <ReconstructionKind kKind, class T>
__device__ double segment_sum_in_double(const T* __restrict__ recon, const T* __restrict__ target, int64_t base,
                                        int64_t count, int lane) {
  double partial = 0.0;
  for (int64_t i = lane; i < count; i += kWarp) {
    double unused_grad;
    partial += element_loss<kKind>(static_cast<double>(recon[base + i]), static_cast<double>(target[base + i]),
                                   &unused_grad);
  }
  return warp_sum(partial);
}

// The same for KL's terms (cpu/losses.cpp, kl_row).
template <class T>
__device__ double kl_sum_in_double(const T* __restrict__ mu, const T* __restrict__ logvar, int64_t base,
                                   int64_t count, int lane) {
  double partial = 0.0;
  for (int64_t i = lane; i < count; i += kWarp) {
    double unused_variance;
    partial += kl_element_term(static_cast<double>(mu[base + i]), static_cast<double>(logvar[base + i]),
                               &unused_variance);
  }
  return warp_sum(partial);
}

// Sums of the reconstruction loss per (row, segment) into segment_sums; gradient into grad.
template <ReconstructionKind kKind, class T>
__global__ void reconstruction_segments_kernel(const T* __restrict__ recon, const T* __restrict__ target,
                                               int64_t cols, int64_t segments_per_row, int64_t items,
                                               T grad_scale, T* __restrict__ grad,
                                               double* __restrict__ segment_sums, uint32_t* out_of_range) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t{gridDim.x} * kSegmentWarpsPerBlock;
  for (int64_t item = int64_t{blockIdx.x} * kSegmentWarpsPerBlock + threadIdx.x / kWarp; item < items;
       item += warps) {
    const Segment s = segment_of(item, segments_per_row, cols);
    const int64_t base = s.row * cols + s.first;
    double partial = 0.0;
    bool bad = false;
    // Unrolled so that each lane can have several loads in flight: the loop is memory-bound,
    // and one load pair per lane at a time may not cover the memory latency (to be timed on a
    // GPU: benchmarks/bench_losses_cuda.py).
#pragma unroll 4
    for (int64_t i = lane; i < s.count; i += kWarp) {
      const T r = recon[base + i];
      T g;
      partial += static_cast<double>(element_loss<kKind>(r, target[base + i], &g));
      if constexpr (kKind == ReconstructionKind::kBce) bad |= (r < T(0)) | (r > T(1));  // NaN is not bad
      if (grad != nullptr) grad[base + i] = g * grad_scale;
    }
    double sum = warp_sum(partial);
    if (!isfinite(sum)) sum = segment_sum_in_double<kKind>(recon, target, base, s.count, lane);
    if constexpr (kKind == ReconstructionKind::kBce) {
      if (__any_sync(0xffffffffu, bad) && lane == 0) atomicOr(out_of_range, 1u);
    }
    if (lane == 0) segment_sums[item] = sum;
  }
}

// KL(N(mu, exp(logvar)) || N(0, 1)) per (row, segment): -0.5 * sum(1 + lv - mu^2 - exp(lv)).
template <class T>
__global__ void kl_segments_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, int64_t cols,
                                   int64_t segments_per_row, int64_t items, T grad_scale,
                                   T* __restrict__ grad_mu, T* __restrict__ grad_logvar,
                                   double* __restrict__ segment_sums) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t{gridDim.x} * kSegmentWarpsPerBlock;
  const T half_scale = T(0.5) * grad_scale;
  for (int64_t item = int64_t{blockIdx.x} * kSegmentWarpsPerBlock + threadIdx.x / kWarp; item < items;
       item += warps) {
    const Segment s = segment_of(item, segments_per_row, cols);
    const int64_t base = s.row * cols + s.first;
    double partial = 0.0;  // (double: see the reconstruction kernel)
    // Unrolled so that each lane can have several loads in flight: the loop is memory-bound,
    // and one load pair per lane at a time may not cover the memory latency (to be timed on a
    // GPU: benchmarks/bench_losses_cuda.py).
#pragma unroll 4
    for (int64_t i = lane; i < s.count; i += kWarp) {
      const T m = mu[base + i];
      T variance;
      partial += static_cast<double>(kl_element_term(m, logvar[base + i], &variance));
      if (grad_mu != nullptr) grad_mu[base + i] = m * grad_scale;
      if (grad_logvar != nullptr) grad_logvar[base + i] = (variance - T(1)) * half_scale;
    }
    double sum = warp_sum(partial);
    if (!isfinite(sum)) sum = kl_sum_in_double(mu, logvar, base, s.count, lane);
    if (lane == 0) segment_sums[item] = -0.5 * sum;
  }
}

// row_losses[row] = the row's segment sums in order (skipped when the segments are the rows);
// *total = the rows summed in a fixed tree. One block: rows are few next to their elements.
__global__ void finish_kernel(const double* __restrict__ segment_sums, int64_t rows, int64_t segments_per_row,
                              double* __restrict__ row_losses, double* __restrict__ total) {
  __shared__ double warp_totals[kFinishThreads / kWarp];
  double partial = 0.0;
  for (int64_t row = threadIdx.x; row < rows; row += blockDim.x) {
    double row_sum = segment_sums[row * segments_per_row];
    if (segments_per_row > 1) {
      for (int64_t s = 1; s < segments_per_row; ++s) row_sum += segment_sums[row * segments_per_row + s];
      row_losses[row] = row_sum;
    }
    partial += row_sum;
  }
  partial = warp_sum(partial);
  if (threadIdx.x % kWarp == 0) warp_totals[threadIdx.x / kWarp] = partial;
  __syncthreads();
  if (threadIdx.x < kWarp) {
    const int warps = blockDim.x / kWarp;
    double value = static_cast<int>(threadIdx.x) < warps ? warp_totals[threadIdx.x] : 0.0;
    value = warp_sum(value);
    if (threadIdx.x == 0) *total = value;
  }
}

// grad[row][j] *= factors[row or 0], skipping rows whose factor is 1 (see ops/losses.h).
template <class T>
__global__ void scale_rows_unless_one_kernel(T* __restrict__ grad, int64_t rows, int64_t cols,
                                             const T* __restrict__ factors, bool per_row) {
  const int64_t elements = rows * cols;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  if (!per_row && factors[0] == T(1)) return;  // the usual case: every thread leaves at once
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < elements; i += stride) {
    const T factor = factors[per_row ? i / cols : 0];
    if (factor != T(1)) grad[i] *= factor;
  }
}

// Launch shape of the segment kernels: one warp per item, at most kMaxSegmentBlocks blocks.
unsigned segment_blocks(int64_t items) {
  const int64_t blocks = cuda::ceil_div(items, kSegmentWarpsPerBlock);
  return static_cast<unsigned>(blocks < kMaxSegmentBlocks ? blocks : kMaxSegmentBlocks);
}

// Where the segment kernel writes: straight into row_losses when each row is one segment.
double* segment_sums_of(int64_t rows, int64_t cols, double* row_losses, double* workspace) {
  if (segments_per_row_of(cols) == 1) return row_losses;
  LS_CHECK_VALUE(workspace != nullptr, "workspace: expected loss_cuda_workspace_doubles(", rows, ", ", cols,
                 ") doubles, got none");
  return workspace;
}

void check_sizes(int64_t rows, int64_t cols, const void* row_losses, const void* total) {
  LS_CHECK_VALUE(rows >= 1 && cols >= 1, "rows, cols: expected at least 1 each, got ", rows, " x ", cols);
  LS_CHECK_VALUE(row_losses != nullptr && total != nullptr, "row_losses, total: expected device buffers");
}

void launch_finish(const double* segment_sums, int64_t rows, int64_t cols, double* row_losses, double* total,
                   cudaStream_t stream) {
  finish_kernel<<<1, kFinishThreads, 0, stream>>>(segment_sums, rows, segments_per_row_of(cols), row_losses, total);
  cuda::check_launch("loss finish_kernel");
}

template <ReconstructionKind kKind, class T>
void launch_reconstruction(const T* recon, const T* target, int64_t rows, int64_t cols, T grad_scale, T* grad,
                           double* segment_sums, uint32_t* out_of_range, cudaStream_t stream) {
  const int64_t segments = segments_per_row_of(cols);
  const int64_t items = rows * segments;
  reconstruction_segments_kernel<kKind, T><<<segment_blocks(items), kSegmentWarpsPerBlock * kWarp, 0, stream>>>(
      recon, target, cols, segments, items, grad_scale, grad, segment_sums, out_of_range);
  cuda::check_launch("reconstruction_segments_kernel");
}

}  // namespace

int64_t loss_cuda_workspace_doubles(int64_t rows, int64_t cols) {
  const int64_t segments = segments_per_row_of(cols);
  return segments == 1 ? 0 : rows * segments;
}

template <class T>
void reconstruction_loss_cuda(const T* recon, const T* target, int64_t rows, int64_t cols,
                              ReconstructionKind kind, T grad_scale, T* grad, double* row_losses,
                              double* total, uint32_t* out_of_range, double* workspace, uintptr_t stream_handle) {
  check_sizes(rows, cols, row_losses, total);
  LS_CHECK_VALUE(kind != ReconstructionKind::kBce || out_of_range != nullptr,
                 "out_of_range: kind='bce' needs a zeroed device flag");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  double* segment_sums = segment_sums_of(rows, cols, row_losses, workspace);
  switch (kind) {
    case ReconstructionKind::kMse:
      launch_reconstruction<ReconstructionKind::kMse>(recon, target, rows, cols, grad_scale, grad, segment_sums,
                                                      out_of_range, stream);
      break;
    case ReconstructionKind::kBce:
      launch_reconstruction<ReconstructionKind::kBce>(recon, target, rows, cols, grad_scale, grad, segment_sums,
                                                      out_of_range, stream);
      break;
    case ReconstructionKind::kBceLogits:
      launch_reconstruction<ReconstructionKind::kBceLogits>(recon, target, rows, cols, grad_scale, grad,
                                                            segment_sums, out_of_range, stream);
      break;
  }
  launch_finish(segment_sums, rows, cols, row_losses, total, stream);
}

template <class T>
void kl_normal_cuda(const T* mu, const T* logvar, int64_t rows, int64_t cols, T grad_scale, T* grad_mu,
                    T* grad_logvar, double* row_losses, double* total, double* workspace, uintptr_t stream_handle) {
  check_sizes(rows, cols, row_losses, total);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  double* segment_sums = segment_sums_of(rows, cols, row_losses, workspace);
  const int64_t segments = segments_per_row_of(cols);
  const int64_t items = rows * segments;
  kl_segments_kernel<T><<<segment_blocks(items), kSegmentWarpsPerBlock * kWarp, 0, stream>>>(
      mu, logvar, cols, segments, items, grad_scale, grad_mu, grad_logvar, segment_sums);
  cuda::check_launch("kl_segments_kernel");
  launch_finish(segment_sums, rows, cols, row_losses, total, stream);
}

template <class T>
void scale_rows_unless_one_cuda(T* grad, int64_t rows, int64_t cols, const T* factors, bool per_row,
                                uintptr_t stream_handle) {
  LS_CHECK_VALUE(rows >= 1 && cols >= 1, "rows, cols: expected at least 1 each, got ", rows, " x ", cols);
  LS_CHECK_VALUE(grad != nullptr && factors != nullptr, "grad, factors: expected device pointers");
  const int64_t blocks = cuda::ceil_div(rows * cols, kScaleThreads);
  scale_rows_unless_one_kernel<T><<<static_cast<unsigned>(blocks < kMaxScaleBlocks ? blocks : kMaxScaleBlocks),
                                    kScaleThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      grad, rows, cols, factors, per_row);
  cuda::check_launch("scale_rows_unless_one_kernel");
}

template void reconstruction_loss_cuda<float>(const float*, const float*, int64_t, int64_t, ReconstructionKind,
                                              float, float*, double*, double*, uint32_t*, double*, uintptr_t);
template void reconstruction_loss_cuda<double>(const double*, const double*, int64_t, int64_t, ReconstructionKind,
                                               double, double*, double*, double*, uint32_t*, double*, uintptr_t);
template void kl_normal_cuda<float>(const float*, const float*, int64_t, int64_t, float, float*, float*, double*,
                                    double*, double*, uintptr_t);
template void kl_normal_cuda<double>(const double*, const double*, int64_t, int64_t, double, double*, double*,
                                     double*, double*, double*, uintptr_t);
template void scale_rows_unless_one_cuda<float>(float*, int64_t, int64_t, const float*, bool, uintptr_t);
template void scale_rows_unless_one_cuda<double>(double*, int64_t, int64_t, const double*, bool, uintptr_t);

}  // namespace latentspace
