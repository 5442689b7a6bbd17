"""Where the CPU kNN should switch from the row path to the packed path (docs/benchmarks.md,
"Row path or packed path"). Not a pytest benchmark: an experiment that alternates the two paths
in one process, because this VM's memory bandwidth jumps between ~33 and ~60 GB/s within minutes.

  python benchmarks/row_cutoff.py [rounds] [SIMD level] [json out]
  e.g. python benchmarks/row_cutoff.py 16 avx2 /tmp/cutoff.json

N = 1M x D = 128 float32 in a FlatIndex (L2), k = 10, Q = 1 to 8 queries, at the given SIMD level
(default: the level in use; the row path is the same at avx2 and avx512, the packed path not). Variants: "rows" (every batch of up to 8 queries on the row path) and "packed" (every
batch packed), set with latentspace._native._set_row_query_limit (8, 0). Per round, in shuffled
variant order, at 2 and 1 threads: torch.sum over the index's buffer (the read roof), then per Q
the search and torch.sum again; each figure the best of 5 calls. A block during which other
processes used the CPUs (from /proc/stat) is dropped. Prints medians of search GB/s (N*D*4
bytes per search: both paths read the database once for up to 8 queries) over the higher
adjacent roof, by threads, Q, window and variant: per Q, the faster variant is the path to take.
"""

from __future__ import annotations

import sys

import numpy as np

import latentspace
from latentspace import FlatIndex, _native

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _q1_experiment import D, N, alternate, report  # noqa: E402

QUERY_COUNTS = tuple(range(1, 9))
K = 10
LIMITS = {"rows": 8, "packed": 0}


def measure(rounds: int) -> list[dict]:
    index = FlatIndex(D, "l2")
    index.add(np.random.default_rng(0).standard_normal((N, D), dtype=np.float32))
    queries = {q: np.random.default_rng(q).standard_normal((q, D), dtype=np.float32) for q in QUERY_COUNTS}
    try:
        for q, x in queries.items():  # both paths must agree before either is timed
            answers = []
            for limit in LIMITS.values():
                _native._set_row_query_limit(limit)
                answers.append(index.search(x, K))
            # (indices may swap on near-ties: the paths sum in different orders)
            assert np.allclose(answers[0][0], answers[1][0], rtol=1e-5), f"the paths disagree at Q = {q}"

        def search_on(path: str, q: int) -> None:
            _native._set_row_query_limit(LIMITS[path])
            index.search(queries[q], K)

        return alternate(rounds, list(LIMITS), lambda r, path, threads: (index._buffer, [
            (dict(round=r, path=path, threads=threads, q=q), lambda q=q: search_on(path, q))
            for q in QUERY_COUNTS
        ]))
    finally:
        _native._set_row_query_limit(-1)


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    if len(sys.argv) > 2:
        latentspace.set_simd_level(sys.argv[2])
    print(f"SIMD level {latentspace.simd_level()}")
    records = measure(rounds)
    report(records, sys.argv[3] if len(sys.argv) > 3 else None, by="q", variant="path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
