"""Latent space metrics: k-NN label agreement (native search) against a brute-force numpy
reference, with duplicates; reconstruction MSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentspace as ls
from latentspace.metrics import knn_label_agreement, reconstruction_mse, self_dropped


def _reference_agreement(z, y, k):
    """Brute force in float64: each point's k nearest others (ties to the lower index)."""
    z = np.asarray(z, dtype=np.float64)
    d = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return float((y[order] == y[:, None]).mean())


@pytest.mark.parametrize("k", [1, 3, 10])
def test_matches_brute_force(rng, k):
    # small integers: distances are exact in float32, so neighbour sets are comparable
    z = rng.integers(0, 50, size=(120, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=120)
    assert knn_label_agreement(z, y, k=k) == pytest.approx(_reference_agreement(z, y, k), abs=1e-12)


def test_duplicates_drop_only_the_point_itself():
    # rows 0, 1 and 2 are identical: with ties to the lower index, row 1's own index comes
    # second and row 2's third in their own lists; neither may count itself.
    z = np.array([[0, 0], [0, 0], [0, 0], [10, 0], [10, 1], [20, 0]], dtype=np.float32)
    y = np.array([0, 1, 2, 3, 3, 4])
    # every point's 1 nearest other: 0->1, 1->0, 2->0, 3->4, 4->3, 5->3 (at distance 100 vs
    # 101 for row 4); labels agree for 3 and 4 only
    assert knn_label_agreement(z, y, k=1) == pytest.approx(2 / 6)
    _, indices = ls.knn(z, z, 2)
    kept = np.take_along_axis(indices, self_dropped(indices), axis=1)
    np.testing.assert_array_equal(kept[:, 0], [1, 0, 0, 4, 3, 3])


def test_self_absent_drops_the_last():
    indices = np.array([[1, 2, 3], [1, 0, 2], [0, 2, 1]])
    kept = np.take_along_axis(indices, self_dropped(indices), axis=1)
    np.testing.assert_array_equal(kept, [[1, 2], [0, 2], [0, 1]])


def test_perfect_and_mixed_clusters(rng):
    centres = np.repeat(np.eye(3) * 100, 20, axis=0)
    z = centres + rng.normal(size=(60, 3))
    y = np.repeat(np.arange(3), 20)
    assert knn_label_agreement(z, y) == 1.0
    assert knn_label_agreement(torch.from_numpy(z), torch.from_numpy(y)) == 1.0
    shuffled = rng.permutation(y)
    assert knn_label_agreement(z, shuffled) < 0.6


def test_pixel_space_agreement_of_the_digits():
    x, y = ls.datasets.load_digits()
    assert 0.9 < knn_label_agreement(x, y, k=10) < 1.0


def test_cosine_metric(rng):
    z = rng.normal(size=(30, 5))
    y = rng.integers(0, 2, 30)
    scaled = z * rng.uniform(0.1, 10, size=(30, 1))  # cosine ignores lengths
    assert knn_label_agreement(z, y, metric="cosine") == knn_label_agreement(scaled, y, metric="cosine")


def test_errors(rng):
    z = rng.random((10, 3)).astype(np.float32)
    y = rng.integers(0, 2, 10)
    with pytest.raises(ValueError, match="Z: k=10 neighbours per point need at least 11 rows, got 10"):
        knn_label_agreement(z, y)
    with pytest.raises(ValueError, match=r"labels: expected shape \(10,\)"):
        knn_label_agreement(z, y[:9], k=3)
    with pytest.raises(TypeError, match="labels: expected integer class labels"):
        knn_label_agreement(z, y.astype(float), k=3)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        knn_label_agreement(z, y, k=0)
    with pytest.raises(ValueError, match="metric: expected one of"):
        knn_label_agreement(z, y, k=3, metric="manhattan")
    with pytest.raises(ValueError, match="Z: expected a 2-d array"):
        knn_label_agreement(z[0], y, k=3)
    z[4, 1] = np.nan
    with pytest.raises(ValueError, match="row 4 contains NaN"):
        knn_label_agreement(z, y, k=3)


def test_reconstruction_mse(rng):
    x = rng.random((8, 6)).astype(np.float32)
    x_hat = x + 0.5
    assert reconstruction_mse(x, x_hat) == pytest.approx(0.25, rel=1e-6)
    assert reconstruction_mse(x, x) == 0.0
    images = x.reshape(8, 1, 2, 3)
    assert reconstruction_mse(images, torch.from_numpy(x_hat).reshape(8, 1, 2, 3)) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="X, X_hat: shapes differ"):
        reconstruction_mse(x, x[:, :5])
