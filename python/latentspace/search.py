"""Exact k-nearest-neighbour search between two sets of vectors."""

from __future__ import annotations

from typing import Any

from . import _cuda_device, _cuda_search
from ._arrays import (as_matrix, check_k, check_metric, check_rows_usable, check_weighted_rows, empty_results,
                      native_knn, weights_for)

# From this many queries on, a weighted_l2 knn on the CPU checks the database against the
# weights before it searches: one read of the database, 0.7-1.9% of a search this large
# (N x D = 1,000,000 x 64, 200,000 x 256 and 2,000,000 x 8, k = 10, 2 threads), where the
# kernel finds an unusable row only while it scans, after searching a whole block of queries
# (up to 512 KiB of them) against the rows before it. Fewer queries: the search costs a few
# such reads, and the kernel's check, made in its own norm pass, costs nothing.
CHECK_FIRST_QUERIES = 2048


def knn(queries: Any, database: Any, k: int, metric: str = "l2", *, weights: Any = None, device: Any = None,
        precision: str = "fp32", workspace_bytes: int | None = None, gpu_memory_bytes: int | None = None):
    """Exact k nearest neighbours of each query among the database rows (faiss conventions).

    Args:
        queries: (Q, D) numpy array or torch tensor (CPU or CUDA).
        database: (N, D) numpy array or torch tensor (CPU or CUDA), N >= 1.
        k: neighbours per query, an integer >= 1 (may exceed N).
        metric: "l2" (squared Euclidean distance, ascending), "ip" (inner product,
            descending) or "cosine" (cosine similarity, descending; a zero vector has
            similarity 0 with everything, so the output never holds NaN; so does a vector
            whose squared norm underflows to zero in float32, every |x_d| below about
            2.6e-23; subnormal norms still count), or "weighted_l2": the
            weighted squared distance sum_d weights[d] * (q_d - x_d)^2, ascending.
        weights: for "weighted_l2" only (required there): (D,) finite values >= 0, one
            influence factor per dimension; 0 drops a dimension. The database is read as it is,
            never scaled or copied, so weights can change from one search to the next. A row
            whose squared norm scaled by them, sum_d w_d x_d^2, is above 4.2e37 is refused,
            naming it (on the CPU, from CHECK_FIRST_QUERIES queries on, before the search):
            a refused query before the database, and in each the first refused row in row
            order, whether NaN / Inf or a squared norm (plain or weighted) past the limit.
        device: where to search. None: on a CUDA GPU when queries or database is a CUDA
            tensor (the queries' device first; the other input is copied there), else on the
            CPU. "cpu": on the CPU (CUDA tensors are copied to the host; results come back as
            CPU tensors). "cuda", "cuda:N" or a torch.device: on that GPU (docs/gpu.md); a
            RuntimeError names why when CUDA is unusable here.
        precision: "fp32" (default: exact float32). GPU only: "tf32", "bf16" or "fp16" round
            the inputs to that precision and multiply on tensor cores, summing in float32
            (faster, less exact: docs/gpu.md); the CPU refuses them with a ValueError.
        workspace_bytes: GPU only (checked, unused on the CPU): the most temporary device
            memory one native call may take (default: 1 GiB, or for a database on the GPU what
            one call of all the queries needs where that is more, up to 8 GiB and an eighth of
            the GPU's free memory); the queries are searched in as many calls as that needs.
            ValueError when one query alone needs more.
        gpu_memory_bytes: GPU only (checked, unused on the CPU): device memory for streaming
            a host (numpy or CPU tensor) database: its chunks, a block of queries and their
            results (default: 2 GiB or half the free memory, the smaller).

    Returns:
        (distances, indices): (Q, k) float32 and (Q, k) int64, each row best first, ties to
        the lower index. When k > N the missing entries are index -1 with distance +inf
        (l2) or -inf (ip, cosine). numpy in, numpy out; torch in, torch out (following
        `queries`): CPU tensors for CPU queries, tensors on the searching GPU for CUDA
        queries.

    C-contiguous float32 inputs are used in place; other real dtypes and non-contiguous
    inputs are converted to a float32 copy first. Raises TypeError / ValueError naming the
    argument for wrong rank, dtype, dimension, k, NaN / Inf values or an empty database.
    On the CPU: runs on latentspace.get_num_threads() threads with the GIL released. On a
    GPU: CUDA tensors are used in place and the search is queued on torch's current stream;
    host data streams through pinned buffers (docs/gpu.md).
    """
    workspace_bytes = _cuda_device.check_budget(workspace_bytes, "workspace_bytes")
    gpu_memory_bytes = _cuda_device.check_budget(gpu_memory_bytes, "gpu_memory_bytes")
    target = _cuda_device.resolve_device(device, (queries, "queries"), (database, "database"))
    precision_code = _cuda_search.check_precision(precision, target is not None)
    if target is not None:
        return _cuda_search.knn_on_device(queries, database, k, metric, target, workspace_bytes=workspace_bytes,
                                          gpu_memory_bytes=gpu_memory_bytes, precision=precision_code,
                                          weights=weights)
    q, kind = as_matrix(queries, "queries")
    x, _ = as_matrix(database, "database", dim=q.shape[1], dim_of="the queries' dimension")
    k = check_k(k)
    code = check_metric(metric)
    w = weights_for(metric, weights, q.shape[1])
    if x.shape[0] == 0:
        raise ValueError("database: expected at least one row, got shape (0, %d)" % x.shape[1])
    if w is not None and (q.shape[0] == 0 or q.shape[0] >= CHECK_FIRST_QUERIES):
        _check_weighted_database_first(q, x, w)  # before any work (see CHECK_FIRST_QUERIES)
    elif q.shape[0] == 0:
        check_rows_usable(x, "database")  # the search would have; say so even with no queries
    distances, indices, d_view, i_view = empty_results(kind, q.shape[0], k)
    native_knn(q, x, k, code, d_view, i_view, w)
    return distances, indices


def _check_weighted_database_first(queries, database, weights) -> None:
    """The weighted database's check before the search, which still names a refused query first,
    as the search does (the queries are read only when the database holds a refused row)."""
    try:
        check_weighted_rows(database, weights, "database")
    except ValueError:
        check_weighted_rows(queries, weights, "queries")
        raise
