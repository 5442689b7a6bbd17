// Exact kNN on the GPU: distances computed tile by tile and filtered into per-query candidate
// lists right where they are computed, so the Q x N distance matrix never reaches device memory.
//
//   1. norms_kernel     squared norms (l2) or inverse norms (cosine) of queries and database
//   2. scan_kernel      (knn_scan.cuh) grid (query tiles, database splits): a block computes score
//                       tiles (knn_tiles.cuh: 128 x 128 float32 FMA, or 64 x 64 on tensor cores
//                       for tf32 / bf16 / fp16 with WMMA, opt-in; knn_mma_tile.cuh: 128 x 128
//                       with mma.sync; knn_deep_tile.cuh: the same staged by cp.async, the
//                       default since GPU run 12) and appends each candidate whose
//                       key beats its query's current k-th best to that query's list; a list
//                       near its capacity is cut back to its k best by a block radix select
//                       (knn_select.cuh), which also tightens the threshold; 1 to 8 queries
//                       take row_scan_kernel (knn_rows.cuh) instead, with the same lists. The
//                       opt-in family of these kernels adds thresholds shared by a query's
//                       splits (SharedThresholds), cut-backs by warps (warp_cut_back) and
//                       scores checked before their keys (offer_scores_first).
//                       Launched through knn_scan_launch.cuh, one file per metric and family
//                       (knn_scan_l2.cu, knn_scan_l2_opt_ins.cu, ...)
//   3. merge_kernel     per query, the k best keys over all splits (radix select again); in the
//                       large-k plan, merge_level_kernel merges them as a tree (knn_merge_tree.cuh)
//   4. CUB segmented radix sort of each query's k keys; 5. decode_kernel writes the results
//      (knn_finish.cuh; by default finish_kernel does 3-5 in one launch for k <= 1024)
//
// Keys (knn_select.cuh) order candidates by score, then index: ties go to the lower index, as
// on the CPU. All temporary memory is one workspace the caller allocates (torch's caching
// allocator), sized by knn_cuda_workspace_bytes. The plan (splits, list capacity, tree merge,
// the workspace's layout) is host arithmetic in knn_plan.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <limits>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/knn_finish.cuh"
#include "cuda/knn_merge_tree.cuh"
#include "cuda/knn_plan.cuh"
#include "cuda/knn_rows.cuh"
#include "cuda/knn_scan_launch.cuh"
#include "cuda/knn_select.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace {
namespace cuda {
namespace {

constexpr int kThreads = kSelectThreads;
static_assert(kThreads == kTileThreads, "the scan's tiles and selection share one block");

int multiprocessor_count(int device) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}

unsigned blocks_for(int64_t items, int threads) { return static_cast<unsigned>(ceil_div(items, threads)); }

// ---- kernels ------------------------------------------------------------------------------

// One warp per row: squared norm (l2; weighted, sum w x^2, when weights is not null) or
// 1 / norm, 0 for a zero vector (cosine), of rows stored as kStorage.
template <KnnStorage kStorage>
__global__ void norms_kernel(const void* rows, int64_t count, int64_t dim, bool inverse, const float* weights,
                             float* out) {
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= count) return;
  float sum = 0.0f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float v = load_element<kStorage>(rows, row * dim + d);
    sum = fmaf(weights ? weights[d] * v : v, v, sum);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xFFFFFFFFu, sum, offset);
  if (lane == 0) out[row] = inverse ? (sum > 0.0f ? 1.0f / sqrtf(sum) : 0.0f) : sum;
}

// One block per query: its k best keys over all splits into keys[q][0..k), padded with empty keys.
__global__ void __launch_bounds__(kThreads) merge_kernel(const uint64_t* candidates, const int* counts, int splits,
                                                         int capacity, int k, uint64_t* keys) {
  __shared__ SelectShared shared;
  const int64_t q = blockIdx.x;
  const int kept = gather_best_keys(candidates, counts, splits, capacity, k, q, keys + q * k, shared);
  for (int i = kept + threadIdx.x; i < k; i += blockDim.x) keys[q * k + i] = kEmptyKey;
}

__global__ void segment_offsets_kernel(int* offsets, int64_t segments, int k) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i <= segments) offsets[i] = static_cast<int>(i * k);
}

__global__ void decode_kernel(const uint64_t* sorted, int64_t count, bool similarity, float* distances,
                              int64_t* indices) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= count) return;
  decode_key(sorted[i], similarity, distances + i, indices + i);
}

// Whether a search of k <= kFusedFinishMaxK without a tree merge finishes in one kernel
// (knn_finish.cuh): yes unless LATENTSPACE_CUDA_FUSED_FINISH=0 (the merge, CUB sort and decode
// kernels). GPU run 8 (H200): 1.005-1.07x over 6 cells (geometric mean 1.02x), never a loss.
// Read at every search.
bool use_fused_finish() { return environment_switch("LATENTSPACE_CUDA_FUSED_FINISH", "1", "0", true); }

// Whether a query's splits share their thresholds in this search (shared_thresholds_setting):
// by default where there is more than one split to share them and the tile scan runs.
bool share_thresholds(const Plan& plan, int64_t num_queries, int64_t dim) {
  const Setting setting = shared_thresholds_setting();
  return setting == Setting::kOn ||
         (setting == Setting::kAuto && plan.splits > 1 && !use_row_scan(num_queries, dim));
}

// Each query's k best keys over its splits' lists into keys[q * k ...], padded, through the
// levels of the tree merge; the lists are merged in place, and the counts of a level go to
// the buffer the level before it read (w.counts, w.tree_counts alternately).
void merge_as_tree(const Workspace& w, const Plan& plan, int64_t num_queries, int64_t k, cudaStream_t stream) {
  ListLevel level{w.candidates, int64_t{plan.splits} * plan.capacity, plan.splits, plan.capacity,
                  static_cast<int>(std::min<int64_t>(k, plan.capacity)), w.counts};
  int* spare = w.tree_counts;
  while (level.segments > kMergeGroup) {
    const ListLevel next = next_level(level, static_cast<int>(k), spare);
    const dim3 grid(static_cast<unsigned>(num_queries), static_cast<unsigned>(next.segments));
    merge_level_kernel<<<grid, kThreads, 0, stream>>>(level, static_cast<int>(k), spare, nullptr);
    check_launch("merge_level_kernel");
    spare = level.counts;  // read by the launch just queued; the next launch runs after it
    level = next;
  }
  merge_level_kernel<<<dim3(static_cast<unsigned>(num_queries), 1), kThreads, 0, stream>>>(level, static_cast<int>(k),
                                                                                            nullptr, w.keys);
  check_launch("merge_level_kernel (last)");
}

// Every setting read once before a search queues anything, so that a bad value is refused
// on every path: each is read again where it applies, which some searches never reach (the
// tree merge past 8 splits only, the tile in a tensor-core search only, the fitted plan over
// a bound only).
void refuse_bad_settings() {
  (void)rows_per_neighbour();
  (void)few_query_splits();
  (void)list_room();
  (void)single_query_rows();
  (void)use_fitted_plan();
  (void)use_fused_finish();
  (void)tree_merge_setting();
  (void)use_early_norms();
  (void)shared_thresholds_setting();
  (void)use_warp_cut_backs();
  (void)use_float_thresholds();
  (void)tensor_tile_setting();
}

void launch_norms(KnnStorage storage, const void* rows, int64_t count, int64_t dim, bool inverse, const float* weights,
                  float* out, cudaStream_t stream, const char* what) {
  const unsigned blocks = blocks_for(count * 32, kThreads);
  switch (storage) {
    case KnnStorage::kFloat32:
      norms_kernel<KnnStorage::kFloat32><<<blocks, kThreads, 0, stream>>>(rows, count, dim, inverse, weights, out);
      break;
    case KnnStorage::kFloat16:
      norms_kernel<KnnStorage::kFloat16><<<blocks, kThreads, 0, stream>>>(rows, count, dim, inverse, weights, out);
      break;
    case KnnStorage::kBfloat16:
      norms_kernel<KnnStorage::kBfloat16><<<blocks, kThreads, 0, stream>>>(rows, count, dim, inverse, weights, out);
      break;
  }
  check_launch(what);
}

}  // namespace
}  // namespace cuda

size_t knn_cuda_workspace_bytes(int64_t num_queries, int64_t num_database, int64_t k, int device,
                                size_t workspace_bound, int64_t dim) {
  if (num_queries == 0) return 0;
  return cuda::make_plan(num_queries, num_database, k, cuda::multiprocessor_count(device), workspace_bound, dim)
      .workspace_bytes;
}

KnnCudaPlan knn_cuda_plan(int64_t num_queries, int64_t num_database, int64_t k, int device, size_t workspace_bound,
                          int64_t dim) {
  LS_CHECK_VALUE(num_queries >= 1, "num_queries: expected >= 1, got ", num_queries);
  const cuda::Plan plan =
      cuda::make_plan(num_queries, num_database, k, cuda::multiprocessor_count(device), workspace_bound, dim);
  return {plan.query_tiles, plan.splits, plan.split_length, plan.capacity, plan.workspace_bytes, plan.tree};
}

KnnCudaPlan knn_cuda_plan_for(int64_t num_queries, int64_t num_database, int64_t k, int multiprocessors,
                              size_t workspace_bound, size_t cub_bytes, int64_t dim) {
  LS_CHECK_VALUE(num_queries >= 1, "num_queries: expected >= 1, got ", num_queries);
  LS_CHECK_VALUE(multiprocessors >= 1, "multiprocessors: expected >= 1, got ", multiprocessors);
  const cuda::Plan plan =
      cuda::plan_for(num_queries, num_database, k, multiprocessors, workspace_bound, cub_bytes, dim);
  return {plan.query_tiles, plan.splits, plan.split_length, plan.capacity, plan.workspace_bytes, plan.tree};
}

int64_t knn_cuda_rows_per_neighbour(int64_t dim) { return cuda::rows_per_neighbour(dim); }

int64_t knn_cuda_few_query_splits() { return cuda::few_query_splits(); }

int64_t knn_cuda_list_room() { return cuda::list_room(); }

int knn_cuda_single_query_rows() { return cuda::single_query_rows(); }

const char* knn_cuda_tensor_tile() { return cuda::tensor_tile_name(cuda::tensor_tile_setting()); }

const char* knn_cuda_last_scan() { return cuda::last_scan_launched(); }

bool knn_cuda_fused_finish() { return cuda::use_fused_finish(); }

bool knn_cuda_early_norms() { return cuda::use_early_norms(); }

const char* knn_cuda_shared_thresholds() { return cuda::setting_name(cuda::shared_thresholds_setting()); }

const char* knn_cuda_tree_merge() { return cuda::setting_name(cuda::tree_merge_setting()); }

bool knn_cuda_warp_cut_backs() { return cuda::use_warp_cut_backs(); }

bool knn_cuda_float_thresholds() { return cuda::use_float_thresholds(); }

bool knn_cuda_fitted_plan() { return cuda::use_fitted_plan(); }

void knn_cuda(const float* queries, int64_t num_queries, const void* database, int64_t num_database, int64_t dim,
              int64_t k, Metric metric, KnnPrecision precision, float* out_distances, int64_t* out_indices,
              void* workspace, size_t workspace_bytes, uintptr_t stream_handle, const float* weights,
              KnnStorage storage, const float* database_norms) {
  using namespace cuda;
  refuse_bad_settings();
  last_scan_launched() = "none";  // (a call that takes no tile scan must not read as the last one's)
  LS_CHECK_VALUE(weights == nullptr || metric == Metric::kL2, "weights: only the weighted squared L2 metric takes weights");
  LS_CHECK_VALUE(weights == nullptr || database_norms == nullptr,
                 "database_norms: kept norms are unweighted; a weighted search computes its own");
  if (num_queries == 0) return;
  LS_CHECK_VALUE(num_database >= 1, "database: expected at least one row");
  LS_CHECK_VALUE(k >= 1, "k: expected an integer >= 1, got ", k);
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  // Planned with the workspace's size as the bound: the plan its size was asked for (make_plan).
  const Plan plan = make_plan(num_queries, num_database, k, multiprocessor_count(device), workspace_bytes, dim);
  LS_CHECK_VALUE(workspace_bytes >= plan.workspace_bytes, "workspace: expected at least ", plan.workspace_bytes,
                 " bytes, got ", workspace_bytes);
  WorkspaceCarver carver(workspace);
  const Workspace w = carve(workspace, num_queries, num_database, k, plan, &carver);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);

  if (metric != Metric::kInnerProduct) {
    const bool inverse = metric == Metric::kCosine;
    launch_norms(KnnStorage::kFloat32, queries, num_queries, dim, inverse, weights, w.query_norms, stream,
                 "norms_kernel (queries)");
    // The row scan sums the norms of the rows it reads itself: the database is read once.
    if (!database_norms && !use_row_scan(num_queries, dim)) {
      launch_norms(storage, database, num_database, dim, inverse, weights, w.database_norms, stream,
                   "norms_kernel (database)");
    }
  }
  const float* norms = database_norms ? database_norms
                       : use_row_scan(num_queries, dim) ? nullptr  // summed in the row scan
                                                        : w.database_norms;
  // Shared thresholds: every query's bound starts as the empty key, all bits set.
  uint64_t* best_kth = share_thresholds(plan, num_queries, dim) ? w.best_kth : nullptr;
  const bool warp_cut_backs = use_warp_cut_backs(), float_thresholds = use_float_thresholds();
  if (best_kth) {
    check_cuda(cudaMemsetAsync(best_kth, 0xFF, static_cast<size_t>(num_queries) * sizeof(uint64_t), stream),
               "cudaMemsetAsync (best_kth)");
  }
  const ScanArgs args{weights, queries, database, w.query_norms, norms, num_queries, num_database, dim, static_cast<int>(k),
                      plan.capacity, plan.splits, plan.split_length, w.candidates, w.counts, best_kth,
                      warp_cut_backs, float_thresholds};
  launch_scan_of(metric, storage, precision, args, stream);
  const bool similarity = metric != Metric::kL2;
  const bool tree = plan.tree;
  if (!tree && k <= kFusedFinishMaxK && use_fused_finish()) {
    const unsigned blocks = static_cast<unsigned>(num_queries);
    if (k <= kFinishThreads) {
      finish_kernel<1><<<blocks, kFinishThreads, 0, stream>>>(w.candidates, w.counts, plan.splits, plan.capacity,
                                                              static_cast<int>(k), similarity, out_distances,
                                                              out_indices);
    } else {
      finish_kernel<kFusedFinishItems><<<blocks, kFinishThreads, 0, stream>>>(
          w.candidates, w.counts, plan.splits, plan.capacity, static_cast<int>(k), similarity, out_distances,
          out_indices);
    }
    check_launch("finish_kernel");
    return;
  }
  if (tree) {
    merge_as_tree(w, plan, num_queries, k, stream);
  } else {
    merge_kernel<<<static_cast<unsigned>(num_queries), kThreads, 0, stream>>>(w.candidates, w.counts, plan.splits,
                                                                              plan.capacity, static_cast<int>(k), w.keys);
    check_launch("merge_kernel");
  }
  segment_offsets_kernel<<<blocks_for(num_queries + 1, kThreads), kThreads, 0, stream>>>(w.offsets, num_queries,
                                                                                         static_cast<int>(k));
  check_launch("segment_offsets_kernel");
  size_t cub_bytes = plan.cub_bytes;
  check_cuda(cub::DeviceSegmentedRadixSort::SortKeys(w.cub_temp, cub_bytes, w.keys, w.sorted,
                                                     static_cast<int>(num_queries * k), static_cast<int>(num_queries),
                                                     w.offsets, w.offsets + 1, 0, 64, stream),
             "cub::DeviceSegmentedRadixSort::SortKeys");
  decode_kernel<<<blocks_for(num_queries * k, kThreads), kThreads, 0, stream>>>(
      w.sorted, num_queries * k, similarity, out_distances, out_indices);
  check_launch("decode_kernel");
}

}  // namespace latentspace
