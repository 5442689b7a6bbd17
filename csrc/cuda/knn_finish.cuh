// The finish of a CUDA kNN search (knn.cu, steps 3-5): each query's k best keys over its
// splits' candidate lists, sorted, decoded into (distance, index) results.
//
// Two ways, with the same results:
//   - separate (k > kFusedFinishMaxK, a tree merge, or LATENTSPACE_CUDA_FUSED_FINISH=0):
//     merge_kernel gathers each query's k best keys (unsorted), CUB's segmented radix sort
//     orders them (11 launches in GPU run 7), decode_kernel writes the results;
//   - fused (the default since GPU run 8 for k <= kFusedFinishMaxK without a tree merge):
//     finish_kernel does all three in one block per query, sorting the k keys in registers
//     and shared memory (cub::BlockRadixSort). GPU run 7 timed the separate finish at 0.09 ms
//     of a single query's 0.55 ms search and 1.9 ms of a k = 10 search over 10,000 queries;
//     run 8 timed the fused one at 1.005-1.07x the separate one (docs/benchmarks.md).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/knn_select.cuh"

namespace latentspace::cuda {

constexpr int kFinishThreads = kSelectThreads;
constexpr int kFusedFinishItems = 4;  // keys per thread in the fused sort (k <= 256: 1)
constexpr int kFusedFinishMaxK = kFinishThreads * kFusedFinishItems;

// Query q's k best keys over all its splits' lists (each at most k long, as finish_lists left
// them) to out[0..kept), in slot order, unsorted; returns kept = min(k, keys there). All
// threads of the block call it.
__device__ inline int gather_best_keys(const uint64_t* candidates, const int* counts, int splits, int capacity, int k,
                                       int64_t q, uint64_t* out, SelectShared& shared) {
  const CandidateLists lists{const_cast<uint64_t*>(candidates) + q * splits * int64_t{capacity}, counts + q * splits,
                             splits, capacity, min(k, capacity)};
  return select_best_keys(lists, k, out, shared);
}

// One result: index -1 and +-inf for an empty key (padding), else the key's index and score
// (negated back for the similarities: inner product, cosine).
__device__ inline void decode_key(uint64_t key, bool similarity, float* distance, int64_t* index) {
  if (key == kEmptyKey) {
    *index = -1;
    *distance = similarity ? -INFINITY : INFINITY;
    return;
  }
  *index = static_cast<int64_t>(key & 0xFFFFFFFFu);
  const float score = from_order_preserving_bits(static_cast<uint32_t>(key >> 32));
  *distance = similarity ? 0.0f - score : score;  // 0 - (+0) = +0, as on the CPU (-score gives -0)
}

// The fused finish: one block per query, k <= kFinishThreads * kItems. The kept keys go to
// shared memory, then kItems per thread into a block radix sort over all 64 bits (keys are
// unique, so the order is the result order; empty keys pad the tail and sort last), whose
// striped output makes each rank's writes coalesced.
template <int kItems>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const uint64_t* candidates, const int* counts,
                                                                int splits, int capacity, int k, bool similarity,
                                                                float* distances, int64_t* indices) {
  using Sort = cub::BlockRadixSort<uint64_t, kFinishThreads, kItems>;
  __shared__ SelectShared shared;
  __shared__ uint64_t best[kFinishThreads * kItems];
  __shared__ typename Sort::TempStorage sort_storage;
  const int64_t q = blockIdx.x;
  const int kept = gather_best_keys(candidates, counts, splits, capacity, k, q, best, shared);
  // block_compact's last barrier made best[0..kept) visible to every thread.
  uint64_t keys[kItems];
  for (int j = 0; j < kItems; ++j) {
    const int slot = threadIdx.x * kItems + j;
    keys[j] = slot < kept ? best[slot] : kEmptyKey;
  }
  Sort(sort_storage).SortBlockedToStriped(keys);  // thread t now holds ranks j * kFinishThreads + t
  for (int j = 0; j < kItems; ++j) {
    const int rank = j * kFinishThreads + threadIdx.x;
    if (rank < k) decode_key(keys[j], similarity, distances + q * k + rank, indices + q * k + rank);
  }
}

}  // namespace latentspace::cuda
