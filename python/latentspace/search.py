"""Exact k-nearest-neighbour search between two sets of vectors."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _cuda_device, _cuda_search, _native
from ._arrays import (BAD_ROW_WORDS, MAX_SQUARED_NORM, as_matrix, check_k, check_metric, check_rows_usable,
                      empty_results, weights_for)

# From this many queries on, a weighted_l2 knn on the CPU checks the database against the
# weights before it searches: one read of the database, 0.7-1.9% of a search this large
# (N x D = 1,000,000 x 64, 200,000 x 256 and 2,000,000 x 8, k = 10, 2 threads), where the
# kernel finds an unusable row only while it scans, after searching a whole block of queries
# (up to 512 KiB of them) against the rows before it. Fewer queries: the search costs a few
# such reads, and the kernel's check, made in its own norm pass, costs nothing.
CHECK_FIRST_QUERIES = 2048
# The bound that picks the rows weighted_overflow_row sums again allows for the rounding of
# both float32 sums (relative error at most about dim * 2**-24 each) with a factor 2, which
# covers it up to this many dimensions; wider rows are all summed again.
_BOUND_DIMS = 1 << 20


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
            naming it (on the CPU, from CHECK_FIRST_QUERIES queries on, before the search).
        device: where to search. None: on a CUDA GPU when queries or database is a CUDA
            tensor (the queries' device first; the other input is copied there), else on the
            CPU. "cpu": on the CPU (CUDA tensors are copied to the host; results come back as
            CPU tensors). "cuda", "cuda:N" or a torch.device: on that GPU (docs/gpu.md); a
            RuntimeError names why when CUDA is unusable here.
        precision: "fp32" (default: exact float32). GPU only: "tf32", "bf16" or "fp16" round
            the inputs to that precision and multiply on tensor cores, summing in float32
            (faster, less exact: docs/gpu.md); the CPU refuses them with a ValueError.
        workspace_bytes: GPU only (checked, unused on the CPU): the most temporary device
            memory one native call may take (default 1 GiB); the queries are searched in as
            many calls as that needs. ValueError when one query alone needs more.
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
    x, _ = as_matrix(database, "database", dim=q.shape[1])
    k = check_k(k)
    code = check_metric(metric)
    w = weights_for(metric, weights, q.shape[1])
    if x.shape[0] == 0:
        raise ValueError("database: expected at least one row, got shape (0, %d)" % x.shape[1])
    if w is not None and (q.shape[0] == 0 or q.shape[0] >= CHECK_FIRST_QUERIES):
        _check_weighted_database(x, w)  # before any work (see CHECK_FIRST_QUERIES)
    elif q.shape[0] == 0:
        check_rows_usable(x, "database")  # the search would have; say so even with no queries
    distances, indices, d_view, i_view = empty_results(kind, q.shape[0], k)
    _native.knn(q, x, k, code, d_view, i_view, w)
    return distances, indices


def weighted_overflow_row(rows: np.ndarray, weights: np.ndarray, name: str, first_row: int = 0) -> int:
    """The first row of a C-contiguous float32 matrix whose squared norm scaled by `weights`,
    sum_d w_d x_d^2, is above what a search can use (MAX_SQUARED_NORM), or -1. A row unusable
    as it is (NaN, Inf, plain overflow) raises check_rows_usable's ValueError, naming `name`
    and the row (first_row + r) first."""
    plain, heavy = refused_rows(rows, weights)
    if plain >= 0:
        raise ValueError(f"{name}: row {first_row + plain} {BAD_ROW_WORDS}")  # check_rows_usable's words
    return heavy


def refused_rows(rows: np.ndarray, weights: np.ndarray) -> tuple[int, int]:
    """(plain, heavy) for a C-contiguous float32 matrix and weighted_l2 weights: the first row
    unusable as it is (NaN, Inf, a plain squared norm past MAX_SQUARED_NORM), and the first
    row before it (before the end when there is none) whose squared norm scaled by the
    weights, sum_d w_d x_d^2, is past MAX_SQUARED_NORM; -1 for none. Never raises.

    Costs one read of the rows (their plain squared norms, as check_rows_usable computes
    them) and a pass over the norms: |x|_w^2 <= max(w) |x|^2, so only the rows whose bound
    passes the limit can, and only they are summed again, exactly (float32 squares times w,
    as the GPU's check sums them)."""
    if rows.shape[0] == 0:
        return -1, -1
    norms = np.empty(rows.shape[0], dtype=np.float32)
    plain = _native.sq_norms(rows, norms)
    if plain >= 0:  # the rows after it do not matter: the search names this one first
        rows, norms = rows[:plain], norms[:plain]
    return plain, _first_heavy_row(rows, norms, weights)


def _first_heavy_row(rows: np.ndarray, norms: np.ndarray, weights: np.ndarray) -> int:
    """refused_rows' heavy row among usable rows, from their plain squared norms."""
    if rows.shape[0] == 0:
        return -1
    largest = float(weights.max(initial=0.0))
    if largest == 0.0:
        return -1
    slack = 2.0 if rows.shape[1] <= _BOUND_DIMS else np.inf
    threshold = MAX_SQUARED_NORM / (largest * slack)  # (0 for an infinite slack: every row)
    if threshold >= MAX_SQUARED_NORM:
        return -1  # no usable plain norm passes it
    suspects = np.flatnonzero(norms > np.float32(threshold))
    if suspects.size == 0:
        return -1
    with np.errstate(over="ignore", invalid="ignore"):
        weighted = np.square(rows[suspects]) @ weights
    over = np.flatnonzero(~(weighted <= MAX_SQUARED_NORM))  # (an inf product passes too)
    return int(suspects[over[0]]) if over.size else -1


def _check_weighted_database(x: np.ndarray, weights: np.ndarray) -> None:
    """ValueError naming "database" and the first row the weighted search would refuse, in
    the kernel's words (check_rows_usable's, which are the same)."""
    row = weighted_overflow_row(x, weights, "database")
    if row >= 0:  # (summed in another order, a row within an ulp of the limit may pass here:
        # then the kernel, which has the last word, decides)
        check_rows_usable(x[row : row + 1], "database", first_row=row, weights=weights)
