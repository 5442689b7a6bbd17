// The row check on the GPU (ops/norms.h, sq_norms_cuda): the CUDA counterpart of sq_norms_cpu.
// One pass over the rows, a group of lanes per row (a warp for wide rows, several rows a warp
// for narrow ones): each row's squared norm in float32 (written out when asked), its weighted
// squared norm when there are weights, and the first row where either is not usable (NaN,
// Inf, above kMaxSquaredNorm), found with an atomic minimum.
//
// It stands in for a check built of torch ops (python/latentspace/_arrays.py,
// unusable_row_flag), which writes the rows' squares to a temporary (256 MiB of rows at a
// time), reads it back to sum it, and launches six more kernels: about three passes over a
// database where this is one.
#include <cuda_runtime.h>

#include <algorithm>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/storage_load.cuh"
#include "ops/norms.h"

namespace latentspace {
namespace cuda {
namespace {

constexpr int kCheckThreads = 256;
constexpr int kWarpsPerBlock = kCheckThreads / kWarp;
// Blocks of one launch; more rows than the grid's warps take are taken in turns (a
// grid-stride loop), so a launch of any row count stays within the grid's limits.
constexpr int64_t kMaxCheckBlocks = int64_t{1} << 16;

// The sum of `value` over each aligned group of `lanes` lanes (a power of two up to 32); every
// lane of a group gets its group's sum. All 32 lanes must call it.
__device__ inline float group_sum(float value, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// A row is summed by a group of `lanes` lanes (a power of two, 1 to 32: as many as its loads
// need, so a warp takes 32 / lanes rows at a time and rows of a few dimensions do not leave
// most lanes idle). kFour: the dimension a multiple of 4 and the rows (and weights) aligned
// for 4-element loads. first_bad: set to all ones (-1 as an int64) before the launch; a row
// that is not usable offers first_row + its index, and the least one offered stays.
template <KnnStorage kStorage, bool kFour>
__global__ void __launch_bounds__(kCheckThreads)
    row_check_kernel(const void* rows, int64_t count, int64_t dim, int lanes, const float* weights, int64_t first_row,
                     float* out, unsigned long long* first_bad) {
  const int lane = threadIdx.x % kWarp;
  const int member = lane % lanes;  // this lane's place in its row's group
  const int64_t rows_per_warp = kWarp / lanes;
  const int64_t warp = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kWarp;
  const int64_t step = int64_t{gridDim.x} * kWarpsPerBlock * rows_per_warp;
  // (the loop's bound is the warp's first row, the same for its 32 lanes: group_sum needs them all)
  for (int64_t first = warp * rows_per_warp; first < count; first += step) {
    const int64_t row = first + lane / lanes;
    const bool exists = row < count;
    // w (x^2), as torch's ops (squares @ w) and the CPU weigh the squares: (w x) x would
    // round differently within an ulp of the limit.
    float plain = 0.0f;
    float weighted = 0.0f;
    if constexpr (kFour) {
      for (int64_t d = 4 * int64_t{member}; exists && d < dim; d += 4 * int64_t{lanes}) {
        const float4 v = load_four<kStorage>(rows, row * dim + d);
        plain = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, plain))));
        if (weights != nullptr) {
          const float4 w = *reinterpret_cast<const float4*>(weights + d);
          weighted = fmaf(w.x, v.x * v.x, fmaf(w.y, v.y * v.y, fmaf(w.z, v.z * v.z, fmaf(w.w, v.w * v.w, weighted))));
        }
      }
    } else {
      for (int64_t d = member; exists && d < dim; d += lanes) {
        const float v = load_element<kStorage>(rows, row * dim + d);
        plain = fmaf(v, v, plain);
        if (weights != nullptr) weighted = fmaf(weights[d], v * v, weighted);
      }
    }
    plain = group_sum(plain, lanes);
    if (weights != nullptr) weighted = group_sum(weighted, lanes);
    if (member == 0 && exists) {
      if (out != nullptr) out[row] = plain;
      // NaN compares false and an overflowing sum is +inf: both are refused, as on the CPU.
      const bool usable = plain <= kMaxSquaredNorm && (weights == nullptr || weighted <= kMaxSquaredNorm);
      if (!usable) atomicMin(first_bad, static_cast<unsigned long long>(first_row + row));
    }
  }
}

// The lanes a row's group takes: one per load a row needs (4 elements a load with kFour, else
// 1), rounded up to a power of two, at most a warp.
int lanes_for(int64_t dim, bool four) {
  const int64_t loads = four ? dim / 4 : dim;
  int lanes = 1;
  while (lanes < kWarp && lanes < loads) lanes *= 2;
  return lanes;
}

template <KnnStorage kStorage>
void launch_row_check(bool four, unsigned blocks, int lanes, cudaStream_t stream, const void* rows, int64_t count,
                      int64_t dim, const float* weights, int64_t first_row, float* out, unsigned long long* first_bad) {
  if (four) {
    row_check_kernel<kStorage, true>
        <<<blocks, kCheckThreads, 0, stream>>>(rows, count, dim, lanes, weights, first_row, out, first_bad);
  } else {
    row_check_kernel<kStorage, false>
        <<<blocks, kCheckThreads, 0, stream>>>(rows, count, dim, lanes, weights, first_row, out, first_bad);
  }
}

bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace
}  // namespace cuda

void sq_norms_cuda(const void* rows, int64_t count, int64_t dim, KnnStorage storage, const float* weights,
                   int64_t first_row, float* out, int64_t* first_bad, uintptr_t stream_handle) {
  // (the arguments are checked by the binding, before any CUDA call, in builds with and without CUDA)
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // All ones: -1 read as an int64 ("no unusable row"), and above every row index as unsigned.
  cuda::check_cuda(cudaMemsetAsync(first_bad, 0xFF, sizeof(int64_t), stream), "cudaMemsetAsync (first_bad)");
  if (count == 0) return;
  const uintptr_t element = storage == KnnStorage::kFloat32 ? 4 : 2;
  const bool four = dim % 4 == 0 && cuda::aligned_to(rows, 4 * element) &&
                    (weights == nullptr || cuda::aligned_to(weights, 16));
  const int lanes = cuda::lanes_for(dim, four);
  const int64_t rows_per_block = int64_t{cuda::kWarpsPerBlock} * (cuda::kWarp / lanes);
  const auto blocks = static_cast<unsigned>(std::min(cuda::ceil_div(count, rows_per_block), cuda::kMaxCheckBlocks));
  auto* flag = reinterpret_cast<unsigned long long*>(first_bad);
  switch (storage) {
    case KnnStorage::kFloat32:
      cuda::launch_row_check<KnnStorage::kFloat32>(four, blocks, lanes, stream, rows, count, dim, weights, first_row,
                                                   out, flag);
      break;
    case KnnStorage::kFloat16:
      cuda::launch_row_check<KnnStorage::kFloat16>(four, blocks, lanes, stream, rows, count, dim, weights, first_row,
                                                   out, flag);
      break;
    case KnnStorage::kBfloat16:
      cuda::launch_row_check<KnnStorage::kBfloat16>(four, blocks, lanes, stream, rows, count, dim, weights, first_row,
                                                     out, flag);
      break;
  }
  cuda::check_launch("row_check_kernel");
}

}  // namespace latentspace
