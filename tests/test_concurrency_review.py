"""Concurrency review: one FlatIndex, and the native kernels, inside a multi-threaded service.

Two kinds of test (tests/test_concurrency.py has more of the first):

* Interleavings, found without timing: a read (or a write) is stopped at each Python call it
  makes inside latentspace in turn, and a write (or a read) runs to its end on another thread
  there. A reader must see the state before or after the write (or a state the write passes
  through between two of its own calls), whole. Threads alone hit some of these windows
  rarely or never (none in 25,000 threaded searches for the weights race below); here every
  one is tried.
* Threaded stress: writers and readers in loops, every answer checked exactly against the
  states the index passes through (k at least the rows, so an answer names one state).

Every thread is joined with a timeout: a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import latentspace
from latentspace.losses import kl_normal, reconstruction_loss
from test_concurrency import _run_threads

JOIN_SECONDS = 20
PACKAGE = os.path.dirname(latentspace.__file__)


def _normal(rng, rows, dim, scale=1.0):
    return (scale * rng.standard_normal((rows, dim))).astype(np.float32)


def _outcome(action):
    """action()'s result, or the exception it raised (compared like a result by the checks)."""
    try:
        return action()
    except Exception as error:
        return error


# -- interleavings ------------------------------------------------------------------------------


_NOT_RUN = object()  # the interruption's outcome when action made fewer calls than `at`


def _calls_inside_latentspace(action) -> int:
    """How many Python calls action() makes into latentspace's own code."""
    return _interrupted(action, lambda: None, at=0)[2]


def _interrupted(action, interruption, at):
    """Runs action() on this thread and, when it makes its at-th Python call into latentspace's
    code (before that call runs), interruption() to its end on another thread (not this one:
    a write from the thread already writing raises by design). Returns (action's outcome,
    interruption's outcome, calls made). The interruption must end: one that waits means
    action holds a lock across a call, where it could wait for ever."""
    calls, result = 0, {}

    def interrupt():
        thread = threading.Thread(target=lambda: result.update(value=_outcome(interruption)), daemon=True)
        thread.start()
        thread.join(JOIN_SECONDS)
        assert not thread.is_alive(), f"the interruption at call {at} waited for the interrupted call (a lock held?)"

    def tracer(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            calls += 1
            if calls == at:
                interrupt()
        return None  # no line events

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        outcome = _outcome(action)
    finally:
        sys.settrace(previous)
    return outcome, result.get("value", _NOT_RUN), calls


def _every_interleaving(setup, first, second):
    """For each Python call first(shared) makes into latentspace, a fresh shared = setup(run)
    with second(shared) run at that call (run: the call's number, from 1); yields (run, shared,
    first's outcome, second's). (A run where `second` makes `first` shorter, e.g. a search
    that finds the index reset, is interrupted only at the calls it still makes.)"""
    shared = setup(0)
    calls = _calls_inside_latentspace(lambda: first(shared))
    assert calls > 0
    for run in range(1, calls + 1):
        shared = setup(run)
        outcome, other, _ = _interrupted(lambda: first(shared), lambda: second(shared), run)
        if other is not _NOT_RUN:
            yield run, shared, outcome, other


# A weighted_l2 index that moves between its states (weights, rows) by two writes in one step:
# the weights change, and a row that only the new weights allow is added or removed. HEAVY
# refuses BIG (its squared norm scaled by HEAVY is 1e38, past the 4.2e37 a search can use).
HEAVY = np.array([1e36, 1, 1, 1], np.float32)
LIGHT = np.ones(4, np.float32)
BIG = np.array([[10, 0, 0, 0]], np.float32)


def _weighted_states(rng):
    base = _normal(rng, 6, 4, 1e-3)  # usable under either weights
    return base, {"heavy": (HEAVY, base), "light": (LIGHT, base), "light+big": (LIGHT, np.vstack([base, BIG]))}


def _weighted_index(base, start):
    index = latentspace.FlatIndex(4, "weighted_l2", weights=HEAVY)
    index.add(base)
    if start == "light+big":
        _swap_weights_and_big_row(index, base.shape[0])
    return index


def _swap_weights_and_big_row(index, base_rows):
    """heavy -> light+big or light+big -> heavy (through "light" either way)."""
    if index.ntotal == base_rows:
        index.weights = LIGHT
        index.add(BIG)
    else:
        index.remove_ids([base_rows])
        index.weights = HEAVY


def _state_named(states, weights, rows):
    return next((name for name, (w, r) in states.items()
                 if np.array_equal(w, weights) and np.array_equal(r, rows)), None)


def _weighted_reads(tmp_path, queries, k):
    """Each read of the index and what it gives as (weights, rows), or for search the answer."""
    path = tmp_path / "weighted.lsidx"

    def saved(index):
        index.save(path)
        return path

    def loaded(path):
        loaded = latentspace.load_index(path)  # verify=True: refuses rows its weights refuse
        return loaded.weights, loaded.vectors()

    def as_pair(index):
        return index.weights, index.vectors()

    return {
        "search": (lambda index: index.search(queries, k), None),
        "save": (saved, loaded),
        "pickle": (pickle.dumps, lambda payload: as_pair(pickle.loads(payload))),
        "deepcopy": (copy.deepcopy, as_pair),
        "to": (lambda index: index.to("cpu"), as_pair),
    }


@pytest.mark.parametrize("read", ["search", "save", "pickle", "deepcopy", "to"])
@pytest.mark.parametrize("start", ["heavy", "light+big"])
def test_a_read_interleaved_with_a_weight_change_sees_weights_and_rows_that_belong_together(read, start,
                                                                                          tmp_path, rng):
    # A search read the default weights, then the rows: a change of weights and an add between
    # the two reads made it search new rows with old weights, and it refused a stored row
    # ("weights (the index's vectors): row 6 ..."). save, pickling, copy and to() read the rows
    # and the weights apart too: their file or copy paired them wrongly, and loading it failed.
    base, states = _weighted_states(rng)
    queries, k = _normal(rng, 3, 4, 1e-3), base.shape[0] + 1
    answers = {name: latentspace.knn(queries, rows, k, "weighted_l2", weights=w) for name, (w, rows) in states.items()}
    action, check = _weighted_reads(tmp_path, queries, k)[read]
    bad = []
    for at, _, outcome, written in _every_interleaving(lambda run: _weighted_index(base, start), action,
                                                       lambda index: _swap_weights_and_big_row(index, base.shape[0])):
        assert written is None, written  # the write itself never fails
        if isinstance(outcome, Exception):
            bad.append((at, repr(outcome)))
            continue
        if read == "search":
            seen = next((name for name, answer in answers.items()
                         if all(np.array_equal(a, b) for a, b in zip(outcome, answer))), None)
        else:
            seen = _outcome(lambda: _state_named(states, *check(outcome)))
        if seen is None or isinstance(seen, Exception):
            bad.append((at, repr(seen)))
    assert not bad, f"{read} from {start!r}, interleaved at these calls, saw no state of the index: {bad}"


# -- signal handlers ----------------------------------------------------------------------------

# A handler that searches the index (a service's SIGTERM handler saving it, a SIGALRM progress
# report) while the main thread resets it: reset() held the index's lock across a call
# (np.empty), where Python runs handlers, and the handler's search waited for that lock, held by
# its own thread, for ever (a repeating timer stacked handlers until RecursionError instead).
_HANDLER_DURING_WRITES = textwrap.dedent("""
    import faulthandler, signal, sys, time
    import numpy as np
    import latentspace

    index = latentspace.FlatIndex(4)
    queries, rows = np.zeros((1, 4), np.float32), np.ones((3, 4), np.float32)
    index.search(queries, 1)  # imports done before the timer starts
    faulthandler.dump_traceback_later(10, exit=True)  # a deadlock: where, and a failed exit
    answers = []

    def handler(signum, frame):
        distances, ids = index.search(queries, 1)
        assert ids[0, 0] in (0, -1), ids  # a row of the index, or none (reset)
        index.save(sys.argv[1])
        assert latentspace.load_index(sys.argv[1]).ntotal in (0, 2, 3)
        answers.append(ids[0, 0])
        signal.setitimer(signal.ITIMER_REAL, 0.001)  # one tick at a time: handlers never stack

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.001)
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        index.add(rows)
        index.reserve(5)
        index.remove_ids([1])
        index.reset()
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    print("handled", len(answers))
""")


def test_a_signal_handler_that_reads_the_index_while_the_main_thread_writes_it_does_not_deadlock(tmp_path):
    script = tmp_path / "handler_during_writes.py"
    script.write_text(_HANDLER_DURING_WRITES)
    try:
        run = subprocess.run([sys.executable, str(script), str(tmp_path / "index.lsidx")], capture_output=True,
                             text=True, timeout=JOIN_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail("a signal handler's search waited for ever for a lock its own thread held")
    assert run.returncode == 0, f"deadlocked or failed (faulthandler's dump after 10 s):\n{run.stderr[-3000:]}"
    handled = int(run.stdout.split()[-1])
    assert handled > 50, run.stdout  # the handler ran many times while the writes looped


# -- every read against every write, both ways round ---------------------------------------------


def _same(outcome, expected) -> bool:
    """Equal answers: arrays (or tuples of them) exactly, exceptions by type and message."""
    if isinstance(expected, Exception) or isinstance(outcome, Exception):
        return type(outcome) is type(expected) and str(outcome) == str(expected)
    if isinstance(expected, tuple):
        return len(outcome) == len(expected) and all(_same(o, e) for o, e in zip(outcome, expected))
    return np.array_equal(np.asarray(outcome), np.asarray(expected))


def _reads(tmp_path, queries):
    """The reads a service makes of an index, each giving a comparable answer."""
    path = tmp_path / "read.lsidx"

    def saved_and_loaded(index):
        index.save(path)
        return np.array(latentspace.load_index(path).vectors())

    return {
        "search": lambda index: index.search(queries, 30),  # k above every state's rows: one answer each
        "vectors": lambda index: np.array(index.vectors()),
        "reconstruct": lambda index: index.reconstruct([0, 1]),  # an ids error where there are fewer rows
        "ntotal": lambda index: index.ntotal,
        "save": saved_and_loaded,
        "pickle": lambda index: pickle.loads(pickle.dumps(index)).vectors(),
        "copy": lambda index: copy.copy(index).vectors(),
        "to": lambda index: index.to("cpu").vectors(),
    }


def _writes(rows, extra, other):
    """name -> (the write, the stored rows it leaves, rows of states it passes through)."""
    return {
        "add, growing": (lambda index: index.add(extra), np.vstack([rows, extra]), []),
        "add within capacity": (lambda index: index.add(extra[:2]), np.vstack([rows, extra[:2]]), []),
        "reserve": (lambda index: index.reserve(40), rows, []),
        "remove_ids": (lambda index: index.remove_ids([1, 5]), np.delete(rows, [1, 5], axis=0), []),
        "reset": (lambda index: index.reset(), rows[:0], []),
        "reset, add": (lambda index: (index.reset(), index.add(other)), other, [rows[:0]]),
        "save over its own file": (None, rows, []),  # (filled in for a mapped index)
    }


MEMORY_WRITES = ("add, growing", "add within capacity", "reserve", "remove_ids", "reset", "reset, add")
MAPPED_WRITES = ("reset", "reset, add", "save over its own file")  # the others refuse a mapped index


@pytest.mark.parametrize("start, write", [("memory", w) for w in MEMORY_WRITES] + [("mmap", w) for w in MAPPED_WRITES])
def test_every_read_interleaved_with_a_write_sees_the_state_before_or_after_it(start, write, tmp_path, rng):
    rows, extra, other = _normal(rng, 8, 3), _normal(rng, 10, 3), _normal(rng, 5, 3)
    file = tmp_path / "start.lsidx"
    first = latentspace.FlatIndex(3)
    first.add(rows)  # capacity 16: "add, growing" moves to a new buffer, "add within capacity" does not
    first.save(file)

    def setup(run):
        """The index, the write and the states a read may see. The rows a write adds differ
        from run to run: a buffer one run freed was handed to the next run's add, whose rows
        not yet written then held the very rows being added (a read of them passed)."""
        if start == "mmap":
            index = latentspace.load_index(file, mmap=True)
        else:
            index = latentspace.FlatIndex(3)
            index.add(rows)
        do, after, between = _writes(rows, extra + run, other - run)[write]
        if do is None:
            do = lambda index: index.save(file)  # noqa: E731 (a new file renamed over the mapped one)
        return index, do, [rows, after, *between]

    def answers(read, states):
        """What a single-threaded index holding each state answers."""
        alone = [latentspace.FlatIndex(3) for _ in states]
        for index, state in zip(alone, states):
            index.add(state)
        return [_outcome(lambda: read(index)) for index in alone]

    bad = []
    for name, read in _reads(tmp_path, _normal(rng, 4, 3)).items():
        # The read stopped at each of its calls while the write runs, then the write stopped
        # at each of its calls while the read runs (it must not wait for the write to go on).
        interleavings = [("read stopped", _every_interleaving(setup, lambda s: read(s[0]), lambda s: s[1](s[0]))),
                         ("write stopped", _every_interleaving(setup, lambda s: s[1](s[0]), lambda s: read(s[0])))]
        for stopped, runs in interleavings:
            for run, (_, _, states), *outcomes in runs:
                seen, written = outcomes if stopped == "read stopped" else outcomes[::-1]
                if isinstance(written, Exception) or not any(_same(seen, e) for e in answers(read, states)):
                    bad.append((name, stopped, run, repr(seen)[:200], repr(written)[:200]))
    assert not bad, f"reads that saw no state of the index around {write!r}: {bad[:5]} ({len(bad)} in all)"


# -- threaded stress ------------------------------------------------------------------------------


@pytest.fixture
def fine_switching():
    """Threads take turns every 10 us instead of 5 ms: a loop of small writes otherwise ran to
    its end in one turn, alone."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _take_turns():
    """Lets the other threads run: Python's locks are not fair, and a loop that releases the
    index's write lock and takes it back at once kept it from the threads waiting for it."""
    time.sleep(0)


def _while_writing(writer, readers):
    """Runs writer() against reader threads, each calling its read until the writer has ended
    (and once more after). Fails on any exception and on a thread that does not finish."""
    done = threading.Event()

    def write():
        try:
            writer()
        finally:
            done.set()

    def loop(read):
        def run():
            while not done.is_set():
                read()
            read()
        return run

    errors = _run_threads([write] + [loop(read) for read in readers])
    assert not errors, errors[:3]


def test_reads_from_threads_see_only_states_the_writer_passes_through(tmp_path, rng, fine_switching):
    dim, queries = 4, _normal(rng, 5, 4)
    a, b, c = _normal(rng, 10, dim), _normal(rng, 7, dim), _normal(rng, 20, dim)
    removed = np.delete(np.vstack([a, b]), [0, 3, 12], axis=0)
    states = [a[:0], a, np.vstack([a, b]), removed, np.vstack([removed, c])]
    k = max(len(s) for s in states) + 1  # every row in every answer: one answer per state
    answers = [latentspace.knn(queries, s, k) if len(s) else latentspace.FlatIndex(dim).search(queries, k)
               for s in states]
    index = latentspace.FlatIndex(dim)
    unmatched = []

    def writer():
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            index.add(a)
            index.reserve(30)  # a new buffer, the same rows
            index.add(b)  # within the reserve
            assert index.remove_ids([0, 3, 12]) == 3
            index.add(c)  # past the capacity: a new buffer again
            index.reset()

    def check(what, seen, matches):
        if not any(matches(seen, s, answer) for s, answer in zip(states, answers)):
            unmatched.append((what, seen))

    def search():
        check("search", index.search(queries, k), lambda seen, s, answer: _same(seen, answer))

    def vectors():
        check("vectors", index.vectors(), lambda seen, s, answer: np.array_equal(seen, s))
        check("ntotal", index.ntotal, lambda seen, s, answer: seen == len(s))

    def reconstruct():
        try:
            seen = index.reconstruct([0])
        except ValueError as error:  # an empty index: the ids error, by name
            assert str(error).startswith("ids: expected values in [0, 0)"), error
            return
        check("reconstruct", seen, lambda seen, s, answer: len(s) and np.array_equal(seen, s[:1]))

    def pickled():
        check("pickle", pickle.loads(pickle.dumps(index)).vectors(), lambda seen, s, answer: np.array_equal(seen, s))

    def saved():  # on two threads, to one path: each load gets one whole file
        index.save(tmp_path / "shared.lsidx")
        check("save", latentspace.load_index(tmp_path / "shared.lsidx").vectors(),
              lambda seen, s, answer: np.array_equal(seen, s))

    _while_writing(writer, [search, vectors, reconstruct, pickled, saved, saved])
    assert not unmatched, f"{len(unmatched)} reads saw no state of the index: {unmatched[:2]}"
    assert index.ntotal == 0


def test_writers_of_every_kind_on_many_threads_lose_no_row(rng, fine_switching):
    # Adders append tagged rows; one thread removes only its own rows (found by their tags:
    # adds elsewhere append, so the positions it found stay valid); others reserve and change
    # the weights. Nothing may be lost, duplicated, reordered within an add, or mixed up.
    dim, blocks, block = 3, 200, 3
    weights = [np.full(dim, w, np.float32) for w in (0.5, 2.0)]
    index = latentspace.FlatIndex(dim, "weighted_l2", weights=weights[0])

    def tagged(tag, count):  # row r of tag t: (t, r, r) - tells every row apart
        r = np.arange(count, dtype=np.float32)
        return np.stack([np.full(count, tag, np.float32), r, r], axis=1)

    def adder(tag):
        def run():
            rows = tagged(tag, blocks * block)
            for start in range(0, len(rows), block):
                index.add(rows[start : start + block])
                _take_turns()
        return run

    def remover():
        rows = tagged(99, 200)
        for start in range(0, len(rows), 5):
            index.add(rows[start : start + 5])
            stored = index.vectors()
            mine = np.flatnonzero(stored[:, 0] == 99)
            assert index.remove_ids(mine[: len(mine) // 2]) == len(mine) // 2
            _take_turns()
        assert index.remove_ids(np.flatnonzero(index.vectors()[:, 0] == 99)) > 0

    def reserver():
        for step in range(200):
            index.reserve(step % 7)
            _take_turns()

    def reweigher():
        for step in range(201):
            index.weights = weights[step % 2]
            _take_turns()

    errors = _run_threads([adder(1), adder(2), adder(3), remover, reserver, reweigher])
    assert not errors, errors[:3]
    stored = index.vectors()
    assert index.ntotal == len(stored) == 3 * blocks * block
    for tag in (1, 2, 3):  # each adder's rows, whole and in order; the remover's, gone
        np.testing.assert_array_equal(stored[stored[:, 0] == tag], tagged(tag, blocks * block))
    starts = np.flatnonzero(stored[:, 1] % block == 0)
    for start in starts:  # no add interleaved with another
        np.testing.assert_array_equal(stored[start : start + block, 0], np.full(block, stored[start, 0]))
    np.testing.assert_array_equal(index.weights, weights[0])  # the last set: step 200


def test_a_mapped_index_reset_while_threads_search_it_answers_from_the_map_or_not_at_all(tmp_path, rng,
                                                                                           fine_switching):
    # The map is dropped (reset) while searches run over it: each must finish on the rows it
    # started with (the view it holds keeps the map) and never crash on an unmapped page.
    dim, k = 16, 3
    mapped_rows, fresh_rows = _normal(rng, 20_000, dim), _normal(rng, 50, dim)
    queries = _normal(rng, 20, dim)
    file = tmp_path / "mapped.lsidx"
    source = latentspace.FlatIndex(dim)
    source.add(mapped_rows)
    source.save(file)
    answers = [latentspace.knn(queries, mapped_rows, k), latentspace.knn(queries, fresh_rows, k),
               latentspace.FlatIndex(dim).search(queries, k)]
    current = [latentspace.load_index(file, mmap=True)]
    unmatched = []

    def writer():
        import gc

        for _ in range(15):
            index = latentspace.load_index(file, mmap=True, verify=False)
            current[0] = index
            for _ in range(3):  # let searches start on the map
                index.search(queries[:1], 1)
            index.reset()
            gc.collect()  # the map's last owner but the searches' views: gone now
            index.add(fresh_rows)

    def search():
        seen = current[0].search(queries, k)
        if not any(_same(seen, answer) for answer in answers):
            unmatched.append(seen)

    _while_writing(writer, [search, search])
    assert not unmatched, f"{len(unmatched)} searches saw no state of the index"


# -- settings changed while the kernels run -------------------------------------------------------


def test_encode_losses_and_knn_on_threads_give_single_threaded_results_while_settings_change(rng, fine_switching):
    # The thread count never changes a result (each kernel splits its work so); the SIMD level
    # may change the last bits, so each call, which reads the level once, must give one level's
    # result. (The losses read the level again for each segment of rows, and knn again for the
    # query norms: a level changed during one call mixed two levels' bits, 11 of 30 loss calls.)
    torch = pytest.importorskip("torch")
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    inputs = _normal(rng, 3000, 24)
    database, queries = _normal(rng, 20_000, 8), _normal(rng, 40, 8)
    recon, target = (torch.from_numpy(_normal(rng, 256, 600)) for _ in range(2))
    levels = [level for level in ("scalar", "avx2", "avx512")
              if ("scalar", "avx2", "avx512").index(level) <= ("scalar", "avx2", "avx512").index(
                  latentspace.build_info()["hardware_simd_level"])]

    def losses():
        r, t = recon.clone().requires_grad_(True), target.clone().requires_grad_(True)
        total = reconstruction_loss(r, t) + kl_normal(r, t, reduction="sum")
        total.backward()
        return total.detach().numpy(), r.grad.numpy(), t.grad.numpy()

    codes, losses_of, knn_of = {}, {}, {}
    latentspace.set_num_threads(1)
    for level in levels:
        latentspace.set_simd_level(level)
        codes[level] = latentspace.encode(model, inputs)
        losses_of[level], knn_of[level] = losses(), latentspace.knn(queries, database, 5)
    expected_losses, expected_knn = losses(), latentspace.knn(queries, database, 5)
    done, wrong = threading.Event(), []

    def changer():
        try:
            for turn in range(40):
                latentspace.set_num_threads(1 + turn % 3)
                assert latentspace.get_num_threads() in (1, 2, 3)
                time.sleep(0.01)
        finally:
            done.set()

    def level_changer():
        while not done.is_set():
            for level in levels:
                latentspace.set_simd_level(level)
                time.sleep(0.002)

    def worker(name, run, matches):
        def loop():
            while not done.is_set():
                if not matches(run()):
                    wrong.append(name)
        return loop

    # knn and the losses run while only the thread count changes: they first, the encoder after.
    errors = _run_threads([changer, worker("knn", lambda: latentspace.knn(queries, database, 5),
                                           lambda got: _same(got, expected_knn)),
                           worker("losses", losses, lambda got: _same(got, expected_losses))])
    assert not errors, errors[:3]
    done.clear()
    errors = _run_threads([changer, level_changer,
                           worker("encode", lambda: latentspace.encode(model, inputs),
                                  lambda got: any(np.array_equal(got, c) for c in codes.values())),
                           worker("encode", lambda: latentspace.encode(model, inputs, batch_size=97),
                                  lambda got: any(np.array_equal(got, c) for c in codes.values())),
                           worker("losses, level changing", losses,
                                  lambda got: any(_same(got, e) for e in losses_of.values())),
                           worker("knn, level changing", lambda: latentspace.knn(queries, database, 5),
                                  lambda got: any(_same(got, e) for e in knn_of.values()))])
    assert not errors, errors[:3]
    assert not wrong, f"results that match no single setting: {wrong[:5]} ({len(wrong)} in all)"


# -- calls made on the writing thread itself ------------------------------------------------------


def test_reads_made_inside_add_encoded_on_its_own_thread_finish_and_writes_there_raise(tmp_path, rng):
    # X's iterator (or a signal handler) runs on the thread that holds the index's write lock:
    # a read there must not wait for the lock (it would wait for itself), and must see the index
    # as it was before add_encoded; a write there raises instead of waiting for ever.
    torch = pytest.importorskip("torch")
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    encoder = latentspace.Encoder(model)
    base, queries = _normal(rng, 20, 4), _normal(rng, 2, 4)
    index = latentspace.FlatIndex(4, "weighted_l2", weights=np.ones(4))
    index.add(base)
    expected = index.search(queries, 5)
    path = tmp_path / "inside.lsidx"
    reads = {
        "search": lambda: index.search(queries, 5),
        "ntotal": lambda: index.ntotal,
        "vectors": lambda: np.array(index.vectors()),
        "reconstruct": lambda: index.reconstruct(np.arange(20)),
        "save": lambda: (index.save(path), latentspace.load_index(path))[1].vectors(),
        "pickle": lambda: pickle.loads(pickle.dumps(index)).vectors(),
        "deepcopy": lambda: copy.deepcopy(index).vectors(),
        "to": lambda: index.to("cpu").vectors(),
    }
    writes = {
        "add": lambda: index.add(base[:1]),
        "reserve": lambda: index.reserve(3),
        "remove_ids": lambda: index.remove_ids([0]),
        "reset": index.reset,
        "weights": lambda: setattr(index, "weights", np.full(4, 2.0)),
    }
    seen, refused = {}, {}

    def chunks():
        for start in range(0, 30, 10):
            yield _normal(rng, 10, 6)
            for name, read in reads.items():
                seen.setdefault(name, []).append(_outcome(read))
            for name, write in writes.items():
                refused.setdefault(name, []).append(_outcome(write))

    errors = _run_threads([lambda: index.add_encoded(encoder, chunks(), batch_size=4)])
    assert not errors, errors
    assert index.ntotal == 50
    for name, outcomes in seen.items():
        for outcome in outcomes:  # the rows before add_encoded, on every turn
            wanted = {"search": expected, "ntotal": 20}.get(name, base)
            assert _same(outcome, wanted), (name, outcome)
    for name, outcomes in refused.items():
        for outcome in outcomes:
            assert isinstance(outcome, RuntimeError), (name, outcome)
            assert "already writing to this index" in str(outcome), (name, outcome)
