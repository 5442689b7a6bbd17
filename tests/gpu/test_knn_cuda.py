"""latentspace.knn and FlatIndex on a CUDA GPU (csrc/cuda/knn.cu through _cuda_search.py).

Marked "cuda": skipped where no usable GPU is visible (latentspace.cuda_available()). Run on
a GPU machine with `pytest -m cuda tests/gpu`; benchmarks/gpu_run.sh runs them, and runs the
tests named "small" again under compute-sanitizer (memcheck, racecheck).

Large searches are checked against a float64 reference computed on the GPU for a sample of
queries (every row is checked for shape, padding, order and ties); small ones against
tests/conftest.py's assert_knn_matches on all rows.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import latentspace
from conftest import METRICS, assert_knn_matches, reference_knn
from latentspace import _cuda_chunks, _cuda_search, _native

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not latentspace.cuda_available(), reason="no usable CUDA GPU (latentspace.cuda_available())"),
]

PAD = {"l2": np.inf, "ip": -np.inf, "cosine": -np.inf}
DEVICE = "cuda"


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, device=DEVICE)


def _integers(rng, *shape, high=2):
    return rng.integers(-high, high + 1, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------
# A float64 reference on the GPU, for searches too large for conftest's numpy reference


def _scores64(queries, database, metric):
    """(S, N) float64 scores, conftest.reference_scores's formulas, on the GPU."""
    q, x = queries.double(), database.double()
    if metric == "l2":
        return ((q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * (q @ x.T)).clamp_(min=0.0)
    if metric == "ip":
        return q @ x.T
    qn, xn = q.norm(dim=1), x.norm(dim=1)
    qs = torch.where(qn > 0, 1.0 / qn, torch.zeros_like(qn))
    xs = torch.where(xn > 0, 1.0 / xn, torch.zeros_like(xn))
    return (q @ x.T) * qs[:, None] * xs[None, :]


def _tolerance(queries, database, metric):
    """conftest.knn_tolerance, on the GPU."""
    q_sq = float(queries.double().square().sum(1).max())
    x_sq = float(database.double().square().sum(1).max())
    if metric == "l2":
        return 1e-5 * (q_sq + x_sq) + 1e-12
    if metric == "ip":
        return 1e-5 * np.sqrt(q_sq) * np.sqrt(x_sq) + 1e-12
    return 2e-6 * max(1.0, np.sqrt(queries.shape[1]) / 8.0)


def assert_matches_reference(D, I, queries, database, k, metric, *, sample=24):
    """conftest.assert_knn_matches's checks (a)-(e), (g) for a GPU result: every row for
    shape, dtype, padding, validity, order and ties; a sample of rows (first, last, random)
    against the float64 reference. (The native kernel's own output passes the same checks:
    it clamps cosine to [-1, 1] itself.)"""
    nq, n = queries.shape[0], database.shape[0]
    assert D.shape == (nq, k) and I.shape == (nq, k), (D.shape, I.shape)
    assert D.dtype == torch.float32 and I.dtype == torch.int64
    if nq == 0:
        return
    kept = min(k, n)
    if k > n:  # (d)
        assert (I[:, kept:] == -1).all(), "padding indices must be -1"
        assert (D[:, kept:] == PAD[metric]).all(), "padding distances must be +-inf"
    Dk, Ik = D[:, :kept], I[:, :kept]
    assert ((Ik >= 0) & (Ik < n)).all(), "index out of range"  # (c)
    if kept > 1:
        ordered = Ik.sort(dim=1).values
        assert (ordered[:, 1:] != ordered[:, :-1]).all(), "duplicate index in a row"
    assert torch.isfinite(Dk).all(), "non-finite distance"
    if metric == "l2":  # (g)
        assert (Dk >= 0).all()
    elif metric == "cosine":
        assert ((Dk >= -1) & (Dk <= 1)).all(), "cosine similarity outside [-1, 1]"
    if kept > 1:  # (e)
        a, b = Dk[:, :-1], Dk[:, 1:]
        better = a < b if metric == "l2" else a > b
        assert (better | (a == b)).all(), "row not sorted best first"
        tie = a == b
        assert (Ik[:, :-1][tie] < Ik[:, 1:][tie]).all(), "equal distances must list the lower index first"
    rows = torch.unique(torch.linspace(0, nq - 1, min(nq, sample)).round().long()).to(queries.device)
    scores = _scores64(queries[rows], database, metric)
    key = scores if metric == "l2" else -scores
    order = torch.sort(key, dim=1, stable=True).indices[:, :kept]
    ref = scores.gather(1, order)
    atol = _tolerance(queries, database, metric)
    diff = (Dk[rows].double() - ref).abs()  # (a)
    assert (diff <= atol).all(), f"distances off the reference by {float(diff.max()):.3g} (atol {atol:.3g})"
    true = scores.gather(1, Ik[rows])  # (b)
    diff = (true - ref).abs()
    assert (diff <= atol).all(), f"a returned index's true score is off by {float(diff.max()):.3g} (atol {atol:.3g})"


# ---------------------------------------------------------------------------------------
# Against the reference: every metric x N x D, each with Q in {1, 7, 1000} and every k


KS = (1, 10, 100, 1024, 4096, 16384)


@pytest.fixture(params=["separate", "fused"])
def finish(request, monkeypatch):
    """Both finishes of a search (csrc/cuda/knn_finish.cuh): merge, CUB sort and decode
    (LATENTSPACE_CUDA_FUSED_FINISH=0), and the fused kernel (the default; k > 1024 and a tree
    merge take the separate one). "fused" turns the large-k plan off
    (LATENTSPACE_CUDA_TREE_MERGE=0), whose tree merge would take the separate finish for few
    queries at k up to 1024; "separate" leaves it as it is by default."""
    monkeypatch.setenv("LATENTSPACE_CUDA_FUSED_FINISH", "1" if request.param == "fused" else "0")
    if request.param == "fused":
        monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    return request.param


# The tree merge's settings: the tree, and no split rule, so that splits are many (as for a
# large k) even where the default rule would keep them few.
TREE = {"LATENTSPACE_CUDA_TREE_MERGE": "1", "LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR": "0"}
WARP = {"LATENTSPACE_CUDA_WARP_CUT_BACKS": "1"}
# The split rule's plans, no large-k plan. Why: by default (since run 9) a large k over few
# queries takes the large-k plan, whose splits are at most a few hundred rows, often no more
# than k, so its lists are never cut back: no threshold to set, share or compare with, and
# the thresholds' and cut-backs' tests would compare two runs that never reach them.
RULE_PLAN = {"LATENTSPACE_CUDA_TREE_MERGE": "0"}
# Thresholds per split and the split rule at 1024 rows per neighbour (a few long splits even
# at k = 10, so lists fill and are cut back mid-split). Thresholds shared by default (auto:
# the tile scan of several splits) run the opt-in family's kernels, which always compare
# scores as floats first: with them on, "float thresholds off" would run those same kernels.
FLOAT_PLAN = {**RULE_PLAN, "LATENTSPACE_CUDA_SHARED_THRESHOLDS": "0", "LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR": "1024"}
OPT_INS = {"shared": {"LATENTSPACE_CUDA_SHARED_THRESHOLDS": "1", **RULE_PLAN}, "tree": TREE,
           "warp": {**WARP, **RULE_PLAN}, "float": {"LATENTSPACE_CUDA_FLOAT_THRESHOLDS": "1", **FLOAT_PLAN},
           "shared+tree": {"LATENTSPACE_CUDA_SHARED_THRESHOLDS": "1", **TREE},
           "shared+warp": {"LATENTSPACE_CUDA_SHARED_THRESHOLDS": "1", **WARP, **RULE_PLAN}}
# The shapes of the opt-ins' equality tests (nq, n, dim, k[, precision]) and, for the opt-in
# integer test, the database rows and k: module constants so that the CPU tests check on the
# host that each reaches the path it is there for under its settings
# (tests/test_cuda_search.py, test_gpu_opt_in_tests_reach_their_paths).
SHARED_SHAPES = [(1, 200_000, 16, 10), (5, 100_003, 48, 300), (130, 300_000, 16, 100), (257, 60_000, 64, 1024),
                 (300, 50_000, 8, 2000), (129, 700, 16, 800), (257, 200_000, 16, 1024), (3, 20_000, 16, 10),
                 (130, 20_000, 16, 100)]
# ... also searched in the default plan, the large-k plan: 174 splits of 1,152 rows (more than
# k: cut back at each split's end), 522 blocks, so later waves start with the bound.
SHARED_LARGE_K_SHAPES = [(257, 200_000, 16, 1024)]
WARP_SHAPES = [(300, 50_000, 16, 1024, "fp32"), (257, 200_000, 16, 1024, "fp32"), (200, 30_000, 8, 5, "fp32"),
               (129, 3000, 16, 3001, "fp32"), (129, 5000, 16, 700, "fp32"), (300, 50_000, 64, 100, "bf16"),
               (300, 50_000, 64, 100, "tf32"), (300, 50_000, 64, 100, "bf16 wmma"), (130, 20_000, 16, 100, "fp32")]
FLOAT_SHAPES = [(300, 50_003, 16, 10, "fp32"), (130, 20_000, 33, 100, "fp32"), (257, 60_000, 64, 1024, "fp32"),
                (129, 700, 16, 800, "fp32"), (300, 50_003, 64, 10, "bf16"), (300, 50_003, 64, 100, "tf32"),
                (200, 30_000, 64, 50, "fp16")]
OPT_IN_INTEGER_ROWS, OPT_IN_INTEGER_KS = 150_001, (1, 64, 1500)


@pytest.fixture(params=["single", "tree"])
def merge(request, monkeypatch):
    """Both merges of the splits' lists: one block per query (LATENTSPACE_CUDA_TREE_MERGE=0,
    the split rule's plans only), and the tree (LATENTSPACE_CUDA_TREE_MERGE=1,
    csrc/cuda/knn_merge_tree.cuh), here with the split rule off
    (LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR=0) so that splits are many."""
    if request.param == "tree":
        for variable, value in TREE.items():
            monkeypatch.setenv(variable, value)
    else:
        monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
        monkeypatch.delenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", raising=False)
    return request.param


@pytest.fixture(params=["split", "shared", "shared+warp"])
def thresholds(request, monkeypatch):
    """The ways a query's database splits keep their lists (csrc/cuda/knn_scan.cuh): each its
    own threshold, cut back by the block (LATENTSPACE_CUDA_SHARED_THRESHOLDS=0); thresholds
    shared through the workspace everywhere (=1; by default only where a query has several
    splits in the tile scan); and those with cut-backs by warps as well
    (LATENTSPACE_CUDA_WARP_CUT_BACKS=1, opt-in): the opt-in family with all it has."""
    monkeypatch.setenv("LATENTSPACE_CUDA_SHARED_THRESHOLDS", "0" if request.param == "split" else "1")
    monkeypatch.setenv("LATENTSPACE_CUDA_WARP_CUT_BACKS", "1" if request.param == "shared+warp" else "0")
    return request.param


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n", [1, 100, 100_003])
@pytest.mark.parametrize("dim", [1, 3, 128, 2048])
def test_knn_matches_reference(metric, n, dim, gen):
    database = _randn(gen, n, dim)
    queries = _randn(gen, 1000, dim)
    for nq in (1, 7, 1000):
        q = queries[:nq]
        for k in KS + (n + 3,):
            if nq * k > 20_000_000:
                continue  # 1000 x (100,003 + 3): 1.2 GB of results, chunked to 2 queries a call
            D, I = latentspace.knn(q, database, k, metric)
            assert D.device == q.device and I.device == q.device
            assert_matches_reference(D, I, q, database, k, metric)
            if n <= 100 and nq <= 7:
                assert_knn_matches(D, I, q, database, k, metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_default_workspace_takes_one_call_where_it_fits_the_free_memory(metric, gen, monkeypatch):
    """1,000 queries at k = 16,384 over 200,000 rows: one call needs 1.9 GiB (the large-k plan
    of 8 query tiles; plan_for's host arithmetic), so without workspace_bytes the search takes
    one call (_cuda_chunks.default_workspace_bytes, where the GPU has 8 x 1.9 GiB free), and
    two under an explicit 1 GiB; the k best keys are the same, so are the results, bit for
    bit, for knn and a FlatIndex."""
    if _cuda_search.CudaBackend(torch.device(DEVICE, torch.cuda.current_device())).free_bytes() < 16 << 30:
        pytest.skip("the GPU has less than 16 GiB free: the default bound would stay near 1 GiB")
    spy = _Spy(monkeypatch)
    database, queries = _randn(gen, 200_000, 16), _randn(gen, 1000, 16)
    index = latentspace.FlatIndex(16, metric, device=DEVICE)
    index.add(database)
    results = {}
    for bound in (None, 1 << 30):
        spy.calls.clear()
        results[bound] = (latentspace.knn(queries, database, 16384, metric, workspace_bytes=bound),
                          index.search(queries, 16384, workspace_bytes=bound))
        assert len(spy.calls) == (2 if bound is None else 4), len(spy.calls)  # knn's calls, then the index's
        assert all(call[10] <= (8 << 30 if bound is None else bound) for call in spy.calls)
    for (d0, i0), (d1, i1) in zip(results[None], results[1 << 30]):
        assert torch.equal(i0, i1) and torch.equal(d0, d1)
    assert_matches_reference(*results[None][0], queries, database, 16384, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_deep_rows_take_more_splits_with_the_same_results(metric, gen, monkeypatch):
    """Rows of 1,024 dimensions: the split rule of 4 rows per neighbour (32 * 128 / 1,024,
    knn_plan.cuh) gives 2,000 queries over 8,192 rows at k = 32 more splits than the rule of
    32 did (32 against 8 on 132 multiprocessors; at 1,000 queries the rule of 32 leaves too few
    blocks and the large-k plan takes 32 too); the k best keys are the same, so the results are
    bit for bit (knn, a FlatIndex), and the workspace asked with the search's dim is the one
    the search checks it was given."""
    monkeypatch.delenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", raising=False)
    device = torch.cuda.current_device()
    deep, plain = (_native._cuda_plan(2000, 8192, 32, device, None, dim) for dim in (1024, 0))
    assert deep["splits"] > plain["splits"], (deep, plain)
    queries, database = _randn(gen, 2000, 1024), _randn(gen, 8192, 1024)
    searches = _knn_and_index(queries, database, 32, metric)
    results = searches()
    monkeypatch.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "32")
    for (d0, i0), (d1, i1) in zip(results, searches()):
        assert torch.equal(i0, i1) and torch.equal(d0, d1)
    assert_matches_reference(*results[0], queries, database, 32, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [3, 300])
def test_k_past_16384_matches_reference(metric, nq, gen):
    """k = 65,536 of 200,003 rows: past the 16,384 the issue names (the benchmark's large-k
    cells time it), a selection that keeps a third of the rows, not all of them (as k = n + 3
    in test_knn_matches_reference does): the large-k plan, its lists merged as a tree over
    levels that select (521 splits of 384 rows for 3 queries; 174 of 1,152 rows for 300, in
    one call of 955 MB of workspace: plan_for's host arithmetic)."""
    database, queries = _randn(gen, 200_003, 16), _randn(gen, nq, 16)
    D, I = latentspace.knn(queries, database, 65_536, metric)
    assert_matches_reference(D, I, queries, database, 65_536, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", [(1, 1, 1, 1), (7, 100, 3, 10), (5, 300, 33, 40), (3, 64, 17, 70),
                                        (7, 129, 128, 128), (2, 5, 2048, 3)])
def test_small_knn_matches_reference(metric, nq, n, dim, k, rng, finish, thresholds):
    # Small shapes at tile edges (64), for compute-sanitizer too (-k small).
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    database = rng.standard_normal((n, dim)).astype(np.float32)
    D, I = latentspace.knn(torch.from_numpy(queries).to(DEVICE), torch.from_numpy(database).to(DEVICE), k, metric)
    assert_knn_matches(D, I, queries, database, k, metric)
    D2, I2 = latentspace.knn(queries, database, k, metric, device=DEVICE)  # streamed from the host
    assert isinstance(D2, np.ndarray)
    np.testing.assert_array_equal(I2, I.cpu().numpy())
    np.testing.assert_array_equal(D2, D.cpu().numpy())


# ---------------------------------------------------------------------------------------
# Ties, zero vectors, exact arithmetic


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k", [(50, 10), (20_000, 100), (20_000, 2000), (100_003, 16384)])
def test_identical_rows_tie_to_lower_index(metric, n, k, gen, finish, thresholds):
    # Identical rows across tiles, database splits and the split merge.
    vector = _randn(gen, 1, 24)
    database = vector.repeat(n, 1)
    queries = _randn(gen, 5, 24)
    D, I = latentspace.knn(queries, database, k, metric)
    assert (I == torch.arange(k, device=DEVICE)).all()
    assert (D == D[:, :1]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_small_interleaved_duplicates_tie_to_lower_index(metric, gen, finish):
    a, b = _randn(gen, 1, 40), _randn(gen, 1, 40)
    database = torch.cat([a, b] * 40)
    D, I = latentspace.knn(a * 2.0, database, 45, metric)
    assert I[0, :40].tolist() == list(range(0, 80, 2))
    assert I[0, 40:].tolist() == list(range(1, 10, 2))


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("n", [100, 5000, 70_001])
@pytest.mark.parametrize("k", [1, 10, 100, 5000, 70_004])
def test_integer_data_equals_the_cpu_exactly(metric, n, k, rng, finish):
    # Small integers: every distance is exact in float32 on both devices, with ties
    # everywhere, so indices and distances must equal the CPU search's bit for bit.
    queries, database = _integers(rng, 50, 3), _integers(rng, n, 3)
    D0, I0 = latentspace.knn(queries, database, k, metric)
    D, I = latentspace.knn(queries, database, k, metric, device=DEVICE)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(D, D0)
    Dt, It = latentspace.knn(torch.from_numpy(queries).to(DEVICE), torch.from_numpy(database).to(DEVICE), k, metric)
    np.testing.assert_array_equal(It.cpu().numpy(), I0)
    np.testing.assert_array_equal(Dt.cpu().numpy(), D0)


@pytest.mark.parametrize("k", [1, 7, 30, 35])
def test_small_cosine_zero_query(k, gen):
    database = _randn(gen, 30, 16)
    D, I = latentspace.knn(torch.zeros(3, 16, device=DEVICE), database, k, "cosine")
    kept = min(k, 30)
    assert not torch.isnan(D).any()
    assert (I[:, :kept] == torch.arange(kept, device=DEVICE)).all()
    assert (D[:, :kept] == 0).all()
    assert not torch.signbit(D[:, :kept]).any(), "similarity of a zero query must be +0, not -0"
    assert (I[:, kept:] == -1).all() and (D[:, kept:] == -np.inf).all()


def test_small_cosine_zero_database_rows(gen):
    database = _randn(gen, 40, 12)
    zero_rows = [0, 7, 8, 39]
    database[zero_rows] = 0.0
    queries = _randn(gen, 10, 12)
    D, I = latentspace.knn(queries, database, 40, "cosine")
    assert not torch.isnan(D).any()
    for r in range(10):
        positions = torch.isin(I[r], torch.tensor(zero_rows, device=DEVICE)).nonzero().flatten()
        assert (D[r, positions] == 0).all() and not torch.signbit(D[r, positions]).any()
        assert I[r, positions].tolist() == zero_rows
    assert_knn_matches(D, I, queries, database, 40, "cosine")


def test_small_cosine_zero_query_and_zero_database():
    D, I = latentspace.knn(torch.zeros(2, 5, device=DEVICE), torch.zeros(4, 5, device=DEVICE), 6, "cosine")
    assert I.tolist() == [[0, 1, 2, 3, -1, -1]] * 2
    assert D.tolist() == [[0, 0, 0, 0, -np.inf, -np.inf]] * 2


def test_cosine_one_dimension_is_clamped_and_ordered(gen):
    # D = 1: every similarity is +-1 in exact arithmetic; float32 rounding gives 1 +- ulp.
    database, queries = _randn(gen, 5000, 1), _randn(gen, 20, 1)
    D, I = latentspace.knn(queries, database, 3000, "cosine")
    assert_matches_reference(D, I, queries, database, 3000, "cosine")


def test_cosine_is_scale_invariant(gen):
    database, queries = _randn(gen, 1000, 20), _randn(gen, 8, 20)
    D, I = latentspace.knn(queries, database, 100, "cosine")
    D2, _ = latentspace.knn(queries * 1000.0, database * 0.001, 100, "cosine")
    torch.testing.assert_close(D2, D, atol=2e-6, rtol=0)
    D3, I3 = latentspace.knn(database, database * 3.0, 1, "cosine")
    assert (I3[:, 0] == torch.arange(1000, device=DEVICE)).all()
    assert (D3 <= 1.0).all() and (D3 > 1.0 - 1e-5).all()


# ---------------------------------------------------------------------------------------
# The native entry point itself: every output written, nothing past it


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", [(1, 1, 1, 1), (7, 100, 3, 10), (3, 5, 8, 9), (65, 300, 33, 64),
                                        (2, 1000, 2048, 1000), (130, 4099, 16, 257), (3, 20_000, 8, 50)])
def test_small_native_writes_every_output_and_nothing_else(metric, nq, n, dim, k, gen, finish, thresholds, merge):
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    guard = 4096
    distances_buffer = torch.full((nq * k + guard,), float("nan"), device=DEVICE)
    indices_buffer = torch.full((nq * k + guard,), -7, dtype=torch.int64, device=DEVICE)
    distances, indices = distances_buffer[: nq * k].view(nq, k), indices_buffer[: nq * k].view(nq, k)
    device = torch.device(DEVICE, torch.cuda.current_device())
    need = _native.knn_cuda_workspace_bytes(nq, n, k, device.index)
    workspace = torch.full((need + guard,), 0xAB, dtype=torch.uint8, device=DEVICE)
    _native.knn_cuda(queries.data_ptr(), nq, database.data_ptr(), n, dim, k, {"l2": 0, "ip": 1, "cosine": 2}[metric],
                     distances.data_ptr(), indices.data_ptr(), workspace.data_ptr(), need,
                     torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert not torch.isnan(distances).any(), "an output distance was not written"
    assert (indices != -7).all(), "an output index was not written"
    assert torch.isnan(distances_buffer[nq * k :]).all() and (indices_buffer[nq * k :] == -7).all(), \
        "written past the outputs"
    assert (workspace[need:] == 0xAB).all(), "written past the workspace"
    assert_matches_reference(distances, indices, queries, database, k, metric)


def test_small_plan_follows_the_split_rule(gen, monkeypatch):
    """_native._cuda_plan reports the plan knn_cuda_workspace_bytes sizes; the split rule
    (LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR, for experiments) changes the splits, never a result."""
    device, variable = torch.cuda.current_device(), "LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR"
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")  # no large-k plan: the rule's alone
    # 300 queries (3 query tiles) at k = 1024: the rule, not the GPU's size, bounds the splits
    plan = _native._cuda_plan(300, 1_000_000, 1024, device)
    assert plan["workspace_bytes"] == _native.knn_cuda_workspace_bytes(300, 1_000_000, 1024, device)
    assert plan["query_tiles"] == 3 and plan["split_length"] % 128 == 0 and plan["capacity"] == 2048
    assert plan["split_length"] >= 32 * 1024 and plan["splits"] * plan["split_length"] >= 1_000_000
    monkeypatch.setenv(variable, "4")
    short = _native._cuda_plan(300, 1_000_000, 1024, device)
    assert short["splits"] > plan["splits"] and short["split_length"] >= 4 * 1024
    queries, database = _randn(gen, 300, 16), _randn(gen, 50_000, 16)
    results = {}
    for rule in ("0", "1", "32", "4096"):  # 131 splits, 131, 15, 1 (computed on the host, 132 multiprocessors)
        monkeypatch.setenv(variable, rule)
        results[rule] = latentspace.knn(queries, database, 100)
    for rule in ("0", "1", "4096"):
        assert torch.equal(results[rule][1], results["32"][1]) and torch.equal(results[rule][0], results["32"][0])
    monkeypatch.setenv(variable, "-1")
    with pytest.raises(ValueError, match=f"{variable}: expected a whole number from 0 to 65536, got '-1'"):
        latentspace.knn(queries, database, 100)


def test_small_fitted_plan_fits_its_bound(monkeypatch):
    """The fitted plan (LATENTSPACE_CUDA_FITTED_PLAN=1): a plan over its workspace bound takes
    fewer splits, up to the one-split plan; a search planned with the workspace's size as the
    bound gets the same plan; off, the bound changes nothing."""
    device, variable = torch.cuda.current_device(), "LATENTSPACE_CUDA_FITTED_PLAN"
    monkeypatch.delenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", raising=False)
    monkeypatch.setenv(variable, "0")
    filling = _native._cuda_plan(10_000, 1_000_000, 1024, device)
    assert _native._cuda_plan(10_000, 1_000_000, 1024, device, 1 << 20) == filling
    assert _native._cuda_fitted_plan() is False
    monkeypatch.setenv(variable, "1")
    assert _native._cuda_fitted_plan() is True
    assert _native._cuda_plan(10_000, 1_000_000, 1024, device) == filling  # no bound: nothing to fit
    bound = filling["workspace_bytes"] // 3
    fitted = _native._cuda_plan(10_000, 1_000_000, 1024, device, bound)
    assert fitted["workspace_bytes"] <= bound and 1 <= fitted["splits"] < filling["splits"]
    assert fitted["query_tiles"] == filling["query_tiles"] and fitted["capacity"] == filling["capacity"]
    assert _native.knn_cuda_workspace_bytes(10_000, 1_000_000, 1024, device, bound) == fitted["workspace_bytes"]
    assert _native._cuda_plan(10_000, 1_000_000, 1024, device, fitted["workspace_bytes"]) == fitted
    one = _native._cuda_plan(10_000, 1_000_000, 1024, device, 1 << 20)  # not even one split fits
    assert one["splits"] == 1 and one["workspace_bytes"] > 1 << 20
    assert _native._cuda_plan(10_000, 1_000_000, 1024, device, one["workspace_bytes"]) == one
    # where none fits: the least workspace, the most splits among equals, and the search plans
    # the same again (lists as long as their splits: more splits, the same bytes)
    monkeypatch.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "0")
    tight = _native._cuda_plan(1, 1000, 1000, device, 1)
    assert _native._cuda_plan(1, 1000, 1000, device, tight["workspace_bytes"]) == tight
    monkeypatch.setenv(variable, "yes")
    with pytest.raises(ValueError, match=f"{variable}: expected '0' or '1', got 'yes'"):
        _native._cuda_plan(10_000, 1_000_000, 1024, device, bound)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", [(300, 50_000, 16, 1024), (5, 30_000, 8, 2000), (260, 20_000, 32, 100)])
def test_small_fitted_plan_equals_the_filling_one(metric, nq, n, dim, k, gen, monkeypatch):
    """Under a workspace bound the filling plan exceeds, the fitted plan searches all queries in
    fewer splits where the filling one searches fewer queries a call: the k best keys are the
    same either way, so the results must be bit-identical (knn and a FlatIndex, which keeps its
    norms). The split rule at 1 row per neighbour gives these small databases 10 to 50 splits."""
    monkeypatch.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "1")
    monkeypatch.setenv("LATENTSPACE_CUDA_FITTED_PLAN", "0")
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")  # the rule's plans (5 queries: the large-k plan, never fitted)
    device = torch.cuda.current_device()
    filling = _native._cuda_plan(nq, n, k, device)
    bound = filling["workspace_bytes"] * 2 // 3
    monkeypatch.setenv("LATENTSPACE_CUDA_FITTED_PLAN", "1")
    assert filling["splits"] >= 6, filling
    assert _native._cuda_plan(nq, n, k, device, bound)["splits"] < filling["splits"]
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    searches = _knn_and_index(queries, database, k, metric, workspace_bytes=bound)
    for d, i in _same_with_and_without("LATENTSPACE_CUDA_FITTED_PLAN", monkeypatch, searches):
        assert_matches_reference(d, i, queries, database, k, metric)


@pytest.mark.parametrize("variable", ["LATENTSPACE_CUDA_FUSED_FINISH", "LATENTSPACE_CUDA_EARLY_NORMS",
                                      "LATENTSPACE_CUDA_SHARED_THRESHOLDS", "LATENTSPACE_CUDA_TREE_MERGE",
                                      "LATENTSPACE_CUDA_FITTED_PLAN", "LATENTSPACE_CUDA_TENSOR_TILE",
                                      "LATENTSPACE_CUDA_WARP_CUT_BACKS", "LATENTSPACE_CUDA_FLOAT_THRESHOLDS",
                                      "LATENTSPACE_CUDA_LIST_ROOM"])
def test_small_a_bad_setting_is_refused_on_every_path(variable, gen, monkeypatch):
    """A float32 search of 200 queries over 300 rows reaches none of the settings but the fused
    finish's (no row scan, tensor tile, tree merge or plan over its bound): a bad value of any
    of them is still refused, before the search queues anything (knn.cu refuse_bad_settings)."""
    queries, database = _randn(gen, 200, 8), _randn(gen, 300, 8)
    monkeypatch.setenv(variable, "bad")
    with pytest.raises(ValueError, match=f"{variable}: expected ('.+' or '.+'|a whole number from .+), got 'bad'"):
        latentspace.knn(queries, database, 3)
    monkeypatch.delenv(variable)
    assert_matches_reference(*latentspace.knn(queries, database, 3), queries, database, 3, "l2")


def test_small_native_refuses_what_it_cannot_do():
    device = torch.cuda.current_device()
    with pytest.raises(ValueError, match="database: at most 2\\^31 - 1 rows"):
        _native.knn_cuda_workspace_bytes(1, 2**31, 1, device)
    with pytest.raises(ValueError, match="num_queries \\* k must stay below 2\\^31"):
        _native.knn_cuda_workspace_bytes(2**16, 100, 2**15, device)
    q = torch.zeros(4, 3, device=DEVICE)
    d = torch.empty(4, 2, device=DEVICE)
    i = torch.empty(4, 2, dtype=torch.int64, device=DEVICE)
    need = _native.knn_cuda_workspace_bytes(4, 4, 2, device)
    workspace = torch.empty(need, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="workspace: expected at least"):
        _native.knn_cuda(q.data_ptr(), 4, q.data_ptr(), 4, 3, 2, 0, d.data_ptr(), i.data_ptr(),
                         workspace.data_ptr(), need - 1, torch.cuda.current_stream().cuda_stream)


# ---------------------------------------------------------------------------------------
# Tensors in place, torch's current stream, devices


class _Spy:
    """Records the pointers and stream each native call gets."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = _native.knn_cuda

        def spy(*args):
            self.calls.append(args)
            return real(*args)

        monkeypatch.setattr(_native, "knn_cuda", spy)


def test_small_cuda_tensors_are_used_in_place_on_the_current_stream(monkeypatch, gen):
    spy = _Spy(monkeypatch)
    queries, database = _randn(gen, 9, 16), _randn(gen, 500, 16)
    q0, x0 = queries.clone(), database.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        D, I = latentspace.knn(queries, database, 5, "l2")
    stream.synchronize()
    assert len(spy.calls) == 1
    args = spy.calls[0]
    assert args[0] == queries.data_ptr() and args[2] == database.data_ptr(), "inputs were copied"
    assert args[7] == D.data_ptr() and args[8] == I.data_ptr(), "results were copied"
    assert args[11] == stream.cuda_stream, "not queued on torch's current stream"
    assert D.device == queries.device and I.device == queries.device
    assert torch.equal(queries, q0) and torch.equal(database, x0)
    assert_knn_matches(D, I, queries, database, 5, "l2")


def test_small_converted_inputs(gen):
    queries, database = _randn(gen, 6, 10), _randn(gen, 80, 10)
    for q, x in [(queries.double(), database), (queries, database.t().contiguous().t()),
                 (queries, torch.cat([database, database], 1)[:, :10]), (queries.half().float(), database.half())]:
        D, I = latentspace.knn(q, x, 4, "ip")
        D1, I1 = latentspace.knn(q.float().contiguous(), x.float().contiguous(), 4, "ip")
        assert torch.equal(I, I1) and torch.equal(D, D1)


def test_mixed_placements_follow_the_queries(gen):
    queries, database = _randn(gen, 7, 12), _randn(gen, 300, 12)
    D0, I0 = latentspace.knn(queries.cpu().numpy(), database.cpu().numpy(), 6, "l2")
    cases = [
        (queries, database.cpu().numpy(), "cuda"),  # host database streamed, CUDA queries
        (queries.cpu().numpy(), database, "numpy"),  # numpy queries, CUDA database
        (queries.cpu(), database, "cpu tensor"),
        (queries, database.cpu(), "cuda"),
    ]
    for q, x, expect in cases:
        D, I = latentspace.knn(q, x, 6, "l2")  # device=None: CUDA because one input is
        if expect == "numpy":
            assert isinstance(D, np.ndarray)
        else:
            assert isinstance(D, torch.Tensor) and D.device.type == ("cuda" if expect == "cuda" else "cpu")
        D, I = (a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in (D, I))
        assert_knn_matches(D, I, queries.cpu().numpy(), database.cpu().numpy(), 6, "l2")
    # device="cpu" with CUDA tensors: copied to the host, CPU tensors back
    D, I = latentspace.knn(queries, database, 6, "l2", device="cpu")
    assert D.device.type == "cpu"
    np.testing.assert_array_equal(I.numpy(), I0)
    np.testing.assert_array_equal(D.numpy(), D0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU")
def test_second_gpu(gen):
    queries = torch.randn(5, 8, device="cuda:1")
    database = torch.randn(100, 8, device="cuda:1")
    D, I = latentspace.knn(queries, database, 3)
    assert D.device == torch.device("cuda", 1)
    assert_knn_matches(D, I, queries, database, 3, "l2")
    D, I = latentspace.knn(queries.cpu().numpy(), database.cpu().numpy(), 3, device="cuda:1")
    assert_knn_matches(D, I, queries, database, 3, "l2")


# ---------------------------------------------------------------------------------------
# Host data streamed through pinned buffers; workspace chunks


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("memory_bytes", [256 << 10, 4 << 20, None])
def test_host_streaming_equals_the_cpu(metric, memory_bytes, rng):
    queries = _integers(rng, 300, 16) if metric != "cosine" else rng.standard_normal((300, 16)).astype(np.float32)
    database = _integers(rng, 40_000, 16) if metric != "cosine" else rng.standard_normal((40_000, 16)).astype(np.float32)
    D0, I0 = latentspace.knn(queries, database, 50, metric)
    D, I = latentspace.knn(queries, database, 50, metric, device=DEVICE, gpu_memory_bytes=memory_bytes)
    if metric == "cosine":
        assert_knn_matches(D, I, queries, database, 50, metric)
    else:
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)


def test_small_host_streaming_many_chunks(rng):
    _host_streaming_many_chunks(5, 300, rng)  # 2 blocks of queries x 9 chunks


def test_host_streaming_many_more_chunks(rng):
    _host_streaming_many_chunks(20, 3000, rng)  # 7 x 89


def test_small_host_streaming_starts_with_small_chunks(monkeypatch, rng):
    # The floor lifted: chunks of an eighth of the pinned buffers' rows, then twice and four
    # times that, each through the same two buffers (a chunk shorter than its buffer).
    monkeypatch.setattr(_cuda_chunks, "STREAM_FIRST_CHUNK_MIN_BYTES", 0)
    plans = []
    plan_stream_chunks = _cuda_chunks.plan_stream_chunks

    def spy(*args):
        plans.append(plan_stream_chunks(*args))
        return plans[-1]

    monkeypatch.setattr(_cuda_search, "plan_stream_chunks", spy)
    _host_streaming_many_chunks(5, 3000, rng)
    sizes = [stop - start for start, stop in plans[0]]
    _, rows = _cuda_chunks.plan_host_stream(5, 3000, 8, 7, 4096, 1 << 30)  # the pinned buffers' rows
    first = rows // 8
    assert len(plans) == 1 and sizes[:3] == [first, 2 * first, 4 * first] and max(sizes) == rows, sizes


def _host_streaming_many_chunks(nq, n, rng):
    queries, database = _integers(rng, nq, 8), _integers(rng, n, 8)
    query_rows, rows = _cuda_chunks.plan_host_stream(nq, n, 8, 7, 4096, 1 << 30)
    assert query_rows < nq and rows < n // 8  # blocks of queries, many database chunks
    D0, I0 = latentspace.knn(queries, database, 7, "l2")
    D, I = latentspace.knn(queries, database, 7, "l2", device=DEVICE, gpu_memory_bytes=4096)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(D, D0)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int8])
def test_host_streaming_converts_chunks(dtype, rng, tmp_path):
    queries = _integers(rng, 10, 32)
    database = _integers(rng, 10_000, 32).astype(dtype)
    D0, I0 = latentspace.knn(queries, database, 9, "ip")
    D, I = latentspace.knn(queries, database, 9, "ip", device=DEVICE, gpu_memory_bytes=1 << 18)
    np.testing.assert_array_equal(I, I0)
    np.save(tmp_path / "x.npy", database)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    D, I = latentspace.knn(queries, mapped, 9, "ip", device=DEVICE, gpu_memory_bytes=1 << 18)
    np.testing.assert_array_equal(I, I0)


def test_bad_rows_are_named_as_on_the_cpu(rng):
    queries, database = rng.standard_normal((30, 8)).astype(np.float32), rng.standard_normal((5000, 8)).astype(np.float32)
    database[3210, 2] = np.nan
    with pytest.raises(ValueError) as cpu:
        latentspace.knn(queries, database, 3)
    for x in (database, torch.from_numpy(database).to(DEVICE)):
        with pytest.raises(ValueError) as gpu:
            latentspace.knn(queries, x, 3, device=DEVICE, gpu_memory_bytes=1 << 16)
        assert str(gpu.value) == str(cpu.value)
    queries[17, 0] = np.inf
    with pytest.raises(ValueError, match="queries: row 17 contains NaN or Inf"):
        latentspace.knn(torch.from_numpy(queries).to(DEVICE), database, 3)


@pytest.mark.parametrize("workspace_bytes", [2 << 20, 16 << 20])
def test_workspace_bound_chunks_the_queries(workspace_bytes, monkeypatch, gen):
    spy = _Spy(monkeypatch)
    queries, database = _randn(gen, 2000, 32), _randn(gen, 50_000, 32)
    D, I = latentspace.knn(queries, database, 256, "l2", workspace_bytes=workspace_bytes)
    assert len(spy.calls) > 1
    assert all(call[10] <= workspace_bytes for call in spy.calls)
    # Each chunk's plan (tile or row scan, database splits) is its own, so sums may round
    # differently from one unchunked call: compare with the float64 reference instead.
    assert_matches_reference(D, I, queries, database, 256, "l2")
    with pytest.raises(ValueError, match="workspace_bytes: one query with k=256 needs"):
        latentspace.knn(queries, database, 256, "l2", workspace_bytes=1000)


def test_cpu_and_cuda_agree(rng):
    queries = rng.standard_normal((200, 64)).astype(np.float32)
    database = rng.standard_normal((20_000, 64)).astype(np.float32)
    for metric in METRICS:
        Dc, Ic = latentspace.knn(queries, database, 20, metric)
        Dg, Ig = latentspace.knn(queries, database, 20, metric, device=DEVICE)
        np.testing.assert_allclose(Dg, Dc, atol=1e-4, rtol=1e-5)
        assert (Ig == Ic).mean() > 0.99  # only near-ties may differ
        assert_knn_matches(Dg, Ig, queries, database, 20, metric)


# ---------------------------------------------------------------------------------------
# FlatIndex on the GPU


@pytest.mark.parametrize("metric", METRICS)
def test_flat_index_round_trip(metric, rng, tmp_path):
    dim = 23
    chunks = [rng.standard_normal((m, dim)).astype(np.float32) for m in (1, 15, 0, 300, 7)]
    index = latentspace.FlatIndex(dim, metric, device=DEVICE)
    assert index.device.startswith("cuda") and "device='cuda" in repr(index)
    for chunk, kind in zip(chunks, ["numpy", "torch", "cuda", "float64", "cuda"]):
        if kind == "torch":
            chunk = torch.from_numpy(chunk)
        elif kind == "cuda":
            chunk = torch.from_numpy(chunk).to(DEVICE)
        elif kind == "float64":
            chunk = chunk.astype(np.float64)
        index.add(chunk)
    data = np.concatenate(chunks)
    assert index.ntotal == len(data) and index.nbytes >= data.nbytes
    np.testing.assert_array_equal(index.vectors(), data)
    np.testing.assert_array_equal(index.reconstruct([5, 0, 322]), data[[5, 0, 322]])
    queries = rng.standard_normal((25, dim)).astype(np.float32)
    for k in (1, 10, len(data), len(data) + 3):
        D, I = index.search(queries, k)
        assert isinstance(D, np.ndarray)
        assert_knn_matches(D, I, queries, data, k, metric)
        Dt, It = index.search(torch.from_numpy(queries).to(DEVICE), k)
        assert Dt.device.type == "cuda"
        np.testing.assert_array_equal(It.cpu().numpy(), I)
    index.save(tmp_path / "gpu.lsx")
    cpu_index = latentspace.load_index(tmp_path / "gpu.lsx")
    np.testing.assert_array_equal(cpu_index.vectors(), data)
    D_cpu, I_cpu = cpu_index.search(queries, 10)
    assert_knn_matches(D_cpu, I_cpu, queries, data, 10, metric)
    for loaded in (latentspace.load_index(tmp_path / "gpu.lsx", device=DEVICE),
                   latentspace.load_index(tmp_path / "gpu.lsx", mmap=True, device=DEVICE),
                   cpu_index.to(DEVICE)):
        assert loaded.device.startswith("cuda") and loaded.metric == metric
        D, I = loaded.search(queries, 10)
        D0, I0 = index.search(queries, 10)
        np.testing.assert_array_equal(I, I0)
    back = index.to("cpu")
    assert back.device == "cpu"
    np.testing.assert_array_equal(back.vectors(), data)
    index.reset()
    assert index.ntotal == 0
    D, I = index.search(queries, 4)
    assert (I == -1).all() and (D == PAD[metric]).all()


def test_flat_index_refuses_bad_rows_and_keeps_its_vectors(rng):
    index = latentspace.FlatIndex(4, device=DEVICE)
    good = rng.standard_normal((10, 4)).astype(np.float32)
    index.add(good)
    bad = good.copy()
    bad[6, 1] = np.inf
    with pytest.raises(ValueError, match="x: row 6 contains NaN or Inf"):
        index.add(torch.from_numpy(bad).to(DEVICE))
    assert index.ntotal == 10
    with pytest.raises(ValueError, match="queries: row 6 contains NaN or Inf"):
        index.search(bad, 2)
    with pytest.raises(ValueError, match="queries: expected 4 columns"):
        index.search(np.zeros((2, 5), np.float32), 2)


def test_flat_index_searches_while_adding(rng):
    dim = 16
    index = latentspace.FlatIndex(dim, device=DEVICE)
    first = rng.standard_normal((1000, dim)).astype(np.float32)
    index.add(first)
    queries = first[:50]
    errors = []

    def search():
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for _ in range(20):
                    D, I = index.search(queries, 1)
                    if not (I[:, 0] == np.arange(50)).all():
                        errors.append("a query did not find itself")
        except Exception as error:  # noqa: BLE001
            errors.append(repr(error))

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        index.add(rng.standard_normal((500, dim)).astype(np.float32) + 100.0)  # far away: never the nearest
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert index.ntotal == 11_000


def test_reference_helpers_agree_with_conftest(rng):
    # The GPU reference above is conftest's, moved: check them against each other once.
    queries = rng.standard_normal((6, 9)).astype(np.float32)
    database = rng.standard_normal((40, 9)).astype(np.float32)
    for metric in METRICS:
        ref_scores, ref_order = reference_knn(queries, database, 40, metric)
        scores = _scores64(torch.from_numpy(queries).to(DEVICE), torch.from_numpy(database).to(DEVICE), metric)
        key = scores if metric == "l2" else -scores
        order = torch.sort(key, dim=1, stable=True).indices.cpu().numpy()
        np.testing.assert_array_equal(order, ref_order)
        np.testing.assert_allclose(np.take_along_axis(scores.cpu().numpy(), order, 1), ref_scores, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Tensor-core precisions (tf32 / bf16 / fp16): inputs rounded, float32 sums


# Unit roundoff of each input precision: tf32 and fp16 keep 10 mantissa bits, bf16 7.
ROUNDOFF = {"tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}


@pytest.fixture(params=["wmma", "mma", "deep"])
def tensor_tile(request, monkeypatch):
    """Each tensor-core tile of the scan (csrc/cuda/knn_scan_launch.cuh, tensor_tile_setting):
    MmaTile ("mma"), WmmaTile ("wmma") and DeepMmaTile ("deep", the default since GPU run 12,
    where it applies; MmaTile elsewhere)."""
    monkeypatch.setenv("LATENTSPACE_CUDA_TENSOR_TILE", request.param)
    return request.param


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", [(3, 5, 8, 9), (70, 3000, 128, 10), (9, 20_000, 40, 300)])
def test_small_tensor_core_precisions(precision, metric, nq, n, dim, k, gen, tensor_tile):
    """Results keep every convention (order, padding, distinct valid indices); each distance
    is the exact score of its returned index to within the precision's rounding; the
    neighbours found are nearly the exact ones (recall vs float32)."""
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    D, I = latentspace.knn(queries, database, k, metric, precision=precision)
    kept = min(k, n)
    assert D.shape == (nq, k) and (I[:, kept:] == -1).all() and (D[:, kept:] == PAD[metric]).all()
    Ik = I[:, :kept]
    assert ((Ik >= 0) & (Ik < n)).all()
    exact = _scores64(queries, database, metric).gather(1, Ik)
    # |error| <= a few roundoffs of the terms summed: |q||x| (and |q|^2 + |x|^2 for l2).
    qn, xn = queries.double().norm(dim=1)[:, None], database.double().norm(dim=1)[Ik]
    scale = (qn**2 + xn**2) if metric == "l2" else (torch.ones_like(xn) if metric == "cosine" else qn * xn)
    assert ((D[:, :kept].double() - exact).abs() <= 8 * ROUNDOFF[precision] * scale + 1e-6).all()
    D32, I32 = latentspace.knn(queries, database, k, metric)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / kept for a, b in zip(Ik.cpu(), I32[:, :kept].cpu())])
    assert recall >= (0.99 if precision != "bf16" else 0.9)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nq,n,dim", [(9, 100, 3), (130, 3000, 40), (300, 1000, 128)])
def test_small_tensor_core_integer_data_is_exact(precision, metric, nq, n, dim, tensor_tile, rng):
    """Small integers are exact in every precision and their sums exact in float32, so each
    tile's scores, ties and indices must equal the CPU's float32 search bit for bit: any slip
    in a fragment layout (a wrong row, column or depth offset) changes a score."""
    queries, database = _integers(rng, nq, dim), _integers(rng, n, dim)
    for k in (1, 10, 100):
        D0, I0 = latentspace.knn(queries, database, k, metric)
        D, I = latentspace.knn(torch.from_numpy(queries).to(DEVICE), torch.from_numpy(database).to(DEVICE), k, metric,
                               precision=precision)
        np.testing.assert_array_equal(I.cpu().numpy(), I0)
        np.testing.assert_array_equal(D.cpu().numpy(), D0)


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_small_half_storage_on_tensor_cores_is_exact(storage, tensor_tile, rng):
    x, q = _integers(rng, 4000, 64), _integers(rng, 50, 64)
    index = latentspace.FlatIndex(64, device="cuda", storage=storage)
    index.add(x)
    D0, I0 = latentspace.knn(q, x, 20)
    D, I = index.search(q, 20, precision=storage)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(D, D0)


def test_bad_tensor_tile_setting_is_named(monkeypatch, gen):
    monkeypatch.setenv("LATENTSPACE_CUDA_TENSOR_TILE", "cutlass")
    queries, database = _randn(gen, 20, 8), _randn(gen, 100, 8)
    expected = "LATENTSPACE_CUDA_TENSOR_TILE: expected 'mma', 'wmma', 'deep', 'pipelined' or 'resident', got 'cutlass'"
    with pytest.raises(ValueError, match=expected):
        latentspace.knn(queries, database, 5, precision="bf16")
    with pytest.raises(ValueError, match=expected):
        latentspace.knn(queries, database, 5)  # float32 never takes a tile, and still refuses a bad setting


def test_precision_reaches_the_flat_index(gen):
    index = latentspace.FlatIndex(64, device="cuda")
    index.add(_randn(gen, 1000, 64))
    queries = _randn(gen, 50, 64)  # more than the row scan's 8: the tile scan, on tensor cores
    exact = index.search(queries, 10)
    rounded = index.search(queries, 10, precision="bf16")
    assert not torch.equal(exact[0], rounded[0])  # bf16 rounding changes distances
    assert (rounded[0] - exact[0]).abs().max() < 0.5


# ---------------------------------------------------------------------------------------
# metric="weighted_l2"


@pytest.mark.parametrize("nq,n,dim,k", [(1, 50, 4, 5), (70, 3000, 17, 10), (9, 20_000, 64, 300)])
def test_small_weighted_l2_matches_the_cpu(nq, n, dim, k, rng):
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = (rng.random(dim) * 3).astype(np.float32)
    w[0] = 0
    D, I = latentspace.knn(torch.from_numpy(q).cuda(), torch.from_numpy(x).cuda(), k, "weighted_l2", weights=w)
    scaled = np.sqrt(w.astype(np.float64))
    assert_knn_matches(D.cpu(), I.cpu(), q * scaled, x * scaled, k, "l2")
    # host streaming and the GPU index take the same weights
    D2, I2 = latentspace.knn(q, x, k, "weighted_l2", weights=w, device="cuda", gpu_memory_bytes=1 << 20)
    assert_knn_matches(D2, I2, q * scaled, x * scaled, k, "l2")
    index = latentspace.FlatIndex(dim, "weighted_l2", device="cuda")
    index.add(x)
    D3, I3 = index.search(q, k, weights=w)
    assert_knn_matches(D3, I3, q * scaled, x * scaled, k, "l2")


@pytest.mark.parametrize("nq", [1, 40])  # the row scan and the tile scan
def test_small_weighted_overflow_is_refused_as_on_the_cpu(nq, rng):
    x, q = rng.standard_normal((300, 5)).astype(np.float32), rng.standard_normal((nq, 5)).astype(np.float32)
    x[123] = 1e18  # plain squared norm 5e36: usable; weighted by 1e4, 5e40: not
    w = np.array([1e4, 1, 1, 1, 1], np.float32)
    index = latentspace.FlatIndex(5, "weighted_l2", device="cuda")
    index.add(x)  # usable with the plain norm: refused when searched with these weights
    with pytest.raises(ValueError) as cpu:
        latentspace.knn(q, x, 3, "weighted_l2", weights=w)
    cpu_index = latentspace.FlatIndex(5, "weighted_l2")
    cpu_index.add(x)
    with pytest.raises(ValueError) as cpu_index_search:
        cpu_index.search(q, 3, weights=w)
    calls = [(lambda: latentspace.knn(torch.from_numpy(q).cuda(), torch.from_numpy(x).cuda(), 3, "weighted_l2",
                                      weights=w), cpu),
             (lambda: latentspace.knn(q, x, 3, "weighted_l2", weights=w, device="cuda", gpu_memory_bytes=1 << 14),
              cpu),
             (lambda: index.search(q, 3, weights=w), cpu_index_search)]  # (names the weights, not "database")
    for call, expected in calls:
        with pytest.raises(ValueError) as gpu:
            call()
        assert str(gpu.value) == str(expected.value)
    assert (index.search(q, 3, weights=np.ones(5))[1] >= 0).all()


# Rows that the weights make unusable, refused where they meet the weights (as on the CPU:
# tests/test_knn_weighted.py; the same logic on the stand-in: tests/test_cuda_search.py).

_HEAVY = np.array([1e4, 1, 1, 1, 1], np.float32)  # 1e18 in dimension 0: plain 1e36, weighted 1e40


def _spoiled(rng, bad, n=300, row=123):
    """Standard normal rows with row `row` made unusable by _HEAVY alone ("heavy") or as it is
    ("nan")."""
    x = rng.standard_normal((n, 5)).astype(np.float32)
    if bad == "heavy":
        x[row] = 1e18  # plain squared norm 5e36: usable
    else:
        x[row, 2] = np.nan
    return x


def _as_stored(x, storage):
    return torch.from_numpy(x).to(_cuda_search.storage_dtype(storage)).float().numpy()


@pytest.mark.parametrize("storage", ["fp32", "bf16"])  # (fp16 refuses 1e18 itself: beyond its range)
def test_small_gpu_index_add_refuses_rows_the_weights_make_unusable(storage, rng):
    """numpy and CUDA rows, all or nothing, bf16 rows checked as stored; the first refused row in
    row order, whichever its kind (NaN in the plain words; a NaN row after a heavy one was named
    first); weights past any use refuse ordinary rows."""
    x = _spoiled(rng, "heavy")
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY, device=DEVICE, storage=storage)
    index.add(x[:100])
    for rows in (x, torch.from_numpy(x).to(DEVICE)):
        with pytest.raises(ValueError, match=r"^x: row 123: its squared norm scaled by the index's weights .* "
                                             r"overflows float32 .*lower the weights"):
            index.add(rows)
        assert index.ntotal == 100
    nan = x.copy()
    nan[200, 3] = np.nan
    for rows in (nan, torch.from_numpy(nan).to(DEVICE)):
        with pytest.raises(ValueError, match="^x: row 123: its squared norm scaled by the index's weights"):
            index.add(rows)
    nan[50, 3] = np.nan
    for rows in (nan, torch.from_numpy(nan).to(DEVICE)):
        with pytest.raises(ValueError, match="^x: row 50 contains NaN or Inf"):
            index.add(rows)
    assert index.ntotal == 100
    np.testing.assert_array_equal(index.vectors(), _as_stored(x[:100], storage))
    huge = latentspace.FlatIndex(5, "weighted_l2", weights=np.full(5, 1e38, np.float32), device=DEVICE,
                                 storage=storage)
    with pytest.raises(ValueError, match="^x: row 0: its squared norm scaled by the index's weights"):
        huge.add(np.ones((3, 5), np.float32))  # ordinary rows, weights past any use: 5e38
    huge.add(np.full((2, 5), 0.1, np.float32))  # 5e36: fine
    assert huge.ntotal == 2


def test_small_gpu_index_add_encoded_refuses_codes_the_weights_make_unusable():
    """The codes are written into the device buffer, checked there, and dropped when refused;
    the row named is X's (3 rows were in the index before)."""
    encoder = torch.nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(5) * 1e18)
    X = np.zeros((40, 5), np.float32)
    X[:, 1] = 1e-18  # codes 1: ordinary
    X[29, 0] = 1  # its code: 1e18 in dimension 0
    index = latentspace.FlatIndex(5, "weighted_l2", weights=_HEAVY, device=DEVICE)
    index.add(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="^the codes of X: row 29: its squared norm scaled by the index's weights"):
        index.add_encoded(encoder, X, batch_size=16)
    assert index.ntotal == 3
    assert index.add_encoded(encoder, np.delete(X, 29, axis=0)) == 39
    assert index.ntotal == 42
    assert not index.vectors()[:3].any()


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_small_gpu_index_refuses_weights_that_make_stored_rows_unusable(storage, rng):
    """`index.weights = w` checks the stored vectors on the device: refused in the CPU index's
    words, the old weights kept; weights that keep every row usable are taken."""
    x = _spoiled(rng, "heavy")
    index = latentspace.FlatIndex(5, "weighted_l2", device=DEVICE, storage=storage)
    index.add(x)
    with pytest.raises(ValueError) as gpu:
        index.weights = _HEAVY
    cpu_index = latentspace.FlatIndex(5, "weighted_l2")
    cpu_index.add(_as_stored(x, storage))
    with pytest.raises(ValueError) as cpu:
        cpu_index.weights = _HEAVY
    assert str(gpu.value) == str(cpu.value)
    assert str(gpu.value).startswith("weights: they scale the squared norm of the index's row 123 past float32's")
    np.testing.assert_array_equal(index.weights, np.ones(5, np.float32))  # kept
    index.weights = _HEAVY / 1e4  # fine
    np.testing.assert_array_equal(index.weights, _HEAVY / 1e4)
    assert (index.search(rng.standard_normal((2, 5)).astype(np.float32), 3)[1] >= 0).all()


@pytest.mark.parametrize("bad", ["heavy", "nan"])
@pytest.mark.parametrize("queries_on", ["host", "cuda"])
def test_small_streamed_weighted_search_refuses_a_row_before_its_chunk_is_searched(bad, queries_on, monkeypatch,
                                                                                  rng):
    """A host database streamed in chunks of 1,502 rows (one block of 20 queries): row 40,000
    is refused, in the CPU's words, once the 26 chunks before it are searched (each in one native
    call); it was found on the device and reported after all 34 chunks. (The check ahead starts
    at CHECK_AHEAD_QUERIES queries: taken from any number here.)"""
    monkeypatch.setattr(_cuda_search, "CHECK_AHEAD_QUERIES", 0)
    spy = _Spy(monkeypatch)
    x, q = _spoiled(rng, bad, n=50_000, row=40_000), rng.standard_normal((20, 5)).astype(np.float32)
    query_rows, rows = _cuda_chunks.plan_host_stream(20, 50_000, 5, 3, 1 << 16, _cuda_chunks.DEFAULT_WORKSPACE_BYTES)
    assert (query_rows, rows) == (20, 1502)
    with pytest.raises(ValueError) as cpu:
        latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY)
    queries = q if queries_on == "host" else torch.from_numpy(q).to(DEVICE)
    with pytest.raises(ValueError) as gpu:
        latentspace.knn(queries, x, 3, "weighted_l2", weights=_HEAVY, device=DEVICE, gpu_memory_bytes=1 << 16)
    assert str(gpu.value) == str(cpu.value)
    assert str(cpu.value).startswith("database: row 40000 ")
    assert [call[3] for call in spy.calls] == [rows] * (40_000 // rows)  # database rows of each call


@pytest.mark.parametrize("bad", ["heavy", "nan"])
@pytest.mark.parametrize("database_as", ["host", "cuda", "cuda bf16"])
def test_small_weighted_database_without_queries_is_checked_as_on_the_cpu(bad, database_as, rng):
    """No queries: a host database was checked plainly (a heavy row passed), a CUDA one in the
    weighted words (where the CPU named a NaN row in the plain ones): now both as on the CPU (the
    weighted words for either kind)."""
    x = _spoiled(rng, bad)
    if database_as == "cuda bf16":
        x = _as_stored(x, "bf16")  # the CPU's reference: the rows as the GPU reads them
    database = {"host": x, "cuda": torch.from_numpy(x).to(DEVICE),
                "cuda bf16": torch.from_numpy(x).to(DEVICE, torch.bfloat16)}[database_as]
    no_queries = np.zeros((0, 5), np.float32)
    for metric, weights in (("weighted_l2", _HEAVY), ("l2", None)):
        if bad == "heavy" and weights is None:
            continue  # a usable row without weights
        with pytest.raises(ValueError) as cpu:
            latentspace.knn(no_queries, x, 3, metric, weights=weights)
        for queries in (no_queries, torch.zeros((0, 5), device=DEVICE)):
            with pytest.raises(ValueError) as gpu:
                latentspace.knn(queries, database, 3, metric, weights=weights, device=DEVICE)
            assert str(gpu.value) == str(cpu.value)
    D, I = latentspace.knn(no_queries, database[:100], 3, "weighted_l2", weights=_HEAVY, device=DEVICE)
    assert tuple(D.shape) == tuple(I.shape) == (0, 3)


# ---------------------------------------------------------------------------------------
# float16 / bfloat16 database storage


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_small_half_storage_index(storage, metric, rng, tmp_path):
    """A GPU index storing fp16 / bf16 returns what float32 search over the rounded vectors
    returns; half the bytes; the storage survives save / load onto a GPU."""
    x = rng.standard_normal((3000, 33)).astype(np.float32)
    q = rng.standard_normal((20, 33)).astype(np.float32)
    index = latentspace.FlatIndex(33, metric, device="cuda", storage=storage)
    index.add(x)
    assert index.storage == storage and index.bytes_per_vector == 66
    rounded = torch.from_numpy(x).to(torch.float16 if storage == "fp16" else torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(index.vectors(), rounded)
    D, I = index.search(q, 10)
    assert_knn_matches(D, I, q, rounded, 10, metric)
    index.save(tmp_path / "half.lsidx")
    loaded = latentspace.load_index(tmp_path / "half.lsidx", device="cuda")
    assert loaded.storage == storage
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    assert latentspace.load_index(tmp_path / "half.lsidx").storage == "fp32"  # a CPU index


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_small_gpu_index_copies_and_pickles_into_an_independent_index(storage, rng):
    """FlatIndex.__reduce__ (twelfth session, written without a GPU): a copy of a GPU index
    is a GPU index of its own, with the same storage and answers; adding to one leaves the
    other as it was."""
    import copy
    import pickle

    x = rng.standard_normal((500, 12)).astype(np.float32)
    q = rng.standard_normal((7, 12)).astype(np.float32)
    index = latentspace.FlatIndex(12, "l2", device="cuda", storage=storage)
    index.add(x)
    before = index.vectors().copy()  # as stored (fp16: rounded)
    for twin in (copy.copy(index), copy.deepcopy(index), pickle.loads(pickle.dumps(index))):
        assert (twin.device, twin.storage, twin.ntotal) == (index.device, storage, 500)
        for a, b in zip(index.search(q, 5), twin.search(q, 5)):
            np.testing.assert_array_equal(a, b)
        twin.add(x[:3] + 100.0)
        assert (twin.ntotal, index.ntotal) == (503, 500)
        np.testing.assert_array_equal(index.vectors(), before)


def test_small_half_tensor_database_is_read_as_stored(gen):
    x = _randn(gen, 2000, 16).half()
    q = _randn(gen, 9, 16)
    D, I = latentspace.knn(q, x, 5)
    assert_knn_matches(D.cpu(), I.cpu(), q.cpu().numpy(), x.float().cpu().numpy(), 5, "l2")


def test_fp16_storage_refuses_values_out_of_range():
    index = latentspace.FlatIndex(2, device="cuda", storage="fp16")
    with pytest.raises(ValueError, match=r"x: row 1 has values beyond fp16's range"):
        index.add(np.array([[1, 2], [7e4, 0]], np.float32))
    assert index.ntotal == 0


# ---------------------------------------------------------------------------------------
def _same_with_and_without(variable, monkeypatch, searches):
    """searches() (a list of (distances, indices) results) with the opt-in setting `variable`
    off ("0") and on ("1"): the results must be bit-identical. Returns those with it on."""
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv(variable, setting)
        results[setting] = searches()
    assert len(results["0"]) == len(results["1"])
    for (d0, i0), (d1, i1) in zip(results["0"], results["1"]):
        assert torch.equal(i0, i1) and torch.equal(d0, d1)
    return results["1"]


def _knn_and_index(queries, database, k, metric, **options):
    """searches() for _same_with_and_without: latentspace.knn and a GPU FlatIndex (which keeps
    its database's norms) over the same data, each with the same options."""
    index = latentspace.FlatIndex(database.shape[1], metric, device="cuda")
    index.add(database)
    return lambda: [latentspace.knn(queries, database, k, metric, **options), index.search(queries, k, **options)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", [(1, 1000, 16, 1), (1, 1000, 16, 256), (3, 5000, 32, 257),
                                        (300, 20_000, 64, 1024), (50, 3000, 8, 1025), (7, 100, 3, 300)])
def test_small_fused_finish_equals_the_separate_one(metric, nq, n, dim, k, gen, monkeypatch):
    """The fused finish sorts and decodes the same keys as merge + CUB sort + decode, so the
    results must be bit-identical: at k = 1 and 256 (one key a thread), 257 and 1024 (four),
    1025 (the separate finish either way) and k > N (padding). The large-k plan is off
    (LATENTSPACE_CUDA_TREE_MERGE=0): its tree merge takes the separate finish."""
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    (d, i), = _same_with_and_without("LATENTSPACE_CUDA_FUSED_FINISH", monkeypatch,
                                     lambda: [latentspace.knn(queries, database, k, metric)])
    assert_matches_reference(d, i, queries, database, k, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", SHARED_SHAPES)
def test_small_shared_thresholds_equal_the_split_ones(metric, nq, n, dim, k, gen, monkeypatch):
    """With shared thresholds a split drops the rows above another split's k-th best key; the
    keys kept are still exactly the k best, so the results must be bit-identical: through the
    row scan (1 and 5 queries) and the tile scan (a partial last query tile: 130, 257, 129),
    with many splits (a few hundred thousand rows), k past the fused finish (2000) and k > N,
    a bound shared at k = 1024 (200,000 rows: 6 splits, where 60,000 rows plan one); the
    20,000-row shapes are small enough for racecheck (53 and 6 splits). In the split rule's
    plans (RULE_PLAN: the large-k plan would cut these lists back never, or only at the end);
    SHARED_LARGE_K_SHAPES in the default plan too."""
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    for tree in ("0", "") if (nq, n, dim, k) in SHARED_LARGE_K_SHAPES else ("0",):
        monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", tree)  # "": the default (auto)
        (d, i), = _same_with_and_without("LATENTSPACE_CUDA_SHARED_THRESHOLDS", monkeypatch,
                                         lambda: [latentspace.knn(queries, database, k, metric)])
        assert_matches_reference(d, i, queries, database, k, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k,precision", WARP_SHAPES)
def test_small_warp_cut_backs_equal_the_block_ones(metric, nq, n, dim, k, precision, gen, monkeypatch):
    """Cut-backs by warps select the same k best keys with the same radix select, so the
    results must be bit-identical to the block's: at k = 1024 (lists cut back several times a
    split), k = 5 (lists that fill once), k = 700 of 5,000 rows (cut back at the end), k > N
    (padding), with thresholds shared too, on the tensor-core tiles MmaTile (set here: the
    default deep tile's cut-backs by warps are in test_knn_deep_tile.py) and WMMA (their
    staging buffers hold the warps' histograms), and the FlatIndex path; the 20,000-row shape
    is small enough for racecheck (the histograms are shared memory). In the split rule's plans
    (RULE_PLAN): in the large-k plan these lists would never be cut back mid-split."""
    for variable, value in RULE_PLAN.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("LATENTSPACE_CUDA_TENSOR_TILE", "mma")
    if precision.endswith(" wmma"):
        precision = precision.split()[0]
        monkeypatch.setenv("LATENTSPACE_CUDA_TENSOR_TILE", "wmma")
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    searches = _knn_and_index(queries, database, k, metric, precision=precision)
    for shared in ("0", "1"):
        monkeypatch.setenv("LATENTSPACE_CUDA_SHARED_THRESHOLDS", shared)
        results = _same_with_and_without("LATENTSPACE_CUDA_WARP_CUT_BACKS", monkeypatch, searches)
        if precision == "fp32":
            for d, i in results:
                assert_matches_reference(d, i, queries, database, k, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k,precision", FLOAT_SHAPES)
def test_small_float_thresholds_equal_the_key_compare(metric, nq, n, dim, k, precision, gen, monkeypatch):
    """The opt-in family compares each score as a float with its query's threshold score
    before it forms the key; exact, so the results must be bit-identical to the default
    kernels': every metric, the float32 tile and the three tensor-core precisions (mma.sync),
    a partial last database tile (50,003 rows), an odd dimension (33: the unaligned loads),
    k past a tile, k > N, and the FlatIndex path (kept norms). Under FLOAT_PLAN: thresholds
    per split (shared ones, the default, take the opt-in family either way) and long splits,
    whose lists are cut back mid-split (a threshold for the rest of the split)."""
    for variable, value in FLOAT_PLAN.items():
        monkeypatch.setenv(variable, value)
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    searches = _knn_and_index(queries, database, k, metric, precision=precision)
    results = _same_with_and_without("LATENTSPACE_CUDA_FLOAT_THRESHOLDS", monkeypatch, searches)
    if precision == "fp32":
        for d, i in results:
            assert_matches_reference(d, i, queries, database, k, metric)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nq", [3, 200])
@pytest.mark.parametrize("opt_in", sorted(OPT_INS))
def test_small_opt_ins_on_integer_data_equal_the_cpu(metric, nq, opt_in, rng, monkeypatch):
    """Small integers: exact scores, ties across every split and merge group, so a bound taken
    from one split meets equal scores in others, and a group's k-th best key ties with keys
    of other groups; ties must still go to the lower index, as on the CPU."""
    queries, database = _integers(rng, nq, 3), _integers(rng, OPT_IN_INTEGER_ROWS, 3)
    for variable, value in OPT_INS[opt_in].items():
        monkeypatch.setenv(variable, value)
    for k in OPT_IN_INTEGER_KS:
        D0, I0 = latentspace.knn(queries, database, k, metric)
        D, I = latentspace.knn(queries, database, k, metric, device=DEVICE)
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", [(1, 200_000, 16, 10), (5, 100_003, 48, 3000), (130, 300_000, 16, 100),
                                        (257, 60_000, 64, 1024), (64, 100_000, 32, 16384), (129, 700, 16, 800),
                                        (3, 3000, 8, 3001), (130, 5000, 16, 6000), (3, 20_000, 8, 50),
                                        (130, 20_000, 16, 100)])
def test_small_tree_merge_equals_the_single_one(metric, nq, n, dim, k, gen, monkeypatch):
    """The tree merge keeps, level by level, each group's k best keys, so the k best of all
    are the single merge's and the results must be bit-identical: with the split rule off
    (splits to fill the GPU: tens to hundreds, so two or three levels), through the row scan
    (1 and 5 queries) and the tile scan, k past the rows of a split (3000, 16384; the lists
    hold every row), and k > N with a tree (3,000 and 5,000 rows: 12 and 20 splits, padding
    after the last level); the 20,000-row shapes are small enough for racecheck."""
    monkeypatch.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "0")
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    (d, i), = _same_with_and_without("LATENTSPACE_CUDA_TREE_MERGE", monkeypatch,
                                     lambda: [latentspace.knn(queries, database, k, metric)])
    assert_matches_reference(d, i, queries, database, k, metric)
    plan = _native._cuda_plan(nq, n, k, torch.cuda.current_device())
    assert plan["splits"] > 8 or n < 10_000, plan  # the tree had levels to run


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,dim,k", [(1, 200_000, 16, 1024), (5, 100_003, 48, 3000), (130, 300_000, 16, 2048),
                                        (64, 100_000, 32, 16384), (3, 20_000, 8, 100), (130, 20_000, 16, 1000)])
def test_small_large_k_plan_equals_the_rule_plan(metric, nq, n, dim, k, gen, monkeypatch):
    """Where the split rule would leave the GPU short of blocks (a large k over few queries),
    the default plan drops the rule and merges its many splits as a tree (knn_plan.cuh plan_for);
    it keeps the same k best keys, so the results must be bit-identical to the rule's plan
    (LATENTSPACE_CUDA_TREE_MERGE=0): through the row scan (1, 3 and 5 queries) and the tile
    scan, k past a split's rows (3000, 16384: the lists hold every row), knn and a FlatIndex;
    the 20,000-row shapes are small enough for the sanitizers (130 queries: the tile scan,
    with the thresholds the default shares across its 53 splits)."""
    monkeypatch.delenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", raising=False)
    queries, database = _randn(gen, nq, dim), _randn(gen, n, dim)
    searches = _knn_and_index(queries, database, k, metric)
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    rule_plan, rule_results = _native._cuda_plan(nq, n, k, torch.cuda.current_device()), searches()
    monkeypatch.delenv("LATENTSPACE_CUDA_TREE_MERGE")
    plan, results = _native._cuda_plan(nq, n, k, torch.cuda.current_device()), searches()
    assert plan["tree"] and plan["splits"] > max(8, rule_plan["splits"]) and not rule_plan["tree"], (plan, rule_plan)
    for (d0, i0), (d, i) in zip(rule_results, results):
        assert torch.equal(i0, i) and torch.equal(d0, d)
        assert_matches_reference(d, i, queries, database, k, metric)


# Few queries (the row scan) and an index's kept norms


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 3, 8])
@pytest.mark.parametrize("dim", [48, 97])
def test_small_early_norms_equal_the_late_ones(metric, nq, dim, gen, monkeypatch):
    """The row scan with its norms loaded ahead uses the same values, so its results must be
    bit-identical: through knn (norms summed in the scan) and a FlatIndex (norms kept), with
    a row count that leaves a partial step (4 rows a warp) at a split's end, and rows read
    in quads (48) or one element a lane (97)."""
    queries, database = _randn(gen, nq, dim), _randn(gen, 10_007, dim)
    searches = _knn_and_index(queries, database, 20, metric)
    for d, i in _same_with_and_without("LATENTSPACE_CUDA_EARLY_NORMS", monkeypatch, searches):
        assert_matches_reference(d, i, queries, database, 20, metric)


def _single_query_searches(gen, metric, dim, storage, rows=10_007):
    """searches() of one query: knn at k = 20 and k past the rows (padding) over a database in
    `storage` (knn reads a half tensor as stored; norms summed in the scan), a FlatIndex of that
    storage (norms kept) at k = 300, and weighted_l2 through knn; with the float64 reference's
    database (the stored values)."""
    half = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[storage]
    queries, database = _randn(gen, 1, dim), _randn(gen, rows, dim).to(half)
    weights = torch.rand(dim, generator=gen, device=DEVICE) + 0.5
    index = latentspace.FlatIndex(dim, metric, device="cuda", storage=storage)
    index.add(database.float())
    checked = [(20, metric), (rows + 50, metric), (300, metric), (20, "weighted_l2")]

    def searches():
        return [latentspace.knn(queries, database, 20, metric), latentspace.knn(queries, database, rows + 50, metric),
                index.search(queries, 300), latentspace.knn(queries, database, 20, "weighted_l2", weights=weights)]

    return queries, database.float(), weights, checked, searches


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim,storage", [(48, "fp32"), (128, "fp32"), (256, "fp16"), (128, "bf16"), (97, "fp32")])
def test_small_single_query_scan_equals_the_row_scan(metric, dim, storage, gen, monkeypatch):
    """One query with LATENTSPACE_CUDA_SINGLE_QUERY_ROWS = 8 (the default since GPU run 10) or
    16 takes the single-query scan (knn_rows.cuh: that many rows in flight a warp, its norms
    loaded ahead); it offers every row to the same list checks, so the results must be
    bit-identical to the row scan's (4): knn (norms summed in the scan), a FlatIndex (norms kept) in each
    storage, weighted_l2, k past the rows, 10,007 rows (a partial round at a split's end), and
    in one split (LATENTSPACE_CUDA_FEW_QUERY_SPLITS=1: 30 rounds of cut-backs at k = 300).
    97 columns read one element a lane: the row scan either way."""
    queries, database, weights, checked, searches = _single_query_searches(gen, metric, dim, storage)
    for splits in ("", "1"):
        monkeypatch.setenv("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", splits)
        results = {}
        for rows in ("4", "8", "16"):
            monkeypatch.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", rows)
            results[rows] = searches()
        for rows in ("8", "16"):
            for (d0, i0), (d, i) in zip(results["4"], results[rows]):
                assert torch.equal(i0, i) and torch.equal(d0, d), (rows, splits)
    for (d, i), (k, name) in zip(results["16"], checked):
        if name == "weighted_l2":  # the reference's l2 over the scaled rows
            scale = weights.sqrt()
            assert_matches_reference(d, i, queries * scale, database * scale, k, "l2")
        else:
            assert_matches_reference(d, i, queries, database, k, name)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 3, 8])
def test_small_few_query_splits_change_no_result(metric, nq, gen, monkeypatch):
    """LATENTSPACE_CUDA_FEW_QUERY_SPLITS (an experiment: the splits of a call of at most 8
    queries) changes the plan, never a result: 1 split, 7, and more splits than the database
    has plan tiles (3,000 rows: 24 tiles of 128), against the plan's own, through knn and a
    FlatIndex. The splits asked are cut in whole tiles: 7 gives splits of 4 tiles, so 6."""
    queries, database = _randn(gen, nq, 32), _randn(gen, 3000, 32)
    searches = _knn_and_index(queries, database, 50, metric)
    monkeypatch.delenv("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", raising=False)
    own_plan, expected = _native._cuda_plan(nq, 3000, 50, torch.cuda.current_device()), searches()
    for splits, planned in (("1", 1), ("7", 6), ("500", 24)):
        monkeypatch.setenv("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", splits)
        plan = _native._cuda_plan(nq, 3000, 50, torch.cuda.current_device())
        assert plan["splits"] == planned, (plan, own_plan)
        for (d0, i0), (d, i) in zip(expected, searches()):
            assert torch.equal(i0, i) and torch.equal(d0, d), splits
            assert_matches_reference(d, i, queries, database, 50, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_small_one_query_takes_whole_waves_with_the_same_results(metric, gen, monkeypatch):
    """One query's plan on this GPU (knn_plan.cuh, single_query_wave; twenty-second session):
    its splits rounded down to whole waves of the single-query scan's 3 resident blocks a
    multiprocessor, here 300,000 rows (2,344 plan tiles: more splits than a wave on any GPU of
    at most 260 multiprocessors); the results bit-identical to those in the plan's own splits
    (LATENTSPACE_CUDA_SINGLE_QUERY_ROWS=4 plans them; forced here on the single-query scan)."""
    n, device = 300_000, torch.cuda.current_device()
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    wave = 3 * multiprocessors
    monkeypatch.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "4")
    own = _native._cuda_plan(1, n, 10, device, None, 128)["splits"]
    monkeypatch.delenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS")
    plan = _native._cuda_plan(1, n, 10, device, None, 128)
    if own <= wave:
        pytest.skip(f"the plan's own {own} splits fit one wave of {wave} here")
    tiles = -(-n // 128)
    length = -(-tiles // (own // wave * wave)) * 128
    assert plan["split_length"] == length and plan["splits"] == -(-n // length), (plan, own, wave)
    queries, database = _randn(gen, 1, 128), _randn(gen, n, 128)
    searches = _knn_and_index(queries, database, 10, metric)
    waves = searches()
    monkeypatch.setenv("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", str(own))
    for (d0, i0), (d, i) in zip(waves, searches()):
        assert torch.equal(i0, i) and torch.equal(d0, d)
        assert_matches_reference(d, i, queries, database, 10, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,n,k,warps", [(130, 60_000, 600, "0"), (300, 20_000, 1000, "0"), (3, 20_000, 600, "0"),
                                          (130, 60_000, 600, "1")])
def test_small_list_room_changes_no_result(metric, nq, n, k, warps, gen, monkeypatch):
    """LATENTSPACE_CUDA_LIST_ROOM (an experiment, knn_plan.cuh list_room: a candidate list's
    room beyond k, in multiples of k) changes how often lists are cut back, never a result:
    rooms 1, 2 and 5 through knn and a FlatIndex, in the tile scan (130 and 300 queries, with
    the block's cut-backs and the warps') and the row scan (3 queries), under the split rule's
    plan so that lists fill and are cut back mid-split."""
    monkeypatch.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    monkeypatch.setenv("LATENTSPACE_CUDA_WARP_CUT_BACKS", warps)
    queries, database = _randn(gen, nq, 32), _randn(gen, n, 32)
    searches = _knn_and_index(queries, database, k, metric)
    results, capacities = {}, []
    for room in ("1", "2", "5"):
        monkeypatch.setenv("LATENTSPACE_CUDA_LIST_ROOM", room)
        plan = _native._cuda_plan(nq, n, k, torch.cuda.current_device(), None, 32)
        assert plan["capacity"] == min(k + max(int(room) * k, 512), plan["split_length"])
        capacities.append(plan["capacity"])
        results[room] = searches()
    assert capacities[0] < capacities[1] < capacities[2], capacities  # (k >= 512: each room its own)
    for room in ("2", "5"):
        for (d0, i0), (d, i) in zip(results["1"], results[room]):
            assert torch.equal(i0, i) and torch.equal(d0, d), room
    for d, i in results["5"]:
        assert_matches_reference(d, i, queries, database, k, metric)


@pytest.fixture(params=["late", "early"])
def norms_loaded(request, monkeypatch):
    """Both ways the row scan loads its norms (csrc/cuda/knn_rows.cuh): where a score needs
    them, and ahead (LATENTSPACE_CUDA_EARLY_NORMS=1, opt-in)."""
    monkeypatch.setenv("LATENTSPACE_CUDA_EARLY_NORMS", "1" if request.param == "early" else "0")
    return request.param


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq,dim", [(1, 1), (1, 128), (3, 97), (8, 1408), (8, 1409), (9, 64), (1, 11264),
                                    (1, 11265)])
def test_small_row_scan_matches_the_reference(metric, nq, dim, rng, finish, norms_loaded):
    """1-8 queries whose rows fit in 44 KiB take the row scan (8 x 1408, 1 x 11264: exactly);
    9 queries or wider ones the tile scan: both agree with the reference (ties, padding, k > N)."""
    x = rng.integers(-2, 3, (700, dim)).astype(np.float32)  # small integers: many exact ties
    q = rng.integers(-2, 3, (nq, dim)).astype(np.float32)
    for k in (1, 10, 800):
        D, I = latentspace.knn(torch.from_numpy(q).cuda(), torch.from_numpy(x).cuda(), k, metric)
        assert_knn_matches(D.cpu(), I.cpu(), q, x, k, metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_small_index_keeps_norms_across_adds_and_resets(metric, rng, norms_loaded):
    index = latentspace.FlatIndex(16, metric, device="cuda")
    parts = [rng.standard_normal((n, 16)).astype(np.float32) for n in (5, 300, 1)]
    parts[1][7] = 0  # a zero vector: cosine similarity 0
    for part in parts:
        index.add(part)
    x = np.concatenate(parts)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    D, I = index.search(q, 20)
    assert_knn_matches(D, I, q, x, 20, metric)
    index.reset()
    index.add(parts[2])
    D, I = index.search(q, 3)
    assert_knn_matches(D, I, q, parts[2], 3, metric)


# ---------------------------------------------------------------------------------------
# Inputs the tests above leave out (a static review of the kernels without a GPU): base
# pointers a torch view leaves misaligned, weights on tensor cores, norms near the overflow
# limit, and a database of more than 2^31 elements. Small integers (times a power of two)
# make every score exact on every path, so the results must equal the CPU's bit for bit.

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _misaligned(values, dtype):
    """A C-contiguous CUDA view of `values` (a float32 numpy matrix) in `dtype`, one element
    past the start of its allocation: 4-byte aligned for float32, 2-byte for half types, so
    never aligned for quad loads (16 and 8 bytes) whatever the dimension."""
    rows, dim = values.shape
    flat = torch.empty(rows * dim + 1, dtype=dtype, device=DEVICE)
    view = flat[1:].view(rows, dim)
    view.copy_(torch.from_numpy(values))
    assert view.is_contiguous() and view.data_ptr() % (4 * view.element_size()) != 0
    return view


@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16"])
def test_small_misaligned_inputs_equal_the_cpu(storage, rng, monkeypatch):
    """knn takes a contiguous CUDA view in place, at whatever offset it starts
    (database[1:] of a flat tensor): the scan must see that the base cannot take 16-byte
    (8-byte, half storage) quad loads although the dimension (64) is a multiple of 4
    (knn_scan_launch.cuh quads_aligned), in the row scan (3 queries) and the tile scan (130;
    float32 and bf16, every tensor-core tile; deep falls back to MmaTile there). Before this,
    only odd dimensions reached the element-by-element loads; a misaligned quad load faults
    ("misaligned address")."""
    spy = _Spy(monkeypatch)
    x = _integers(rng, 3000, 64)
    database = _misaligned(x, STORAGE_DTYPES[storage])
    for nq in (3, 130):
        q = _integers(rng, nq, 64)
        queries = _misaligned(q, torch.float32)
        cases = [("fp32", "mma")] + ([("bf16", "mma"), ("bf16", "wmma"), ("bf16", "deep")] if nq > 8 else [])
        for precision, tile in cases:
            monkeypatch.setenv("LATENTSPACE_CUDA_TENSOR_TILE", tile)
            for metric in ("l2", "ip"):
                D0, I0 = latentspace.knn(q, x, 20, metric)
                spy.calls.clear()
                D, I = latentspace.knn(queries, database, 20, metric, precision=precision)
                assert spy.calls[0][0] == queries.data_ptr() and spy.calls[0][2] == database.data_ptr(), "copied"
                np.testing.assert_array_equal(I.cpu().numpy(), I0)
                np.testing.assert_array_equal(D.cpu().numpy(), D0)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_small_weighted_l2_on_tensor_cores_is_exact(precision, rng, monkeypatch):
    """weighted_l2 on tensor cores: the queries are scaled by the weights while they are
    staged, then rounded (knn_tiles.cuh staged_query_quad), and the norms are weighted
    (norms_kernel). Small integer values and weights (w q <= 6) are exact in every precision,
    so the results must equal the CPU's: every tensor-core tile (deep takes no weights: MmaTile
    runs), float32 / float16 / bfloat16 database storage, a dimension padded within a tile step
    (20) and an odd one (13), a zero weight; 130 queries (the tile scan: a partial query tile).
    The weighted tests above search in float32 only."""
    for dim in (20, 13):
        q, x = _integers(rng, 130, dim), _integers(rng, 3000, dim)
        w = rng.integers(0, 4, dim).astype(np.float32)
        w[0] = 0
        D0, I0 = latentspace.knn(q, x, 50, "weighted_l2", weights=w)
        queries = torch.from_numpy(q).to(DEVICE)
        for tile in ("mma", "wmma", "deep"):  # (deep takes no weights: MmaTile runs)
            monkeypatch.setenv("LATENTSPACE_CUDA_TENSOR_TILE", tile)
            for dtype in STORAGE_DTYPES.values():
                database = torch.from_numpy(x).to(DEVICE, dtype)
                D, I = latentspace.knn(queries, database, 50, "weighted_l2", weights=w, precision=precision)
                np.testing.assert_array_equal(I.cpu().numpy(), I0, err_msg=f"{tile} {dtype}")
                np.testing.assert_array_equal(D.cpu().numpy(), D0, err_msg=f"{tile} {dtype}")


@pytest.mark.parametrize("metric", METRICS)
def test_small_norms_near_the_overflow_limit_are_exact(metric, rng):
    """Values of 2^59 (squared norms up to 2^124 = 2.1e37, half the documented limit of
    4.2e37): small integers times a power of two, so every product, sum, norm and inverse
    norm is exact or rounds exactly as at scale 1, with no overflow in qn + xn - 2 dot or in
    the staged tf32 / bf16 values (fp16 overflows there by design: docs/gpu.md). l2 and ip
    must equal the CPU's search bit for bit; cosine, scale-invariant, the same GPU search at
    scale 1. Zero rows in both (cosine: similarity +0, never NaN); the row scan (3 queries,
    norms summed in the scan) and the tile scan (130; float32, tf32, bf16)."""
    scale = 2.0**59  # (a Python float: float32 times it stays float32, in numpy and torch)
    x, q = _integers(rng, 2000, 16), _integers(rng, 130, 16)
    x[[0, 777, 1999]] = 0.0
    q[[1, 129]] = 0.0
    for nq in (3, 130):
        for precision in ("fp32",) if nq <= 8 else ("fp32", "tf32", "bf16"):
            small = (torch.from_numpy(q[:nq]).to(DEVICE), torch.from_numpy(x).to(DEVICE))
            large = (small[0] * scale, small[1] * scale)
            D, I = latentspace.knn(*large, 40, metric, precision=precision)
            assert torch.isfinite(D).all(), (nq, precision)
            if metric == "cosine":
                D1, I1 = latentspace.knn(*small, 40, metric, precision=precision)
                assert torch.equal(I, I1) and torch.equal(D, D1), (nq, precision)
                assert (D[1] == 0).all() and not torch.signbit(D[1]).any(), "a zero query's similarity must be +0"
            else:
                D0, I0 = latentspace.knn(q[:nq] * scale, x * scale, 40, metric)
                np.testing.assert_array_equal(I.cpu().numpy(), I0, err_msg=f"{nq} {precision}")
                np.testing.assert_array_equal(D.cpu().numpy(), D0, err_msg=f"{nq} {precision}")


def test_database_past_2_to_31_elements_is_addressed_in_64_bits(rng):
    """A float16 database of 2^21 + 5 rows x 1024 (2^31 + 5120 elements, 4 GiB) through the
    native entry (the Python checks would make float32 copies of it): every element offset
    (row * dim + d) must be computed in 64 bits, in the norms kernel, the row scan (1 query)
    and the tile scan (9 queries; float32 and bf16). Zero rows but three: row 2^21, whose
    first element sits at offset 2^31 exactly, equals the query; the last row and row
    2^21 - 1 differ from it by 1 and 2 in one component. The expected results follow exactly
    (small integers). Not "small": 4 GiB under the sanitizers would take too long."""
    if torch.cuda.mem_get_info()[0] < 6 << 30:
        pytest.skip("needs 6 GiB of free GPU memory")
    dim, rows, k = 1024, (1 << 21) + 5, 4
    middle, last = 1 << 21, rows - 1
    assert rows * dim > 2**31 and middle * dim == 2**31
    query = torch.from_numpy(_integers(rng, 1, dim)).to(DEVICE)
    query[0, :2] = torch.tensor([1.0, 2.0], device=DEVICE)  # the inner products below stay apart
    database = torch.zeros((rows, dim), dtype=torch.float16, device=DEVICE)
    try:
        database[middle] = query[0]
        database[last] = query[0]
        database[last, 0] += 1  # l2 1, ip |q|^2 + 1
        database[middle - 1] = query[0]
        database[middle - 1, 1] += 2  # l2 4, ip |q|^2 + 4
        norm = float(query.square().sum())
        expected = {"l2": ([middle, last, middle - 1, 0], [0.0, 1.0, 4.0, norm]),
                    "ip": ([middle - 1, last, middle, 0], [norm + 4, norm + 1, norm, 0.0])}
        device = torch.cuda.current_device()
        for nq, precisions in ((1, (0,)), (9, (0, 2))):  # (the row scan computes in float32 only)
            queries = query.repeat(nq, 1)
            need = _native.knn_cuda_workspace_bytes(nq, rows, k, device)
            workspace = torch.empty(need, dtype=torch.uint8, device=DEVICE)
            for precision in precisions:
                for metric, (indices, values) in expected.items():
                    D = torch.full((nq, k), float("nan"), device=DEVICE)
                    I = torch.full((nq, k), -7, dtype=torch.int64, device=DEVICE)
                    _native.knn_cuda(queries.data_ptr(), nq, database.data_ptr(), rows, dim, k,
                                     {"l2": 0, "ip": 1}[metric], D.data_ptr(), I.data_ptr(), workspace.data_ptr(),
                                     need, torch.cuda.current_stream().cuda_stream, precision, 0, 1, 0)
                    torch.cuda.synchronize()
                    assert I.tolist() == [indices] * nq, (nq, precision, metric, I.tolist())
                    assert D.tolist() == [values] * nq, (nq, precision, metric, D.tolist())
    finally:
        del database
        torch.cuda.empty_cache()


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_small_gpu_index_remove_ids_equals_the_cpu_index(storage, metric, rng):
    """remove_ids on a GPU index (sixteenth session, written without a GPU): the kept rows and
    their kept norms gathered into new tensors; the same vectors and answers as a CPU index of
    the same (stored) rows after the same removal, and adds append after them."""
    x = rng.standard_normal((700, 12)).astype(np.float32)
    q = rng.standard_normal((7, 12)).astype(np.float32)
    index = latentspace.FlatIndex(12, metric, device="cuda", storage=storage)
    index.add(x)
    cpu = latentspace.FlatIndex(12, metric)
    cpu.add(index.vectors())  # as stored (fp16: rounded)
    doomed = np.concatenate([rng.choice(700, size=90, replace=False), [700, -5]])
    assert index.remove_ids(torch.from_numpy(doomed)) == 90 == cpu.remove_ids(doomed)
    assert index.ntotal == cpu.ntotal == 610
    np.testing.assert_array_equal(index.vectors(), cpu.vectors())
    D, I = index.search(q, 10)
    assert_knn_matches(D, I, q, cpu.vectors(), 10, metric)  # (near ties may order apart from the CPU's)
    index.add(x[:4])
    assert index.ntotal == 614
    assert index.remove_ids(np.arange(614)) == 614 and index.ntotal == 0
    assert index.search(q, 2)[1].tolist() == [[-1, -1]] * 7
