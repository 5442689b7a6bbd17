"""Exact kNN: latentspace against faiss and torch, plus the machine's roofs, in one session.

Cells: metric in {l2, ip} x Q in {1, 8, 64, 1024} x k in {10, 100} over the Gaussian mixture of
conftest.py (N = 1,000,000 x D = 128 by default). Peers in each cell:

  latentspace.knn        latentspace.knn(queries, database, k, metric)
  latentspace.FlatIndex  FlatIndex(D, metric).search(queries, k), vectors added beforehand
  faiss                  faiss.IndexFlatL2 / IndexFlatIP .search(queries, k)
  torch                  blocked addmm + topk (TorchBlockedKnn below)

Every peer runs at 1 thread and at all cores; the report keeps each one's best. Before a
peer is timed, its answer is checked (float64 brute force on a sample of queries, faiss on
all of them), and so is every answer it returned while timed: a benchmark that measures a
wrong answer is worthless.

The roofs (SGEMM rate, memory read bandwidth) are measured in the same session, before and
after the cells, and recorded in the JSON's extra_info; benchmarks/report_knn.py turns it all
into tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest

import faiss
import latentspace
import torch
from _common import (
    READ_ROOFS,
    SGEMM_LIBRARIES,
    THREAD_COUNTS,
    again_after,
    measure_roof,
    read_rate_nearby,
    rounds_for,
    timed_call,
)

METRICS = ("l2", "ip")
QUERY_COUNTS = (1, 8, 64, 1024)
KS = (10, 100)
PEERS = ("latentspace.knn", "latentspace.FlatIndex", "faiss", "torch")
# Every peer at 1 thread and all cores (THREAD_COUNTS): on this 2-core machine some peers are
# faster with 1 (faiss at Q=1). Timing: one call per round, about BUDGET_S seconds of rounds,
# never fewer than MIN_ROUNDS (_common.py).


# ============================================================================================
# Roofs
# ============================================================================================
# Cases as (roof, library, threads): SGEMM at every thread count, then the read roofs.
ROOFS = [("sgemm", lib, t) for lib in SGEMM_LIBRARIES for t in THREAD_COUNTS] + READ_ROOFS
# After the cells, the roofs are measured again at all cores (the best case for both): the
# memory bandwidth of this VM drifts with its neighbours, so the report uses the higher.
ROOFS_AGAIN = again_after(ROOFS)


@pytest.mark.parametrize("roof,library,threads", ROOFS, ids=lambda v: f"{v}t" if isinstance(v, int) else v)
def test_roof_before(benchmark, roof, library, threads, set_threads, foreign_load):
    """SGEMM rate (roof of the compute-bound cells, Q >= 64) and memory read bandwidth (a sum
    over 1 GiB: roof of the memory-bound cells, Q = 1), before the kNN cells."""
    set_threads(threads)
    measure_roof(benchmark, foreign_load, roof, library, threads, "before")


# ============================================================================================
# The torch peer
# ============================================================================================
TORCH_BLOCK_ROWS = 65536
# Below this many queries the score GEMM is skinny and torch does better computing the
# transposed scores (rows, Q) = X_block @ q^T: MKL streams the database rows contiguously
# (measured ~1.5-2x faster at Q=8 here; no difference at Q=1, where MKL's GEMV reads only
# ~7 GB/s whatever the call). From Q = 64 on, (Q, rows) is the better GEMM shape, and topk
# runs along contiguous rows (along columns it is ~4x slower at Q=1024).
TORCH_ROW_MAJOR_BELOW_Q = 32


class TorchBlockedKnn:
    """Exact kNN in plain torch, written the way a careful user would.

    The database is scanned in blocks of TORCH_BLOCK_ROWS rows, which bounds the score
    buffer (Q x block floats) at N = 1M, Q = 1024. Per block: one GEMM for the scores (for
    l2, addmm folds in the database norms: |x|^2 - 2 q.x; |q|^2 is the same for every
    candidate of a query, so it is added to the k winners only), then an unsorted topk.
    A final sorted topk over the per-block winners gives the answer.

    Index state, prepared outside the timed region: the database norms. Per (Q, k), the
    score and candidate buffers are allocated on the first (untimed) call and reused.
    """

    def __init__(self, database: np.ndarray, metric: str, block_rows: int = TORCH_BLOCK_ROWS):
        self.x = torch.from_numpy(database)  # shares memory with the numpy array
        self.metric = metric
        self.largest = metric == "ip"  # ip: larger is better; l2: smaller is better
        self.block_rows = block_rows
        self.starts = range(0, self.x.shape[0], block_rows)
        with torch.inference_mode():
            self.x_sq_norms = torch.linalg.vector_norm(self.x, dim=1).square_()
        self._buffers: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def _buffers_for(self, nq: int, k: int):
        key = (nq, k)
        if key not in self._buffers:
            blocks = len(self.starts)
            worst = -math.inf if self.largest else math.inf  # unused slots never win
            with torch.inference_mode():
                scores = torch.empty(nq * self.block_rows)
                cand_d = torch.full((blocks, nq, k), worst)
                cand_i = torch.full((blocks, nq, k), -1, dtype=torch.int64)
            self._buffers[key] = (scores, cand_d, cand_i)
        return self._buffers[key]

    def search(self, queries: np.ndarray, k: int):
        q = torch.from_numpy(queries)
        nq = q.shape[0]
        scores, cand_d, cand_i = self._buffers_for(nq, k)
        row_major = nq < TORCH_ROW_MAJOR_BELOW_Q
        with torch.inference_mode():
            for j, start in enumerate(self.starts):
                xb = self.x[start : start + self.block_rows]
                rows = xb.shape[0]
                kb = min(k, rows)
                if row_major:
                    s = scores[: nq * rows].view(rows, nq)
                    self._block_scores(q.T, xb, start, s, row_major=True)
                    d, i = torch.topk(s, kb, dim=0, largest=self.largest, sorted=False)
                    cand_d[j, :, :kb] = d.T
                    cand_i[j, :, :kb] = i.T
                else:
                    s = scores[: nq * rows].view(nq, rows)
                    self._block_scores(q, xb, start, s, row_major=False)
                    torch.topk(s, kb, dim=1, largest=self.largest, sorted=False,
                               out=(cand_d[j, :, :kb], cand_i[j, :, :kb]))
                cand_i[j, :, :kb] += start
            # (blocks, nq, k) -> (nq, blocks * k): each query's candidates side by side.
            all_d = cand_d.permute(1, 0, 2).reshape(nq, -1)
            all_i = cand_i.permute(1, 0, 2).reshape(nq, -1)
            best_d, position = torch.topk(all_d, k, dim=1, largest=self.largest, sorted=True)
            best_i = all_i.gather(1, position)
            if self.metric == "l2":
                best_d += torch.linalg.vector_norm(q, dim=1, keepdim=True).square_()
        return best_d.numpy(), best_i.numpy()

    def _block_scores(self, q, xb, start, out, *, row_major: bool) -> None:
        """out = scores of the block: (rows, nq) if row_major (q is then q^T) else (nq, rows)."""
        if self.metric == "ip":
            if row_major:
                torch.mm(xb, q, out=out)
            else:
                torch.mm(q, xb.T, out=out)
            return
        norms = self.x_sq_norms[start : start + xb.shape[0]]
        if row_major:
            torch.addmm(norms[:, None], xb, q, alpha=-2, out=out)
        else:
            torch.addmm(norms, q, xb.T, alpha=-2, out=out)


# ============================================================================================
# Peers
# ============================================================================================
@pytest.fixture(scope="session")
def peers(dataset):
    """peers(metric) -> {peer name: search(queries, k) -> (distances, indices)}, built once."""

    @lru_cache(maxsize=None)
    def build(metric: str):
        database = dataset.database
        dim = database.shape[1]
        flat = latentspace.FlatIndex(dim, metric)
        flat.add(database)
        faiss_index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        faiss_index.add(database)
        torch_knn = TorchBlockedKnn(database, metric)
        return {
            "latentspace.knn": lambda q, k: latentspace.knn(q, database, k, metric=metric),
            "latentspace.FlatIndex": flat.search,
            "faiss": faiss_index.search,
            "torch": torch_knn.search,
        }

    return build


# ============================================================================================
# Is the answer right?
# ============================================================================================
TRUTH_ROWS = 64  # queries checked against a float64 brute-force scan (all are checked vs faiss)
# Float32 distances via |x|^2 - 2 q.x + |q|^2 over D = 128 terms can be off by up to ~D * eps
# (~1e-5) of the norms' scale; real errors are 10-100x smaller. Distances that differ by less
# than this are near-ties, which any peer may break either way.
RELATIVE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Truth:
    costs: np.ndarray  # (TRUTH_ROWS, max k) float64, ascending ("cost": l2 distance, or -ip)
    indices: np.ndarray


def to_costs(distances: np.ndarray, metric: str) -> np.ndarray:
    """Smaller-is-better view of a metric's values, so l2 and ip share one set of checks."""
    return distances if metric == "l2" else -distances


def exact_costs(queries: np.ndarray, database: np.ndarray, indices: np.ndarray, metric: str):
    """Float64 costs of the given neighbours, computed directly (no |x|^2 - 2 q.x + |q|^2)."""
    q = queries.astype(np.float64)[:, None, :]
    x = database[indices].astype(np.float64)  # (Q, k, D)
    if metric == "l2":
        return ((x - q) ** 2).sum(axis=2)
    return -(x * q).sum(axis=2)


def brute_force(queries: np.ndarray, database: np.ndarray, k: int, metric: str, block=65536):
    """Float64 exact top-k by a blocked scan, keeping the k best candidates per query."""
    q = queries.astype(np.float64)
    best_c = np.empty((len(q), 0))
    best_i = np.empty((len(q), 0), dtype=np.int64)
    for start in range(0, len(database), block):
        xb = database[start : start + block].astype(np.float64)
        c = -(q @ xb.T)
        if metric == "l2":  # float64 leaves ample precision for the expansion here
            c = 2 * c + (xb * xb).sum(1)[None, :] + (q * q).sum(1)[:, None]
        cat_c = np.concatenate([best_c, c], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(xb)), c.shape)], axis=1)
        keep = np.argpartition(cat_c, min(k, cat_c.shape[1]) - 1, axis=1)[:, :k]
        best_c = np.take_along_axis(cat_c, keep, 1)
        best_i = np.take_along_axis(cat_i, keep, 1)
    order = np.argsort(best_c, axis=1, kind="stable")
    return Truth(np.take_along_axis(best_c, order, 1), np.take_along_axis(best_i, order, 1))


class Referee:
    """Checks a peer's answer for one cell before that peer is timed.

    1. shapes and dtypes; indices in range and distinct within each row;
    2. the distances reported are those of the indices reported (vs float64 recomputation);
    3. each row is best first;
    4. rank by rank, the neighbours' float64 costs match the float64 brute force (first
       TRUTH_ROWS queries) and faiss (all queries) to within the near-tie tolerance, so a
       peer may break a near-tie differently but may not miss a neighbour.
    """

    def __init__(self, dataset, peers):
        self.database = dataset.database
        self.queries = dataset.queries
        self.peers = peers
        self.max_sq_norm = float(np.einsum("ij,ij->i", self.database, self.database).max())

    @lru_cache(maxsize=None)
    def truth(self, metric: str) -> Truth:
        return brute_force(self.queries[:TRUTH_ROWS], self.database, max(KS), metric)

    @lru_cache(maxsize=None)
    def faiss_costs(self, metric: str, nq: int, k: int) -> np.ndarray:
        _, indices = self.peers(metric)["faiss"](self.queries[:nq], k)
        return np.sort(exact_costs(self.queries[:nq], self.database, indices, metric), axis=1)

    def tolerance(self, queries: np.ndarray, metric: str) -> np.ndarray:
        q_sq = (queries.astype(np.float64) ** 2).sum(1)
        scale = q_sq + self.max_sq_norm if metric == "l2" else np.sqrt(q_sq * self.max_sq_norm)
        return RELATIVE_TOLERANCE * scale[:, None]

    def check(self, answer, metric: str, nq: int, k: int) -> dict:
        """Raises AssertionError if the answer is wrong; returns agreement figures if not."""
        distances, indices = answer
        queries = self.queries[:nq]
        assert distances.shape == indices.shape == (nq, k), (distances.shape, indices.shape)
        assert distances.dtype == np.float32 and indices.dtype == np.int64
        assert indices.min() >= 0 and indices.max() < len(self.database), "index out of range"
        assert (np.diff(np.sort(indices, axis=1), axis=1) != 0).all(), "repeated index in a row"

        tol = self.tolerance(queries, metric)
        reported = to_costs(distances.astype(np.float64), metric)
        costs = exact_costs(queries, self.database, indices, metric)
        _assert_within(reported, costs, tol, "reported distances vs float64 recomputation")
        assert (np.diff(reported, axis=1) >= -tol).all(), "rows are not sorted best first"

        sorted_costs = np.sort(costs, axis=1)
        rows = min(nq, TRUTH_ROWS)
        truth = self.truth(metric)
        _assert_within(sorted_costs[:rows], truth.costs[:rows, :k], tol[:rows], "vs float64 brute force")
        _assert_within(sorted_costs, self.faiss_costs(metric, nq, k), tol, "vs faiss")
        return {"same_indices_as_truth": _overlap(indices[:rows], truth.indices[:rows, :k])}


def _assert_within(actual, expected, tol, what: str) -> None:
    excess = np.abs(actual - expected) - tol
    if (excess > 0).any():
        row, col = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{what}: {(excess > 0).sum()} values off by more than the near-tie tolerance; "
            f"worst at query {row}, rank {col}: {actual[row, col]:.6g} vs {expected[row, col]:.6g} "
            f"(tolerance {tol[row, 0]:.3g})"
        )


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of neighbours shared by two (Q, k) index sets (near-ties may differ)."""
    shared = (a[:, :, None] == b[:, None, :]).any(axis=2)
    return float(shared.mean())


@pytest.fixture(scope="session")
def referee(dataset, peers):
    return Referee(dataset, peers)


# ============================================================================================
# The kNN benchmarks
# ============================================================================================
# Cell-major order: all peers and thread counts of one cell run back to back, so they see
# the same machine conditions as nearly as a sequential run allows.
CASES = [
    pytest.param(metric, nq, k, peer, threads, id=f"{metric}-Q{nq}-k{k}-{peer}-{threads}t")
    for metric in METRICS
    for nq in QUERY_COUNTS
    for k in KS
    for peer in PEERS
    for threads in THREAD_COUNTS
]


@pytest.mark.parametrize("metric,nq,k,peer,threads", CASES)
def test_knn(benchmark, metric, nq, k, peer, threads, dataset, peers, referee, set_threads, foreign_load):
    search = peers(metric)[peer]
    queries = dataset.queries[:nq]
    set_threads(threads)
    answer, seconds = timed_call(search, queries, k)  # also the warm-up
    agreement = referee.check(answer, metric, nq, k)  # wrong before timing: fail, time nothing

    n, d = dataset.database.shape
    benchmark.group = f"knn {metric} Q={nq} k={k}"
    benchmark.extra_info.update(
        kind="knn", peer=peer, metric=metric, q=nq, k=k, n=n, d=d, threads=threads,
        flops=2 * nq * n * d, bytes=n * d * 4, verified=False, **agreement,
    )
    answers = []

    def search_and_keep(q, k):  # keeping a reference costs ~100 ns, the same for every peer
        answers.append(search(q, k))

    memory_bound = nq < MEMORY_BOUND_BELOW_Q
    if memory_bound:
        read_before = read_rate_nearby(dataset.database, set_threads, threads)
    with foreign_load:
        benchmark.pedantic(
            search_and_keep, args=(queries, k), rounds=rounds_for(seconds), iterations=1,
            warmup_rounds=1 if seconds < 0.1 else 0,
        )
    benchmark.extra_info["foreign_cpus"] = foreign_load.cpus
    if memory_bound:
        read_after = read_rate_nearby(dataset.database, set_threads, threads)
        benchmark.extra_info["read_gbs_nearby"] = max(read_before, read_after)
    # A fast round that skipped work would flatter the peer: check every timed answer too.
    for unique_answer in _distinct(answers):
        referee.check(unique_answer, metric, nq, k)
    benchmark.extra_info["verified"] = True


MEMORY_BOUND_BELOW_Q = 64  # these cells are also held to a read rate measured right beside them


def _distinct(answers):
    """The distinct (distances, indices) among the answers (usually one)."""
    seen = {}
    for distances, indices in answers:
        seen.setdefault(hash((distances.tobytes(), indices.tobytes())), (distances, indices))
    return seen.values()


# ============================================================================================
# Roofs again, after the cells
# ============================================================================================
@pytest.mark.parametrize("roof,library,threads", ROOFS_AGAIN, ids=lambda v: f"{v}t" if isinstance(v, int) else v)
def test_roof_after(benchmark, roof, library, threads, set_threads, foreign_load):
    set_threads(threads)
    measure_roof(benchmark, foreign_load, roof, library, threads, "after")
