"""Recall of latentspace.knn (l2) against float64 as the data move away from the origin, as it
is and after centring: the table in docs/knn.md, "Accuracy of l2 far from the origin".

Usage: python benchmarks/l2_offset_accuracy.py   (a few seconds on the CPU)
"""

from __future__ import annotations

import numpy as np

import latentspace

OFFSETS = (0, 100, 300, 1_000, 3_000)
ROWS, QUERIES, DIM, K = 2_000, 200, 8, 10


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def main() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    near = base[:QUERIES] + 0.1 * rng.standard_normal((QUERIES, DIM)).astype(np.float32)
    print(f"{ROWS:,} x {DIM} standard normal rows, {QUERIES} queries near them, k = {K}: recall@{K} against float64")
    print(f"{'offset':>8} {'as it is':>9} {'centred':>8}")
    for offset in OFFSETS:
        x, q = base + np.float32(offset), near + np.float32(offset)
        exact = ((q.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1)
        truth = np.argsort(exact, axis=1, kind="stable")[:, :K]
        _, plain = latentspace.knn(q, x, K)
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        _, centred = latentspace.knn(q - mean, x - mean, K)
        print(f"{offset:>8,} {recall(plain, truth):>9.3f} {recall(centred, truth):>8.3f}")


if __name__ == "__main__":
    main()
