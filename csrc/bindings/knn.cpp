// pybind11 glue for exact kNN and row norms: check buffers, drop the GIL, call ops/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "bindings/arrays.h"
#include "bindings/interrupt.h"
#include "ops/knn.h"
#include "ops/norms.h"

namespace latentspace::bindings {

void bind_knn(py::module_& m) {
  m.def(
      "knn",
      [](py::array queries, py::array database, int64_t k, int metric, py::array distances,
         py::array indices, py::object weights) {
        const float* q = checked_data<float>(queries, "queries", 2, false);
        const float* x = checked_data<float>(database, "database", 2, false);
        float* d = checked_data<float>(distances, "distances", 2, true);
        int64_t* i = checked_data<int64_t>(indices, "indices", 2, true);
        const int64_t nq = dim_of(queries, 0), dim = dim_of(queries, 1), nb = dim_of(database, 0);
        LS_CHECK_VALUE(dim_of(database, 1) == dim, "database: expected ", dim,
                       " columns (the queries' dimension), got ", dim_of(database, 1));
        LS_CHECK_VALUE(dim_of(distances, 0) == nq && dim_of(distances, 1) == k &&
                           dim_of(indices, 0) == nq && dim_of(indices, 1) == k,
                       "distances, indices: expected shape (", nq, ", ", k, ")");
        LS_CHECK_VALUE(metric >= 0 && metric <= 2, "metric: expected 0 (l2), 1 (ip) or 2 (cosine), got ", metric);
        const float* w = nullptr;
        py::array weight_array;
        if (!weights.is_none()) {
          weight_array = weights.cast<py::array>();
          w = checked_data<float>(weight_array, "weights", 1, false);
          LS_CHECK_VALUE(dim_of(weight_array, 0) == dim, "weights: expected ", dim, " values (one per dimension), got ",
                         dim_of(weight_array, 0));
        }
        PythonInterrupts interrupts;  // Ctrl-C stops a long search
        py::gil_scoped_release release;
        knn_cpu(q, nq, x, nb, dim, k, static_cast<Metric>(metric), d, i, w);
      },
      py::arg("queries"), py::arg("database"), py::arg("k"), py::arg("metric"),
      py::arg("distances"), py::arg("indices"), py::arg("weights") = py::none(),
      "Exact kNN into preallocated (Q, k) float32 distances and int64 indices; weights (dim "
      "float32 values, metric l2 only): the weighted squared distance.");

  // Experiments only (benchmarks/row_cutoff.py, tests): the CPU row / packed cut-off.
  m.def("_set_row_query_limit", &knn_cpu_set_row_query_limit, py::arg("limit"),
        "Batches of at most `limit` queries take the CPU row path (0-8); -1 restores the default.");
  m.def("_row_query_limit", &knn_cpu_row_query_limit, "The CPU row / packed cut-off in use.");

  // CUDA: torch tensors cross as device pointers (integers) from python/latentspace/_cuda_search.py,
  // which checks devices, dtypes, shapes and finiteness first; the stream is torch's current one.
  m.def(
      "knn_cuda_workspace_bytes",
      [](int64_t num_queries, int64_t num_database, int64_t k, int device, std::optional<size_t> workspace_bound,
         int64_t dim) {
        LS_CHECK_VALUE(num_queries >= 0 && num_database >= 1 && k >= 1,
                       "num_queries, num_database, k: expected >= 0, >= 1, >= 1");
        LS_CHECK_VALUE(dim >= 0, "dim: expected >= 0 (0: not given), got ", dim);
        return knn_cuda_workspace_bytes(num_queries, num_database, k, device, workspace_bound.value_or(SIZE_MAX),
                                        dim);
      },
      py::arg("num_queries"), py::arg("num_database"), py::arg("k"), py::arg("device"),
      py::arg("workspace_bound") = py::none(), py::arg("dim") = 0,
      "Bytes of device workspace knn_cuda needs for these sizes on this device; workspace_bound (None: "
      "none): the most the caller gives, which the fitted plan (on unless LATENTSPACE_CUDA_FITTED_PLAN=0) fits; "
      "dim: the rows' dimension, which the split rule reads (0: not given, the rule of 128 or fewer): a search's "
      "own, for the plan the search will make.");
  // Diagnostics (benchmarks/profile_knn_cuda.py, tests): a search's plan and the split rule.
  auto plan_dict = [](const KnnCudaPlan& plan) {
    py::dict out;
    out["query_tiles"] = plan.query_tiles;
    out["splits"] = plan.splits;
    out["split_length"] = plan.split_length;
    out["capacity"] = plan.capacity;
    out["workspace_bytes"] = plan.workspace_bytes;
    out["tree"] = plan.tree;
    return out;
  };
  m.def(
      "_cuda_plan",
      [plan_dict](int64_t num_queries, int64_t num_database, int64_t k, int device,
                  std::optional<size_t> workspace_bound, int64_t dim) {
        LS_CHECK_VALUE(num_database >= 1 && k >= 1, "num_database, k: expected >= 1, >= 1");
        LS_CHECK_VALUE(dim >= 0, "dim: expected >= 0 (0: not given), got ", dim);
        return plan_dict(
            knn_cuda_plan(num_queries, num_database, k, device, workspace_bound.value_or(SIZE_MAX), dim));
      },
      py::arg("num_queries"), py::arg("num_database"), py::arg("k"), py::arg("device"),
      py::arg("workspace_bound") = py::none(), py::arg("dim") = 0,
      "The plan of one native GPU search call: query_tiles, splits (per query tile), split_length, "
      "capacity, workspace_bytes (workspace_bound as for knn_cuda_workspace_bytes), tree (the lists merged as a tree).");
  m.def(
      "_cuda_plan_for",
      [plan_dict](int64_t num_queries, int64_t num_database, int64_t k, int multiprocessors,
                  std::optional<size_t> workspace_bound, size_t cub_bytes, int64_t dim) {
        LS_CHECK_VALUE(num_database >= 1 && k >= 1, "num_database, k: expected >= 1, >= 1");
        LS_CHECK_VALUE(dim >= 0, "dim: expected >= 0 (0: not given), got ", dim);
        return plan_dict(knn_cuda_plan_for(num_queries, num_database, k, multiprocessors,
                                           workspace_bound.value_or(SIZE_MAX), cub_bytes, dim));
      },
      py::arg("num_queries"), py::arg("num_database"), py::arg("k"), py::arg("multiprocessors"),
      py::arg("workspace_bound") = py::none(), py::arg("cub_bytes") = 0, py::arg("dim") = 0,
      "_cuda_plan's plan for a given multiprocessor count and CUB temporary size, computed on the host "
      "alone: the plan's logic, testable without a GPU (a CUDA build is needed).");
  m.def(
      "_cuda_rows_per_neighbour",
      [](int64_t dim) {
        LS_CHECK_VALUE(dim >= 0, "dim: expected >= 0 (0: not given), got ", dim);
        return knn_cuda_rows_per_neighbour(dim);
      },
      py::arg("dim") = 0,
      "The GPU split rule's rows per split per neighbour for rows of `dim` dimensions (0: not given): 32 up "
      "to 128, 32 * 128 / dim past them (at least 2), or LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR (0: no rule).");
  m.def("_cuda_few_query_splits", &knn_cuda_few_query_splits,
        "The splits of a GPU call of at most 8 queries: 0 (the plan's own), or LATENTSPACE_CUDA_FEW_QUERY_SPLITS "
        "(an experiment).");
  m.def("_cuda_list_room", &knn_cuda_list_room,
        "A GPU candidate list's room beyond k, in multiples of k: 1, or LATENTSPACE_CUDA_LIST_ROOM (an "
        "experiment).");
  m.def("_cuda_single_query_rows", &knn_cuda_single_query_rows,
        "The rows a warp reads at once in the GPU scan of one query: 8 (the single-query scan, the "
        "default), 16, or 4 (the row scan), as LATENTSPACE_CUDA_SINGLE_QUERY_ROWS says.");
  m.def("_cuda_fitted_plan", &knn_cuda_fitted_plan,
        "Whether a GPU plan that needs more workspace than its bound takes fewer splits "
        "(on unless LATENTSPACE_CUDA_FITTED_PLAN=0).");
  m.def("_cuda_warp_cut_backs", &knn_cuda_warp_cut_backs,
        "Whether a GPU search's tile scan cuts its lists back by warps (LATENTSPACE_CUDA_WARP_CUT_BACKS=1, opt-in).");
  m.def("_cuda_float_thresholds", &knn_cuda_float_thresholds,
        "Whether a GPU search's tile scan compares scores with a float threshold before forming their keys "
        "(LATENTSPACE_CUDA_FLOAT_THRESHOLDS=1, opt-in).");
  m.def("_cuda_tree_merge", [] { return std::string(knn_cuda_tree_merge()); },
        "The GPU tree merge's setting, LATENTSPACE_CUDA_TREE_MERGE: 'auto' (the large-k plan), '1' (every search "
        "of more than 8 splits) or '0' (never).");
  m.def("_cuda_last_scan", [] { return std::string(knn_cuda_last_scan()); },
        "The tile of the tile scan of this thread's last native GPU search call: 'simt', 'wmma', 'mma', "
        "'deep', or 'none' (no call yet, or one that took the row scan); for tests.");
  m.def("_cuda_tensor_tile", [] { return std::string(knn_cuda_tensor_tile()); },
        "The tensor-core tile a tf32 / bf16 / fp16 GPU search takes now: 'mma', 'wmma' or 'deep' "
        "(LATENTSPACE_CUDA_TENSOR_TILE).");
  m.def("_cuda_fused_finish", &knn_cuda_fused_finish,
        "Whether a GPU search of k <= 1024 finishes in one kernel (on unless LATENTSPACE_CUDA_FUSED_FINISH=0).");
  m.def("_cuda_early_norms", &knn_cuda_early_norms,
        "Whether the GPU row scan loads its norms ahead (LATENTSPACE_CUDA_EARLY_NORMS=1, opt-in).");
  m.def("_cuda_shared_thresholds", [] { return std::string(knn_cuda_shared_thresholds()); },
        "The GPU shared thresholds' setting, LATENTSPACE_CUDA_SHARED_THRESHOLDS: 'auto' (where a query has "
        "several splits and the tile scan runs), '1' (every search) or '0' (none).");
  m.def(
      "knn_cuda",
      [](uintptr_t queries, int64_t num_queries, uintptr_t database, int64_t num_database, int64_t dim, int64_t k,
         int metric, uintptr_t distances, uintptr_t indices, uintptr_t workspace, size_t workspace_bytes,
         uintptr_t stream, int precision, uintptr_t weights, int storage, uintptr_t database_norms) {
        LS_CHECK_VALUE(metric >= 0 && metric <= 2, "metric: expected 0 (l2), 1 (ip) or 2 (cosine), got ", metric);
        LS_CHECK_VALUE(precision >= 0 && precision <= 3,
                       "precision: expected 0 (fp32), 1 (tf32), 2 (bf16) or 3 (fp16), got ", precision);
        LS_CHECK_VALUE(storage >= 0 && storage <= 2,
                       "storage: expected 0 (float32), 1 (float16) or 2 (bfloat16), got ", storage);
        LS_CHECK_VALUE(dim >= 1 && num_queries >= 0, "dim, num_queries: expected dim >= 1 and num_queries >= 0");
        py::gil_scoped_release release;
        knn_cuda(reinterpret_cast<const float*>(queries), num_queries, reinterpret_cast<const void*>(database),
                 num_database, dim, k, static_cast<Metric>(metric), static_cast<KnnPrecision>(precision),
                 reinterpret_cast<float*>(distances),
                 reinterpret_cast<int64_t*>(indices), reinterpret_cast<void*>(workspace), workspace_bytes, stream,
                 reinterpret_cast<const float*>(weights), static_cast<KnnStorage>(storage),
                 reinterpret_cast<const float*>(database_norms));
      },
      py::arg("queries"), py::arg("num_queries"), py::arg("database"), py::arg("num_database"), py::arg("dim"),
      py::arg("k"), py::arg("metric"), py::arg("distances"), py::arg("indices"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"), py::arg("precision") = 0, py::arg("weights") = 0,
      py::arg("storage") = 0, py::arg("database_norms") = 0,
      "Exact kNN on the current CUDA device into preallocated (Q, k) float32 / int64 device arrays; "
      "queued on `stream`, returns before the work is done. weights: a device pointer to dim "
      "float32 values (0: none; metric l2 only), the weighted squared distance. storage: the "
      "database's element type (0 float32, 1 float16, 2 bfloat16). database_norms: a device pointer "
      "to the database's squared norms (l2) or inverse norms (cosine), 0: computed per call.");

  m.def(
      "sq_norms",
      [](py::array x, py::array out) {
        const float* data = checked_data<float>(x, "x", 2, false);
        float* norms = checked_data<float>(out, "out", 1, true);
        LS_CHECK_VALUE(dim_of(out, 0) == dim_of(x, 0), "out: expected ", dim_of(x, 0), " entries");
        PythonInterrupts interrupts;  // Ctrl-C stops the check of a huge database
        py::gil_scoped_release release;
        return sq_norms_cpu(data, dim_of(x, 0), dim_of(x, 1), norms);
      },
      py::arg("x"), py::arg("out"),
      "Squared L2 norms of the rows of x into out; returns the first unusable row (NaN, Inf, "
      "or too large) or -1.");

  m.def(
      "sq_norms_cuda",
      [](uintptr_t rows, int64_t count, int64_t dim, int storage, uintptr_t weights, int64_t first_row, uintptr_t out,
         uintptr_t first_bad, uintptr_t stream) {
        // Checked here, before any CUDA call: the same ValueError in a build without CUDA.
        LS_CHECK_VALUE(storage >= 0 && storage <= 2,
                       "storage: expected 0 (float32), 1 (float16) or 2 (bfloat16), got ", storage);
        LS_CHECK_VALUE(count >= 0, "count: expected >= 0, got ", count);
        LS_CHECK_VALUE(dim >= 1, "dim: expected >= 1, got ", dim);
        LS_CHECK_VALUE(first_row >= 0, "first_row: expected >= 0, got ", first_row);
        LS_CHECK_VALUE(first_bad != 0, "first_bad: expected a device pointer to one int64, got 0");
        LS_CHECK_VALUE(count == 0 || rows != 0, "rows: expected a device pointer, got 0");
        py::gil_scoped_release release;
        sq_norms_cuda(reinterpret_cast<const void*>(rows), count, dim, static_cast<KnnStorage>(storage),
                      reinterpret_cast<const float*>(weights), first_row, reinterpret_cast<float*>(out),
                      reinterpret_cast<int64_t*>(first_bad), stream);
      },
      py::arg("rows"), py::arg("count"), py::arg("dim"), py::arg("storage"), py::arg("weights"), py::arg("first_row"),
      py::arg("out"), py::arg("first_bad"), py::arg("stream"),
      "The row check on the current CUDA device, queued on `stream` (device pointers as integers, 0 for "
      "none): squared norms of `count` rows of `dim` elements of type `storage` (0 float32, 1 float16, "
      "2 bfloat16) into out (optional), and first_row plus the first row that is unusable (NaN, Inf, or a "
      "squared norm, or with weights a weighted one, too large) into the int64 at first_bad, or -1.");
}

}  // namespace latentspace::bindings
