"""Ctrl-C (and any exception a Python signal handler raises) stops long native calls.

The native kernels run with the GIL released, so Python cannot run its signal handlers until
they return; they poll instead (csrc/core/interrupt.h). Each test here tells "stopped in the
middle" from "finished, then the handler ran" without timing anything: the outputs are
poisoned first, and a call that stopped early leaves some of them unwritten. Each call is
sized to take at least half a second on the fastest machine seen (a Zen 4 core does about
6e10 multiply-adds a second here), several times the signal's delay plus one poll interval.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import latentspace
from latentspace import _native

POISON_INDEX = -7
L2 = 0  # _native.knn's metric code


class HandlerStop(Exception):
    """What the test's SIGALRM handler raises."""


@pytest.fixture
def alarm():
    """Returns start(seconds, interval=0, handler=raise HandlerStop); restores SIGALRM after."""
    previous = signal.getsignal(signal.SIGALRM)

    def raise_stop(signum, frame):
        raise HandlerStop()

    def start(seconds, interval=0.0, handler=raise_stop):
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, seconds, interval)

    yield start
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _poisoned_outputs(num_queries, k):
    return np.full((num_queries, k), np.nan, np.float32), np.full((num_queries, k), POISON_INDEX, np.int64)


def _normal(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("threads", [1, 2, 16])
def test_a_handlers_exception_stops_a_long_search(alarm, num_threads, threads, rng):
    # 16 threads on 1,000 queries: the threads split the database (fewer than 64 queries
    # each); 1 and 2 threads on 4,096 queries: they split the queries.
    num_threads(threads)
    num_queries = 1000 if threads == 16 else 4096
    queries, database = _normal(rng, num_queries, 256), _normal(rng, 300_000 if threads == 16 else 200_000, 256)
    distances, indices = _poisoned_outputs(num_queries, 10)
    alarm(0.1)
    with pytest.raises(HandlerStop):
        _native.knn(queries, database, 10, L2, distances, indices, None)
    unwritten = (indices == POISON_INDEX).all(axis=1)
    assert unwritten.any(), "the search ran to its end before the handler's exception reached the caller"


def test_handlers_that_return_run_during_a_search_and_change_nothing(alarm, num_threads, rng):
    # A handler that does not raise lets the search go on: the results equal an undisturbed
    # search's, bit for bit. It ran several times during the one call (signals that arrive
    # while a call holds the interpreter up would run once, after it).
    num_threads(2)
    queries, database = _normal(rng, 4096, 256), _normal(rng, 200_000, 256)
    expected = _poisoned_outputs(4096, 10)
    _native.knn(queries, database, 10, L2, *expected, None)
    calls = []
    alarm(0.01, interval=0.01, handler=lambda signum, frame: calls.append(signum))
    got = _poisoned_outputs(4096, 10)
    _native.knn(queries, database, 10, L2, *got, None)
    signal.setitimer(signal.ITIMER_REAL, 0)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    assert len(calls) >= 3, f"the handler ran {len(calls)} times: the search did not poll"


def test_a_search_on_another_thread_is_not_stopped_by_the_main_threads_signal(alarm, num_threads, rng):
    # Only the main thread runs signal handlers: its exception is its own, and a search a
    # worker thread runs meanwhile finishes with every result written.
    num_threads(1)
    queries, database = _normal(rng, 2048, 128), _normal(rng, 200_000, 128)
    distances, indices = _poisoned_outputs(2048, 10)
    searched = threading.Event()

    def search():
        _native.knn(queries, database, 10, L2, distances, indices, None)
        searched.set()

    worker = threading.Thread(target=search)
    alarm(0.05)
    worker.start()
    with pytest.raises(HandlerStop):
        worker.join()
    # Not join() again: Python 3.11 marks a thread whose join a signal handler's exception
    # interrupted as stopped, so a second join returns at once (seen under ASan's slowdown).
    assert searched.wait(timeout=120), "the worker's search did not finish"
    worker.join()
    reference = _poisoned_outputs(2048, 10)
    _native.knn(queries, database, 10, L2, *reference, None)
    np.testing.assert_array_equal(indices, reference[1])


def test_the_row_path_scans_a_large_database_in_pieces_with_the_same_results(num_threads, rng):
    # Few queries take the row path, which checks for a stop between pieces of 65,536 rows:
    # results across the pieces' seams are those of the float64 reference, and a bad row past
    # the first piece is still the one named.
    num_threads(2)
    queries, database = _normal(rng, 2, 8), _normal(rng, 200_003, 8)
    database[131_072:131_080] = database[5]  # duplicates on a seam tie with row 5
    queries[0] = database[5]
    distances, indices = latentspace.knn(queries, database, 12)
    exact = ((queries.astype(np.float64)[:, None, :] - database.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(database.shape[0]), exact.shape), exact), axis=1)[:, :12]
    np.testing.assert_array_equal(indices[0, :9], [5, *range(131_072, 131_080)])
    np.testing.assert_allclose(distances, np.take_along_axis(exact, order, 1), rtol=1e-4, atol=1e-4)
    database[150_001, 3] = np.inf
    with pytest.raises(ValueError, match=r"database: row 150001\b"):
        latentspace.knn(queries, database, 12)


def test_a_handlers_exception_stops_a_long_native_encode(alarm, num_threads, rng):
    num_threads(2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                torch.nn.ReLU(), torch.nn.Linear(2048, 32))
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native", encoder.reason
    rows = rng.random((30_000, 784), dtype=np.float32)
    codes = np.full((30_000, 32), np.nan, np.float32)
    alarm(0.1)
    with pytest.raises(HandlerStop):
        encoder.encode(rows, out=codes, batch_size=30_000)
    assert np.isnan(codes).all(axis=1).any(), "the encoding ran to its end before the handler's exception"


_CTRL_C_CHILD = textwrap.dedent("""
    import numpy as np
    from latentspace import _native
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((4096, 256), dtype=np.float32)
    database = rng.standard_normal((300_000, 256), dtype=np.float32)
    indices = np.full((4096, 10), -7, np.int64)
    print("searching", flush=True)
    try:
        _native.knn(queries, database, 10, 0, np.empty((4096, 10), np.float32), indices, None)
    except KeyboardInterrupt:
        print("KeyboardInterrupt, unwritten rows:", int((indices == -7).all(axis=1).sum()), flush=True)
        raise
""")


def _signal_mid_search(script: str, signum: int, *args: str):
    """Runs `script` in a child, sends it `signum` 0.3 s after it prints "searching" (the line
    before its long search), and returns the child's (stdout, stderr, exit status)."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "searching"
        threading.Event().wait(0.3)
        child.send_signal(signum)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    return out, err, child.returncode


def test_ctrl_c_stops_a_long_search_with_keyboard_interrupt():
    # The real thing: SIGINT with Python's default handler, in a process of its own.
    out, err, _ = _signal_mid_search(_CTRL_C_CHILD, signal.SIGINT)
    assert "KeyboardInterrupt" in err, err
    unwritten = int(out.split(":")[-1])
    assert unwritten > 0, "the search ran to its end before Ctrl-C reached it"


# ---------------------------------------------------------------------------------------
# Python code that runs inside a native call: the poll runs signal handlers (and, on Python
# 3.12+, the garbage collector's finalizers) on OpenMP thread 0, inside the call's parallel
# region. A latentspace call made there opens a nested region, which OpenMP gives one thread.

@pytest.mark.parametrize("num_queries, num_database", [(512, 20_000), (8, 200_000)],
                         ids=["threads split the queries", "threads split the database"])
def test_a_search_a_signal_handler_makes_during_a_search_is_complete(alarm, num_threads, rng, num_queries,
                                                                     num_database):
    # A handler that searches (a progress report, a watchdog) got results with some rows never
    # written: the nested call asked for 2 threads, got 1, and thread 0 did only its share.
    num_threads(2)
    queries, database = _normal(rng, num_queries, 32), _normal(rng, num_database, 32)
    expected = latentspace.knn(queries, database, 5)
    nested = []

    def search_then_stop(signum, frame):
        nested.append(latentspace.knn(queries, database, 5))
        raise HandlerStop()

    outer_queries, outer_database = _normal(rng, 2048, 128), _normal(rng, 200_000, 128)
    outer = _poisoned_outputs(2048, 10)
    alarm(0.1, handler=search_then_stop)  # (everything is made first: the handler must run inside the search)
    with pytest.raises(HandlerStop):
        _native.knn(outer_queries, outer_database, 10, L2, *outer, None)
    assert (outer[1] == POISON_INDEX).all(axis=1).any(), "the handler ran after the outer search, not inside it"
    np.testing.assert_array_equal(nested[0][1], expected[1])
    np.testing.assert_array_equal(nested[0][0], expected[0])


# ---------------------------------------------------------------------------------------
# Through the public API: what a stopped call leaves behind.


@pytest.fixture
def poisoned_index_results(monkeypatch):
    """FlatIndex.search's result arrays, poisoned before the native call fills them (the
    list holds each search's (distances, indices))."""
    from latentspace.indexes import flat

    made = []

    def poisoned(kind, rows, k):
        distances, indices, d_view, i_view = flat_empty_results(kind, rows, k)
        d_view[...] = np.nan
        i_view[...] = POISON_INDEX
        made.append((d_view, i_view))
        return distances, indices, d_view, i_view

    flat_empty_results = flat.empty_results
    monkeypatch.setattr(flat, "empty_results", poisoned)
    return made


@pytest.mark.parametrize("metric", ["ip", "cosine", "weighted_l2"])
def test_a_handlers_exception_stops_an_index_search_and_leaves_the_index_as_it_was(
        alarm, num_threads, rng, poisoned_index_results, metric):
    num_threads(2)
    vectors = _normal(rng, 200_000, 128)
    weights = rng.random(128, dtype=np.float32) if metric == "weighted_l2" else None
    index = latentspace.FlatIndex(128, metric, weights=weights)
    index.add(vectors)
    queries = _normal(rng, 4096, 128)  # at least 0.8 s on 2 threads of a Zen 4
    alarm(0.1)
    with pytest.raises(HandlerStop):
        index.search(queries, 10)
    unwritten = (poisoned_index_results[-1][1] == POISON_INDEX).all(axis=1)
    assert unwritten.any(), "the search ran to its end before the handler's exception reached the caller"
    # Unchanged, and neither lock is left held: a search and an add both go ahead.
    assert index.ntotal == 200_000
    np.testing.assert_array_equal(index.vectors(), vectors)
    distances, indices = index.search(vectors[7:9], 1)
    if metric != "ip":  # (an inner product's best match need not be the vector itself)
        np.testing.assert_array_equal(indices[:, 0], [7, 8])
    index.add(vectors[:3])
    assert index.ntotal == 200_003


def _mlp_encoder():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                torch.nn.ReLU(), torch.nn.Linear(2048, 32))
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native", encoder.reason
    return encoder


def test_a_handlers_exception_stops_add_encoded_and_adds_nothing(alarm, num_threads, rng):
    # add_encoded writes the codes straight into the index's spare rows: the ones it never
    # reached are still poisoned (a white-box look at the buffer), and none of them counts.
    num_threads(2)
    encoder = _mlp_encoder()
    index = latentspace.FlatIndex(32)
    first = _normal(rng, 5, 32)
    index.add(first)
    index.reserve(30_000)
    index._buffer[5:] = np.nan
    rows = rng.random((30_000, 784), dtype=np.float32)  # made first: the handler must run inside the encode
    alarm(0.1)
    with pytest.raises(HandlerStop):
        index.add_encoded(encoder, rows, batch_size=30_000)
    assert np.isnan(index._buffer[5 : 5 + 30_000]).all(axis=1).any(), "the encoding ran to its end"
    assert index.ntotal == 5
    np.testing.assert_array_equal(index.vectors(), first)
    index.add(first[:1])  # the write lock was released
    assert index.ntotal == 6


_SIGTERM_CLI_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import latentspace
    from latentspace import cli
    from latentspace.indexes import flat

    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    index = latentspace.FlatIndex(128)
    index.add(rng.standard_normal((200_000, 128), dtype=np.float32))
    index.save(folder + "/vectors.lsidx")
    np.save(folder + "/queries.npy", rng.standard_normal((4096, 128), dtype=np.float32))
    latentspace.set_num_threads(2)
    made = []
    original = flat.empty_results

    def poisoned(kind, rows, k):  # the search's own results, poisoned; says when it starts
        results = original(kind, rows, k)
        results[3][...] = -7
        made.append(results[3])
        print("searching", flush=True)
        return results

    flat.empty_results = poisoned
    code = cli.main(["search", folder + "/vectors.lsidx", folder + "/queries.npy", "-k", "10",
                     "--out", folder + "/found.npz"])
    print("exit", code, "unwritten rows", int((made[0] == -7).all(axis=1).sum()), flush=True)
""")


def test_sigterm_stops_the_clis_search_mid_call_with_status_143_and_no_files(tmp_path):
    # cli.py turns SIGTERM into an exception so that temporary files are removed: the poll
    # must hand that very exception (not a KeyboardInterrupt) back out of the native search.
    out, err, status = _signal_mid_search(_SIGTERM_CLI_CHILD, signal.SIGTERM, str(tmp_path))
    assert status == 0, err
    assert "terminated (SIGTERM)" in err, err
    words = out.split()
    assert words[:2] == ["exit", "143"], out
    assert int(words[-1]) > 0, "the search ran to its end before the SIGTERM handler's exception reached it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["queries.npy", "vectors.lsidx"]
