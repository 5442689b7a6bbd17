"""Thread safety under stress: many threads on one index, encoder, file or loss at once.

Each scenario runs a writer (or a setting changer) against several readers in loops, and
checks every answer exactly against a single-threaded one: a search must equal a search over
some consistent prefix of the rows (the snapshot at its start), never a mix. The assertions
never depend on timing: a race that does not happen on one run only makes the test weaker,
never wrong. Each test stays well under 10 s on 2 cores.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import latentspace

READERS = 3
JOIN_SECONDS = 30  # a hang fails the test instead of the run


def _normal(rng, rows, dim):
    return rng.standard_normal((rows, dim)).astype(np.float32)


def _run_threads(targets):
    """Runs each target on a thread of its own, all starting together; returns the exceptions
    they raised. Fails when one has not finished within JOIN_SECONDS (a deadlock)."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))  # else the first could end before the last began

    def guarded(target):
        def run():
            try:
                start.wait(JOIN_SECONDS)
                target()
            except BaseException as error:  # reported by the caller
                errors.append(error)
        return run

    threads = [threading.Thread(target=guarded(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_SECONDS)
    assert not any(thread.is_alive() for thread in threads), "threads did not finish (a deadlock?)"
    return errors


def _matching_prefix(result, references):
    """The prefix length whose reference equals `result` exactly, or None. (With k at least
    the rows, each prefix has its own answer; else added rows outside every top k would make
    two prefixes look alike.)"""
    distances, indices = result
    for rows, (ref_d, ref_i) in references.items():
        if np.array_equal(indices, ref_i) and np.array_equal(distances, ref_d):
            return rows
    return None


def _searches_during(writer, index, queries, k, references):
    """Runs `writer` against READERS threads searching `index` until it ends; every search
    must equal one reference (a prefix), and each reader's prefixes never go back."""
    done = threading.Event()
    seen: list[list[int | None]] = [[] for _ in range(READERS)]

    def write():
        try:
            writer()
        finally:
            done.set()

    def reader(mine):
        def run():
            while not done.is_set():
                mine.append(_matching_prefix(index.search(queries, k), references))
            mine.append(_matching_prefix(index.search(queries, k), references))
        return run

    errors = _run_threads([write] + [reader(s) for s in seen])
    assert not errors, errors
    for mine in seen:
        assert None not in mine, f"a search saw no consistent prefix: {mine}"
    return seen


# -- FlatIndex: writers against searches ------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine", "weighted_l2"])
def test_searches_see_a_prefix_while_add_reserve_and_add_encoded_run(metric, rng):
    dim = 8
    torch = pytest.importorskip("torch")
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim))
    encoder = latentspace.Encoder(model)
    assert encoder.backend == "native"
    inputs = [_normal(rng, int(n), 12) for n in rng.integers(1, 300, size=12)]
    codes = [encoder.encode(x) for x in inputs]
    data = np.concatenate(codes)
    k = data.shape[0] + 3  # every row in every answer: rows outside the top k cannot hide
    queries = _normal(rng, 9, dim)
    boundaries = np.concatenate([[0], np.cumsum([c.shape[0] for c in codes])])
    references = {int(n): latentspace.knn(queries, data[:n], k, metric, weights=np.ones(dim) if
                                          metric == "weighted_l2" else None) if n else None
                  for n in boundaries}
    empty = latentspace.FlatIndex(dim, metric).search(queries, k)
    references[0] = empty
    for _ in range(3):
        index = latentspace.FlatIndex(dim, metric)

        def writer():
            for step, (x, c) in enumerate(zip(inputs, codes)):
                if step % 3 == 0:
                    index.add(c)
                elif step % 3 == 1:
                    index.reserve(int(rng.integers(0, 500)))
                    index.add_encoded(encoder, x)
                else:  # in chunks: the buffer grows chunk by chunk, rows published together
                    index.add_encoded(encoder, iter(np.array_split(x, 3)), batch_size=7)

        seen = _searches_during(writer, index, queries, k, references)
        for mine in seen:
            assert mine == sorted(mine), "a later search saw fewer rows than an earlier one"
            assert mine[-1] == data.shape[0]


def test_searches_see_the_old_or_the_new_contents_across_reset(rng):
    dim, rows = 8, 400
    k = rows + 1  # every row in every answer: rows outside the top k cannot hide
    first, second = _normal(rng, rows, dim), _normal(rng, rows, dim)
    queries = _normal(rng, 7, dim)
    # Every state a search may see: a prefix of `first` (it is added in 4 steps), the empty
    # index, or a prefix of `second` (its boundaries shifted by `rows` + 1 to tell them apart).
    references = {n: latentspace.knn(queries, first[:n], k) for n in range(100, rows + 1, 100)}
    references[0] = latentspace.FlatIndex(dim).search(queries, k)
    references.update({rows + 1 + n: latentspace.knn(queries, second[:n], k) for n in range(100, rows + 1, 100)})
    for _ in range(5):
        index = latentspace.FlatIndex(dim)

        def writer():
            for part in np.split(first, 4):
                index.add(part)
            index.reset()
            for part in np.split(second, 4):
                index.add(part)

        seen = _searches_during(writer, index, queries, k, references)
        for mine in seen:
            assert mine[-1] == 2 * rows + 1


def test_writes_from_many_threads_are_serialised_and_none_is_lost(rng):
    dim, per_thread, writers = 4, 50, 4
    # Row r of writer w holds the value w * 1000 + r in every dimension: the result tells
    # which rows each add placed, and no two adds may interleave within a block.
    blocks = [np.full((per_thread, dim), w * 1000, np.float32) + np.arange(per_thread, dtype=np.float32)[:, None]
              for w in range(writers)]
    for _ in range(10):
        index = latentspace.FlatIndex(dim)

        def writer(block):
            def run():
                for piece in np.split(block, 5):
                    index.add(piece)
                    index.reserve(3)
            return run

        errors = _run_threads([writer(b) for b in blocks])
        assert not errors, errors
        stored = index.vectors()
        assert stored.shape == (writers * per_thread, dim)
        # Each add's 10 rows are contiguous and in order; all rows are there exactly once.
        for start in range(0, stored.shape[0], 10):
            piece = stored[start : start + 10, 0]
            assert np.array_equal(np.diff(piece), np.ones(9)), piece
        np.testing.assert_array_equal(np.sort(stored[:, 0]), np.sort(np.concatenate(blocks)[:, 0]))


def _adding_in_parts(index, data, parts, done):
    """A thread body that adds `data` to `index` in `parts` equal parts, then sets `done`."""
    def writer():
        try:
            for part in np.split(data, parts):
                index.add(part)
        finally:
            done.set()
    return writer


def test_copies_and_pickles_taken_while_adding_hold_a_prefix(rng):
    dim, chunk, chunks = 6, 25, 30
    data = _normal(rng, chunk * chunks, dim)
    index = latentspace.FlatIndex(dim, "ip")
    copies = []
    done = threading.Event()

    writer = _adding_in_parts(index, data, chunks, done)

    def copier():
        for _ in range(10):  # at least these, whether or not the writer is still running
            copies.append(copy.deepcopy(index))
        while not done.is_set():
            copies.append(copy.deepcopy(index))
            copies.append(pickle.loads(pickle.dumps(index)))
            copies.append(copy.copy(index))

    errors = _run_threads([writer, copier, copier])
    assert not errors, errors
    assert copies
    for copied in copies:
        n = copied.ntotal
        assert n % chunk == 0
        np.testing.assert_array_equal(copied.vectors(), data[:n])
        copied.add(data[:1])  # its own buffer: the original is not touched
    np.testing.assert_array_equal(index.vectors(), data)


def test_saves_taken_while_adding_hold_a_prefix(tmp_path, rng):
    dim, chunk, chunks = 6, 40, 20
    data = _normal(rng, chunk * chunks, dim)
    index = latentspace.FlatIndex(dim)
    done = threading.Event()
    loaded = []

    writer = _adding_in_parts(index, data, chunks, done)

    def saver(name):
        def run():
            path = tmp_path / name
            turns = 0
            while not done.is_set() or turns < 5:
                turns += 1
                index.save(path)
                loaded.append(latentspace.load_index(path).vectors())
        return run

    errors = _run_threads([writer, saver("a.lsidx"), saver("b.lsidx")])
    assert not errors, errors
    assert loaded
    for vectors in loaded:
        assert vectors.shape[0] % chunk == 0
        np.testing.assert_array_equal(vectors, data[: vectors.shape[0]])


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_load_index_while_another_thread_saves_over_the_file_gets_one_whole_file(mmap, tmp_path, rng):
    # The docs say save() is safe against readers: it writes a new file and renames it over
    # the old one. A load racing it must then get the old file or the new one, whole. load
    # used to stat the path, open it, and (mmap) open it again by name for the map: a rename
    # between those mixed the header of one file with the size or the data of the other,
    # and a valid file raised IndexFileError or ValueError.
    dim = 8
    small, large = _normal(rng, 50, dim), _normal(rng, 3000, dim)
    path = tmp_path / "index.lsidx"
    versions = []
    for rows in (small, large):
        index = latentspace.FlatIndex(dim)
        index.add(rows)
        versions.append(index)
    versions[0].save(path)
    done = threading.Event()
    loads = []

    def saver():
        try:
            for turn in range(150):
                versions[turn % 2].save(path)
        finally:
            done.set()

    def loader():
        while not done.is_set():
            loaded = latentspace.load_index(path, mmap=mmap)
            loads.append(np.array(loaded.vectors()))

    errors = _run_threads([saver, loader, loader])
    assert not errors, errors
    for vectors in loads:
        expected = small if vectors.shape[0] == small.shape[0] else large
        np.testing.assert_array_equal(vectors, expected)


def test_searches_of_a_mapped_index_survive_saves_over_its_file(tmp_path, rng):
    dim, k = 8, 4
    data = _normal(rng, 2000, dim)
    queries = _normal(rng, 5, dim)
    path = tmp_path / "index.lsidx"
    index = latentspace.FlatIndex(dim)
    index.add(data)
    index.save(path)
    mapped = latentspace.load_index(path, mmap=True)
    assert mapped.is_mmap
    expected = latentspace.knn(queries, data, k)
    other = latentspace.FlatIndex(dim)
    other.add(data[::-1].copy())
    references = {data.shape[0]: expected}

    def writer():
        for turn in range(40):
            (other if turn % 2 else index).save(path)

    _searches_during(writer, mapped, queries, k, references)


def test_searches_use_the_old_or_the_new_default_weights_while_they_change(rng):
    dim, k = 10, 1000  # answers of this length tell every pair of weights apart
    data, queries = _normal(rng, 3000, dim), _normal(rng, 8, dim)
    weights = [rng.uniform(0, 2, dim).astype(np.float32) for _ in range(4)]
    references = {w: latentspace.knn(queries, data, k, "weighted_l2", weights=weights[w]) for w in range(len(weights))}
    index = latentspace.FlatIndex(dim, "weighted_l2", weights=weights[0])
    index.add(data)

    def changer():
        for turn in range(200):
            index.weights = weights[turn % len(weights)]

    seen = _searches_during(changer, index, queries, k, references)
    assert all(mine[-1] == 3 for mine in seen)  # the last weights set: 199 % 4


# -- settings changed while searches run -------------------------------------------------------


def test_searches_racing_set_num_threads_and_set_simd_level_match_one_setting(rng):
    dim, k = 24, 7
    database = _normal(rng, 20_000, dim)  # large enough for the threaded paths
    batches = {"row path": _normal(rng, 2, dim), "packed": _normal(rng, 40, dim), "many": _normal(rng, 300, dim)}
    levels = [level for level in ("scalar", "avx2", "avx512")
              if ("scalar", "avx2", "avx512").index(level) <= ("scalar", "avx2", "avx512").index(
                  latentspace.build_info()["hardware_simd_level"])]
    references = {}  # (batch, level) -> result: a level may round the last bits differently
    for level in levels:
        latentspace.set_simd_level(level)
        for threads in (1, 2, 3):
            latentspace.set_num_threads(threads)
            for name, queries in batches.items():
                result = latentspace.knn(queries, database, k)
                previous = references.setdefault((name, level), result)
                # The thread count never changes an answer.
                np.testing.assert_array_equal(result[1], previous[1])
                np.testing.assert_array_equal(result[0], previous[0])
    done = threading.Event()
    results = []

    def changer():
        try:
            for turn in range(60):
                latentspace.set_simd_level(levels[turn % len(levels)])
                latentspace.set_num_threads(1 + turn % 3)
                latentspace.knn(batches["row path"], database[:500], 1)  # a pause of real work
        finally:
            done.set()

    def searcher():
        while not done.is_set():
            for name, queries in batches.items():
                results.append((name, latentspace.knn(queries, database, k)))

    errors = _run_threads([changer, searcher, searcher])
    assert not errors, errors
    for name, (distances, indices) in results:
        assert any(np.array_equal(indices, references[name, level][1])
                   and np.array_equal(distances, references[name, level][0]) for level in levels), name


# -- Encoder shared between threads ------------------------------------------------------------


def _torch_and_native_encoders(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(int(rng.integers(1 << 31)))
    native = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    # Softplus is not exported: the same kind of model on the torch backend.
    other = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Softplus(), torch.nn.Linear(32, 5))
    return {"native": latentspace.Encoder(native), "torch": latentspace.Encoder(other)}


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_one_encoder_used_by_many_threads_gives_single_threaded_codes(backend, rng):
    encoder = _torch_and_native_encoders(rng)[backend]
    assert encoder.backend == backend
    inputs = [_normal(rng, int(n), 20) for n in rng.integers(1, 700, size=24)]
    # The same chunks as below: torch's own products may round differently for another
    # batch size (MKL picks its blocking by shape), which is no concern of threads.
    expected = [encoder.encode(x, batch_size=97) for x in inputs]
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda x: encoder.encode(x, batch_size=97), inputs))
        for codes, reference in zip(got, expected):
            np.testing.assert_array_equal(codes, reference)


def test_a_module_of_unknown_width_learns_it_once_under_concurrent_first_use(rng):
    torch = pytest.importorskip("torch")

    class Doubler(torch.nn.Module):  # no latent_dim, not exportable: width learnt from a chunk
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 3)

        def forward(self, x):
            return torch.cat([self.linear(x), 2 * self.linear(x)], dim=1)

    torch.manual_seed(int(rng.integers(1 << 31)))
    model = Doubler()
    inputs = [_normal(rng, 50, 6) for _ in range(8)]
    expected = [latentspace.Encoder(model).encode(x) for x in inputs]
    for _ in range(5):
        encoder = latentspace.Encoder(model)
        assert encoder.latent_dim is None
        barrier = threading.Barrier(4)

        def encode(x):
            barrier.wait()
            return encoder.encode(x)

        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(encode, inputs[:4])) + list(pool.map(encoder.encode, inputs[4:]))
        assert encoder.latent_dim == 6
        for codes, reference in zip(got, expected):
            np.testing.assert_array_equal(codes, reference)


def test_add_encoded_from_many_threads_into_one_index_adds_each_batch_whole(rng):
    encoder = _torch_and_native_encoders(rng)["native"]
    batches = [_normal(rng, 64, 20) + 10 * b for b in range(8)]  # each batch far from the others
    codes = [encoder.encode(x) for x in batches]
    for _ in range(5):
        index = latentspace.FlatIndex(5)
        errors = _run_threads([lambda x=x: index.add_encoded(encoder, x, batch_size=16) for x in batches])
        assert not errors, errors
        stored = index.vectors()
        # Each batch's codes lie contiguous, in order, in some order of batches.
        found = sorted(next(b for b, c in enumerate(codes) if np.array_equal(stored[s : s + 64], c))
                       for s in range(0, stored.shape[0], 64))
        assert found == list(range(len(batches)))


# -- losses -------------------------------------------------------------------------------------


def test_losses_from_many_threads_match_single_threaded(rng):
    torch = pytest.importorskip("torch")
    from latentspace.losses import kl_normal, reconstruction_loss

    # Large enough for several native threads and for huge-page gradient buffers (4 MiB+),
    # which a cache of freed blocks shares between calls.
    pairs = [(torch.from_numpy(_normal(rng, 2048, 600)), torch.from_numpy(_normal(rng, 2048, 600)))
             for _ in range(3)]

    def losses(pair):
        recon, target = (t.clone().requires_grad_(True) for t in pair)
        total = reconstruction_loss(recon, target) + kl_normal(recon, target, reduction="sum")
        rows = reconstruction_loss(recon, target, "bce_logits", reduction="none")
        total.backward()
        return total.detach().numpy(), rows.detach().numpy(), recon.grad.numpy(), target.grad.numpy()

    expected = [losses(pair) for pair in pairs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(losses, pairs * 4))
    for result, reference in zip(got, expected * 4):
        for value, ref in zip(result, reference):
            np.testing.assert_array_equal(value, ref)


# -- signals ----------------------------------------------------------------------------------


class _Tick(Exception):
    pass


def _stop_the_timer(previous_handler):
    """Stops the interval timer and restores the handler; a tick may still raise meanwhile."""
    while True:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous_handler)
            return
        except _Tick:
            pass


WORKER_SEARCHES = 200  # some 0.2-0.5 s: many ticks of the 10 ms timer


def test_only_the_main_threads_own_call_is_stopped_by_its_signal_handler(rng):
    dim, k = 32, 5
    database = _normal(rng, 40_000, dim)
    queries = _normal(rng, 3, dim)
    expected = latentspace.knn(queries, database, k)
    ticks = {"n": 0, "raised": 0}

    def handler(signum, frame):
        # Raises only inside latentspace (the native search polls for it there): a tick that
        # landed in this test's own loop, outside its try (at the loop's head), failed the test
        # once in CI with the very exception it sends.
        ticks["n"] += 1
        if frame is not None and frame.f_globals.get("__name__", "").startswith("latentspace"):
            ticks["raised"] += 1
            raise _Tick()

    previous = signal.signal(signal.SIGALRM, handler)
    done = threading.Event()
    worker_results = []

    def worker():
        try:
            for _ in range(WORKER_SEARCHES):
                worker_results.append(latentspace.knn(queries, database, k))
        finally:
            done.set()

    thread = threading.Thread(target=worker, daemon=True)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    try:
        thread.start()
        while True:  # the handler may raise anywhere in this loop, not only in knn
            try:
                if done.is_set():
                    break
                result = latentspace.knn(queries, database, k)
                np.testing.assert_array_equal(result[1], expected[1])  # a finished call is whole
            except _Tick:
                pass
    finally:
        _stop_the_timer(previous)
    thread.join(timeout=JOIN_SECONDS)
    assert not thread.is_alive()
    assert len(worker_results) == WORKER_SEARCHES, "the worker's search was stopped by the main thread's signal"
    assert ticks["raised"] > 0, f"no tick of {ticks['n']} stopped a search of the main thread"
    for distances, indices in worker_results:
        np.testing.assert_array_equal(indices, expected[1])
        np.testing.assert_array_equal(distances, expected[0])


# -- processes ---------------------------------------------------------------------------------


def _fork_child_writes_and_searches(index, rows, queries, k, expected, outcome):
    index.add(rows)
    distances, indices = index.search(queries, k)
    outcome.put((index.ntotal, np.array_equal(indices, expected[1])))


def test_a_child_forked_while_another_thread_writes_can_write_to_the_index(rng):
    # A thread adding to an index holds its write lock; a child forked meanwhile (multiprocessing's
    # default start method on Linux) inherits the lock held by a thread it does not have, and
    # its own first add() used to wait for it forever.
    dim, k = 5, 3  # the encoder's latent_dim
    base, extra = _normal(rng, 100, dim), _normal(rng, 20, dim)
    queries = _normal(rng, 2, dim)
    expected = latentspace.knn(queries, np.concatenate([base, extra]), k)
    index = latentspace.FlatIndex(dim)
    index.add(base)
    encoder = _torch_and_native_encoders(rng)["native"]
    writing, release = threading.Event(), threading.Event()

    first_chunk = _normal(rng, 5, 20)
    errors = []

    def chunks():  # add_encoded holds the write lock while it reads this
        yield first_chunk
        writing.set()
        release.wait(JOIN_SECONDS)
        raise RuntimeError("stop")  # all or nothing: the parent's index keeps its 100 rows

    def writer():
        try:
            index.add_encoded(encoder, chunks())
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert writing.wait(JOIN_SECONDS)
        context = multiprocessing.get_context("fork")
        outcome = context.Queue()
        child = context.Process(target=_fork_child_writes_and_searches,
                                args=(index, extra, queries, k, expected, outcome))
        child.start()
        child.join(timeout=20)
        hung = child.is_alive()
        if hung:
            child.kill()
            child.join()
    finally:
        release.set()
        thread.join(JOIN_SECONDS)
    assert not hung, "the forked child's add() waited for a lock held by a thread it does not have"
    assert child.exitcode == 0
    assert outcome.get(timeout=5) == (120, True)
    assert [str(e) for e in errors] == ["stop"]
    assert index.ntotal == 100


def _forked_search(index, queries, k, expected, outcome):
    distances, indices = index.search(queries, k)
    outcome.put(np.array_equal(indices, expected[1]) and np.array_equal(distances, expected[0]))


def test_children_forked_while_other_threads_search_can_search(rng):
    # The parent's threads are inside OpenMP regions when it forks: the child (one thread,
    # docs/knn.md "Threads") must neither hang nor answer differently.
    dim, k = 16, 4
    data, queries = _normal(rng, 30_000, dim), _normal(rng, 50, dim)
    index = latentspace.FlatIndex(dim)
    index.add(data)
    expected = index.search(queries, k)
    done = threading.Event()
    context = multiprocessing.get_context("fork")
    outcome = context.Queue()

    def searcher():
        while not done.is_set():
            index.search(queries, k)

    threads = [threading.Thread(target=searcher, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    children = []
    try:
        for _ in range(3):
            child = context.Process(target=_forked_search, args=(index, queries, k, expected, outcome))
            child.start()
            children.append(child)
        for child in children:
            child.join(timeout=20)
    finally:
        done.set()
        for child in children:
            if child.is_alive():
                child.kill()
                child.join()
        for thread in threads:
            thread.join(JOIN_SECONDS)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert [outcome.get(timeout=5) for _ in children] == [True, True, True]


def _spawned_search(payload, queries, k, threads):
    latentspace.set_num_threads(threads)
    index = pickle.loads(payload)
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda q: index.search(q, k), [queries] * 3))


def test_an_index_pickled_to_spawned_workers_searches_as_the_parent(rng):
    dim, k = 16, 5
    data = _normal(rng, 5000, dim)
    queries = _normal(rng, 70, dim)
    index = latentspace.FlatIndex(dim, "cosine")
    index.add(data)
    expected = index.search(queries, k)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        results = pool.apply(_spawned_search, (pickle.dumps(index), queries, k, 2))
    for distances, indices in results:
        np.testing.assert_array_equal(indices, expected[1])
        np.testing.assert_array_equal(distances, expected[0])
