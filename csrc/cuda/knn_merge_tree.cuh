// The tree merge of a CUDA kNN search's candidate lists (knn.cu, step 3): the large-k plan's
// merge since GPU runs 8-9 (knn_plan.cuh plan_for; LATENTSPACE_CUDA_TREE_MERGE, docs/gpu.md).
//
// The default merge gives each query one block, which selects the k best keys over all of the
// query's splits. That is enough parallelism when a call has thousands of queries; it is not
// when a call has few: with splits enough to fill the GPU at a large k, each query's lists hold
// about every row (8 MB at N = 1M), so a 1 GiB workspace takes 127 queries a call
// in 521 splits at k = 16,384 (computed by the plan's code, knn_cuda_plan_for), and one block
// per query then reads hundreds of lists several times over.
// The tree merges groups of kMergeGroup lists at once instead: a level's block (query, group)
// selects the group's k best keys and leaves them in place, at the group's first list, so
// each level divides the lists by kMergeGroup with blocks for every (query, group), and the
// last level (kMergeGroup lists at most) writes each query's k best keys, padded, where the
// sort expects them. The keys kept are exactly the default merge's, so are the results.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/knn_select.cuh"

namespace latentspace::cuda {

constexpr int kMergeGroup = 8;  // lists one block merges in one level

// One level's lists: query q's list s holds counts[q * segments + s] keys (at most
// max_length) at keys + q * query_stride + s * stride.
struct ListLevel {
  uint64_t* keys;
  int64_t query_stride;
  int segments;
  int64_t stride;
  int max_length;
  int* counts;
};

// The level after `in`: each group of kMergeGroup lists becomes one list of at most k keys at
// the group's first list (so a stride kMergeGroup times as long), counted in counts_out.
inline ListLevel next_level(const ListLevel& in, int k, int* counts_out) {
  ListLevel out = in;
  out.segments = (in.segments + kMergeGroup - 1) / kMergeGroup;
  out.stride = in.stride * kMergeGroup;
  out.max_length = static_cast<int>(std::min<int64_t>(k, int64_t{in.max_length} * kMergeGroup));
  out.counts = counts_out;
  return out;
}

// grid (queries, groups): block (q, g) merges lists g * kMergeGroup onwards of query q.
// final_keys null: the group's k best keys stay in place, at the group's first list (in
// place is safe: a list's stride is at least its max_length, see block_compact), their count
// in counts_out[q * gridDim.y + g]. final_keys set (one group): the k best keys to
// final_keys[q * k ...], padded with empty keys to k.
__global__ void __launch_bounds__(kSelectThreads) merge_level_kernel(ListLevel in, int k, int* counts_out,
                                                                     uint64_t* final_keys) {
  __shared__ SelectShared shared;
  const int64_t q = blockIdx.x;
  const int first = static_cast<int>(blockIdx.y) * kMergeGroup;
  uint64_t* group = in.keys + q * in.query_stride + first * in.stride;
  const CandidateLists lists{group, in.counts + q * in.segments + first, min(kMergeGroup, in.segments - first),
                             in.stride, in.max_length};
  if (final_keys == nullptr) {
    const int kept = select_best_keys(lists, k, group, shared);
    if (threadIdx.x == 0) counts_out[q * gridDim.y + blockIdx.y] = kept;
    return;
  }
  uint64_t* out = final_keys + q * k;
  const int kept = select_best_keys(lists, k, out, shared);
  for (int i = kept + threadIdx.x; i < k; i += blockDim.x) out[i] = kEmptyKey;
}

}  // namespace latentspace::cuda
