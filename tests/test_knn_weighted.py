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
from latentspace import _arrays
from latentspace._arrays import STORED_ROWS_NAME


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
    # named as the argument that made the stored row unusable ("database" is knn's)
    with pytest.raises(ValueError, match=r"^weights \(the index's vectors\): row 123 .*or lower the weights$"):
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


def test_add_names_the_first_refused_row_whichever_its_kind(rng):
    """A heavy row before a NaN row is named, in add's words (it was the NaN row: check_rows_usable
    came first, so which row was named depended on the kinds, not on the order)."""
    x = _with_heavy_row(rng)
    x[200, 3] = np.nan
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY)
    with pytest.raises(ValueError, match="^x: row 123: its squared norm scaled by the index's weights"):
        index.add(x)
    x[50, 3] = np.nan
    with pytest.raises(ValueError, match="^x: row 50 contains NaN or Inf"):
        index.add(x)
    assert index.ntotal == 0


def _scaling_encoder_and_rows():
    """A linear encoder multiplying by 1e18, and 40 rows whose codes are ordinary (1 in
    dimension 1) until a test sets other values."""
    torch = pytest.importorskip("torch")
    encoder = torch.nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(5) * 1e18)
    X = np.zeros((40, 5), np.float32)
    X[:, 1] = 1e-18  # codes 1: ordinary
    return encoder, X


def test_add_encoded_refuses_codes_that_the_index_weights_make_unusable(rng):
    encoder, X = _scaling_encoder_and_rows()
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


# ---------------------------------------------------------------------------------------
# Which refusal wins. The rule, on every path: the first refused row in row order, whichever
# its kind (NaN / Inf / plain overflow, or a weighted squared norm past float32), the queries
# before the database; a search names it in the weighted words, which cover both kinds.
# Paths: knn (the kernel's check, the check first from CHECK_FIRST_QUERIES, no queries), a
# FlatIndex's search and add, and the GPU orchestration on the CPU stand-in (streamed chunks of
# 52 rows, blocks of 7 queries, the check ahead, the checks without queries).

_WEIGHTED_WORDS = ("contains NaN or Inf, or values so large that squared distances overflow float32 (squared norm, "
                   "plain or scaled by the weights, above 4.2e37); clean or rescale the data, or lower the weights")
_CHUNK_ROWS = 52  # the stand-in's streamed chunks of 3000 x 5 rows with 4000 bytes (and the host checks' here)


def _spoiled(x, row, kind):
    if kind == "heavy":
        x[row] = 1e18  # usable as it is; refused by _HEAVY's weights
    else:
        x[row, 2] = np.nan


def _two_bad_rows(rng, n, placement, limit=None):
    """Two row numbers of an n-row input: in one panel of the CPU kernel (adjacent, the first
    even), on either side of a streamed chunk's boundary, or anywhere (in order)."""
    if placement == "one panel":
        first = 32 * int(rng.integers(0, n // 32)) + 2 * int(rng.integers(0, 15))
        return first, first + 1
    if placement == "chunk boundary":
        boundary = _CHUNK_ROWS * int(rng.integers(1, n // _CHUNK_ROWS))
        return boundary - 1, boundary
    first, second = sorted(rng.choice(n if limit is None else limit, size=2, replace=False))
    return int(first), int(second)


def _weighted_search_paths(monkeypatch):
    """name -> search(queries, database) for every weighted search path reachable without a GPU."""
    torch = pytest.importorskip("torch")
    from latentspace import _cuda_search, search

    def knn(q, x):
        return latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY)

    def patched(module, name, value, run):
        """run with module.name = value for the call only."""
        def patched_run(q, x):
            monkeypatch.setattr(module, name, value)
            try:
                return run(q, x)
            finally:
                monkeypatch.undo()
        return patched_run

    def index_search(q, x):
        index = latentspace.FlatIndex(5, "weighted_l2")
        index._buffer, index._ntotal = x, x.shape[0]  # stored as is: add would refuse a NaN row
        return index.search(q, 3, weights=_HEAVY)

    def index_search_of_many(q, x):
        return index_search(np.concatenate([q] + [np.zeros((1, 5), np.float32)] * 2048), x)

    def stand_in(q, x):
        return _cuda_search._knn(_cuda_search.CpuBackend(), q, x, 3, "weighted_l2", workspace_bytes=None,
                                 gpu_memory_bytes=4000, weights=_HEAVY)

    def device_queries(q, x):
        queries = torch.from_numpy(q)
        return _cuda_search.search_streamed(_cuda_search.CpuBackend(weights=_HEAVY), queries, x, 3,
                                            "weighted_l2", workspace_bytes=1 << 20, memory_bytes=4000,
                                            query_checks=_arrays.query_row_checks(queries, _HEAVY))

    return {"knn": knn, "knn, database checked first": patched(search, "CHECK_FIRST_QUERIES", 1, knn),
            "FlatIndex.search": index_search, "FlatIndex.search of 2048+ queries": index_search_of_many,
            "GPU entry (stand-in)": stand_in,
            "GPU entry, chunks checked ahead": patched(_cuda_search, "CHECK_AHEAD_QUERIES", 0, stand_in),
            "streamed, device queries": device_queries,
            "streamed, device queries, checked ahead": patched(_cuda_search, "CHECK_AHEAD_QUERIES", 0, device_queries)}


def _database_checks_without_queries(monkeypatch):
    """name -> check(database) of the paths that check a database with no queries to search."""
    torch = pytest.importorskip("torch")
    from latentspace import _cuda_search

    no_queries = np.zeros((0, 5), np.float32)

    def host_chunks(x):
        monkeypatch.setattr(_cuda_search, "HOST_CHUNK_BYTES", _CHUNK_ROWS * 5 * 4)
        try:
            return _cuda_search._knn(_cuda_search.CpuBackend(), no_queries, x.astype(np.float64), 3, "weighted_l2",
                                     workspace_bytes=None, gpu_memory_bytes=None, weights=_HEAVY)
        finally:
            monkeypatch.undo()

    def device_database(x):
        for host_check in (0, 1 << 14):
            monkeypatch.setattr(_arrays, "_HOST_CHECK_ELEMENTS", host_check)
            try:
                _cuda_search.check_database_without_queries(torch.from_numpy(x), _HEAVY)
            finally:
                monkeypatch.undo()

    return {"knn without queries": lambda x: latentspace.knn(no_queries, x, 3, "weighted_l2", weights=_HEAVY),
            "GPU entry without queries, host chunks": host_chunks,
            "without queries, device database": device_database}



@pytest.mark.parametrize("placement", ["one panel", "chunk boundary", "anywhere"])
@pytest.mark.parametrize("order", [("nan", "heavy"), ("heavy", "nan"), ("nan", "nan"), ("heavy", "heavy")])
def test_every_weighted_search_names_the_first_refused_database_row(order, placement, rng, monkeypatch):
    x, q = _data(rng, 3000, 5), _data(rng, 30, 5)
    rows = _two_bad_rows(rng, 3000, placement)
    for row, kind in zip(rows, order):
        _spoiled(x, row, kind)
    paths = _weighted_search_paths(monkeypatch)
    checks = _database_checks_without_queries(monkeypatch)
    got = {name: _refusal(lambda: search(q, x)) for name, search in paths.items()}
    got.update({name: _refusal(lambda: check(x)) for name, check in checks.items()})
    # (an index's search names the argument that made its stored row unusable: the weights)
    expected = {name: f"{STORED_ROWS_NAME if name.startswith('FlatIndex') else 'database'}: row {rows[0]} "
                      f"{_WEIGHTED_WORDS}" for name in got}
    assert got == expected


@pytest.mark.parametrize("placement", ["one panel", "anywhere"])
@pytest.mark.parametrize("order", [("nan", "heavy"), ("heavy", "nan")])
@pytest.mark.parametrize("database", ["usable", "refused"])
def test_every_weighted_search_names_the_first_refused_query_first(order, placement, database, rng, monkeypatch):
    """Queries come first, whatever the database holds; among them, the first in row order (the
    CPU kernel checked them all as they are, then all weighted)."""
    x, q = _data(rng, 3000, 5), _data(rng, 40, 5)
    rows = _two_bad_rows(rng, 40, placement, limit=40)
    for row, kind in zip(rows, order):
        _spoiled(q, row, kind)
    if database == "refused":
        _spoiled(x, int(rng.integers(0, 3000)), str(rng.choice(["nan", "heavy"])))
    expected = f"queries: row {rows[0]} {_WEIGHTED_WORDS}"
    got = {name: _refusal(lambda: search(q, x)) for name, search in _weighted_search_paths(monkeypatch).items()}
    assert got == dict.fromkeys(got, expected)


@pytest.mark.parametrize("placement", ["one panel", "anywhere"])
@pytest.mark.parametrize("order", [("nan", "heavy"), ("heavy", "nan")])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_add_names_the_first_refused_row_in_its_own_words(order, placement, as_tensor, rng):
    """add refuses the first refused row in row order too, in the words of its kind: NaN / Inf
    in the plain words, a row the index's weights make unusable in add's own."""
    x = _data(rng, 3000, 5)
    rows = _two_bad_rows(rng, 3000, placement)
    for row, kind in zip(rows, order):
        _spoiled(x, row, kind)
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY)
    if as_tensor:
        x = pytest.importorskip("torch").from_numpy(x)
    words = " contains NaN or Inf" if order[0] == "nan" else ": its squared norm scaled by the index's weights"
    with pytest.raises(ValueError, match=f"^x: row {rows[0]}{words}"):
        index.add(x)
    assert index.ntotal == 0


@pytest.mark.parametrize("heavy_first", [True, False])
def test_add_encoded_names_the_first_refused_code(heavy_first, rng):
    encoder, X = _scaling_encoder_and_rows()
    heavy, plain = sorted(int(row) for row in rng.choice(40, size=2, replace=False))[:: 1 if heavy_first else -1]
    X[heavy, 0] = 1  # its code: 1e18 in dimension 0, heavy
    X[plain, 3] = 10  # its code: 1e19, finite (the encoder passes it) but unusable as it is
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY)
    words = ": its squared norm scaled by the index's weights" if heavy < plain else " contains NaN or Inf"
    with pytest.raises(ValueError, match=f"^the codes of X: row {min(heavy, plain)}{words}"):
        index.add_encoded(encoder, X, batch_size=16)
    assert index.ntotal == 0


def _refusal(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


def test_a_row_the_kernel_decides_does_not_hide_a_later_refused_row(monkeypatch):
    """A row the first check flags only by the weights, but which passes when summed again
    (within an ulp of the limit: the kernel decides for it), must not end the check: a later
    row the weights refuse is still named. (The flag is forced on a light row here: such
    ulp cases depend on the summation order.)"""
    rows = np.ones((8, 5), np.float32)
    rows[5] = 1e10  # weighted: 5 * 1e20 * 1e18, refused
    weights = np.full(5, 1e18, np.float32)
    real = _arrays.first_refused_row

    def flags_row_2_first(block, w):
        found = real(block, w)
        return 2 if block.shape[0] == rows.shape[0] else found  # the first call: row 2

    monkeypatch.setattr(_arrays, "first_refused_row", flags_row_2_first)
    with pytest.raises(ValueError, match=r"^database: row 5 "):
        _arrays.check_weighted_rows(rows, weights, "database")
    rows[5] = 1
    _arrays.check_weighted_rows(rows, weights, "database")  # only row 2 flagged: the kernel decides


def test_weights_that_vanish_in_float32_are_refused_by_name():
    """weights=np.full(6, 1e-46) became all 0 in float32: every distance 0 and the indices
    0, 1, 2, nothing said. A weight of exactly 0 still drops its dimension."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 6)).astype(np.float32)
    weights = np.ones(6)
    weights[4] = 1e-46
    with pytest.raises(ValueError, match=r"weights: 1e-46 at index 4 is below float32's smallest positive value"):
        latentspace.knn(x[:2], x, 3, "weighted_l2", weights=weights)
    index = latentspace.FlatIndex(6, "weighted_l2", weights=np.ones(6))
    with pytest.raises(ValueError, match="weights: 1e-46 at index 4"):
        index.weights = weights
    weights[4] = 0.0
    distances, _ = latentspace.knn(x[:2], x, 3, "weighted_l2", weights=weights)
    dropped = np.delete(x, 4, axis=1).astype(np.float64)
    expected = np.sort(((dropped[:2, None, :] - dropped[None, :, :]) ** 2).sum(-1), axis=1)[:, :3]
    np.testing.assert_allclose(distances, expected, rtol=1e-5, atol=1e-5)
    weights[4] = 2e-45  # the smallest float32 subnormals stay positive: taken
    latentspace.knn(x[:2], x, 3, "weighted_l2", weights=weights)
