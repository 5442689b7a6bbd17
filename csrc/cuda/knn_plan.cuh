// The plan of a CUDA kNN search (knn.cu): how many splits of the database each query tile's
// scan takes, how long each split's candidate list may grow, whether the lists are merged as a
// tree, and the workspace those lists need, carved out of the one buffer the caller allocates.
//
// Host arithmetic only (make_plan asks CUB for its sort's temporary size, nothing else
// touches the GPU), kept apart from the kernels' launch code so that it reads on its own and
// so that the CPU tests run it where there is no GPU (knn_cuda_plan_for, tests/test_cuda_search.py).
// Included by knn.cu alone.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/knn_merge_tree.cuh"
#include "cuda/knn_rows.cuh"
#include "cuda/knn_tiles.cuh"

namespace latentspace::cuda {

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
// Past kRuleDim dimensions the rule shrinks in proportion (kRowsPerNeighbour * kRuleDim / dim,
// at least kLeastRowsPerNeighbour): a row's scan costs dim multiply-adds, its place in a list
// the same whatever dim, so the lists' share of a split's time falls as dim grows and more,
// shorter splits pay. GPU run 10's plan sweep (H200, float32, faiss #3045's shape: 5,000
// queries, 8,192 rows of 2,048, k = 32, shared thresholds): 22 splits (rule 2, the rule
// here at 2,048) 6.41 ms, against 7.67 ms in the 8 splits rule 32 gives.
constexpr int64_t kRuleDim = 128, kLeastRowsPerNeighbour = 2;

// The rule's default for rows of `dim` dimensions (0: not given, the rule of kRuleDim).
inline int64_t default_rows_per_neighbour(int64_t dim) {
  if (dim <= kRuleDim) return kRowsPerNeighbour;
  return std::max<int64_t>(kLeastRowsPerNeighbour, kRowsPerNeighbour * kRuleDim / dim);
}

inline int64_t rows_per_neighbour(int64_t dim = 0) {
  return environment_integer("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", default_rows_per_neighbour(dim), 0, 1 << 16);
}

// The splits of a call of at most kRowQueries queries (the row scan's count; a wider query
// takes the tile scan with the same plan), for experiments (the profile's q1 sweep: whether
// whole waves of the row scan's resident blocks read faster than the plan's own splits, which
// assume the tile scan's 2 a multiprocessor): LATENTSPACE_CUDA_FEW_QUERY_SPLITS, 0 or unset:
// the plan's own. Cut in whole plan tiles (never more splits than tiles); the rest of the
// plan as it would be (the large-k plan's tree merge, its check against the bound made with
// these splits; fitted to a bound it exceeds). Read at every plan, like the split rule.
inline int64_t few_query_splits() { return environment_integer("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", 0, 0, 65535); }

// `splits` rounded down to a whole number of waves of `wave` blocks (single_query_wave; 0: no
// wave), where there is more than one wave: fewer splits than a wave stay as they are.
inline int64_t whole_waves(int64_t splits, int64_t wave) {
  return wave > 0 && splits > wave ? splits / wave * wave : splits;
}

constexpr int kExtraCapacityTiles = 4;  // list room beyond k (in kPlanRows): fewer cut-backs early on

// A list's room beyond its k keys, in multiples of k (at least kExtraCapacityTiles plan tiles
// of rows, at most the split's rows): a list that fills is cut back to k by a block radix
// select (knn_scan.cuh), so more room means fewer, larger cut-backs and more workspace.
// LATENTSPACE_CUDA_LIST_ROOM, a whole number from 1 (unset: the room every GPU run so far
// timed, capacity 2 k at k >= 512) to 64; for experiments: GPU run 12 timed the scan of
// Q = 10,000 over 1M x 128 at k = 1024 at 89.6 ms against 74.1 at k = 10, and the profile's
// plan sweep times rooms 2 and 3 there. Read at every plan, like the split rule.
inline int64_t list_room() { return environment_integer("LATENTSPACE_CUDA_LIST_ROOM", 1, 1, 64); }

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

inline Workspace carve(void* base, int64_t nq, int64_t nb, int64_t k, const Plan& plan, WorkspaceCarver* carver) {
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

// Splits per query tile: at least two waves of blocks over the multiprocessors (assuming the
// scan's two resident blocks per multiprocessor), the count among the next few that wastes
// the least of the last wave, and each split a few tiles long (and long against k).
// `rule`: rows_per_neighbour(dim), or 0 for the large-k plan (plan_for).
inline int64_t choose_splits(int64_t query_tiles, int64_t database_tiles, int64_t k, int multiprocessors,
                             int64_t rule) {
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
// list of `capacity` keys. At k = 1024 (capacity 2048, 16 KiB) a 1 GiB bound (the default's floor) holds
// the lists of about 500 (query tile, split) blocks, whatever the split count. When the
// filling plan does not fit, the caller searches fewer queries a call, each call asks for
// more splits to fill the GPU, and a query's candidates grow with its splits (about
// k (1 + ln(split rows / k)) each). Q = 10,000, N = 1M, k = 1024, the default plan: 30 splits
// of about 1,200 queries a call (computed). Fitted, the same bound takes all 10,000 queries in
// one call of 5 splits, 395 blocks against 300, with a quarter of the candidates and a sixth
// of the keys to merge (computed by this code on the host, knn_cuda_plan_for, with CUB's size
// estimated). Measured: 1 call, its scan 115 ms against 9 calls' 282 ms (docs/benchmarks.md).
inline bool use_fitted_plan() { return environment_switch("LATENTSPACE_CUDA_FITTED_PLAN", "1", "0", true); }

// Whether a search merges its splits' lists as a tree (knn_merge_tree.cuh):
// LATENTSPACE_CUDA_TREE_MERGE. Unset or "auto": in the large-k plan (plan_for), where it
// pays; "1": every plan of more than kMergeGroup splits, the split rule's plans (no large-k
// plan: with LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR=0, the tests' way to many splits); "0":
// never, and no large-k plan. Read at every plan.
inline Setting tree_merge_setting() { return environment_setting("LATENTSPACE_CUDA_TREE_MERGE"); }

// The plan of `splits` splits per query tile (fewer when the rows run out first), its lists
// with `room` times k of room beyond k (list_room, read once by the caller: the fitted plan
// tries up to hundreds of split counts).
inline Plan plan_with_splits(int64_t nq, int64_t nb, int64_t k, int64_t splits, size_t cub_bytes, int64_t room) {
  Plan plan;
  plan.query_tiles = ceil_div(nq, SimtTile::kQueries);
  const int64_t database_tiles = ceil_div(nb, kPlanRows);
  plan.split_length = ceil_div(database_tiles, splits) * kPlanRows;
  plan.splits = static_cast<int>(std::max<int64_t>(1, ceil_div(nb, plan.split_length)));
  // A list never holds more keys than its split has rows, so no capacity beyond that is needed
  // (small query batches get many short splits: this keeps their workspace small).
  // (int: a split of 2^31 rows at room 64 would pass it; such a list never fits a workspace)
  plan.capacity = static_cast<int>(
      std::min({k + std::max<int64_t>(room * k, kExtraCapacityTiles * kPlanRows), plan.split_length,
                int64_t{std::numeric_limits<int>::max()}}));
  plan.cub_bytes = cub_bytes;
  WorkspaceCarver sizer(nullptr);
  carve(nullptr, nq, nb, k, plan, &sizer);
  plan.workspace_bytes = sizer.used();
  return plan;
}

inline void check_plan_sizes(int64_t nq, int64_t nb, int64_t k) {
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
// the measured large-k cases: at k = 16,384 over 1M rows a 1 GiB bound holds 127 queries
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
// search would take the rule's plan within the same workspace: another plan, the same results.
// Not taken under B: the rule's plan needs at most B, less than the few queries' large-k plan,
// so the search does not take it either. (A plan over its bound is never
// searched: the caller gives fewer queries, or refuses one query that does not fit.)
inline Plan plan_for(int64_t nq, int64_t nb, int64_t k, int multiprocessors, size_t workspace_bound,
                     size_t cub_bytes, int64_t dim) {
  check_plan_sizes(nq, nb, k);
  // The plan holds for every precision (the workspace size does not depend on it): splits
  // are counted in the largest tiles' units, and a smaller tile's grid covers the same splits.
  const int64_t query_tiles = ceil_div(nq, SimtTile::kQueries), database_tiles = ceil_div(nb, kPlanRows);
  const int64_t rule = rows_per_neighbour(dim), room = list_room();
  const Setting tree = tree_merge_setting();
  // (few_query_splits: the splits an experiment forces on a call of at most 8 queries, or 0)
  const int64_t forced = nq <= kRowQueries ? few_query_splits() : 0;
  int64_t filling = choose_splits(query_tiles, database_tiles, k, multiprocessors, rule);
  bool large_k = tree == Setting::kAuto && rule != 0 && 4 * query_tiles * filling < 3 * int64_t{multiprocessors};
  // ... and only where dropping the rule at least doubles the splits. A small database leaves
  // the GPU short of blocks with or without the rule (its rows, not k, bound the splits): one
  // query over 20,000 rows at k = 10 gets 53 splits either way, over 4,096 rows 11 under the
  // rule and 16 without, and the large-k plan's tree merge and CUB sort then take 15 launches
  // where the fused finish takes one (GPU run 10's profile of a FlatIndex search of one query
  // over 4,096 rows: 17 kernels, 11 of them CUB's sort), for few or no more blocks. Every
  // case runs 8-9 timed gained at least 5.8x the blocks (174 splits against 30 at Q = 300,
  // k = 1024), and keeps its plan.
  if (large_k) large_k = choose_splits(query_tiles, database_tiles, k, multiprocessors, 0) >= 2 * filling;
  if (large_k) {
    const int64_t few = std::min<int64_t>(nq, kLargeKFewQueries);
    const int64_t few_splits =
        forced > 0 ? forced
                   : whole_waves(choose_splits(ceil_div(few, SimtTile::kQueries), database_tiles, k, multiprocessors, 0),
                                 single_query_wave(few, dim, multiprocessors));
    large_k = plan_with_splits(few, nb, k, few_splits, cub_bytes, room).workspace_bytes <= workspace_bound;
  }
  if (large_k) filling = choose_splits(query_tiles, database_tiles, k, multiprocessors, 0);
  // One query: whole waves of the single-query scan's resident blocks (single_query_wave).
  filling = whole_waves(filling, single_query_wave(nq, dim, multiprocessors));
  if (forced > 0) filling = forced;
  const bool merge_as_tree = large_k || tree == Setting::kOn;
  const auto with_splits = [&](int64_t splits) {
    Plan plan = plan_with_splits(nq, nb, k, splits, cub_bytes, room);
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
inline Plan make_plan(int64_t nq, int64_t nb, int64_t k, int multiprocessors, size_t workspace_bound,
                      int64_t dim) {
  check_plan_sizes(nq, nb, k);
  size_t cub_bytes = 0;
  const int items = static_cast<int>(nq * k);
  LS_CHECK_VALUE(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, cub_bytes, static_cast<const uint64_t*>(nullptr),
                                                         static_cast<uint64_t*>(nullptr), items,
                                                         static_cast<int>(nq), static_cast<const int*>(nullptr),
                                                         static_cast<const int*>(nullptr), 0, 64) == cudaSuccess,
                 "k: CUB could not size the sort");
  return plan_for(nq, nb, k, multiprocessors, workspace_bound, cub_bytes, dim);
}

}  // namespace latentspace::cuda
