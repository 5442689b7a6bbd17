// Exact kNN on the GPU: distances computed tile by tile and filtered into per-query candidate
// lists right where they are computed, so the Q x N distance matrix never reaches device memory.
//
//   1. norms_kernel     squared norms (l2) or inverse norms (cosine) of queries and database
//   2. scan_kernel      (knn_scan.cuh) grid (query tiles, database splits): a block computes score
//                       tiles (knn_tiles.cuh: 128 x 128 float32 FMA, or 64 x 64 on tensor cores
//                       for tf32 / bf16 / fp16 with WMMA, opt-in; knn_mma_tile.cuh: 128 x 128
//                       with mma.sync, the default) and appends each candidate whose
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
// allocator), sized by knn_cuda_workspace_bytes.
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <limits>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/knn_finish.cuh"
#include "cuda/knn_merge_tree.cuh"
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
constexpr int kMinTilesPerSplit = 2;
// Rows per split at least this many times k. 32 is the value GPU run 4 measured (k = 1024 in
// 378 ms); commit 22c7a7a's 8 let a search chunked by its workspace (at k = 1024 the 1 GiB
// default holds ~290 queries a call: 3 query tiles) take 122 splits instead of 30, and the
// extra lists' cut-backs and merge took it to 595 ms (GPU runs 6-7: 35 calls, merge 74 ms).
// LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR overrides it, for experiments (the profile's plan sweep:
// benchmarks/profile_knn_cuda.py); 0: no such rule, splits only to fill the GPU (with the
// tree merge, the plan for a large k). Read at every plan, so the workspace size and the
// search agree as long as it does not change between them.
constexpr int64_t kRowsPerNeighbour = 32;

int64_t rows_per_neighbour() {
  return environment_integer("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", kRowsPerNeighbour, 0, 1 << 16);
}

// The splits of a call of at most kRowQueries queries (the row scan's count; a wider query
// takes the tile scan with the same plan), for experiments (the profile's q1 sweep: whether
// whole waves of the row scan's resident blocks read faster than the plan's own splits, which
// assume the tile scan's 2 a multiprocessor): LATENTSPACE_CUDA_FEW_QUERY_SPLITS, 0 or unset:
// the plan's own. Cut in whole plan tiles (never more splits than tiles); the rest of the
// plan as it would be (the large-k plan's tree merge, its check against the bound made with
// these splits; fitted to a bound it exceeds). Read at every plan, like the split rule.
int64_t few_query_splits() { return environment_integer("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", 0, 0, 65535); }

constexpr int kExtraCapacityTiles = 4;  // list room beyond k (in kPlanRows): fewer cut-backs early on

// The fewest queries a call of the large-k plan must be able to take within the workspace
// bound (plan_for).
constexpr int64_t kLargeKFewQueries = 64;

struct Plan {
  int64_t query_tiles = 0;
  int splits = 1;
  int64_t split_length = 0;
  int capacity = 0;
  size_t cub_bytes = 0;
  size_t workspace_bytes = 0;
  bool tree = false;  // the splits' lists merged as a tree (knn_merge_tree.cuh), not one block per query
};

struct Workspace {
  float* query_norms;
  float* database_norms;
  uint64_t* candidates;  // [query][split][capacity]
  int* counts;           // [query][split]
  uint64_t* keys;        // [query][k]
  uint64_t* sorted;      // [query][k]
  int* offsets;          // num_queries + 1 segment starts: i * k
  uint64_t* best_kth;    // [query]: the shared thresholds (knn_scan.cuh), when asked for
  int* tree_counts;      // [query][ceil(splits / kMergeGroup)]: the tree merge's (knn_merge_tree.cuh)
  void* cub_temp;
};

Workspace carve(void* base, int64_t nq, int64_t nb, int64_t k, const Plan& plan, WorkspaceCarver* carver) {
  Workspace w{};
  w.query_norms = carver->take<float>(nq);
  w.database_norms = carver->take<float>(nb);
  w.candidates = carver->take<uint64_t>(static_cast<size_t>(nq) * plan.splits * plan.capacity);
  w.counts = carver->take<int>(static_cast<size_t>(nq) * plan.splits);
  w.keys = carver->take<uint64_t>(static_cast<size_t>(nq) * k);
  w.sorted = carver->take<uint64_t>(static_cast<size_t>(nq) * k);
  w.offsets = carver->take<int>(nq + 1);
  w.best_kth = carver->take<uint64_t>(nq);
  w.tree_counts = carver->take<int>(static_cast<size_t>(nq) * ceil_div(plan.splits, kMergeGroup));
  w.cub_temp = carver->take_bytes(plan.cub_bytes);
  (void)base;
  return w;
}

int multiprocessor_count(int device) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}

// Splits per query tile: at least two waves of blocks over the multiprocessors (assuming the
// scan's two resident blocks per multiprocessor), the count among the next few that wastes
// the least of the last wave, and each split a few tiles long (and long against k).
// `rule`: rows_per_neighbour(), or 0 for the large-k plan (plan_for).
int64_t choose_splits(int64_t query_tiles, int64_t database_tiles, int64_t k, int multiprocessors, int64_t rule) {
  const int64_t resident = 2 * int64_t{multiprocessors};
  // Each split's list takes about k (1 + ln(split rows / k)) candidates, each paid for in
  // cut-backs: for a large k, few long splits (at least rule * k rows each).
  const int64_t long_enough = rule == 0 ? database_tiles : std::max<int64_t>(1, database_tiles * kPlanRows / (rule * k));
  const int64_t most = std::min<int64_t>({std::max<int64_t>(1, database_tiles / kMinTilesPerSplit), long_enough, 65535});
  const int64_t least = std::clamp<int64_t>(ceil_div(2 * resident, query_tiles), 1, most);
  int64_t best = least;
  double best_use = 0.0;
  for (int64_t splits = least; splits <= std::min<int64_t>(most, 2 * least); ++splits) {
    const int64_t blocks = query_tiles * splits;
    const double use = static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, resident) * resident);
    if (use > best_use + 1e-9) best = splits, best_use = use;
  }
  return best;
}

// Whether a plan whose workspace exceeds its bound takes fewer splits instead: yes unless
// LATENTSPACE_CUDA_FITTED_PLAN=0 (GPU run 8, H200: 2.49x at Q = 10,000, N = 1M, k = 1024,
// 119 ms against 295 ms; "1" or unset: yes). Read by every plan over its bound (and by every
// search, refuse_bad_settings): the workspace size and the search agree as long as it does
// not change between them.
//
// Why: the splits that fill the GPU are chosen per call, and each split of each query keeps a
// list of `capacity` keys. At k = 1024 (capacity 2048, 16 KiB) the 1 GiB default bound holds
// the lists of about 500 (query tile, split) blocks, whatever the split count. When the
// filling plan does not fit, the caller searches fewer queries a call, each call asks for
// more splits to fill the GPU, and a query's candidates grow with its splits (about
// k (1 + ln(split rows / k)) each). Q = 10,000, N = 1M, k = 1024, the default plan: 30 splits
// of about 1,200 queries a call (computed). Fitted, the same bound takes all 10,000 queries in
// one call of 5 splits, 395 blocks against 300, with a quarter of the candidates and a sixth
// of the keys to merge (computed by this code on the host, knn_cuda_plan_for, with CUB's size
// estimated). Measured: 1 call, its scan 115 ms against 9 calls' 282 ms (docs/benchmarks.md).
bool use_fitted_plan() { return environment_switch("LATENTSPACE_CUDA_FITTED_PLAN", "1", "0", true); }

// Whether a search merges its splits' lists as a tree (knn_merge_tree.cuh):
// LATENTSPACE_CUDA_TREE_MERGE. Unset or "auto": in the large-k plan (plan_for), where it
// pays; "1": every plan of more than kMergeGroup splits, the split rule's plans (no large-k
// plan: with LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR=0, the tests' way to many splits); "0":
// never, and no large-k plan. Read at every plan.
Setting tree_merge_setting() { return environment_setting("LATENTSPACE_CUDA_TREE_MERGE"); }

// The plan of `splits` splits per query tile (fewer when the rows run out first).
Plan plan_with_splits(int64_t nq, int64_t nb, int64_t k, int64_t splits, size_t cub_bytes) {
  Plan plan;
  plan.query_tiles = ceil_div(nq, SimtTile::kQueries);
  const int64_t database_tiles = ceil_div(nb, kPlanRows);
  plan.split_length = ceil_div(database_tiles, splits) * kPlanRows;
  plan.splits = static_cast<int>(std::max<int64_t>(1, ceil_div(nb, plan.split_length)));
  // A list never holds more keys than its split has rows, so no capacity beyond that is needed
  // (small query batches get many short splits: this keeps their workspace small).
  plan.capacity = static_cast<int>(
      std::min<int64_t>(k + std::max<int64_t>(k, kExtraCapacityTiles * kPlanRows), plan.split_length));
  plan.cub_bytes = cub_bytes;
  WorkspaceCarver sizer(nullptr);
  carve(nullptr, nq, nb, k, plan, &sizer);
  plan.workspace_bytes = sizer.used();
  return plan;
}

void check_plan_sizes(int64_t nq, int64_t nb, int64_t k) {
  LS_CHECK_VALUE(nb < (int64_t{1} << 31), "database: at most 2^31 - 1 rows per search on the GPU, got ", nb);
  LS_CHECK_VALUE(k < (int64_t{1} << 29), "k: at most 2^29 - 1 per GPU call, got ", k);
  LS_CHECK_VALUE(nq * k < (int64_t{1} << 31), "queries, k: num_queries * k must stay below 2^31 per GPU call, got ",
                 nq, " * ", k, " (search the queries in chunks)");
}

// The plan of a call (make_plan's, for a given multiprocessor count and CUB temporary size:
// host arithmetic only, so that the CPU tests run it where there is no GPU, knn_cuda_plan_for):
// the splits that fill the GPU within the split rule (choose_splits).
//
// The large-k plan: where the split rule leaves fewer blocks than three quarters of the
// multiprocessors (a large k over few queries), the splits that fill the GPU without the
// rule, their lists merged as a tree. GPU runs 8-9 (H200, 132 multiprocessors, N = 1M,
// D = 128, float32), against the rule's plan of `blocks` blocks (run 9 unless named):
//   faster: Q = 100, k = 4096, 7 blocks: 10.7x (5.3 ms against 56.9); Q = 1, k = 1024, 30
//   blocks: 3.2x; Q = 300, k = 1024, 90 blocks: 1.75x; Q = 1000, k = 4096, 56 blocks: 1.5x;
//   Q = 1000, k = 16,384, 8 blocks: 5.7x (run 8's large-k cell);
//   slower: Q = 1000, k = 2048, 120 blocks: 0.90x; Q = 1000, k = 1024, 240 blocks: 0.43x (run 8).
// The threshold lies between 90 and 120 blocks (docs/benchmarks.md, "The defaults of run 8").
//
// The large-k plan keeps about every row of each split where k is large (8 bytes a row per
// query), so it is taken only where the bound holds it for kLargeKFewQueries queries (or all
// of them, if fewer): the caller then searches at least that many a call. Under a tighter
// bound the rule's plan stays (before this check, 1 query at k = 1024 over 1M rows under a
// 12 MiB bound was refused, and 2,000 queries at k = 256 over 50,000 rows took 2,000 calls
// instead of 50 under 2 MiB, 100 instead of 2 under 16 MiB: computed on the host). 64 keeps
// the measured large-k cases: at k = 16,384 over 1M rows the 1 GiB default holds 127 queries
// a call (run 8: 69 ms in 8 calls, against 385 ms for the rule's plan).
//
// The fitted plan, for a plan over its workspace bound (use_fitted_plan): the most splits
// below the filling count whose workspace fits the bound; where none fits, the plan of least
// workspace, the most splits among equals (the caller then gives fewer queries). Not for the
// large-k plan, whose many splits are its point (run 8: fitted to 2 splits at k = 16,384,
// 269 ms against 69 ms in 8 calls of the large-k plan).
//
// The search is planned again with its workspace's size as the bound, and gets the same plan
// as the sizing with the caller's bound B gave: with S the splits chosen under B, every count
// above S (up to the filling one) needs more than B >= need(S) bytes, so none of them fits
// need(S) either, and S does. Where none fit B, S needs the least, and the counts above it
// more: none of those fits need(S) either. (The workspace is not monotonic in the splits: a
// list holds at most its split's rows.) The large-k plan: taken under B where the few
// queries' large-k plan fits B; then the search's bound is need(large-k plan of all nq
// queries), which is at least the few queries' need (one query tile: the same splits, more
// lists; more tiles: fewer splits a tile, but queries x splits about as many, 129 x 261
// against 64 x 521 at N = 1M and 132 multiprocessors, and every other part of the workspace
// grows with the queries), so the search takes it too; were it to fall short somewhere, the
// search would take the rule's plan within the same workspace: another plan, the same results. Not taken under B: the rule's plan needs at most B, less than the few
// queries' large-k plan, so the search does not take it either. (A plan over its bound is never
// searched: the caller gives fewer queries, or refuses one query that does not fit.)
Plan plan_for(int64_t nq, int64_t nb, int64_t k, int multiprocessors, size_t workspace_bound, size_t cub_bytes) {
  check_plan_sizes(nq, nb, k);
  // The plan holds for every precision (the workspace size does not depend on it): splits
  // are counted in the largest tiles' units, and a smaller tile's grid covers the same splits.
  const int64_t query_tiles = ceil_div(nq, SimtTile::kQueries), database_tiles = ceil_div(nb, kPlanRows);
  const int64_t rule = rows_per_neighbour();
  const Setting tree = tree_merge_setting();
  // (few_query_splits: the splits an experiment forces on a call of at most 8 queries, or 0)
  const int64_t forced = nq <= kRowQueries ? few_query_splits() : 0;
  int64_t filling = choose_splits(query_tiles, database_tiles, k, multiprocessors, rule);
  bool large_k = tree == Setting::kAuto && rule != 0 && 4 * query_tiles * filling < 3 * int64_t{multiprocessors};
  if (large_k) {
    const int64_t few = std::min<int64_t>(nq, kLargeKFewQueries);
    const int64_t few_splits =
        forced > 0 ? forced : choose_splits(ceil_div(few, SimtTile::kQueries), database_tiles, k, multiprocessors, 0);
    large_k = plan_with_splits(few, nb, k, few_splits, cub_bytes).workspace_bytes <= workspace_bound;
  }
  if (large_k) filling = choose_splits(query_tiles, database_tiles, k, multiprocessors, 0);
  if (forced > 0) filling = forced;
  const bool merge_as_tree = large_k || tree == Setting::kOn;
  const auto with_splits = [&](int64_t splits) {
    Plan plan = plan_with_splits(nq, nb, k, splits, cub_bytes);
    plan.tree = merge_as_tree && plan.splits > kMergeGroup;
    return plan;
  };
  Plan plan = with_splits(filling);
  if (plan.workspace_bytes <= workspace_bound || large_k || !use_fitted_plan()) return plan;
  Plan least = plan;
  for (int64_t splits = filling - 1; splits >= 1; --splits) {
    plan = with_splits(splits);
    if (plan.workspace_bytes <= workspace_bound) return plan;
    if (plan.workspace_bytes < least.workspace_bytes) least = plan;
  }
  return least;
}

// The plan of a call on this device (plan_for with CUB's size of the final sort).
Plan make_plan(int64_t nq, int64_t nb, int64_t k, int multiprocessors, size_t workspace_bound) {
  check_plan_sizes(nq, nb, k);
  size_t cub_bytes = 0;
  const int items = static_cast<int>(nq * k);
  LS_CHECK_VALUE(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, cub_bytes, static_cast<const uint64_t*>(nullptr),
                                                         static_cast<uint64_t*>(nullptr), items,
                                                         static_cast<int>(nq), static_cast<const int*>(nullptr),
                                                         static_cast<const int*>(nullptr), 0, 64) == cudaSuccess,
                 "k: CUB could not size the sort");
  return plan_for(nq, nb, k, multiprocessors, workspace_bound, cub_bytes);
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
  (void)single_query_rows();
  (void)use_fitted_plan();
  (void)use_fused_finish();
  (void)tree_merge_setting();
  (void)use_early_norms();
  (void)shared_thresholds_setting();
  (void)use_warp_cut_backs();
  (void)use_float_thresholds();
  (void)use_mma_tile();
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
                                size_t workspace_bound) {
  if (num_queries == 0) return 0;
  return cuda::make_plan(num_queries, num_database, k, cuda::multiprocessor_count(device), workspace_bound)
      .workspace_bytes;
}

KnnCudaPlan knn_cuda_plan(int64_t num_queries, int64_t num_database, int64_t k, int device, size_t workspace_bound) {
  LS_CHECK_VALUE(num_queries >= 1, "num_queries: expected >= 1, got ", num_queries);
  const cuda::Plan plan =
      cuda::make_plan(num_queries, num_database, k, cuda::multiprocessor_count(device), workspace_bound);
  return {plan.query_tiles, plan.splits, plan.split_length, plan.capacity, plan.workspace_bytes, plan.tree};
}

KnnCudaPlan knn_cuda_plan_for(int64_t num_queries, int64_t num_database, int64_t k, int multiprocessors,
                              size_t workspace_bound, size_t cub_bytes) {
  LS_CHECK_VALUE(num_queries >= 1, "num_queries: expected >= 1, got ", num_queries);
  LS_CHECK_VALUE(multiprocessors >= 1, "multiprocessors: expected >= 1, got ", multiprocessors);
  const cuda::Plan plan = cuda::plan_for(num_queries, num_database, k, multiprocessors, workspace_bound, cub_bytes);
  return {plan.query_tiles, plan.splits, plan.split_length, plan.capacity, plan.workspace_bytes, plan.tree};
}

int64_t knn_cuda_rows_per_neighbour() { return cuda::rows_per_neighbour(); }

int64_t knn_cuda_few_query_splits() { return cuda::few_query_splits(); }

int knn_cuda_single_query_rows() { return cuda::single_query_rows(); }

const char* knn_cuda_tensor_tile() { return cuda::use_mma_tile() ? "mma" : "wmma"; }

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
  LS_CHECK_VALUE(weights == nullptr || metric == Metric::kL2, "weights: only the weighted squared L2 metric takes weights");
  LS_CHECK_VALUE(weights == nullptr || database_norms == nullptr,
                 "database_norms: kept norms are unweighted; a weighted search computes its own");
  if (num_queries == 0) return;
  LS_CHECK_VALUE(num_database >= 1, "database: expected at least one row");
  LS_CHECK_VALUE(k >= 1, "k: expected an integer >= 1, got ", k);
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  // Planned with the workspace's size as the bound: the plan its size was asked for (make_plan).
  const Plan plan = make_plan(num_queries, num_database, k, multiprocessor_count(device), workspace_bytes);
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
