"""Exact kNN against the other exact searches a user may reach for: hnswlib's brute-force
index and scikit-learn's brute-force NearestNeighbors, beside latentspace and faiss.

    python -m pytest benchmarks/bench_knn_more_peers.py --benchmark-json=more_peers.json
    python benchmarks/report_knn_more_peers.py more_peers.json

Cells: metric in {l2, ip} x Q in {1, 64, 1024}, k = 10, over bench_knn.py's dataset (the
Gaussian mixture of conftest.py, N = 1,000,000 x D = 128 by default; LATENTSPACE_BENCH_N for a
quick run). Peers:

  latentspace.knn        latentspace.knn(queries, database, k, metric)
  latentspace.FlatIndex  FlatIndex(D, metric).search(queries, k)
  faiss                  faiss.IndexFlatL2 / IndexFlatIP .search(queries, k)
  hnswlib.BFIndex        hnswlib.BFIndex(space="l2" / "ip").knn_query(queries, k, num_threads)
  sklearn.brute          NearestNeighbors(algorithm="brute").kneighbors(queries, k) (l2 only:
                         scikit-learn has no inner-product neighbours); it returns
                         Euclidean distances, squared here outside the timed call

(hnswlib's HNSW graph is approximate and not a peer of an exact search.) Each peer runs at 1
thread and all cores; bench_knn.py's Referee checks every answer (float64 brute force and
faiss) before and after timing.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from _common import THREAD_COUNTS, rounds_for, timed_call
from bench_knn import Referee, _distinct, peers  # noqa: F401 (peers: bench_knn.py's fixture, reused)

hnswlib = pytest.importorskip("hnswlib")
neighbors = pytest.importorskip("sklearn.neighbors")
threadpoolctl = pytest.importorskip("threadpoolctl")

METRICS = ("l2", "ip")
QUERY_COUNTS = (1, 64, 1024)
K = 10
PEERS = ("latentspace.knn", "latentspace.FlatIndex", "faiss", "hnswlib.BFIndex", "sklearn.brute")


class HnswlibBruteForce:
    """hnswlib.BFIndex in faiss's answer format: its "ip" space reports 1 - q.x."""

    def __init__(self, database: np.ndarray, metric: str):
        self.metric = metric
        self.index = hnswlib.BFIndex(space=metric, dim=database.shape[1])
        self.index.init_index(max_elements=len(database))
        self.index.add_items(database)
        self.threads = 1

    def search(self, queries: np.ndarray, k: int):
        labels, distances = self.index.knn_query(queries, k=k, num_threads=self.threads)
        if self.metric == "ip":
            distances = (1.0 - distances.astype(np.float64)).astype(np.float32)
        return distances, labels.astype(np.int64)


class SklearnBruteForce:
    """NearestNeighbors(algorithm="brute"): Euclidean distances, squared for the referee.
    Its threads are OpenMP's and BLAS's, set with threadpoolctl (n_jobs does not reach them)."""

    def __init__(self, database: np.ndarray):
        self.model = neighbors.NearestNeighbors(algorithm="brute", metric="euclidean").fit(database)
        self.threads = 1

    def search(self, queries: np.ndarray, k: int):
        with threadpoolctl.threadpool_limits(limits=self.threads):
            distances, indices = self.model.kneighbors(queries, n_neighbors=k)
        return distances, indices


def squared(answer):
    """sklearn's Euclidean distances as squared float32 ones, as every other peer reports."""
    distances, indices = answer
    return np.square(distances.astype(np.float64)).astype(np.float32), indices.astype(np.int64)


@pytest.fixture(scope="session")
def more_peers(dataset, peers):
    """more_peers(metric) -> {peer: search(queries, k), or an object with search and a threads
    setting}: bench_knn.py's latentspace and faiss peers, then the two brute-force searches."""

    @lru_cache(maxsize=None)
    def build(metric: str):
        found = {name: peers(metric)[name] for name in ("latentspace.knn", "latentspace.FlatIndex", "faiss")}
        found["hnswlib.BFIndex"] = HnswlibBruteForce(dataset.database, metric)
        if metric == "l2":
            found["sklearn.brute"] = SklearnBruteForce(dataset.database)
        return found

    return build


@pytest.fixture(scope="session")
def more_referee(dataset, more_peers):
    return Referee(dataset, more_peers)


CASES = [
    pytest.param(metric, nq, peer, threads, id=f"{metric}-Q{nq}-k{K}-{peer}-{threads}t")
    for metric in METRICS
    for nq in QUERY_COUNTS
    for peer in PEERS
    for threads in THREAD_COUNTS
]


@pytest.mark.parametrize("metric,nq,peer,threads", CASES)
def test_knn_more_peers(benchmark, metric, nq, peer, threads, dataset, more_peers, more_referee, set_threads,
                        foreign_load):
    found = more_peers(metric)
    if peer not in found:
        pytest.skip(f"{peer} has no {metric} search")
    searcher = found[peer]
    set_threads(threads)  # latentspace, faiss, torch
    if hasattr(searcher, "threads"):
        searcher.threads = threads
    search = searcher.search if hasattr(searcher, "search") else searcher
    queries = dataset.queries[:nq]
    answer, seconds = timed_call(search, queries, K)  # also the warm-up
    convert = squared if peer == "sklearn.brute" else (lambda a: a)
    agreement = more_referee.check(convert(answer), metric, nq, K)

    n, d = dataset.database.shape
    benchmark.group = f"knn {metric} Q={nq} k={K}"
    benchmark.extra_info.update(kind="knn", peer=peer, metric=metric, q=nq, k=K, n=n, d=d, threads=threads,
                                flops=2 * nq * n * d, bytes=n * d * 4, verified=False, **agreement)
    answers = []

    def search_and_keep(q, k):
        answers.append(search(q, k))

    with foreign_load:
        benchmark.pedantic(search_and_keep, args=(queries, K), rounds=rounds_for(seconds), iterations=1,
                           warmup_rounds=1 if seconds < 0.1 else 0)
    benchmark.extra_info["foreign_cpus"] = foreign_load.cpus
    for unique_answer in _distinct(answers):
        more_referee.check(convert(unique_answer), metric, nq, K)
    benchmark.extra_info["verified"] = True
