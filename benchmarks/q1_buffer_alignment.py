"""One-query FlatIndex.search read rate against the buffer the vectors sit in (docs/benchmarks.md,
"Q = 1 and buffer alignment"). Not a pytest benchmark: an experiment that alternates buffers in one
process, because this VM's memory bandwidth jumps between ~33 and ~55 GB/s within minutes.

  python benchmarks/q1_buffer_alignment.py [rounds] [buffers] [json out]
  e.g. python benchmarks/q1_buffer_alignment.py 40 numpy,numpy64,huge,huge+16,4k /tmp/q1.json

Buffers (N = 1M x D = 128 float32, the same values in each):
  add(new)  what FlatIndex.add allocates now (cache-line aligned; 2 MiB aligned huge pages)
  numpy     np.empty: transparent huge pages, but 16 bytes past a cache line
  numpy64   np.empty, viewed from its first 64-byte boundary
  huge      latentspace's 2 MiB aligned MADV_HUGEPAGE allocation
  huge+16   the same, shifted by 16 bytes
  4k        np.empty with huge pages refused (MADV_NOHUGEPAGE)
Per round, in shuffled buffer order, at 2 and 1 threads (latentspace and torch alike): torch.sum
over the buffer (the read roof), search k = 10 and k = 100, torch.sum again; each figure the best
of 5 calls. A block during which other processes used the CPUs (from /proc/stat) is dropped.
Prints medians of search GB/s over the higher adjacent roof, by threads, k, window (2 threads:
fast when both roofs >= 45 GB/s, slow when < 40) and buffer.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from latentspace import FlatIndex, _native

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _q1_experiment import D, N, NBYTES, alternate, report  # noqa: E402

MADV_NOHUGEPAGE = 15


def aligned_view(flat: np.ndarray, align: int, extra: int) -> np.ndarray:
    start = (-flat.ctypes.data) % align // 4 + extra // 4
    return flat[start : start + N * D].reshape(N, D)


def make_buffer(name: str, source: np.ndarray) -> np.ndarray:
    if name == "add(new)":
        index = FlatIndex(D, "l2")
        index.add(source)
        return index._buffer
    if name == "4k":
        np._core.multiarray._set_madvise_hugepage(False)
        buffer = np.empty((N, D), np.float32)
        ctypes.CDLL(None).madvise(ctypes.c_void_p(buffer.ctypes.data & ~4095), ctypes.c_size_t(NBYTES + 8192),
                                  MADV_NOHUGEPAGE)
        np._core.multiarray._set_madvise_hugepage(True)
    elif name == "numpy":
        buffer = np.empty((N, D), np.float32)
    elif name == "numpy64":
        buffer = aligned_view(np.empty(N * D + 64, np.float32), 64, 0)
    elif name == "huge":
        buffer = _native.empty_huge_float32(N, D)
    elif name == "huge+16":
        buffer = aligned_view(_native.empty_huge_float32(N + 1, D).reshape(-1), 4096, 16)
    else:
        raise ValueError(f"buffers: unknown buffer {name!r}")
    buffer[:] = source
    return buffer


def measure(names: list[str], rounds: int) -> list[dict]:
    source = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
    indexes = {}
    for name in names:
        buffer = make_buffer(name, source)
        print(f"{name:8} address mod 64 = {buffer.ctypes.data % 64}, mod 2 MiB = {buffer.ctypes.data % (2 << 20)}")
        index = FlatIndex(D, "l2")
        index._buffer, index._ntotal = buffer, N  # the experiment's buffer, searched as the index's own
        indexes[name] = index
    del source
    query = np.random.default_rng(1).standard_normal((1, D), dtype=np.float32)
    expected = indexes[names[0]].search(query, 100)[1]
    assert all(np.array_equal(index.search(query, 100)[1], expected) for index in indexes.values())
    return alternate(rounds, names, lambda r, name, threads: (indexes[name]._buffer, [
        (dict(round=r, buffer=name, threads=threads, k=k), lambda k=k: indexes[name].search(query, k))
        for k in (10, 100)
    ]))


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["add(new)", "numpy", "numpy64", "huge", "huge+16"]
    records = measure(names, rounds)
    report(records, sys.argv[3] if len(sys.argv) > 3 else None, by="k", variant="buffer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
