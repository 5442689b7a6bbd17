"""Exact k-nearest-neighbour search between two sets of vectors."""

from __future__ import annotations

from typing import Any

from . import _native
from ._arrays import as_matrix, check_k, check_metric, check_rows_usable, empty_results


def knn(queries: Any, database: Any, k: int, metric: str = "l2"):
    """Exact k nearest neighbours of each query among the database rows (faiss conventions).

    Args:
        queries: (Q, D) numpy array or torch CPU tensor.
        database: (N, D) numpy array or torch CPU tensor, N >= 1.
        k: neighbours per query, an integer >= 1 (may exceed N).
        metric: "l2" (squared Euclidean distance, ascending), "ip" (inner product,
            descending) or "cosine" (cosine similarity, descending; a zero vector has
            similarity 0 with everything, so the output never holds NaN; so does a vector
            whose squared norm underflows float32, |x| < ~1e-19).

    Returns:
        (distances, indices): (Q, k) float32 and (Q, k) int64, each row best first, ties to
        the lower index. When k > N the missing entries are index -1 with distance +inf
        (l2) or -inf (ip, cosine). numpy in, numpy out; torch in, torch out (following
        `queries`).

    C-contiguous float32 inputs are used in place; other real dtypes and non-contiguous
    inputs are converted to a float32 copy first. Raises TypeError / ValueError naming the
    argument for wrong rank, dtype, dimension, k, NaN / Inf values or an empty database.
    Runs on latentspace.get_num_threads() threads with the GIL released.
    """
    q, kind = as_matrix(queries, "queries")
    x, _ = as_matrix(database, "database", dim=q.shape[1])
    k = check_k(k)
    code = check_metric(metric)
    if x.shape[0] == 0:
        raise ValueError("database: expected at least one row, got shape (0, %d)" % x.shape[1])
    if q.shape[0] == 0:
        check_rows_usable(x, "database")  # the search would have; say so even with no queries
    distances, indices, d_view, i_view = empty_results(kind, q.shape[0], k)
    _native.knn(q, x, k, code, d_view, i_view)
    return distances, indices
