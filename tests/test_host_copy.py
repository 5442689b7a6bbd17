"""latentspace._host_copy.copy_rows: the streamed GPU search's host copy into pinned buffers,
split into slices of rows over a thread pool. Runs on any machine (numpy only)."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import numpy as np
import pytest

from latentspace import _host_copy
from latentspace._host_copy import copy_rows


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of at least 1 KiB, so that small arrays are split as a chunk of 256 MiB is."""
    monkeypatch.setattr(_host_copy, "SLICE_BYTES", 1024)


@pytest.mark.parametrize("rows", [0, 1, 7, 1000, 1001])
@pytest.mark.parametrize("threads", [None, 1, 2, 3, 8])
def test_copy_equals_numpy_copyto(rows, threads, rng, small_slices):
    source = rng.standard_normal((rows, 33))  # float64 in, float32 out, as a chunk is converted
    destination = np.full((rows, 33), np.nan, np.float32)
    copy_rows(destination, source, threads)
    expected = np.empty_like(destination)
    np.copyto(expected, source, casting="unsafe")
    np.testing.assert_array_equal(destination, expected)


def test_slices_cover_every_row_once_across_threads(monkeypatch, small_slices):
    calls = []
    copy_slice = _host_copy._copy_slice

    def recorded(destination, source):
        calls.append((destination.shape[0], threading.current_thread().name))
        copy_slice(destination, source)

    monkeypatch.setattr(_host_copy, "_copy_slice", recorded)
    source = np.arange(1001 * 16, dtype=np.float64).reshape(1001, 16)
    destination = np.zeros((1001, 16), np.float32)
    copy_rows(destination, source, 4)
    assert sorted(rows for rows, _ in calls) == [248, 251, 251, 251]  # ceil(1001 / 4) rows a slice
    assert all(name.startswith("latentspace-copy") for _, name in calls)
    np.testing.assert_array_equal(destination, source.astype(np.float32))


def test_small_copies_take_one_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(_host_copy, "_copy_slice", lambda d, s: calls.append(threading.current_thread().name))
    copy_rows(np.zeros((100, 8), np.float32), np.ones((100, 8)), 8)  # 3 KiB: below SLICE_BYTES
    assert calls == [threading.current_thread().name]


def test_values_beyond_float32_become_inf_without_warnings(small_slices):
    source = np.array([[1e39, -1e39], [np.nan, 2.0]] * 300)
    destination = np.zeros(source.shape, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a worker's RuntimeWarning would raise there, then here
        copy_rows(destination, source, 4)
    assert np.isposinf(destination[::2, 0]).all() and np.isneginf(destination[::2, 1]).all()
    assert np.isnan(destination[1::2, 0]).all() and (destination[1::2, 1] == 2.0).all()


def test_strided_and_narrower_sources(rng, small_slices):
    wide = rng.standard_normal((500, 40)).astype(np.float16)
    source = wide[:, ::2]  # not contiguous, float16 in
    destination = np.empty((500, 20), np.float32)
    copy_rows(destination, source, 3)
    np.testing.assert_array_equal(destination, source.astype(np.float32))


def test_a_slice_error_reaches_the_caller(small_slices):
    source = np.array([["1.5"] * 8] * 400, dtype=object)
    source[333, 5] = "not a number"
    with pytest.raises(ValueError, match="not a number"):
        copy_rows(np.zeros((400, 8), np.float32), source, 4)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_copies_with_a_pool_of_its_own(small_slices):
    """The parent's pool threads do not exist in a forked child: the child must not hand its
    slices to them (they would never run: a hang)."""
    source = np.arange(4000, dtype=np.float64).reshape(1000, 4)
    copy_rows(np.zeros((1000, 4), np.float32), source, 4)  # the parent's pool exists now
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a process with threads
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the copy completes and is right
        code = 1
        try:
            destination = np.zeros((1000, 4), np.float32)
            copy_rows(destination, source, 4)
            code = 0 if np.array_equal(destination, source.astype(np.float32)) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's copy did not finish in 30 s")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"source: expected shape \(3, 2\), got \(2, 3\)"):
        copy_rows(np.zeros((3, 2), np.float32), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="threads: expected an integer >= 1, got 0"):
        copy_rows(np.zeros((3, 2), np.float32), np.zeros((3, 2)), 0)


@pytest.mark.parametrize("threads", [2.5, True, "2"])
def test_a_thread_count_that_is_not_an_integer_is_named(threads, small_slices):
    # 2.5 failed inside range() ("'float' object cannot be interpreted as an integer"), "2" in
    # a comparison, and True copied on one thread as if it were 1.
    with pytest.raises(TypeError, match="threads: expected an integer >= 1"):
        copy_rows(np.zeros((64, 2), np.float32), np.zeros((64, 2)), threads)
