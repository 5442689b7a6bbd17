"""Latent space metrics: k-NN label agreement (native search) against a brute-force numpy
reference, with duplicates; reconstruction MSE."""

from __future__ import annotations

import math
import warnings

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
    with pytest.raises(ValueError, match="^Z: row 4 contains NaN"):
        knn_label_agreement(z, y, k=3)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_torch_labels_get_a_torch_hint(rng, dtype):
    # The hint is the caller's own conversion: a torch tensor has .long(), not .astype; a
    # bfloat16 tensor (no numpy dtype) is refused by its own name, not by numpy's conversion.
    z = rng.random((10, 3)).astype(np.float32)
    y = torch.from_numpy(rng.integers(0, 2, 10)).to(dtype)
    with pytest.raises(TypeError, match=rf"labels: expected integer class labels, got dtype {str(dtype)[6:]}; "
                                        r"convert whole-number labels with labels\.long\(\)$"):
        knn_label_agreement(z, y, k=3)
    assert knn_label_agreement(z, y.long(), k=3) == knn_label_agreement(z, y.long().numpy(), k=3)

def test_reconstruction_mse(rng):
    x = rng.random((8, 6)).astype(np.float32)
    x_hat = x + 0.5
    assert reconstruction_mse(x, x_hat) == pytest.approx(0.25, rel=1e-6)
    assert reconstruction_mse(x, x) == 0.0
    images = x.reshape(8, 1, 2, 3)
    assert reconstruction_mse(images, torch.from_numpy(x_hat).reshape(8, 1, 2, 3)) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="X, X_hat: shapes differ"):
        reconstruction_mse(x, x[:, :5])


def test_reconstruction_mse_refuses_images_of_another_shape(rng):
    # (n, 2, 3) against (n, 3, 2): both flatten to (n, 6), and the pixels were compared with
    # the wrong ones (a transposed or channels-last reconstruction) without a word
    x = rng.random((4, 2, 3))
    with pytest.raises(ValueError, match=r"^X, X_hat: shapes differ, \(4, 2, 3\) vs \(4, 3, 2\)"):
        reconstruction_mse(x, x.transpose(0, 2, 1))
    with pytest.raises(ValueError, match=r"^X, X_hat: shapes differ, \(4, 1, 2, 3\) vs \(4, 2, 3, 1\)"):
        reconstruction_mse(x[:, None], torch.from_numpy(x[..., None]))
    # images against their flat rows, either way round, stay accepted
    assert reconstruction_mse(x, x.reshape(4, 6) + 0.5) == pytest.approx(0.25, rel=1e-12)
    assert reconstruction_mse(x.reshape(4, 6), x + 0.5) == pytest.approx(0.25, rel=1e-12)


def test_reconstruction_mse_keeps_float64_and_refuses_what_has_no_mean(rng):
    """Computed in float64 from the values given: float64 data is not rounded to float32
    first (0.01 exactly, not 0.0099999928; 1e-16, not 0); NaN / Inf rows and empty data
    are ValueErrors naming the argument, not a NaN result."""
    x = rng.random((5, 4))
    assert reconstruction_mse(x + 0.1, x) == pytest.approx(0.01, rel=1e-12)
    assert reconstruction_mse(np.array([[1 + 1e-8]]), np.array([[1.0]])) == pytest.approx(1e-16, rel=1e-6)
    assert reconstruction_mse(torch.from_numpy(x + 0.1), torch.from_numpy(x)) == pytest.approx(0.01, rel=1e-12)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="^X: row 3 contains NaN or Inf"):
        reconstruction_mse(bad, x)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="^X_hat: row 3 contains NaN or Inf"):
        reconstruction_mse(x, bad)
    with pytest.raises(ValueError, match=r"^X: expected at least one row, got shape \(0, 4\)"):
        reconstruction_mse(x[:0], x[:0])


# ---------------------------------------------------------------------------------------
# Weighted squared L2 in knn_label_agreement


def test_weights_zero_drops_a_dimension(rng):
    # small integers: every distance is exact in float32, so neighbour sets compare exactly
    z = rng.integers(0, 20, size=(80, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=80)
    before = z.copy()
    dropped = knn_label_agreement(z, y, k=5, weights=np.array([1.0, 0.0, 1.0]))
    assert dropped == knn_label_agreement(z[:, [0, 2]], y, k=5)
    np.testing.assert_array_equal(z, before)  # the caller's codes are not scaled in place


def test_weights_equal_scaled_codes(rng):
    z = rng.integers(0, 20, size=(90, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=90)
    w = np.array([4.0, 1.0, 9.0])  # exact square roots: the scaled codes are exact too
    scaled = z * np.sqrt(w).astype(np.float32)
    for k in (1, 4):
        weighted = knn_label_agreement(z, y, k=k, weights=w)
        assert weighted == knn_label_agreement(scaled, y, k=k)
        assert weighted == pytest.approx(_reference_agreement(scaled, y, k), abs=1e-12)
    assert knn_label_agreement(z, y, k=3, weights=np.ones(3)) == knn_label_agreement(z, y, k=3)
    assert knn_label_agreement(torch.from_numpy(z), torch.from_numpy(y), k=3, weights=torch.tensor(w)) == \
        knn_label_agreement(z, y, k=3, weights=w)


def test_weights_from_relevance_help_on_noisy_codes(rng):
    # two informative dimensions and six of loud noise: weighting by relevance finds the classes
    # (over 30 seeds: plain 0.52-0.62, weighted 0.38-0.48 higher)
    y = np.repeat(np.arange(4), 50)
    centres = np.array([[0, 0], [6, 0], [0, 6], [6, 6]])
    z = np.concatenate([centres[y] + rng.normal(size=(200, 2)), rng.normal(size=(200, 6)) * 5], 1)
    plain = knn_label_agreement(z, y, k=5)
    scores = ls.relevance(z, y)
    assert set(ls.top_dimensions(scores, 2)) == {0, 1}
    assert knn_label_agreement(z, y, k=5, weights=ls.relevance_weights(scores)) > plain + 0.25
    assert knn_label_agreement(z, y, k=5, weights=ls.keep_top(scores, 2)) > plain + 0.25


def test_weights_errors(rng):
    z = rng.random((12, 3)).astype(np.float32)
    y = rng.integers(0, 2, 12)
    with pytest.raises(ValueError, match=r"weights: expected 3 values \(one per dimension\), got shape \(2,\)"):
        knn_label_agreement(z, y, k=3, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="weights: expected finite values >= 0, got -1.0 at index 1"):
        knn_label_agreement(z, y, k=3, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="weights: expected finite values >= 0, got nan at index 2"):
        knn_label_agreement(z, y, k=3, weights=[1.0, 1.0, np.nan])
    with pytest.raises(ValueError, match="weights: every weight is 0"):
        knn_label_agreement(z, y, k=3, weights=np.zeros(3))
    with pytest.raises(ValueError, match="weights: per-dimension weights define a weighted squared L2; use metric"):
        knn_label_agreement(z, y, k=3, metric="cosine", weights=np.ones(3))
    with pytest.raises(TypeError, match="weights: expected a real numeric dtype"):
        knn_label_agreement(z, y, k=3, weights=np.array(["a", "b", "c"]))


def test_rows_whose_weighted_norm_overflows_are_named_as_z(rng):
    # usable as they are, but not scaled by the weights: the search refused them as its
    # "queries", an argument the caller never passed
    z = rng.normal(size=(40, 3)).astype(np.float32)
    y = rng.integers(0, 2, 40)
    z[7] = 1e17  # squared norm 3e34: usable; weighted by 1e10 in one dimension, 1e44: not
    with pytest.raises(ValueError, match=r"^Z: row 7 contains NaN or Inf, .*lower the weights$"):
        knn_label_agreement(z, y, k=3, weights=np.array([1e10, 1, 1], np.float32))
    assert 0 <= knn_label_agreement(z, y, k=3, weights=np.ones(3)) <= 1


# ---------------------------------------------------------------------------------------
# Trustworthiness and neighbour recall


def _untied(make):
    """make() until it returns integer points whose squared distances (exact in float32 when
    the coordinates stay below 1,100 in 3 dimensions or fewer) all differ from every point,
    so neighbour ranks do not depend on how ties are broken."""
    while True:
        points = make().astype(np.float64)
        squared = ((points[:, None] - points[None]) ** 2).sum(-1)
        if all(np.unique(row).size == len(points) for row in squared):
            return points


@pytest.mark.parametrize("k", [1, 5, 12])
def test_trustworthiness_matches_sklearn(rng, k):
    from sklearn.manifold import trustworthiness as sklearn_trustworthiness

    x = _untied(lambda: rng.integers(0, 1000, size=(60, 3)))
    unrelated = _untied(lambda: rng.integers(0, 1000, size=(60, 2)))  # a low score
    projected = _untied(lambda: x[:, :2] + rng.integers(0, 50, size=(60, 2)))  # a high one
    for embedding in (unrelated, projected, x):
        expected = sklearn_trustworthiness(x, embedding, n_neighbors=k)
        assert ls.trustworthiness(x, embedding, k=k) == pytest.approx(expected, abs=1e-6)
    assert ls.trustworthiness(x, x, k=k) == 1.0
    assert ls.trustworthiness(x, unrelated, k=k) < ls.trustworthiness(x, projected, k=k)


def test_trustworthiness_of_the_digits_close_to_sklearn():
    """Real data, with ties in pixel space (their order may differ from sklearn's)."""
    from sklearn.manifold import trustworthiness as sklearn_trustworthiness

    x, _ = ls.datasets.load_digits()
    x = x[:400]
    z = ls.PCA(4).fit(x).encode(x)
    assert ls.trustworthiness(x, z, k=7) == pytest.approx(sklearn_trustworthiness(x, z, n_neighbors=7), abs=1e-4)
    images = torch.from_numpy(x).reshape(400, 1, 8, 8)  # images are flattened
    assert ls.trustworthiness(images, z, k=7) == ls.trustworthiness(x, z, k=7)


def test_trustworthiness_in_chunks(rng, monkeypatch):
    from latentspace import metrics

    x = rng.normal(size=(150, 5))
    z = x[:, :2] + 0.3 * rng.normal(size=(150, 2))
    whole = ls.trustworthiness(x, z, k=6)
    monkeypatch.setattr(metrics, "_RANK_ENTRIES_PER_STEP", 7 * 150 + 3)  # 7 queries per step, a ragged end
    assert ls.trustworthiness(x, z, k=6) == whole


def test_trustworthiness_errors(rng):
    x = rng.random((10, 4))
    with pytest.raises(ValueError, match=r"k: trustworthiness needs k < n / 2 \(n = 10 rows\), got k=5"):
        ls.trustworthiness(x, x[:, :2], k=5)
    with pytest.raises(ValueError, match="X, Z: expected one code per row of X, got 10 rows in X and 9 in Z"):
        ls.trustworthiness(x, x[:9, :2], k=2)
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match="row 3 contains NaN or Inf"):
        ls.trustworthiness(x, rng.random((10, 2)), k=2)


def _reference_recall(x, z, k):
    """Brute force in float64: each point's k nearest others in both spaces (ties to the
    lower index), the shared share."""
    def nearest(a):
        d = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1, kind="stable")[:, :k]
    nx, nz = nearest(np.asarray(x, np.float64)), nearest(np.asarray(z, np.float64))
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(nx, nz)])


@pytest.mark.parametrize("k", [1, 4, 10])
def test_neighbor_recall_matches_brute_force(rng, k):
    x = rng.integers(0, 30, size=(70, 4)).astype(np.float32)  # exact distances, many ties
    z = x[:, :2] + rng.integers(0, 3, size=(70, 2))
    assert ls.neighbor_recall(x, z, k=k) == pytest.approx(_reference_recall(x, z, k), abs=1e-12)


def test_neighbor_recall_perfect_and_permuted(rng):
    x = rng.integers(0, 10, size=(50, 6)).astype(np.float32)
    assert ls.neighbor_recall(x, x, k=5) == 1.0
    assert ls.neighbor_recall(x, x[:, ::-1].copy(), k=5) == 1.0  # the dimensions permuted: same distances
    assert ls.neighbor_recall(x, 3 * x + 7, k=5) == 1.0  # scaled and shifted
    shuffled = x[rng.permutation(50)]  # the points permuted: codes of other points
    assert ls.neighbor_recall(x, shuffled, k=5) < 0.5
    assert ls.neighbor_recall(x, shuffled, k=5) == pytest.approx(_reference_recall(x, shuffled, 5), abs=1e-12)


def test_neighbor_recall_hand_made():
    # points on a line; in Z the last two swap places
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    z = np.array([[0.0], [1.0], [3.0], [10.0], [6.0]])
    # k=1: X: 0->1, 1->0, 2->1, 3->2, 4->3;  Z: 0->1, 1->0, 2->1, 3->4, 4->2: 3 of 5 kept
    assert ls.neighbor_recall(x, z, k=1) == pytest.approx(3 / 5)
    # k=2, ties to the lower index (point 2 has two others at distance 3 in each space, 0 wins):
    # X: {1,2} {0,2} {1,0} {2,4} {3,2};  Z: {1,2} {0,2} {1,0} {4,2} {2,3}: all kept
    assert ls.neighbor_recall(x, z, k=2) == 1.0


def test_neighbor_recall_errors(rng):
    x = rng.random((6, 3))
    with pytest.raises(ValueError, match="X: k=6 neighbours per point need at least 7 rows, got 6"):
        ls.neighbor_recall(x, x, k=6)
    with pytest.raises(ValueError, match="X, Z: expected one code per row of X"):
        ls.neighbor_recall(x, x[:5], k=2)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        ls.neighbor_recall(x, x, k=0)


@pytest.mark.parametrize("metric", ["neighbor_recall", "trustworthiness"])
@pytest.mark.parametrize("which", ["X", "Z"])
def test_unusable_rows_are_named_by_their_argument(rng, metric, which):
    """A NaN in X or Z is named as the caller passed it (the search inside would say
    "queries")."""
    x, z = rng.random((12, 5)), rng.random((12, 2))
    (x if which == "X" else z)[7, 1] = np.nan
    with pytest.raises(ValueError, match=f"^{which}: row 7 contains NaN or Inf"):
        getattr(ls, metric)(x, z, k=3)


def test_metrics_are_exported():
    from latentspace import metrics

    for name in ("knn_label_agreement", "trustworthiness", "neighbor_recall"):
        assert getattr(ls, name) is getattr(metrics, name)


def test_reconstruction_mse_of_large_errors_that_float64_holds():
    """One error of 1e155 among 10,000 elements: an MSE of 1e306, which float64 holds, but its
    square (1e310) does not: the plain mean of squares came back inf (with numpy's overflow
    warning)."""
    x = np.zeros((100, 100))
    x[3, 7] = 1e155
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way
        assert reconstruction_mse(x, np.zeros_like(x)) == pytest.approx(1e306, rel=1e-12)
        assert reconstruction_mse(np.zeros_like(x), -x) == pytest.approx(1e306, rel=1e-12)
    assert reconstruction_mse(np.full((2, 2), 1e300), np.full((2, 2), -1e300)) == math.inf  # 4e600: beyond float64


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_reconstruction_mse_of_integers_beyond_two_to_the_53(dtype):
    """Integers are subtracted exactly before the difference is rounded to float64: through
    float64 first, 2**62 + 1 and 2**62 (or 2**64 - 1 and 2**64 - 3) were equal, an MSE of 0."""
    big = 2**62 if dtype is np.int64 else 2**64 - 3
    x = np.array([[big + 1, 5], [big, 7]], dtype=dtype)
    x_hat = np.array([[big, 5], [big + 2, 4]], dtype=dtype)
    assert reconstruction_mse(x, x_hat) == (1 + 4 + 9) / 4
    assert reconstruction_mse(torch.from_numpy(x.astype(np.int64)), x_hat.astype(np.int64)) == \
        reconstruction_mse(x.astype(np.int64), x_hat.astype(np.int64))
    # small unsigned images do not wrap around (10 - 200 is -190, not 66)
    assert reconstruction_mse(np.full((2, 3), 10, np.uint8), np.full((2, 3), 200, np.uint8)) == 190.0**2
    # int64 against uint64: the difference needs 65 bits
    assert reconstruction_mse(np.array([[2**64 - 1]], np.uint64), np.array([[-(2**63)]], np.int64)) == \
        float(2**64 - 1 + 2**63) ** 2


def test_self_dropped_checks_its_arguments():
    indices = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    # ids of one value (or a column) were broadcast over every row: row 2 "dropped" everywhere
    for bad in ([2], np.zeros((3, 1), dtype=np.int64), [0, 1]):
        with pytest.raises(ValueError, match=r"^ids: expected shape \(3,\) \(one index per row of indices\)"):
            self_dropped(indices, ids=bad)
    with pytest.raises(TypeError, match=r"^ids: expected integer"):
        self_dropped(indices, ids=[0.0, 1.0, 2.0])
    for bad in (np.array([0, 1]), np.zeros((2, 2, 2), dtype=np.int64)):
        with pytest.raises(ValueError, match=r"^indices: expected a 2-d array"):
            self_dropped(bad)
    with pytest.raises(TypeError, match=r"^indices: expected integer"):
        self_dropped(indices.astype(np.float32))
    # lists are fine (positions to keep); rows 1 and 2 as the lists of points 2 and 0
    np.testing.assert_array_equal(self_dropped(indices.tolist()), [[1, 2], [1, 2], [1, 2]])
    np.testing.assert_array_equal(self_dropped(indices[1:], ids=[2, 0]), [[0, 2], [0, 2]])
