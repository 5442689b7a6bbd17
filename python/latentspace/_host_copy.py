"""Host-side copies of database rows into pinned buffers, spread over a few threads.

A search streamed from host memory (_cuda_search._PinnedChunks) copies each chunk of the
user's array into a pinned buffer before its upload, converting to float32 as it goes. One
thread's np.copyto leaves most of a server's memory bandwidth unused; np.copyto releases the
GIL, so slices of rows copied from a small thread pool run at once. The first chunk's copy
overlaps no search, so its time adds directly to the search's (GPU run 6: the streamed cell
took 145 ms, 50 ms more than the upload and the resident search; benchmarks/
profile_knn_cuda.py measures the copy's rate by thread count).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ._arrays import check_int

# At most this many threads copy at once, and each takes at least SLICE_BYTES of the output:
# below that, starting the slices costs more than they save.
MAX_THREADS = 4
SLICE_BYTES = 16 << 20

POOL_THREADS = max(1, min(MAX_THREADS, os.cpu_count() or 1))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _copy_pool() -> ThreadPoolExecutor:
    """The module's thread pool of POOL_THREADS, made on first use (idle until needed)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="latentspace-copy")
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child inherits the pool object but none of its threads: work handed to it would
    # never run. The child makes a pool of its own on first use instead.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _copy_slice(destination: np.ndarray, source: np.ndarray) -> None:
    # errstate is per thread: values beyond float32 become inf here (refused later, by the
    # search's row check), without a RuntimeWarning from the worker.
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(destination, source, casting="unsafe")


def copy_rows(destination: np.ndarray, source: np.ndarray, threads: int | None = None) -> None:
    """np.copyto(destination, source, casting="unsafe") for two arrays of the same shape,
    rows first, split into slices of rows copied by up to `threads` threads at once (default:
    the pool's size). Values too large for destination's dtype become inf, without a warning."""
    if destination.shape != source.shape:
        raise ValueError(f"source: expected shape {destination.shape}, got {source.shape}")
    rows = destination.shape[0]
    most = POOL_THREADS if threads is None else check_int(threads, "threads")
    slices = max(1, min(most, rows, destination.nbytes // SLICE_BYTES))
    if slices == 1:
        _copy_slice(destination, source)
        return
    step = -(-rows // slices)
    pool = _copy_pool()
    futures = [pool.submit(_copy_slice, destination[i : i + step], source[i : i + step]) for i in range(0, rows, step)]
    wait(futures)  # every slice done (or failed) before the buffer is handed on
    for future in futures:
        future.result()  # re-raises a slice's error
