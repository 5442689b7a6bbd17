"""metric="weighted_l2": sum_d w_d (q_d - x_d)^2, in knn and FlatIndex (CPU; the GPU tests are
in tests/gpu/test_knn_cuda.py).

The reference is the plain l2 reference on the data scaled by sqrt(w) in float64 (the same
distances), checked with conftest's assert_knn_matches at every SIMD level.
"""

from __future__ import annotations

import numpy as np
import pytest

import latentspace
from conftest import assert_knn_matches


def _data(rng, n, dim):
    return rng.standard_normal((n, dim)).astype(np.float32)


def _weights(rng, dim, zeros=1):
    w = rng.random(dim).astype(np.float32) * 3
    w[rng.choice(dim, size=min(zeros, dim), replace=False)] = 0  # a dropped dimension
    return w


def _scaled(x, w):
    return x.astype(np.float64) * np.sqrt(w.astype(np.float64))


@pytest.mark.parametrize("nq", [1, 2, 3, 4, 7, 31, 200])
@pytest.mark.parametrize("n,dim,k", [(1, 1, 1), (100, 3, 10), (1000, 17, 7), (3000, 64, 100), (50, 8, 70)])
def test_matches_the_scaled_reference(simd_level, row_query_limit, nq, n, dim, k, rng, num_threads):
    q, x, w = _data(rng, nq, dim), _data(rng, n, dim), _weights(rng, dim)
    for threads in (1, 2):
        num_threads(threads)
        D, I = latentspace.knn(q, x, k, "weighted_l2", weights=w)
        assert_knn_matches(D, I, _scaled(q, w), _scaled(x, w), k, "l2")


def test_zero_weight_drops_a_dimension(rng):
    q, x = _data(rng, 20, 5), _data(rng, 500, 5)
    w = np.array([1, 1, 0, 1, 1], np.float32)
    noisy = x.copy()
    noisy[:, 2] = rng.standard_normal(500) * 1e6  # huge differences in the dropped dimension
    D1, I1 = latentspace.knn(q, x, 10, "weighted_l2", weights=w)
    D2, I2 = latentspace.knn(q, noisy, 10, "weighted_l2", weights=w)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-6, atol=1e-6)
    D3, I3 = latentspace.knn(np.delete(q, 2, 1), np.delete(x, 2, 1), 10)
    np.testing.assert_array_equal(I1, I3)


def test_unit_weights_equal_l2(rng):
    q, x = _data(rng, 50, 16), _data(rng, 2000, 16)
    Dw, Iw = latentspace.knn(q, x, 8, "weighted_l2", weights=np.ones(16))
    D, I = latentspace.knn(q, x, 8, "l2")
    # The weighted norms are summed apart from the plain ones, so distances may differ in the
    # last bit and near-ties (about 1 seed in 3,000 here) swap: both must be the reference's
    # answer to rounding, and the distances agree.
    assert_knn_matches(Dw, Iw, q, x, 8, "l2")
    np.testing.assert_allclose(Dw, D, rtol=1e-5, atol=1e-5)


def test_integer_data_is_exact(rng):
    q = rng.integers(-3, 4, (30, 6)).astype(np.float32)
    x = rng.integers(-3, 4, (400, 6)).astype(np.float32)
    w = rng.integers(0, 4, 6).astype(np.float32)
    D, I = latentspace.knn(q, x, 12, "weighted_l2", weights=w)
    assert_knn_matches(D, I, _scaled(q, w), _scaled(x, w), 12, "l2")
    exact = ((q[:, None, :] - x[None]) ** 2 * w).sum(-1)
    np.testing.assert_array_equal(D, np.take_along_axis(exact, I, 1))


def test_torch_inputs_and_weights(rng):
    torch = pytest.importorskip("torch")
    q, x, w = _data(rng, 5, 8), _data(rng, 100, 8), _weights(rng, 8)
    D, I = latentspace.knn(torch.from_numpy(q), torch.from_numpy(x), 3, "weighted_l2", weights=torch.from_numpy(w))
    assert isinstance(D, torch.Tensor)
    Dn, In = latentspace.knn(q, x, 3, "weighted_l2", weights=w)
    np.testing.assert_array_equal(I.numpy(), In)


@pytest.mark.parametrize(
    "weights, metric, message",
    [
        (None, "weighted_l2", "weighted_l2' needs weights"),
        (np.ones(3), "l2", "only metric='weighted_l2' takes weights"),
        (np.ones(3), "cosine", "only metric='weighted_l2' takes weights"),
        (np.ones(4), "weighted_l2", r"weights: expected 3 values \(one per dimension\), got shape \(4,\)"),
        (np.ones((3, 1)), "weighted_l2", "weights: expected 3 values"),
        (np.array([1, -1, 1]), "weighted_l2", "weights: expected finite values >= 0, got -1.0 at index 1"),
        (np.array([1, np.nan, 1]), "weighted_l2", "at index 1"),
        (np.array([1, 1, np.inf]), "weighted_l2", "at index 2"),
        (np.array([1e39, 1, 1]), "weighted_l2", "at index 0"),  # beyond float32
        (np.array([True, False, True]), "weighted_l2", "weights"),
    ],
)
def test_bad_weights(weights, metric, message):
    x = np.ones((4, 3), np.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        latentspace.knn(x, x, 2, metric, weights=weights)


def test_weights_change_per_search_without_touching_the_index(rng):
    x, q = _data(rng, 1000, 6), _data(rng, 10, 6)
    index = latentspace.FlatIndex(6, "weighted_l2")
    np.testing.assert_array_equal(index.weights, np.ones(6, np.float32))  # the default
    index.add(x)
    buffer, nbytes = index.vectors(), index.nbytes
    for _ in range(3):
        w = _weights(rng, 6, zeros=2)
        D, I = index.search(q, 5, weights=w)
        assert_knn_matches(D, I, _scaled(q, w), _scaled(x, w), 5, "l2")
        np.testing.assert_array_equal(index.vectors(), x)  # never scaled in place
        assert index.nbytes == nbytes and np.shares_memory(index.vectors(), buffer)  # nor copied
    w = _weights(rng, 6)
    index.weights = w
    w[:] = 7  # the index holds its own copy
    D, I = index.search(q, 5)
    assert_knn_matches(D, I, _scaled(q, index.weights), _scaled(x, index.weights), 5, "l2")


def test_index_weights_errors(rng):
    with pytest.raises(ValueError, match="only metric='weighted_l2' takes weights"):
        latentspace.FlatIndex(3, "l2", weights=np.ones(3))
    with pytest.raises(ValueError, match="weights: expected 3 values"):
        latentspace.FlatIndex(3, "weighted_l2", weights=np.ones(2))
    index = latentspace.FlatIndex(3, "ip")
    assert index.weights is None
    with pytest.raises(ValueError, match="only metric='weighted_l2' takes weights"):
        index.weights = np.ones(3)
    with pytest.raises(ValueError, match="only metric='weighted_l2' takes weights"):
        index.search(np.ones((1, 3), np.float32), 1, weights=np.ones(3))
    weighted = latentspace.FlatIndex(3, "weighted_l2")
    with pytest.raises(ValueError, match="at index 2"):
        weighted.weights = np.array([1, 1, -2])


@pytest.mark.parametrize("mmap", [False, True])
def test_weights_survive_save_and_load(rng, tmp_path, mmap):
    x, q, w = _data(rng, 300, 5), _data(rng, 4, 5), _weights(rng, 5)
    index = latentspace.FlatIndex(5, "weighted_l2", weights=w)
    index.add(x)
    index.save(tmp_path / "w.lsidx")
    loaded = latentspace.load_index(tmp_path / "w.lsidx", mmap=mmap)
    assert loaded.metric == "weighted_l2"
    np.testing.assert_array_equal(loaded.weights, w)
    for a, b in zip(index.search(q, 7), loaded.search(q, 7)):
        np.testing.assert_array_equal(a, b)
    copy = loaded.to("cpu")
    np.testing.assert_array_equal(copy.weights, w)


def test_weighted_index_with_empty_and_padding(rng):
    index = latentspace.FlatIndex(4, "weighted_l2", weights=np.array([1, 2, 0, 1]))
    D, I = index.search(np.ones((2, 4), np.float32), 3)
    assert (I == -1).all() and np.isinf(D).all() and (D > 0).all()
    index.add(np.zeros((2, 4), np.float32))
    D, I = index.search(np.ones((1, 4), np.float32), 3)
    np.testing.assert_array_equal(I, [[0, 1, -1]])
    np.testing.assert_array_equal(D, [[4.0, 4.0, np.inf]])


@pytest.mark.parametrize("nq", [1, 3, 4, 8, 40])  # the row path (up to the cut-off) and the packed path
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_unusable_rows_are_reported_even_in_a_dropped_dimension(simd_level, row_query_limit, nq, bad, rng):
    """A weight of 0 does not hide NaN, Inf or overflowing values: the row is refused as with
    the plain metric (the usable-row check uses the unweighted norm on both paths)."""
    x = _data(rng, 300, 5)
    x[123, 2] = bad
    w = np.array([1, 1, 0, 1, 1], np.float32)
    with pytest.raises(ValueError, match="database: row 123 contains NaN or Inf"):
        latentspace.knn(_data(rng, nq, 5), x, 3, "weighted_l2", weights=w)


@pytest.mark.parametrize("nq", [1, 3, 4, 8, 40])  # the row path (up to the cut-off) and the packed path
def test_rows_whose_weighted_norm_overflows_are_refused(simd_level, row_query_limit, nq, rng):
    """Large weights can push a usable row's weighted squared norm past float32 (the search
    would give NaN distances and -1 for rows that exist): refused, naming the row."""
    x, q = _data(rng, 300, 5), _data(rng, nq, 5)
    x[123] = 1e18  # plain squared norm 5e36: usable; weighted by 1e4, 5e40: not
    w = np.array([1e4, 1, 1, 1, 1], np.float32)
    with pytest.raises(ValueError, match="database: row 123 .*weights"):
        latentspace.knn(q, x, 3, "weighted_l2", weights=w)
    index = latentspace.FlatIndex(5, "weighted_l2")
    index.add(x)  # usable with the index's unit weights; refused when searched with these
    with pytest.raises(ValueError, match="database: row 123 .*weights"):
        index.search(q, 3, weights=w)
    assert (index.search(q, 3)[1] >= 0).all()
    q[nq - 1] = 1e18
    with pytest.raises(ValueError, match=f"queries: row {nq - 1} .*weights"):
        latentspace.knn(q, x[:100], 3, "weighted_l2", weights=w)


# ---------------------------------------------------------------------------------------
# Rows that the weights make unusable, refused when they meet: at add for an index (its
# weights are known), when an index's weights are set, at call time for knn.

_HEAVY = np.array([1e4, 1, 1, 1, 1], np.float32)  # 1e18 in dimension 0: plain 1e36, weighted 1e40


def _with_heavy_row(rng, n=300, row=123):
    x = _data(rng, n, 5)
    x[row] = 1e18  # plain squared norm 5e36: usable; weighted by _HEAVY, 1e40 + 4e36: not
    return x


def test_add_refuses_rows_that_the_index_weights_make_unusable(rng):
    """They were added, saved, and refused only by every later search (naming "database",
    which is no argument of search)."""
    torch = pytest.importorskip("torch")
    x = _with_heavy_row(rng)
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY)
    index.add(x[:100])
    for rows in (x, torch.from_numpy(x)):
        with pytest.raises(ValueError, match=r"^x: row 123: its squared norm scaled by the index's weights .* "
                                             r"overflows float32 .*lower the weights"):
            index.add(rows)
        assert index.ntotal == 100  # all or nothing
    huge = latentspace.FlatIndex(5, "weighted_l2", weights=np.full(5, 1e38, np.float32))
    with pytest.raises(ValueError, match="^x: row 0: its squared norm scaled by the index's weights"):
        huge.add(np.ones((3, 5), np.float32))  # ordinary rows, weights past any use: 5e38
    huge.add(np.full((2, 5), 0.1, np.float32))  # 5e36: fine


def test_the_add_check_is_exact_at_the_limit(rng):
    """Only rows whose weighted squared norm passes the search's limit are refused: not rows
    that a bound (largest weight x plain norm) would suspect."""
    limit = float(np.float32(3.4028234e38) / np.float32(8.0))
    w = np.array([4, 1e-6, 0, 1, 1], np.float32)
    index = latentspace.FlatIndex(5, "weighted_l2", weights=w)
    suspect = np.zeros((1, 5), np.float32)
    suspect[0, 1] = 6e18  # plain 3.6e37, usable; 4 x plain passes the limit, weighted 3.6e31 does not
    below, above = np.zeros((1, 5), np.float32), np.zeros((1, 5), np.float32)
    below[0, 0] = np.float32(np.sqrt(limit / 4) * (1 - 1e-6))
    above[0, 0] = np.float32(np.sqrt(limit / 4) * (1 + 1e-6))
    index.add(np.concatenate([_data(rng, 10, 5), suspect, below]))
    with pytest.raises(ValueError, match="^x: row 1: "):
        index.add(np.concatenate([below, above]))
    assert index.ntotal == 12
    for got, want in zip(index.search(below, 2), latentspace.knn(below, index.vectors(), 2, "weighted_l2", weights=w)):
        np.testing.assert_array_equal(got, want)


def test_add_still_names_plain_unusable_rows_first(rng):
    """NaN, Inf and plain overflow in the plain words, before any weighted overflow (as
    check_rows_usable orders them)."""
    x = _with_heavy_row(rng)
    x[200, 3] = np.nan
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY)
    with pytest.raises(ValueError, match="^x: row 200 contains NaN or Inf"):
        index.add(x)
    assert index.ntotal == 0


def test_add_encoded_refuses_codes_that_the_index_weights_make_unusable(rng):
    torch = pytest.importorskip("torch")
    encoder = torch.nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(5) * 1e18)
    X = np.zeros((40, 5), np.float32)
    X[:, 1] = 1e-18  # codes 1: ordinary
    X[29, 0] = 1  # its code: 1e18 in dimension 0
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY)
    with pytest.raises(ValueError, match="^the codes of X: row 29: its squared norm scaled by the index's weights"):
        index.add_encoded(encoder, X, batch_size=16)
    assert index.ntotal == 0
    assert index.add_encoded(encoder, np.delete(X, 29, axis=0)) == 39


def test_weights_that_make_stored_rows_unusable_are_refused_when_set(rng):
    """`index.weights = w` was taken, and every later search refused row 123."""
    x = _with_heavy_row(rng)
    index = latentspace.FlatIndex(5, "weighted_l2")
    index.add(x)
    with pytest.raises(ValueError, match=r"^weights: they scale the squared norm of the index's row 123 past "
                                         r"float32's range .*lower them"):
        index.weights = _HEAVY
    np.testing.assert_array_equal(index.weights, np.ones(5, np.float32))  # kept
    index.weights = _HEAVY / 1e4  # fine
    assert (index.search(_data(rng, 2, 5), 3)[1] >= 0).all()


def test_knn_without_queries_still_checks_the_weighted_database(rng):
    """No queries: the database is checked as a search would (plain rows were; weighted not)."""
    x = _with_heavy_row(rng)
    with pytest.raises(ValueError, match="^database: row 123 .*weights"):
        latentspace.knn(_data(rng, 0, 5), x, 3, "weighted_l2", weights=_HEAVY)


def test_knn_of_many_queries_checks_the_weighted_database_before_searching(rng, monkeypatch):
    """The kernel found the row while scanning, after a whole block of queries (up to 512 KiB
    of them) had been searched; a batch that large now has the database checked first."""
    from latentspace import search

    x = _with_heavy_row(rng, n=5000, row=4999)
    q = _data(rng, search.CHECK_FIRST_QUERIES, 5)

    def searched(*args):
        raise AssertionError("searched before the database was checked")

    monkeypatch.setattr(latentspace._native, "knn", searched)
    with pytest.raises(ValueError, match="^database: row 4999 .*weights"):
        latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY)
    with pytest.raises(AssertionError, match="searched"):  # fewer queries: the kernel's own check
        latentspace.knn(q[:-1], x, 3, "weighted_l2", weights=_HEAVY)
