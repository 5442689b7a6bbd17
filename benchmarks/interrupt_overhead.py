"""What the Ctrl-C checks cost the CPU kernels (csrc/core/interrupt.h): best-of times of the
searches and norm checks whose units of work are smallest, for one build.

Run it under two builds (before and after a change to the checks), alternating processes a
few rounds, and compare: the machine's noise is larger than what the checks cost.

    python benchmarks/interrupt_overhead.py [threads]
"""

from __future__ import annotations

import json
import sys

import numpy as np

import latentspace
from latentspace import _native

from _timing import best_seconds


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    latentspace.set_num_threads(threads)
    rng = np.random.default_rng(0)
    times = {}
    for dim in (8, 128):
        database = rng.standard_normal((1_000_000, dim), dtype=np.float32)
        # 1 query: the row path; 16 and 64: small packed panels (a check per 16 panels); 1,024: large ones.
        for num_queries, repeats in ((1, 20), (16, 20), (64, 10), (1024, 3)):
            queries = rng.standard_normal((num_queries, dim), dtype=np.float32)
            distances = np.empty((num_queries, 10), np.float32)
            indices = np.empty((num_queries, 10), np.int64)
            times[f"knn D={dim} Q={num_queries}"] = best_seconds(
                lambda: _native.knn(queries, database, 10, 0, distances, indices, None), repeats)
        norms = np.empty(database.shape[0], np.float32)
        times[f"sq_norms D={dim}"] = best_seconds(lambda: _native.sq_norms(database, norms), 20)
    print(json.dumps({name: round(seconds * 1e3, 3) for name, seconds in times.items()}))


if __name__ == "__main__":
    main()
