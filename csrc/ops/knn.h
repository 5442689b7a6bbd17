// Exact k-nearest-neighbour search: one declaration per backend, same signature.
//
// Conventions (faiss's): results per query are best first; "l2" is the squared Euclidean
// distance (ascending), "ip" the inner product and "cosine" the cosine similarity
// (descending). Ties go to the lower database index. Rows past the database size get
// index -1 and distance +inf (l2) or -inf (ip, cosine).
#pragma once

#include <cstddef>
#include <cstdint>

namespace latentspace {

enum class Metric : int { kL2 = 0, kInnerProduct = 1, kCosine = 2 };

// How the GPU computes dot products: exact float32 (CUDA cores), or the inputs rounded to
// tf32 / bf16 / fp16 and multiplied on tensor cores with float32 sums (opt-in; the CPU has
// float32 only).
enum class KnnPrecision : int { kFloat32 = 0, kTf32 = 1, kBf16 = 2, kFp16 = 3 };

// The element type the GPU reads the database in: float32, or float16 / bfloat16 storage
// (half the memory and the bandwidth; values widened to float32 as they are loaded).
enum class KnnStorage : int { kFloat32 = 0, kFloat16 = 1, kBfloat16 = 2 };

// queries [num_queries][dim] and database [num_database][dim]: C-contiguous float32.
// out_distances, out_indices: [num_queries][k]. Releases nothing itself: callers drop the
// GIL. Throws ValueError naming "queries" or "database" when a row holds NaN or Inf or
// values so large that squared distances would overflow float32.
//
// weights (nullable, dim values, finite and >= 0; metric must be kL2): the weighted squared
// distance sum_d w_d (q_d - x_d)^2 ("weighted_l2"): a weight of 0 drops a dimension. The
// database is read as it is (never scaled or copied), so weights may change per search.
void knn_cpu(const float* queries, int64_t num_queries, const float* database,
             int64_t num_database, int64_t dim, int64_t k, Metric metric,
             float* out_distances, int64_t* out_indices, const float* weights = nullptr);

// For experiments (benchmarks/row_cutoff.py): batches of at most `limit` queries take the row
// path instead of packing, limit in [0, the row path's capacity (8)]; -1 restores the measured
// default. Process-wide; takes effect at the next search. Throws ValueError for another limit.
void knn_cpu_set_row_query_limit(int limit);
int knn_cpu_row_query_limit();  // the cut-off in use at the active SIMD level

// The same search on the current CUDA device (csrc/cuda/knn.cu; a CPU-only build throws
// RuntimeError). Same arguments and results, plus what a GPU call needs: all pointers are
// device memory, `stream` is a cudaStream_t (torch's current stream, as an integer) that every
// kernel is queued on, and `workspace` is device memory of knn_cuda_workspace_bytes(...)
// bytes, allocated by the caller (torch's caching allocator): nothing is allocated here.
// `database` holds elements of type `storage` (float32, float16 or bfloat16). database_norms
// (nullable, device memory): the database's squared norms (l2) or inverse norms, 0 for a zero
// vector (cosine), kept by the caller (a GPU FlatIndex) so a search reads the database once;
// null: computed here. Not for weighted l2 (its norms depend on the weights).
// Returns when the work is queued, not done. Inputs must be finite (the caller checks).
// workspace_bound: the most bytes the caller will give; with the fitted plan (the default,
// knn_cuda_fitted_plan) a plan that needs more takes fewer database splits. knn_cuda plans
// with its workspace's size as the bound, which gives the plan that size was asked for.
// dim: the rows' dimension, which the plan's split rule reads (knn_plan.cuh); 0: not given,
// the rule of 128 dimensions or fewer. A search's size must be asked with its own dim.
size_t knn_cuda_workspace_bytes(int64_t num_queries, int64_t num_database, int64_t k, int device,
                                size_t workspace_bound = SIZE_MAX, int64_t dim = 0);
void knn_cuda(const float* queries, int64_t num_queries, const void* database, int64_t num_database,
              int64_t dim, int64_t k, Metric metric, KnnPrecision precision, float* out_distances,
              int64_t* out_indices, void* workspace, size_t workspace_bytes, uintptr_t stream,
              const float* weights = nullptr, KnnStorage storage = KnnStorage::kFloat32,
              const float* database_norms = nullptr);
// A GPU search's plan (csrc/cuda/knn.cu), for diagnostics (benchmarks/profile_knn_cuda.py):
// query tiles of 128, database splits per query tile (blocks = query_tiles * splits), rows
// per split, candidate list capacity, workspace bytes (knn_cuda_workspace_bytes), and whether
// the lists are merged as a tree.
struct KnnCudaPlan {
  int64_t query_tiles, splits, split_length, capacity;
  size_t workspace_bytes;
  bool tree;
};
KnnCudaPlan knn_cuda_plan(int64_t num_queries, int64_t num_database, int64_t k, int device,
                          size_t workspace_bound = SIZE_MAX, int64_t dim = 0);
// The same plan for a given multiprocessor count and CUB temporary size, computed on the host
// alone (no device is asked): for tests of the plan's logic on machines without a GPU.
KnnCudaPlan knn_cuda_plan_for(int64_t num_queries, int64_t num_database, int64_t k, int multiprocessors,
                              size_t workspace_bound, size_t cub_bytes, int64_t dim = 0);
// The split rule's rows per split per neighbour in use for rows of `dim` dimensions (0: not
// given): 32 up to 128 dimensions, 32 * 128 / dim past them (at least 2), or
// LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR (a whole number from 0, no rule, to 65536; other values
// throw ValueError). For experiments.
int64_t knn_cuda_rows_per_neighbour(int64_t dim = 0);
// The splits of a call of at most 8 queries: 0 (the plan's own), or
// LATENTSPACE_CUDA_FEW_QUERY_SPLITS (a whole number from 0 to 65535; other values throw
// ValueError). For experiments.
int64_t knn_cuda_few_query_splits();
// A candidate list's room beyond k, in multiples of k: 1, or LATENTSPACE_CUDA_LIST_ROOM (a
// whole number from 1 to 64; other values throw ValueError). For experiments.
int64_t knn_cuda_list_room();
// The rows a warp reads at once in the scan of one query: 8 (the single-query scan, the
// default), 16, or 4 (the row scan), as LATENTSPACE_CUDA_SINGLE_QUERY_ROWS says (other values
// throw ValueError).
int knn_cuda_single_query_rows();
// The tree merge's setting (knn_merge_tree.cuh), LATENTSPACE_CUDA_TREE_MERGE: "auto" (unset,
// empty or auto: in the large-k plan, where the split rule would leave the GPU short of
// blocks), "1" (every search of more than 8 database splits) or "0" (never); other values
// throw ValueError.
const char* knn_cuda_tree_merge();
// Whether the tile scan cuts its candidate lists back by warps, 8 lists at a time
// (csrc/cuda/knn_scan.cuh, opt-in): LATENTSPACE_CUDA_WARP_CUT_BACKS=1; unset, empty or 0: no;
// other values throw ValueError.
bool knn_cuda_warp_cut_backs();
// Whether the tile scan compares each score with its query's threshold as a float before it
// forms the score's key (csrc/cuda/knn_scan.cuh, opt-in; the shared-threshold and warp
// cut-back settings run the same kernels, so they get it too):
// LATENTSPACE_CUDA_FLOAT_THRESHOLDS=1; unset, empty or 0: no; other values throw ValueError.
bool knn_cuda_float_thresholds();
// Whether a plan that needs more workspace than its bound takes fewer database splits
// (csrc/cuda/knn.cu): yes unless LATENTSPACE_CUDA_FITTED_PLAN=0 (unset, empty or 1: yes);
// other values throw ValueError.
bool knn_cuda_fitted_plan();
// The tensor-core tile a tf32 / bf16 / fp16 search takes now: "deep" (DeepMmaTile where it
// applies, the default since GPU run 12), "mma" (MmaTile), "wmma" (WmmaTile), "pipelined" (the
// pipelined deep tile, opt-in) or "resident" (its resident-queries variant, opt-in), as the
// environment variable LATENTSPACE_CUDA_TENSOR_TILE says; a bad
// value throws the ValueError the search would. A CPU-only build throws RuntimeError.
const char* knn_cuda_tensor_tile();
// The tile of the tile scan of this thread's last native GPU search call: "simt", "wmma",
// "mma", "deep", "pipelined", "resident", or "none" (no call yet, or a call that took the row scan): the tests check
// with it that an opt-in tile ran where it applies and that a fallback is the one documented.
// A CPU-only build throws RuntimeError.
const char* knn_cuda_last_scan();
// Whether a search of k <= 1024 without a tree merge finishes in one kernel
// (csrc/cuda/knn_finish.cuh): yes unless LATENTSPACE_CUDA_FUSED_FINISH=0 (unset, empty or 1:
// yes); other values throw ValueError.
bool knn_cuda_fused_finish();
// Whether the row scan (1-8 queries) loads its norms ahead (csrc/cuda/knn_rows.cuh, opt-in):
// LATENTSPACE_CUDA_EARLY_NORMS=1; unset, empty or 0: no; other values throw ValueError.
bool knn_cuda_early_norms();
// The shared thresholds' setting (csrc/cuda/knn_scan.cuh), LATENTSPACE_CUDA_SHARED_THRESHOLDS:
// "auto" (unset, empty or auto: a query's database splits share their thresholds where there
// are several and the tile scan runs), "1" (every search) or "0" (none); other values throw
// ValueError.
const char* knn_cuda_shared_thresholds();

}  // namespace latentspace
