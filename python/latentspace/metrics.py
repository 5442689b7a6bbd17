"""How good a latent space is: neighbour label agreement and reconstruction error."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import as_labels, as_matrix, check_k, check_metric
from .search import knn

__all__ = ["knn_label_agreement", "reconstruction_mse", "self_dropped"]


def knn_label_agreement(Z: Any, labels: Any, k: int = 10, metric: str = "l2") -> float:
    """The share of each point's k nearest neighbours (itself excluded) that carry its label,
    averaged over all points: 1.0 when every neighbourhood is pure.

    Args:
        Z: (n, d) vectors (numpy or torch), n >= k + 1: raw data or latent codes.
        labels: (n,) integer class labels.
        k: neighbours per point.
        metric: "l2", "ip" or "cosine", as for latentspace.knn.

    Computed with the exact native search (latentspace.knn), the set queried against itself
    with k + 1 neighbours and each point's own index dropped. Exact duplicates tie to the
    lower index, so a point can come second in its own list: it is dropped wherever it is
    (and the (k+1)-th neighbour dropped when it is absent, behind k lower-index duplicates).
    """
    vectors, _ = as_matrix(Z, "Z")
    n = vectors.shape[0]
    y = as_labels(labels, "labels", n)
    k = check_k(k)
    check_metric(metric)
    if n < k + 1:
        raise ValueError(f"Z: k={k} neighbours per point need at least {k + 1} rows, got {n}")
    _, indices = knn(vectors, vectors, k + 1, metric=metric)
    neighbours = np.take_along_axis(indices, self_dropped(indices), axis=1)
    return float((y[neighbours] == y[:, None]).mean())


def self_dropped(indices: np.ndarray) -> np.ndarray:
    """For a set searched against itself with k + 1 neighbours, (n, k + 1) indices: the
    (n, k) positions to keep so that each row loses its own index wherever it stands (or
    its last entry when its own index is absent). Use with np.take_along_axis."""
    not_self = indices != np.arange(indices.shape[0])[:, None]
    # A stable sort moves the (at most one) self-match to the end of the row, keeping order.
    return np.argsort(~not_self, axis=1, kind="stable")[:, : indices.shape[1] - 1]


def reconstruction_mse(X: Any, X_hat: Any) -> float:
    """Mean squared error over all elements between data and its reconstruction, (n, d) each
    (numpy or torch; computed in float64)."""
    a, _ = as_matrix(_flat(X), "X")
    b, _ = as_matrix(_flat(X_hat), "X_hat")
    if a.shape != b.shape:
        raise ValueError(f"X, X_hat: shapes differ, {a.shape} vs {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def _flat(x: Any) -> Any:
    """(n, ...) -> (n, prod(...)) so images compare like rows."""
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) > 2:
        return x.reshape(shape[0], -1)
    return x
