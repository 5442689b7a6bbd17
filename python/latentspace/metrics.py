"""How good a latent space is: neighbour label agreement, trustworthiness, neighbour
recall, reconstruction error. Every neighbourhood comes from the exact native search
(latentspace.knn)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import (as_float64_matrix, as_labels, as_matrix, check_k, check_metric, check_rows_usable, check_weights,
                      detached, is_torch_tensor, numpy_to_tensor, raise_unusable_rows, unusable_row_flag)
from .search import knn

__all__ = ["knn_label_agreement", "neighbor_recall", "reconstruction_mse", "self_dropped", "trustworthiness"]

# trustworthiness ranks every point for a chunk of queries at a time: (chunk, n) distances,
# indices and positions, 20 bytes each, so one step holds at most this many entries (40 MiB).
_RANK_ENTRIES_PER_STEP = 1 << 21


def knn_label_agreement(Z: Any, labels: Any, k: int = 10, metric: str = "l2", weights: Any = None) -> float:
    """The share of each point's k nearest neighbours (itself excluded) that carry its label,
    averaged over all points: 1.0 when every neighbourhood is pure.

    Args:
        Z: (n, d) vectors (numpy or torch), n >= k + 1: raw data or latent codes.
        labels: (n,) integer class labels.
        k: neighbours per point.
        metric: "l2", "ip" or "cosine", as for latentspace.knn.
        weights: None, or (d,) non-negative per-dimension weights (not all 0) for a weighted
            squared L2, sum_j w_j (a_j - b_j)^2 (metric must be "l2"): e.g. from
            latentspace.relevance_weights or keep_top. A zero weight drops its dimension.

    Computed with the exact native search (latentspace.knn), the set queried against itself
    with k + 1 neighbours and each point's own index dropped. Exact duplicates tie to the
    lower index, so a point can come second in its own list: it is dropped wherever it is
    (and the (k+1)-th neighbour dropped when it is absent, behind k lower-index duplicates).
    With weights, the search is knn's metric "weighted_l2" (Z is read as it is, not scaled).
    """
    vectors, _ = as_matrix(Z, "Z")
    check_rows_usable(vectors, "Z")  # (here: the search would name its "queries")
    n = vectors.shape[0]
    y = as_labels(labels, "labels", n)
    k = check_k(k)
    check_metric(metric)
    w = None
    if weights is not None:
        if metric not in ("l2", "weighted_l2"):
            raise ValueError(f"weights: per-dimension weights define a weighted squared L2; use metric='l2' "
                             f"(got metric={metric!r})")
        metric, w = "weighted_l2", check_weights(weights, vectors.shape[1])
        if not w.any():
            raise ValueError("weights: every weight is 0, so every distance would be 0; give at least one "
                             "dimension a positive weight")
        # rows whose squared norm scaled by the weights overflows float32: the search would
        # refuse them too, but as its "queries", an argument the caller never passed
        raise_unusable_rows([(unusable_row_flag(numpy_to_tensor(vectors), 0, w), "Z", True)])
    if n < k + 1:
        raise ValueError(f"Z: k={k} neighbours per point need at least {k + 1} rows, got {n}")
    _, indices = knn(vectors, vectors, k + 1, metric=metric, weights=w)
    neighbours = np.take_along_axis(indices, self_dropped(indices), axis=1)
    return float((y[neighbours] == y[:, None]).mean())


def _nearest_others(vectors: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows (squared L2, ties to the lower index)."""
    _, indices = knn(vectors, vectors, k + 1)
    return np.take_along_axis(indices, self_dropped(indices), axis=1)


def _paired(X: Any, Z: Any) -> tuple[np.ndarray, np.ndarray]:
    """Data X (rows, or images flattened to rows) and its codes Z, as float32 matrices with
    one row each per point."""
    x, _ = as_matrix(_flat(X), "X")
    z, _ = as_matrix(Z, "Z")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"X, Z: expected one code per row of X, got {x.shape[0]} rows in X and {z.shape[0]} in Z")
    check_rows_usable(x, "X")  # (here: the search would name its "queries")
    check_rows_usable(z, "Z")
    return x, z


def trustworthiness(X: Any, Z: Any, k: int = 5) -> float:
    """How far the latent space can be trusted not to invent neighbours (Venna and Kaski,
    2001), in [0, 1]; 1.0 when each point's k nearest neighbours in Z are also among its k
    nearest in X:

        T(k) = 1 - 2 / (n k (2n - 3k - 1)) * sum_i sum_{j in N_k^Z(i)} max(0, r(i, j) - k)

    where N_k^Z(i) is i's k nearest neighbours in Z and r(i, j) the rank of j among i's
    neighbours in X (1 = nearest), both itself excluded. The same definition and value as
    sklearn.manifold.trustworthiness(X, Z, n_neighbors=k) with the Euclidean metric.

    Args:
        X: (n, D) data (numpy or torch; images (n, ...) are flattened).
        Z: (n, d) its codes, one per row of X.
        k: neighbours per point, 1 <= k < n / 2 (the normalisation needs it).

    Every neighbour and rank comes from the exact native search in float32, ties to the
    lower index (sklearn sorts float64 distances, its tie order unspecified: the two can
    differ where distances tie or differ by float32 rounding). The ranks in X are found for
    a chunk of points at a time (each against all n), so memory stays at about 40 MiB
    whatever n; the time grows like n^2 (every pair's distance is needed).
    """
    x, z = _paired(X, Z)
    n = x.shape[0]
    k = check_k(k)
    if not k < n / 2:
        raise ValueError(f"k: trustworthiness needs k < n / 2 (n = {n} rows), got k={k}")
    latent = _nearest_others(z, k)
    chunk = max(1, _RANK_ENTRIES_PER_STEP // n)
    penalty = 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = np.arange(stop - start)[:, None]
        _, order = knn(x[start:stop], x, n)  # every point, nearest first
        position = np.empty_like(order)
        position[rows, order] = np.arange(n)
        # rank among the others: the point itself (usually first) does not count
        mine = position[rows, latent[start:stop]]
        own = position[rows[:, 0], np.arange(start, stop)][:, None]
        rank = mine + 1 - (own < mine)
        penalty += int(np.maximum(rank - k, 0).sum())
    return 1.0 - 2.0 * penalty / (n * k * (2.0 * n - 3.0 * k - 1.0))


def neighbor_recall(X: Any, Z: Any, k: int = 10) -> float:
    """The share of each point's k nearest neighbours in input space that are also among its
    k nearest in the latent space, averaged over the points: mean_i |N_k^X(i) & N_k^Z(i)| / k,
    itself excluded. 1.0 when the latent space keeps every neighbourhood.

    Args:
        X: (n, D) data (numpy or torch; images (n, ...) are flattened).
        Z: (n, d) its codes, one per row of X; n >= k + 1.
        k: neighbours per point.

    Both neighbourhoods come from the exact native search (squared L2, float32), ties to
    the lower index: where several points tie at the k-th distance only the lower indices
    count, so a tie resolved differently in the two spaces (or float32 rounding of nearly
    equal distances) can lower the recall although the spaces agree up to ties.
    """
    x, z = _paired(X, Z)
    n = x.shape[0]
    k = check_k(k)
    if n < k + 1:
        raise ValueError(f"X: k={k} neighbours per point need at least {k + 1} rows, got {n}")
    # Each list holds distinct indices, so a value seen twice in the merged row is shared.
    both = np.sort(np.concatenate([_nearest_others(x, k), _nearest_others(z, k)], axis=1), axis=1)
    shared = int((both[:, 1:] == both[:, :-1]).sum())
    return shared / (n * k)


def self_dropped(indices: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """For a set searched against itself with k + 1 neighbours, (n, k + 1) indices: the
    (n, k) positions to keep so that each row loses its own index wherever it stands (or
    its last entry when its own index is absent). Use with np.take_along_axis.
    ids: each row's own index, when the queries were rows `ids` of the set (default: row i
    is point i, the whole set queried). TypeError for indices or ids that are not integers,
    ValueError for indices that are not 2-d or ids not of shape (n,)."""
    indices = _integer_array(indices, "indices")
    if indices.ndim != 2:
        raise ValueError(f"indices: expected a 2-d array (one row of neighbours per query), got shape {indices.shape}")
    own = np.arange(indices.shape[0]) if ids is None else _integer_array(ids, "ids")
    if own.shape != (indices.shape[0],):  # (one id, or a column, would be broadcast over every row)
        raise ValueError(f"ids: expected shape ({indices.shape[0]},) (one index per row of indices), got {own.shape}")
    not_self = indices != own[:, None]
    # A stable sort moves the (at most one) self-match to the end of the row, keeping order.
    return np.argsort(~not_self, axis=1, kind="stable")[:, : indices.shape[1] - 1]


def _integer_array(x: Any, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer indices, got dtype {array.dtype}")
    return array


def reconstruction_mse(X: Any, X_hat: Any) -> float:
    """Mean squared error over all elements between data and its reconstruction, (n, d) each,
    n >= 1 (numpy or torch; images (n, ...) are flattened): computed in float64 from the
    values as given (float64 data is not rounded to float32 first; two integer arrays are
    subtracted exactly, so integers beyond 2**53 keep their differences), inf only when the MSE
    itself exceeds float64's range. NaN or Inf in either is a ValueError naming it and the row.
    Images are compared with images of the same shape or with their flat rows: (n, 2, 3)
    against (n, 3, 2) (transposed, or channels last) is a ValueError, not pixels paired wrongly."""
    x_shape, x_hat_shape = tuple(getattr(X, "shape", ())), tuple(getattr(X_hat, "shape", ()))
    if len(x_shape) > 2 and len(x_hat_shape) > 2 and x_shape != x_hat_shape:
        raise ValueError(f"X, X_hat: shapes differ, {x_shape} vs {x_hat_shape}")
    a = as_float64_matrix(_flat(X), "X")
    b = as_float64_matrix(_flat(X_hat), "X_hat")
    if a.shape != b.shape:
        raise ValueError(f"X, X_hat: shapes differ, {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"X: expected at least one row, got shape {a.shape}")
    integers = _integer_rows(X), _integer_rows(X_hat)
    if integers[0] is not None and integers[1] is not None:
        diff = _exact_integer_difference(*integers)
    else:
        with np.errstate(over="ignore"):  # a difference beyond float64 (|a - b| > 1.8e308) is inf
            diff = a - b
    # Scaled by a power of two (exact) to a largest |difference| in [0.5, 1) first: squares of
    # errors above 1e154 overflow float64 although their mean may not (1e155 once in 10,000
    # elements: 1e306). An MSE beyond float64's range is inf.
    _, exponent = np.frexp(np.abs(diff).max())
    scaled = np.ldexp(diff, -exponent)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.ldexp(np.mean(scaled * scaled), 2 * exponent))


def _integer_rows(x: Any) -> np.ndarray | None:
    """x (already checked by as_float64_matrix) as a flat-row integer numpy array when it holds
    integers, else None."""
    if is_torch_tensor(x):
        if x.is_floating_point():
            return None
        return detached(x).to("cpu").reshape(x.shape[0], -1).numpy()
    array = np.asarray(_flat(x))
    return array if array.dtype.kind in "iu" else None


def _exact_integer_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b for integer arrays, rounded once to float64: through float64 first, integers
    beyond 2**53 lost their differences (2**62 + 1 - 2**62 was 0), and integer arithmetic
    wraps (uint8 10 - 200) or overflows (uint64 against int64). Each value is split into
    2**32 * high + low, low in [0, 2**32): both parts' differences are exact in float64."""
    def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        high, low = np.divmod(x.astype(np.uint64 if x.dtype == np.uint64 else np.int64), 1 << 32)
        return high.astype(np.float64), low.astype(np.float64)

    (a_high, a_low), (b_high, b_low) = split(a), split(b)
    return (a_high - b_high) * float(1 << 32) + (a_low - b_low)


def _flat(x: Any) -> Any:
    """(n, ...) -> (n, prod(...)) so images compare like rows."""
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) > 2:
        return x.reshape(shape[0], -1)
    return x
