"""latentspace.FlatIndex: contents, search, errors and thread safety."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import latentspace
from conftest import METRICS, assert_knn_matches

PAD = {"l2": np.inf, "ip": -np.inf, "cosine": -np.inf}


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("metric", METRICS)
def test_chunked_add_equals_knn_on_concatenation(simd_level, metric, rng):
    dim = 23
    chunks = [_normal(rng, n, dim) for n in (1, 15, 16, 0, 100, 7, 300)]
    index = latentspace.FlatIndex(dim, metric)
    total = 0
    for chunk in chunks:
        index.add(chunk)
        total += len(chunk)
        assert index.ntotal == len(index) == total
    data = np.concatenate(chunks)
    queries = _normal(rng, 25, dim)
    for k in (1, 10, total, total + 3):
        D, I = index.search(queries, k)
        D0, I0 = latentspace.knn(queries, data, k, metric)
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)
        assert_knn_matches(D, I, queries, data, k, metric)
    np.testing.assert_array_equal(index.vectors(), data)


def test_add_mixed_input_types(rng):
    dim = 6
    a = _normal(rng, 4, dim)
    b = _normal(rng, 3, dim).astype(np.float64)
    c = torch.from_numpy(_normal(rng, 5, dim))
    d = np.asfortranarray(_normal(rng, 2, dim))
    e = torch.from_numpy(_normal(rng, 3, dim)).to(torch.bfloat16)
    index = latentspace.FlatIndex(dim)
    for part in (a, b, c, d, e):
        index.add(part)
    expected = np.concatenate([a, b.astype(np.float32), c.numpy(), d, e.float().numpy()])
    np.testing.assert_array_equal(index.vectors(), expected)
    # torch queries -> torch results
    D, I = index.search(torch.from_numpy(a), 3)
    assert isinstance(D, torch.Tensor) and isinstance(I, torch.Tensor)
    assert D.dtype == torch.float32 and I.dtype == torch.int64
    np.testing.assert_array_equal(I[:, 0].numpy(), np.arange(4))


def test_add_own_vectors(rng):
    index = latentspace.FlatIndex(5)
    data = _normal(rng, 11, 5)
    index.add(data)
    for _ in range(4):  # with and without the buffer growing
        index.add(index.vectors())
        data = np.concatenate([data, data])
        np.testing.assert_array_equal(index.vectors(), data)
    index.add(index.vectors()[3:9])
    np.testing.assert_array_equal(index.vectors(), np.concatenate([data, data[3:9]]))


def test_add_copies_its_input(rng):
    x = _normal(rng, 5, 4)
    index = latentspace.FlatIndex(4)
    index.add(x)
    saved = x.copy()
    x[:] = 99.0
    np.testing.assert_array_equal(index.vectors(), saved)


@pytest.mark.parametrize("metric", METRICS)
def test_properties_and_repr(metric, rng):
    index = latentspace.FlatIndex(12, metric=metric)
    assert index.dim == 12 and index.metric == metric
    assert index.ntotal == 0 and len(index) == 0
    assert index.bytes_per_vector == 48
    assert not index.is_mmap
    assert repr(index) == f"FlatIndex(dim=12, metric={metric!r}, ntotal=0)"
    index.add(_normal(rng, 40, 12))
    assert repr(index) == f"FlatIndex(dim=12, metric={metric!r}, ntotal=40)"
    assert index.ntotal == len(index) == 40
    assert index.vectors().shape == (40, 12)


def test_default_metric_is_l2():
    assert latentspace.FlatIndex(3).metric == "l2"


@pytest.mark.parametrize("dim", [1, 7, 64, 130])
def test_bytes_per_vector_and_nbytes(dim, rng):
    index = latentspace.FlatIndex(dim)
    assert index.bytes_per_vector == dim * 4
    total = 0
    for n in (1, 5, 30, 200, 3):
        index.add(_normal(rng, n, dim))
        total += n
        # holds at least the vectors, in whole float32 rows, with bounded spare capacity
        assert index.nbytes >= total * dim * 4
        assert index.nbytes % (dim * 4) == 0
        assert index.nbytes <= max(16, 2 * total) * dim * 4
    assert index.vectors().nbytes == total * dim * 4


def test_reset(rng):
    index = latentspace.FlatIndex(5, "ip")
    index.add(_normal(rng, 30, 5))
    index.reset()
    assert index.ntotal == 0 and len(index) == 0
    assert index.vectors().shape == (0, 5)
    assert index.dim == 5 and index.metric == "ip"
    D, I = index.search(_normal(rng, 2, 5), 3)
    assert (I == -1).all() and (D == -np.inf).all()
    new = _normal(rng, 4, 5)
    index.add(new)
    np.testing.assert_array_equal(index.vectors(), new)
    D, I = index.search(new, 4)
    assert_knn_matches(D, I, new, new, 4, "ip")


@pytest.mark.parametrize("metric", METRICS)
def test_search_empty_index_returns_padding(metric, rng):
    index = latentspace.FlatIndex(8, metric)
    D, I = index.search(_normal(rng, 3, 8), 5)
    assert D.shape == I.shape == (3, 5)
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert (I == -1).all()
    assert (D == PAD[metric]).all()
    D, I = index.search(np.empty((0, 8), np.float32), 5)
    assert D.shape == I.shape == (0, 5)


def test_add_wrong_dim_raises(rng):
    index = latentspace.FlatIndex(4)
    index.add(_normal(rng, 2, 4))
    with pytest.raises(ValueError, match="x"):
        index.add(_normal(rng, 3, 5))
    with pytest.raises(ValueError, match="x"):
        index.add(_normal(rng, 4))  # 1-d
    with pytest.raises(ValueError, match="x"):
        index.add(_normal(rng, 1, 2, 4))
    assert index.ntotal == 2


def test_search_wrong_dim_and_bad_k(rng):
    index = latentspace.FlatIndex(4)
    index.add(_normal(rng, 10, 4))
    with pytest.raises(ValueError, match="queries"):
        index.search(_normal(rng, 2, 3), 1)
    with pytest.raises(ValueError, match="k"):
        index.search(_normal(rng, 2, 4), 0)
    with pytest.raises(TypeError, match="k"):
        index.search(_normal(rng, 2, 4), 1.5)
    with pytest.raises(ValueError, match="queries"):
        bad = _normal(rng, 2, 4)
        bad[1, 1] = np.nan
        index.search(bad, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_add_bad_values_raises_and_leaves_index_unchanged(bad, rng):
    index = latentspace.FlatIndex(6, "cosine")
    first = _normal(rng, 10, 6)
    index.add(first)
    before_nbytes = index.nbytes
    x = _normal(rng, 8, 6)
    x[5, 2] = bad
    with pytest.raises(ValueError, match=r"row 5\b"):
        index.add(x)
    assert index.ntotal == 10
    assert index.nbytes == before_nbytes
    np.testing.assert_array_equal(index.vectors(), first)
    D, I = index.search(first, 10)
    assert ((I >= 0) & (I < 10)).all()


@pytest.mark.parametrize("make", [lambda a: a.astype(str), lambda a: a > 0, lambda a: a.astype(np.complex64)],
                         ids=["str", "bool", "complex"])
def test_add_non_numeric_raises(make, rng):
    index = latentspace.FlatIndex(3)
    with pytest.raises(TypeError, match="x"):
        index.add(make(_normal(rng, 2, 3)))
    assert index.ntotal == 0


def test_vectors_is_read_only_view(rng):
    index = latentspace.FlatIndex(3)
    data = _normal(rng, 20, 3)
    index.add(data)
    view = index.vectors()
    assert view.dtype == np.float32 and view.shape == (20, 3)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 1.0
    with pytest.raises(ValueError):
        view[:] = 0
    np.testing.assert_array_equal(index.vectors(), data)


def test_reconstruct(rng):
    index = latentspace.FlatIndex(7)
    data = _normal(rng, 50, 7)
    index.add(data[:20])
    index.add(data[20:])
    ids = [0, 49, 20, 19, 3, 3]
    got = index.reconstruct(ids)
    assert got.shape == (6, 7) and got.dtype == np.float32
    np.testing.assert_array_equal(got, data[ids])
    np.testing.assert_array_equal(index.reconstruct(np.array([5], np.int32)), data[[5]])
    assert index.reconstruct(np.array([], dtype=np.int64)).shape == (0, 7)
    assert index.reconstruct([]).shape == (0, 7)  # numpy makes [] float64; still no ids
    # a copy: writing to it does not change the index
    got[:] = 0.0
    np.testing.assert_array_equal(index.reconstruct(ids), data[ids])


@pytest.mark.parametrize("ids", [[50], [-1], [0, 100]])
def test_reconstruct_out_of_range(ids, rng):
    index = latentspace.FlatIndex(2)
    index.add(_normal(rng, 50, 2))
    with pytest.raises(ValueError, match="ids"):
        index.reconstruct(ids)


@pytest.mark.parametrize("ids", [[[0, 1], [2, 3]], np.zeros((2, 0), np.int64)])
def test_reconstruct_refuses_ids_of_two_dimensions(ids, rng):
    """A (2, 2) array of ids gave 4 rows, (4, dim), read in an order the caller never chose,
    not the (len(ids), dim) the docstring promises."""
    index = latentspace.FlatIndex(2)
    index.add(_normal(rng, 5, 2))
    with pytest.raises(ValueError, match=r"^ids: expected an id or a 1-d list of ids, got shape \(2, "):
        index.reconstruct(ids)
    assert index.reconstruct(3).shape == (1, 2)  # one id: one row, as before


def test_reconstruct_non_integer_ids(rng):
    index = latentspace.FlatIndex(2)
    index.add(_normal(rng, 5, 2))
    with pytest.raises(TypeError, match="ids"):
        index.reconstruct([0.5])


@pytest.mark.parametrize(
    "args,exc",
    [
        ((0,), ValueError),
        ((-3,), ValueError),
        ((2.5,), (TypeError, ValueError)),
        (("8",), (TypeError, ValueError)),
        ((None,), (TypeError, ValueError)),
        ((True,), (TypeError, ValueError)),
        ((np.bool_(True),), (TypeError, ValueError)),
        ((np.float32(4.0),), (TypeError, ValueError)),
        ((8, "foo"), ValueError),
        ((8, "L2"), ValueError),
        ((8, None), ValueError),
        # a row's bytes must fit in an int64 (numpy's "array is too big" named nothing)
        ((2**61,), ValueError),
        ((2**62,), ValueError),
    ],
)
def test_constructor_errors(args, exc):
    with pytest.raises(exc, match="dim" if len(args) == 1 else "metric"):
        latentspace.FlatIndex(*args)


def test_constructor_accepts_numpy_integer():
    index = latentspace.FlatIndex(np.int64(5), "cosine")
    assert index.dim == 5 and isinstance(index.dim, int)


# ---------------------------------------------------------------------------------------
# Threads


@pytest.mark.parametrize("metric", METRICS)
def test_concurrent_searches_match_single_threaded(metric, rng):
    index = latentspace.FlatIndex(32, metric)
    index.add(_normal(rng, 5000, 32))
    query_sets = [_normal(rng, n, 32) for n in (1, 3, 17, 64, 200, 5, 2, 90)]
    expected = [index.search(q, 10) for q in query_sets]
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        return [index.search(query_sets[i], 10) for _ in range(3)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    for i, runs in enumerate(results):
        for D, I in runs:
            np.testing.assert_array_equal(I, expected[i][1])
            np.testing.assert_array_equal(D, expected[i][0])


def test_concurrent_knn_calls_match_single_threaded(rng):
    database = _normal(rng, 20000, 16)  # database-split path with > 1 thread
    queries = [_normal(rng, 3, 16) for _ in range(8)]
    expected = [latentspace.knn(q, database, 7) for q in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda q: latentspace.knn(q, database, 7), queries))
    for (D, I), (D0, I0) in zip(results, expected):
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)


@pytest.mark.parametrize("metric", METRICS)
def test_search_while_adding(metric, rng):
    dim, chunk, chunks, k = 16, 37, 40, 5
    data = _normal(rng, chunk * chunks, dim)
    queries = _normal(rng, 4, dim)
    index = latentspace.FlatIndex(dim, metric)
    index.add(data[:chunk])
    # every prefix a search may see, and its exact result
    prefixes = {n: latentspace.knn(queries, data[:n], k, metric)
                for n in range(chunk, chunk * chunks + 1, chunk)}
    stop = threading.Event()
    errors: list[BaseException] = []
    results = []

    def writer():
        try:
            for c in range(1, chunks):
                index.add(data[c * chunk : (c + 1) * chunk])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    def reader():
        try:
            while not stop.is_set():
                results.append(index.search(queries, k))
            results.append(index.search(queries, k))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "threads did not finish"
    assert not errors, errors
    assert index.ntotal == chunk * chunks
    np.testing.assert_array_equal(index.vectors(), data)
    assert len(results) >= 3
    for D, I in results:
        assert ((I >= 0) & (I < index.ntotal)).all()
        matches = [n for n, (D0, I0) in prefixes.items()
                   if np.array_equal(I, I0) and np.array_equal(D, D0)]
        assert matches, "a concurrent search result matches no prefix of the added data"
    # the last searches ran after the writer finished: they see everything
    np.testing.assert_array_equal(results[-1][1], prefixes[chunk * chunks][1])


# ---------------------------------------------------------------------------------------
# add_encoded: encode straight into the index (test_encode.py covers encoding itself)

from test_encode import FakeMlpEncoder, backend  # noqa: E402,F401  (a fixture, used by name)


def _model(latent_dim=5, input_dim=12):
    torch.manual_seed(0)
    return latentspace.Autoencoder(input_dim, latent_dim, hidden=(9,)).eval()


@pytest.mark.parametrize("metric", METRICS)
def test_add_encoded_equals_add_of_encode(backend, single_threaded, metric, rng):
    model, x = _model(), _normal(rng, 300, 12)
    first = _normal(rng, 7, 5)
    expected = latentspace.FlatIndex(5, metric)
    expected.add(first)
    expected.add(latentspace.encode(model, x, batch_size=64))
    index = latentspace.FlatIndex(5, metric)
    index.add(first)
    assert index.add_encoded(model, x, batch_size=64) == 300
    assert index.ntotal == 307
    np.testing.assert_array_equal(index.vectors(), expected.vectors())
    queries = _normal(rng, 4, 5)
    for got, want in zip(index.search(queries, 9), expected.search(queries, 9)):
        np.testing.assert_array_equal(got, want)


def test_add_encoded_streams_an_iterable(backend, single_threaded, rng):
    model = _model()
    chunks = [_normal(rng, n, 12) for n in (3, 0, 40, 1, 17)]
    index = latentspace.FlatIndex(5)
    assert index.add_encoded(model, (c for c in chunks), batch_size=16) == 61
    # the same chunks through encode: the same torch batches, so bit-identical codes
    np.testing.assert_array_equal(index.vectors(), latentspace.encode(model, iter(chunks), batch_size=16))
    assert index.add_encoded(model, iter([])) == 0 and index.ntotal == 61


@pytest.mark.parametrize("nested", ["add", "add_encoded", "reserve", "reset"])
def test_a_write_from_inside_add_encoded_on_its_own_thread_raises_instead_of_hanging(backend, single_threaded,
                                                                                   nested, rng):
    # X's iterator (or a signal handler that runs inside the native encode) writing to the
    # index being filled waited forever for the write lock its own thread held.
    model = _model()
    index = latentspace.FlatIndex(5)
    index.add(_normal(rng, 4, 5))
    writes = {"add": lambda: index.add(_normal(rng, 2, 5)), "reserve": lambda: index.reserve(10),
              "reset": index.reset, "add_encoded": lambda: index.add_encoded(model, _normal(rng, 2, 12))}

    def chunks():
        yield _normal(rng, 10, 12)
        writes[nested]()
        yield _normal(rng, 10, 12)

    outcome = []

    def fill():
        try:
            index.add_encoded(model, chunks(), batch_size=8)
        except RuntimeError as error:
            outcome.append(error)

    worker = threading.Thread(target=fill, daemon=True)  # a hang must fail the test, not the run
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the nested write waited for the lock its own thread held"
    assert outcome and f"{nested}: this thread is already writing to this index" in str(outcome[0])
    assert index.ntotal == 4  # all or nothing: the rows encoded before the error are not added
    index.add(_normal(rng, 1, 5))  # and the write lock was released
    assert index.ntotal == 5


def test_add_encoded_writes_into_the_index_buffer_grown_once(monkeypatch, single_threaded, rng):
    monkeypatch.setattr(latentspace._native, "MlpEncoder", FakeMlpEncoder, raising=False)
    FakeMlpEncoder.instances.clear()
    model, x = _model(), _normal(rng, 100, 12)
    index = latentspace.FlatIndex(5)
    index.add(_normal(rng, 4, 5))
    index.add_encoded(model, x, batch_size=30)
    buffer = index._buffer  # white-box: the codes must not be staged anywhere else
    assert buffer.shape[0] == 104  # grown once, to exactly the rows needed (from 16)
    calls = FakeMlpEncoder.instances[-1].calls
    assert [rows for _, _, rows in calls] == [30, 30, 30, 10]
    assert [out for _, out, _ in calls] == [buffer.ctypes.data + (4 + s) * 5 * 4 for s in (0, 30, 60, 90)]


def test_add_encoded_accepts_an_encoder(backend, single_threaded, rng):
    model, x = _model(), _normal(rng, 20, 12)
    encoder = latentspace.Encoder(model)
    index = latentspace.FlatIndex(5)
    index.add_encoded(encoder, x)
    np.testing.assert_array_equal(index.vectors(), encoder.encode(x))
    with pytest.raises(ValueError, match="an Encoder already has them"):
        index.add_encoded(encoder, x, precision="bf16")


def _unchanged(index, before):
    assert index.ntotal == before.shape[0]
    np.testing.assert_array_equal(index.vectors(), before)


def test_add_encoded_errors_leave_the_index_unchanged(backend, single_threaded, rng):
    model = _model()
    index = latentspace.FlatIndex(5)
    index.add(_normal(rng, 6, 5))
    before = index.vectors().copy()
    with pytest.raises(ValueError, match=r"model: its codes have 5 dimensions \(latent_dim\) but this index holds "
                                         "4-dimensional vectors"):
        latentspace.FlatIndex(4).add_encoded(model, _normal(rng, 3, 12))
    x = _normal(rng, 90, 12)
    x[71, 2] = np.nan
    with pytest.raises(ValueError, match="X: row 71 contains NaN or Inf"):
        index.add_encoded(model, x, batch_size=20)
    _unchanged(index, before)
    chunks = iter([_normal(rng, 10, 12), _normal(rng, 4, 11)])
    with pytest.raises(ValueError, match=r"X\[1\]: expected shape \(n, 12\)"):
        index.add_encoded(model, chunks)
    _unchanged(index, before)
    with pytest.raises(ValueError, match="batch_size"):
        index.add_encoded(model, x, batch_size=0)
    index.add_encoded(model, x[:10])  # still usable, and the lock was released
    assert index.ntotal == 16


def test_add_encoded_refuses_unusable_codes_and_width_mismatch(single_threaded, rng):
    class Huge(torch.nn.Module):  # finite inputs, codes whose squared norms overflow float32
        def forward(self, x):
            return x[:, :3] * 1e20

    index = latentspace.FlatIndex(3)
    index.add(_normal(rng, 2, 3))
    before = index.vectors().copy()
    x = _normal(rng, 8, 4) * 1e-30
    x[5] = 1.0
    with pytest.raises(ValueError, match="the codes of X: row 5 contains NaN or Inf, or values so large"):
        index.add_encoded(Huge(), x)
    _unchanged(index, before)
    with pytest.raises(ValueError, match="model: its codes have 3 dimensions but this index holds 2-dimensional"):
        latentspace.FlatIndex(2).add_encoded(Huge(), x)


def test_add_encoded_interrupted_adds_nothing(single_threaded, rng):
    class StopsOnSecondChunk(torch.nn.Module):
        calls = 0

        def forward(self, x):
            StopsOnSecondChunk.calls += 1
            if StopsOnSecondChunk.calls == 2:
                raise KeyboardInterrupt
            return x[:, :2]

    index = latentspace.FlatIndex(2)
    with pytest.raises(KeyboardInterrupt):
        index.add_encoded(StopsOnSecondChunk(), _normal(rng, 10, 3), batch_size=4)
    assert index.ntotal == 0
    index.add(_normal(rng, 1, 2))  # the write lock was released
    assert index.ntotal == 1


def test_add_encoded_on_a_mapped_index_is_refused(tmp_path, rng):
    index = latentspace.FlatIndex(5)
    index.add(_normal(rng, 3, 5))
    index.save(tmp_path / "i.lsidx")
    mapped = latentspace.load_index(tmp_path / "i.lsidx", mmap=True)
    with pytest.raises(ValueError, match="add_encoded: this index is memory-mapped read-only"):
        mapped.add_encoded(_model(), _normal(rng, 2, 12))
    with pytest.raises(ValueError, match="reserve: this index is memory-mapped read-only"):
        mapped.reserve(10)


def test_searches_do_not_wait_for_add_encoded(single_threaded, rng):
    """add_encoded holds the write lock while it encodes; searches must not wait for it."""
    started, release = threading.Event(), threading.Event()

    class Slow(torch.nn.Module):
        def forward(self, x):
            started.set()
            assert release.wait(timeout=30), "the search never finished while encoding ran"
            return x[:, :4]

    index = latentspace.FlatIndex(4)
    data = _normal(rng, 50, 4)
    index.add(data)
    worker = threading.Thread(target=index.add_encoded, args=(Slow(), _normal(rng, 10, 6)))
    worker.start()
    try:
        assert started.wait(timeout=30)
        D, I = index.search(data[:3], 1)  # while the encoding is blocked inside the model
        np.testing.assert_array_equal(I[:, 0], [0, 1, 2])
        assert index.ntotal == 50  # the rows being added are not visible yet
    finally:
        release.set()
        worker.join(timeout=30)
    assert not worker.is_alive() and index.ntotal == 60


def test_reserve_avoids_reallocation(rng):
    index = latentspace.FlatIndex(3)
    index.add(_normal(rng, 5, 3))
    index.reserve(100)
    assert index.nbytes == 105 * 3 * 4
    buffer = index._buffer
    for _ in range(10):
        index.add(_normal(rng, 10, 3))
    assert index._buffer is buffer and index.ntotal == 105
    index.reserve(0)
    with pytest.raises(ValueError, match="rows: expected an integer >= 0"):
        index.reserve(-1)
    # more than any machine holds (2^50 rows: 12 PiB): a MemoryError naming rows and the size,
    # not the allocator's "std::bad_alloc"; the index is left as it was
    with pytest.raises(MemoryError, match=r"rows: cannot allocate 12,582,912\.0 GiB of host memory for "
                                          r"1,125,899,906,842,729 vectors of dimension 3"):
        index.reserve(2**50)
    assert index._buffer is buffer and index.ntotal == 105
    # beyond any address space (the byte count overflowed 64 bits in the allocator, and numpy's
    # "array is too big" named nothing): the same MemoryError
    for rows in (2**61, 2**62, 2**63):
        with pytest.raises(MemoryError, match=r"rows: cannot allocate .* GiB of host memory"):
            index.reserve(rows)
    assert index._buffer is buffer and index.ntotal == 105


# -- the host buffer's alignment (csrc/bindings/buffers.cpp, docs/benchmarks.md) ------------

_HUGE = 2 << 20
_HAS_HUGE_ALLOCATOR = hasattr(latentspace._native, "empty_huge_float32")


def _address(array):
    return array.__array_interface__["data"][0]


@pytest.mark.parametrize("rows, dim", [(0, 8), (1, 3), (17, 23), (1000, 128), (8193, 128)])
def test_vector_buffers_start_on_a_cache_line(rows, dim):
    from latentspace._arrays import HUGE_BUFFER_BYTES, empty_vector_buffer

    buffer = empty_vector_buffer(rows, dim)
    assert buffer.shape == (rows, dim) and buffer.dtype == np.float32
    assert buffer.flags.c_contiguous and buffer.flags.writeable
    if rows:
        assert _address(buffer) % 64 == 0
        buffer[:] = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
        assert buffer[-1, -1] == rows * dim - 1
    if rows * dim * 4 >= HUGE_BUFFER_BYTES and _HAS_HUGE_ALLOCATOR:
        assert _address(buffer) % _HUGE == 0


@pytest.mark.skipif(not _HAS_HUGE_ALLOCATOR, reason="no huge-page allocator in this build")
@pytest.mark.parametrize("rows, cols", [(2**62, 4), (2**61, 3), (2**63 - 1, 1), (1, 2**61)])
@pytest.mark.parametrize("allocate", ["empty_huge_float32", "empty_huge_float64"])
def test_huge_allocator_refuses_byte_counts_beyond_int64(allocate, rows, cols):
    # the byte count used to wrap around 64 bits, so a 2 MiB block was allocated and numpy
    # refused the shape with "array is too big"; now the allocator's own MemoryError
    with pytest.raises(MemoryError):
        getattr(latentspace._native, allocate)(rows, cols, cached=False)


def test_large_index_buffer_is_huge_page_aligned_and_growth_keeps_the_rows(rng):
    dim = 32
    chunks = [_normal(rng, n, dim) for n in (5, 3000, 20000, 1, 16000)]  # crosses 4 MiB
    index = latentspace.FlatIndex(dim)
    buffers = []
    for chunk in chunks:
        index.add(chunk)
        assert _address(index._buffer) % 64 == 0
        if buffers and index._buffer is not buffers[-1]:
            buffers.append(index._buffer)
        elif not buffers:
            buffers.append(index._buffer)
    assert len(buffers) >= 3  # it did grow, several times
    assert index.nbytes >= 4 << 20
    if _HAS_HUGE_ALLOCATOR:
        assert _address(index._buffer) % _HUGE == 0
    data = np.concatenate(chunks)
    np.testing.assert_array_equal(index.vectors(), data)
    queries = _normal(rng, 3, dim)
    for k in (1, 10, 100):
        D, I = index.search(queries, k)
        D0, I0 = latentspace.knn(queries, data, k)
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)


def test_views_outlive_a_grown_or_dropped_huge_buffer(rng):
    import gc

    dim = 64
    first = _normal(rng, 20000, dim)  # 5 MiB: a native buffer
    index = latentspace.FlatIndex(dim)
    index.add(first)
    view = index.vectors()
    index.add(_normal(rng, 20000, dim))  # grows: the old buffer lives on through the view
    del index
    gc.collect()
    np.testing.assert_array_equal(view, first)


def test_reserve_on_a_large_index_is_exact_and_aligned(rng):
    dim = 128
    index = latentspace.FlatIndex(dim)
    index.add(_normal(rng, 10, dim))
    index.reserve(10000)
    assert index.nbytes == 10010 * dim * 4
    if _HAS_HUGE_ALLOCATOR:
        assert _address(index._buffer) % _HUGE == 0
    buffer = index._buffer
    index.add(_normal(rng, 10000, dim))
    assert index._buffer is buffer and index.ntotal == 10010


@pytest.mark.parametrize("rows", [5, 9000])  # below and above the huge-page size
def test_loaded_buffer_is_aligned_and_a_mapped_one_still_mapped(tmp_path, rows, rng):
    dim = 128
    data = _normal(rng, rows, dim)
    index = latentspace.FlatIndex(dim, "ip")
    index.add(data)
    index.save(tmp_path / "i.lsidx")
    loaded = latentspace.load_index(tmp_path / "i.lsidx")
    assert not loaded.is_mmap and loaded.nbytes == rows * dim * 4
    assert _address(loaded._buffer) % 64 == 0
    if rows * dim * 4 >= 4 << 20 and _HAS_HUGE_ALLOCATOR:
        assert _address(loaded._buffer) % _HUGE == 0
    np.testing.assert_array_equal(loaded.vectors(), data)
    mapped = latentspace.load_index(tmp_path / "i.lsidx", mmap=True)
    assert mapped.is_mmap and isinstance(mapped._buffer, np.memmap)
    queries = _normal(rng, 2, dim)
    D0, I0 = index.search(queries, 7)
    for other in (loaded, mapped):
        D, I = other.search(queries, 7)
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)
    loaded.add(data[:3])  # a loaded index grows as any other
    assert _address(loaded._buffer) % 64 == 0
    np.testing.assert_array_equal(loaded.vectors(), np.concatenate([data, data[:3]]))


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
@pytest.mark.parametrize("mmap", [False, True])
def test_copies_and_pickles_are_independent_indexes(how, mmap, tmp_path, rng):
    """copy.copy shared the buffer (and the locks) with the original: rows added to one
    overwrote the rows the other had added in the spare capacity, silently. deepcopy and
    pickle (multiprocessing, joblib) failed with "cannot pickle '_thread.lock' object"."""
    import copy
    import pickle

    x = rng.standard_normal((10, 3)).astype(np.float32)
    w = np.array([1.0, 0.0, 2.0], np.float32)
    index = latentspace.FlatIndex(3, "weighted_l2", weights=w)
    index.add(x)
    if mmap:
        index.save(tmp_path / "i.lsidx")
        index = latentspace.load_index(tmp_path / "i.lsidx", mmap=True)
    make = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": lambda i: pickle.loads(pickle.dumps(i))}[how]
    twin = make(index)
    assert twin is not index and repr(twin).replace(", mmap", "") == repr(index).replace(", mmap", "")
    np.testing.assert_array_equal(twin.weights, w)
    np.testing.assert_array_equal(twin.vectors(), x)
    q = rng.standard_normal((4, 3)).astype(np.float32)
    for got, expected in zip(twin.search(q, 5), index.search(q, 5)):
        np.testing.assert_array_equal(got, expected)
    ones, sevens = np.ones((1, 3), np.float32), np.full((1, 3), 7, np.float32)
    twin.add(ones)  # a copy of a mapped index holds its vectors in memory: it can add
    if not mmap:
        index.add(sevens)
        np.testing.assert_array_equal(index.vectors()[10], sevens[0])
    np.testing.assert_array_equal(twin.vectors()[10], ones[0])
    assert twin.ntotal == 11 and index.ntotal == (10 if mmap else 11)


def test_reconstruct_takes_any_id_tensor_or_names_ids(rng):
    """Tensor ids went through np.asarray: a negated view (neg bit set) raised torch's
    'negative bit set', a sparse or meta one torch's own conversion error, naming no argument."""
    x = rng.standard_normal((6, 3)).astype(np.float32)
    index = latentspace.FlatIndex(3)
    index.add(x)
    negated = torch._neg_view(torch.tensor([-4, -1]))
    np.testing.assert_array_equal(index.reconstruct(negated), x[[4, 1]])
    with pytest.raises(TypeError, match="^ids: expected a dense tensor"):
        index.reconstruct(torch.tensor([1, 2]).to_sparse())
    with pytest.raises(ValueError, match="^ids: expected a CPU or CUDA tensor"):
        index.reconstruct(torch.ones(2, dtype=torch.long, device="meta"))


# --- add's check on a GPU index, run on CPU tensors: the CPU add's row and words ----------

_HEAVY = np.array([1e4, 1, 1, 1, 1], np.float32)  # 1e18 in dimension 0: plain 1e36, weighted 1e40


@pytest.mark.parametrize("kinds", [("nan", "heavy"), ("heavy", "nan"), ("nan", "nan"), ("heavy", "heavy")])
@pytest.mark.parametrize("host_check", [0, 1 << 14])
def test_device_add_check_names_the_row_the_cpu_add_names(kinds, host_check, rng, monkeypatch):
    """A GPU index's add (and add_encoded) checked every row as it is before it weighed any, so a
    NaN row was named before an earlier heavy one; the CPU add names the first in row order."""
    from latentspace import _arrays
    from latentspace.indexes import flat

    monkeypatch.setattr(_arrays, "_HOST_CHECK_ELEMENTS", host_check)  # the flags' device and host paths
    x = _normal(rng, 300, 5)
    rows = sorted(int(r) for r in rng.choice(300, size=2, replace=False))
    for row, kind in zip(rows, kinds):
        if kind == "heavy":
            x[row] = 1e18
        else:
            x[row, 2] = np.nan
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY)
    with pytest.raises(ValueError) as cpu:
        index.add(x)
    assert str(cpu.value).startswith(f"x: row {rows[0]}")
    with pytest.raises(ValueError) as device:
        flat.check_device_rows_for_index(torch.from_numpy(x), "x", _HEAVY)
    assert str(device.value) == str(cpu.value)
    if "heavy" not in kinds:  # an index without weights: the plain check, the same row
        with pytest.raises(ValueError) as plain:
            flat.check_device_rows_for_index(torch.from_numpy(x), "x", None)
        assert str(plain.value) == str(cpu.value)


# ---------------------------------------------------------------------------------------
# remove_ids (faiss's IndexFlat.remove_ids: ids are positions, later vectors move down)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine", "weighted_l2"])
def test_remove_ids_keeps_the_other_vectors_in_order(rng, metric):
    x = rng.standard_normal((300, 7)).astype(np.float32)
    weights = rng.random(7).astype(np.float32) + 0.5 if metric == "weighted_l2" else None
    index = latentspace.FlatIndex(7, metric, weights=weights)
    index.add(x)
    doomed = rng.choice(300, size=40, replace=False)
    asked = np.concatenate([doomed, doomed[:5], [300, 10**6, -1]])  # repeats and absent ids: ignored
    assert index.remove_ids(asked) == 40
    kept = np.delete(x, doomed, axis=0)
    assert index.ntotal == 260
    np.testing.assert_array_equal(index.vectors(), kept)
    fresh = latentspace.FlatIndex(7, metric, weights=weights)
    fresh.add(kept)
    q = rng.standard_normal((9, 7)).astype(np.float32)
    for got, want in zip(index.search(q, 12), fresh.search(q, 12)):
        np.testing.assert_array_equal(got, want)
    index.add(x[:3])  # adding after a removal appends after the kept rows
    np.testing.assert_array_equal(index.vectors(), np.concatenate([kept, x[:3]]))


def test_remove_ids_takes_ids_as_reconstruct_does(rng):
    x = rng.standard_normal((10, 3)).astype(np.float32)
    for ids, removed in [(4, 1), (np.int64(9), 1), ([], 0), (torch.tensor([0, 1]), 2), (np.array([2], np.uint8), 1)]:
        index = latentspace.FlatIndex(3)
        index.add(x)
        assert index.remove_ids(ids) == removed
        assert index.ntotal == 10 - removed
    index = latentspace.FlatIndex(3)
    index.add(x)
    for ids, error, message in [
        ([[0, 1]], ValueError, r"^ids: expected an id or a 1-d list of ids, got shape \(1, 2\)"),
        ([0.5], TypeError, r"^ids: expected integers, got float64"),
        (["a"], TypeError, r"^ids: expected integers"),
    ]:
        with pytest.raises(error, match=message):
            index.remove_ids(ids)
    assert index.ntotal == 10
    assert index.remove_ids(range(10)) == 10 and index.ntotal == 0
    assert index.vectors().shape == (0, 3)
    assert index.search(x[:2], 3)[1].tolist() == [[-1, -1, -1]] * 2


def test_remove_ids_of_a_mapped_index_is_refused(rng, tmp_path):
    index = latentspace.FlatIndex(3)
    index.add(rng.standard_normal((10, 3)).astype(np.float32))
    index.save(tmp_path / "i.lsidx")
    mapped = latentspace.load_index(tmp_path / "i.lsidx", mmap=True)
    with pytest.raises(ValueError, match=r"^remove_ids: this index is memory-mapped read-only"):
        mapped.remove_ids([1])
    assert mapped.ntotal == 10


def test_a_search_in_flight_sees_the_vectors_from_before_a_removal(rng):
    """The removal writes a new buffer and swaps it in: a search that started before reads the
    old one whole (as after add's growth), never rows moving under it."""
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    index = latentspace.FlatIndex(16)
    index.add(x)
    before = index.vectors()  # a view of the buffer as it was
    index.remove_ids(np.arange(0, 2000, 2))
    np.testing.assert_array_equal(before, x)  # the old buffer is untouched
    np.testing.assert_array_equal(index.vectors(), x[1::2])


def test_remove_ids_holds_no_copy_of_the_kept_rows_beside_the_new_buffer(rng):
    """The kept rows go straight into the new buffer: the old and the new are held for a
    moment, but no third copy of the kept rows (a fancy-indexing gather made one per
    65,536 rows: as large as the new buffer below that, at any dimension)."""
    import tracemalloc

    index = latentspace.FlatIndex(1024)  # 2 MB: a numpy buffer, which tracemalloc sees
    index.add(rng.standard_normal((500, 1024)).astype(np.float32))
    tracemalloc.start()
    try:
        assert index.remove_ids([3, 400]) == 2
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.nbytes <= peak < 1.25 * index.nbytes


def test_remove_ids_names_ids_beyond_int64_as_such(rng):
    """A Python int past int64 (or a list mixing one with others) is no float: numpy makes the
    list float64 or object, and the refusal said 'got float64'."""
    index = latentspace.FlatIndex(3)
    index.add(rng.standard_normal((10, 3)).astype(np.float32))
    for ids in ([1, 2**63], [2**64], -(2**63) - 1):
        with pytest.raises(TypeError, match=r"^ids: expected integers within int64's or uint64's range"):
            index.remove_ids(ids)
    assert index.ntotal == 10


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(1000, 6), (1000,)])
@pytest.mark.parametrize("pattern", ["random", "none kept", "all kept", "first block empty", "one row"])
def test_gpu_remove_ids_gathers_kept_rows_block_by_block(dtype, shape, pattern, rng):
    """The GPU index's remove_ids gathers the kept rows (and norms) a block at a time into the
    new tensor (positions of every kept row at once took 8 bytes a row on host and device).
    The gather is torch code run here on CPU tensors: blocks of 7 rows against boolean
    indexing, over a buffer with spare capacity past the rows that keep covers."""
    torch = pytest.importorskip("torch")
    from latentspace.indexes.flat import gather_kept_rows

    buffer = torch.from_numpy(rng.standard_normal((1200, *shape[1:])).astype(np.float32)).to(getattr(torch, dtype))
    keep = {"random": rng.random(shape[0]) < 0.6, "none kept": np.zeros(shape[0], bool),
            "all kept": np.ones(shape[0], bool),
            "first block empty": np.r_[np.zeros(7, bool), rng.random(shape[0] - 7) < 0.5],
            "one row": np.eye(1, shape[0], 997, dtype=bool)[0]}[pattern]
    fresh = gather_kept_rows(buffer, keep, int(keep.sum()), block_rows=7)
    expected = buffer[: shape[0]][torch.from_numpy(keep)]
    assert fresh.dtype == buffer.dtype and fresh.shape == expected.shape and fresh.is_contiguous()
    assert torch.equal(fresh, expected)
