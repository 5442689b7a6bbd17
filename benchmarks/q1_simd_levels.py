"""Few-query FlatIndex.search read rate at each SIMD level (docs/benchmarks.md, "Q = 1:
256-bit row path" and "Row path or packed path"). Not a pytest benchmark: an experiment that alternates SIMD levels in one
process, because this VM's memory bandwidth jumps between ~33 and ~60 GB/s within minutes.

  python benchmarks/q1_simd_levels.py [rounds] [levels] [json out] [query counts]
  e.g. python benchmarks/q1_simd_levels.py 40 avx512,avx2 /tmp/levels.json
       python benchmarks/q1_simd_levels.py 12 avx512,avx2 "" 7,8,10,12,16

N = 1M x D = 128 float32 in a FlatIndex (L2), k = 10, queries Q = 1 and Q = 3 (the row path) or
the counts given.
Per round, in shuffled level order, at 2 and 1 threads (latentspace and torch alike): torch.sum
over the index's buffer (the read roof), then per Q the search at that level and torch.sum again;
each figure the best of 5 calls. A block during which other processes used the CPUs (from
/proc/stat) is dropped. Prints medians of search GB/s (N*D*4 bytes) over the higher adjacent
roof, by threads, Q, window (2 threads: fast when both roofs >= 45 GB/s, slow when < 40) and level.
"""

from __future__ import annotations

import sys

import numpy as np

import latentspace
from latentspace import FlatIndex

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _q1_experiment import D, N, alternate, report  # noqa: E402

K = 10


def measure(levels: list[str], rounds: int, query_counts: tuple[int, ...] = (1, 3)) -> list[dict]:
    index = FlatIndex(D, "l2")
    index.add(np.random.default_rng(0).standard_normal((N, D), dtype=np.float32))
    queries = {q: np.random.default_rng(q).standard_normal((q, D), dtype=np.float32) for q in query_counts}
    default_level = latentspace.simd_level()
    database64 = index._buffer.astype(np.float64)
    for q, x in queries.items():  # every level must find the true k nearest distances before it is timed
        x64 = x.astype(np.float64)
        exact = ((database64**2).sum(1)[None, :] - 2 * x64 @ database64.T + (x64**2).sum(1)[:, None])
        truth = np.sort(np.partition(exact, K, axis=1)[:, :K], axis=1)
        for level in levels:
            latentspace.set_simd_level(level)
            distances = index.search(x, K)[0]
            assert np.allclose(distances, truth, rtol=1e-4, atol=1e-2), f"{level} is wrong at Q = {q}"
        latentspace.set_simd_level(default_level)
    del database64

    def search_at(level: str, q: int) -> None:
        latentspace.set_simd_level(level)
        try:
            index.search(queries[q], K)
        finally:
            latentspace.set_simd_level(default_level)

    return alternate(rounds, levels, lambda r, level, threads: (index._buffer, [
        (dict(round=r, level=level, threads=threads, q=q), lambda q=q: search_at(level, q))
        for q in query_counts
    ]))


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    supported = latentspace.build_info()["hardware_simd_level"]
    levels = sys.argv[2].split(",") if len(sys.argv) > 2 else (["avx512", "avx2"] if supported == "avx512"
                                                                 else ["avx2", "scalar"])
    counts = tuple(int(q) for q in sys.argv[4].split(",")) if len(sys.argv) > 4 else (1, 3)
    records = measure(levels, rounds, counts)
    report(records, (sys.argv[3] or None) if len(sys.argv) > 3 else None, by="q", variant="level")
    return 0


if __name__ == "__main__":
    sys.exit(main())
