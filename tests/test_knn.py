"""latentspace.knn against a float64 reference, input handling, threads and bad inputs."""

from __future__ import annotations

import contextlib

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import latentspace
from conftest import METRICS, SUPPORTED_SIMD_LEVELS, assert_knn_matches, reference_knn

DIMS = [1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 64, 97, 128, 256]
PAD = {"l2": np.inf, "ip": -np.inf, "cosine": -np.inf}


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Property-based comparison with the reference


@st.composite
def knn_problems(draw):
    nq = draw(st.integers(0, 40), label="Q")
    n = draw(st.integers(1, 300), label="N")
    dim = draw(st.sampled_from(DIMS), label="D")
    k = draw(st.integers(1, n + 5), label="k")
    kind = draw(st.sampled_from(["normal", "integers", "duplicates"]), label="data")
    seed = draw(st.integers(0, 2**64 - 1), label="numpy seed")
    rng = np.random.default_rng(seed)
    if kind == "normal":
        queries, database = _normal(rng, nq, dim), _normal(rng, n, dim)
    elif kind == "integers":
        # small integers: float32 arithmetic is exact, and there are many exact ties
        high = int(rng.integers(1, 4))
        queries = rng.integers(-high, high + 1, (nq, dim)).astype(np.float32)
        database = rng.integers(-high, high + 1, (n, dim)).astype(np.float32)
    else:
        # rows drawn from a small pool: bit-identical database rows (and zero rows)
        pool = _normal(rng, int(rng.integers(1, 6)), dim)
        pool[0] = 0.0 if rng.random() < 0.3 else pool[0]
        database = pool[rng.integers(0, len(pool), n)]
        queries = np.concatenate([pool, _normal(rng, nq, dim)])[:nq]
    return queries, database, k, kind


@pytest.mark.parametrize("metric", METRICS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=knn_problems())
def test_knn_matches_reference(simd_level, metric, problem):
    queries, database, k, kind = problem
    D, I = latentspace.knn(queries, database, k, metric)
    assert isinstance(D, np.ndarray) and isinstance(I, np.ndarray)
    exact = kind == "integers" and metric in ("l2", "ip")
    assert_knn_matches(D, I, queries, database, k, metric, exact=exact)


@pytest.mark.parametrize("threads", [1, 2, 3])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_few_queries_match_reference(simd_level, row_query_limit, threads, num_threads, data):
    # A few queries take the row path (no packing) up to a cut-off, here also moved to 8 and
    # to 0; larger databases make the threads split the database.
    num_threads(threads)
    nq = data.draw(st.integers(1, 8), label="Q")
    n = data.draw(st.integers(1, 2000), label="N")
    dim = data.draw(st.sampled_from(DIMS), label="D")
    k = data.draw(st.one_of(st.integers(1, 12), st.integers(1, n + 5)), label="k")
    metric = data.draw(st.sampled_from(METRICS), label="metric")
    kind = data.draw(st.sampled_from(["normal", "integers", "duplicates"]), label="data")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**64 - 1), label="numpy seed"))
    if kind == "integers":
        queries = rng.integers(-2, 3, (nq, dim)).astype(np.float32)
        database = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    else:
        queries, database = _normal(rng, nq, dim), _normal(rng, n, dim)
        if kind == "duplicates":
            database = database[rng.integers(0, min(n, 3), n)]
    D, I = latentspace.knn(queries, database, k, metric)
    exact = kind == "integers" and metric in ("l2", "ip")
    assert_knn_matches(D, I, queries, database, k, metric, exact=exact)


# ---------------------------------------------------------------------------------------
# Dedicated cases


@pytest.mark.parametrize("metric", METRICS)
def test_k_equals_one(simd_level, metric, rng):
    queries, database = _normal(rng, 37, 19), _normal(rng, 211, 19)
    D, I = latentspace.knn(queries, database, 1, metric)
    assert D.shape == I.shape == (37, 1)
    assert_knn_matches(D, I, queries, database, 1, metric)


def test_k_equals_one_finds_each_database_row_itself(simd_level, rng):
    database = _normal(rng, 150, 33)
    D, I = latentspace.knn(database, database, 1, "l2")
    np.testing.assert_array_equal(I[:, 0], np.arange(150))
    np.testing.assert_allclose(D[:, 0], 0.0, atol=1e-4)
    _, I = latentspace.knn(database, database, 1, "cosine")
    np.testing.assert_array_equal(I[:, 0], np.arange(150))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k", [(1, 1), (1, 4), (5, 12), (33, 40), (64, 65)])
def test_k_larger_than_database_pads(simd_level, metric, n, k, rng):
    queries, database = _normal(rng, 6, 10), _normal(rng, n, 10)
    D, I = latentspace.knn(queries, database, k, metric)
    assert D.shape == I.shape == (6, k)
    assert (I[:, n:] == -1).all()
    assert (D[:, n:] == PAD[metric]).all()
    # every database row appears exactly once in the first n entries
    np.testing.assert_array_equal(np.sort(I[:, :n], axis=1), np.tile(np.arange(n), (6, 1)))
    assert np.isfinite(D[:, :n]).all()
    assert_knn_matches(D, I, queries, database, k, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_identical_rows_tie_to_lower_index(simd_level, metric, rng):
    vector = _normal(rng, 1, 24)
    database = np.repeat(vector, 50, axis=0)
    queries = _normal(rng, 5, 24)
    D, I = latentspace.knn(queries, database, 10, metric)
    np.testing.assert_array_equal(I, np.tile(np.arange(10), (5, 1)))
    assert (D == D[:, :1]).all(), "identical rows must get identical distances"
    # the same database, as a non-contiguous broadcast view
    D2, I2 = latentspace.knn(queries, np.broadcast_to(vector, (50, 24)), 10, metric)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_array_equal(D2, D)


@pytest.mark.parametrize("metric", METRICS)
def test_interleaved_duplicates_tie_to_lower_index(simd_level, metric, rng):
    a, b = _normal(rng, 1, 40), _normal(rng, 1, 40)
    database = np.concatenate([a, b] * 40)  # a at even rows, b at odd rows
    D, I = latentspace.knn(a * 2.0, database, 45, metric)  # a is the best match for 2a
    np.testing.assert_array_equal(I[0, :40], np.arange(0, 80, 2))
    np.testing.assert_array_equal(I[0, 40:], np.arange(1, 10, 2))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_identical_rows_tie_across_threads_and_panels(simd_level, metric, threads, num_threads, rng):
    # 3 queries, 20,000 rows: with > 1 thread the database is split between threads, so the
    # tie-break must survive merging the threads' heaps.
    num_threads(threads)
    database = np.repeat(_normal(rng, 1, 8), 20000, axis=0)
    queries = _normal(rng, 3, 8)
    D, I = latentspace.knn(queries, database, 100, metric)
    np.testing.assert_array_equal(I, np.tile(np.arange(100), (3, 1)))


def test_integer_ties_order_exactly(simd_level, rng):
    # Integer data: every distance is exact in float32, so the order must equal the stable
    # reference order exactly, including among distinct rows at equal distance.
    database = rng.integers(-1, 2, (500, 3)).astype(np.float32)
    queries = rng.integers(-1, 2, (20, 3)).astype(np.float32)
    for metric in ("l2", "ip"):
        D, I = latentspace.knn(queries, database, 500, metric)
        ref_scores, ref_order = reference_knn(queries, database, 500, metric)
        np.testing.assert_array_equal(I, ref_order)
        np.testing.assert_array_equal(D, ref_scores.astype(np.float32))


# --- cosine and zero vectors -----------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 30, 35])
def test_cosine_zero_query(simd_level, k, rng):
    database = _normal(rng, 30, 16)
    queries = np.zeros((3, 16), dtype=np.float32)
    D, I = latentspace.knn(queries, database, k, "cosine")
    kept = min(k, 30)
    assert not np.isnan(D).any()
    np.testing.assert_array_equal(I[:, :kept], np.tile(np.arange(kept), (3, 1)))
    assert (D[:, :kept] == 0.0).all()
    assert not np.signbit(D[:, :kept]).any(), "similarity of a zero query must be +0, not -0"
    assert (I[:, kept:] == -1).all() and (D[:, kept:] == -np.inf).all()


def test_cosine_zero_database_rows(simd_level, rng):
    database = _normal(rng, 40, 12)
    zero_rows = [0, 7, 8, 39]
    database[zero_rows] = 0.0
    queries = _normal(rng, 10, 12)
    D, I = latentspace.knn(queries, database, 40, "cosine")
    assert not np.isnan(D).any()
    for r in range(10):
        positions = np.flatnonzero(np.isin(I[r], zero_rows))
        # zero rows score exactly 0 and, tied with each other, appear in index order
        np.testing.assert_array_equal(D[r, positions], 0.0)
        np.testing.assert_array_equal(I[r, positions], zero_rows)
    assert_knn_matches(D, I, queries, database, 40, "cosine")


def test_cosine_zero_query_and_zero_database(simd_level):
    D, I = latentspace.knn(np.zeros((2, 5), np.float32), np.zeros((4, 5), np.float32), 6, "cosine")
    np.testing.assert_array_equal(I, [[0, 1, 2, 3, -1, -1]] * 2)
    np.testing.assert_array_equal(D, [[0, 0, 0, 0, -np.inf, -np.inf]] * 2)


def test_cosine_is_scale_invariant_and_bounded(simd_level, rng):
    database = _normal(rng, 100, 20)
    queries = _normal(rng, 8, 20)
    D, I = latentspace.knn(queries, database, 100, "cosine")
    D2, I2 = latentspace.knn(queries * 1000.0, database * 0.001, 100, "cosine")
    np.testing.assert_allclose(D2, D, atol=2e-6)
    assert (D <= 1.0).all() and (D >= -1.0).all()
    # a vector is its own best match with similarity ~1 (clamped to at most 1)
    D3, I3 = latentspace.knn(database, database * 3.0, 1, "cosine")
    np.testing.assert_array_equal(I3[:, 0], np.arange(100))
    assert (D3 <= 1.0).all() and (D3 > 1.0 - 1e-5).all()


# --- memory safety ---------------------------------------------------------------------

_GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
import latentspace as ls

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []

def guarded(values):
    # a float32 copy of `values` that ends exactly where an unreadable page begins
    nbytes = values.size * 4
    pages = (nbytes + PAGE - 1) // PAGE + 1
    buf = mmap.mmap(-1, pages * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    arr = np.frombuffer(buf, np.float32, values.size, (pages - 1) * PAGE - nbytes)
    arr = arr.reshape(values.shape)
    arr[...] = values
    assert libc.mprotect(addr + (pages - 1) * PAGE, PAGE, 0) == 0  # PROT_NONE
    keep.append(buf)
    return arr

rng = np.random.default_rng(int(sys.argv[1]))
levels = sys.argv[2].split(",")
checked = 0
for dim in (1, 3, 7, 8, 15, 17, 31, 33, 100):
    for n in (1, 5, 16, 33, 200):
        for nq in (1, 2, 3, 4, 7, 13):
            q = rng.standard_normal((nq, dim)).astype(np.float32)
            x = rng.standard_normal((n, dim)).astype(np.float32)
            gq, gx = guarded(q), guarded(x)
            for level in levels:
                ls.set_simd_level(level)
                for threads in (1, 2):
                    ls.set_num_threads(threads)
                    for metric in ("l2", "ip", "cosine"):
                        d0, i0 = ls.knn(q, x, 4, metric)
                        d, i = ls.knn(gq, gx, 4, metric)
                        assert (i == i0).all() and (d == d0).all(), (dim, n, nq, level, metric)
                        checked += 1
            index = ls.FlatIndex(dim)
            index.add(gx)
            index.search(gq, 2)
print("ok", checked)
"""


def test_no_reads_past_the_end_of_inputs(rng, tmp_path):
    # Inputs that end right before an unreadable page: any read past the last element
    # crashes. Run in a subprocess so that a crash is reported as a failure.
    script = tmp_path / "guard.py"
    script.write_text(_GUARD_PAGE_SCRIPT)
    seed = int(rng.integers(0, 2**32))
    result = subprocess.run(
        [sys.executable, str(script), str(seed), ",".join(SUPPORTED_SIMD_LEVELS)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        f"exit status {result.returncode} (negative: killed by signal; -11 is SIGSEGV)\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    assert result.stdout.startswith("ok")


# --- array types -----------------------------------------------------------------------


def test_numpy_in_numpy_out(rng):
    D, I = latentspace.knn(_normal(rng, 4, 8), _normal(rng, 20, 8), 3)
    assert type(D) is np.ndarray and type(I) is np.ndarray
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert D.flags.c_contiguous and I.flags.c_contiguous and D.flags.writeable


@pytest.mark.parametrize("metric", METRICS)
def test_torch_in_torch_out(simd_level, metric, rng):
    q, x = _normal(rng, 9, 17), _normal(rng, 60, 17)
    D, I = latentspace.knn(torch.from_numpy(q), torch.from_numpy(x), 5, metric)
    assert isinstance(D, torch.Tensor) and isinstance(I, torch.Tensor)
    assert D.dtype == torch.float32 and I.dtype == torch.int64
    assert D.device.type == "cpu" and D.shape == (9, 5) and I.shape == (9, 5)
    Dn, In = latentspace.knn(q, x, 5, metric)
    np.testing.assert_array_equal(D.numpy(), Dn)
    np.testing.assert_array_equal(I.numpy(), In)


def test_output_type_follows_queries(rng):
    q, x = _normal(rng, 3, 6), _normal(rng, 10, 6)
    D, I = latentspace.knn(q, torch.from_numpy(x), 2)
    assert isinstance(D, np.ndarray) and isinstance(I, np.ndarray)
    D2, I2 = latentspace.knn(torch.from_numpy(q), x, 2)
    assert isinstance(D2, torch.Tensor) and isinstance(I2, torch.Tensor)
    np.testing.assert_array_equal(D2.numpy(), D)
    np.testing.assert_array_equal(I2.numpy(), I)


def test_inputs_are_not_modified(rng):
    q, x = _normal(rng, 5, 9), _normal(rng, 30, 9)
    q0, x0 = q.copy(), x.copy()
    for metric in METRICS:
        latentspace.knn(q, x, 4, metric)
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(x, x0)
    qt, xt = torch.from_numpy(q.copy()), torch.from_numpy(x.copy())
    latentspace.knn(qt, xt, 4, "cosine")
    np.testing.assert_array_equal(qt.numpy(), q0)
    np.testing.assert_array_equal(xt.numpy(), x0)


def _noncontiguous_variants(a: np.ndarray, rng):
    """Views with the same values as `a` but other memory layouts."""
    n, d = a.shape
    big = np.zeros((2 * n, 3 * d), dtype=np.float32)
    big[::2, ::3] = a
    yield "step slice", big[::2, ::3]
    yield "fortran", np.asfortranarray(a)
    yield "transpose", np.ascontiguousarray(a.T).T
    yield "reversed rows", a[::-1].copy()[::-1]
    yield "reversed cols", a[:, ::-1].copy()[:, ::-1]
    wide = np.zeros((n, d + 5), dtype=np.float32)
    wide[:, 2 : 2 + d] = a
    yield "column slice", wide[:, 2 : 2 + d]
    # C-contiguous but misaligned (offset by one byte inside a bytes buffer)
    raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(n, d)
    misaligned[...] = a
    yield "misaligned", misaligned
    readonly = a.copy()
    readonly.flags.writeable = False
    yield "read-only", readonly
    yield "big-endian", a.astype(">f4")


@pytest.mark.parametrize("metric", METRICS)
def test_noncontiguous_inputs_equal_contiguous(simd_level, metric, rng):
    q, x = _normal(rng, 11, 13), _normal(rng, 70, 13)
    D0, I0 = latentspace.knn(q, x, 6, metric)
    for name, qv in _noncontiguous_variants(q, rng):
        np.testing.assert_array_equal(qv, q)
        D, I = latentspace.knn(qv, x, 6, metric)
        np.testing.assert_array_equal(I, I0, err_msg=f"queries: {name}")
        np.testing.assert_array_equal(D, D0, err_msg=f"queries: {name}")
    for name, xv in _noncontiguous_variants(x, rng):
        D, I = latentspace.knn(q, xv, 6, metric)
        np.testing.assert_array_equal(I, I0, err_msg=f"database: {name}")
        np.testing.assert_array_equal(D, D0, err_msg=f"database: {name}")


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` one byte past an aligned address: its dtype's alignment broken."""
    raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned and view.flags.c_contiguous
    return view


def test_misaligned_inputs_reach_the_native_kernels_aligned(simd_level, rng):
    # Reading a float through a misaligned pointer is undefined behaviour (UBSan reported it in
    # pack_query_panel and the scalar pack_rows): the bindings copy such an input. The native
    # functions are called directly, past the Python layer; the packed path (7 queries at every
    # level), the row path (1 query) and the weights are all reached, and the inputs stay as they were.
    q, x, w = _normal(rng, 7, 13), _normal(rng, 70, 13), rng.random(13).astype(np.float32)
    q_odd, x_odd, w_odd = _misaligned(q), _misaligned(x), _misaligned(w)
    for rows in (7, 1):
        for weights, weights_odd in ((None, None), (w, w_odd)):
            expected = np.empty((rows, 6), np.float32), np.empty((rows, 6), np.int64)
            got = np.empty((rows, 6), np.float32), np.empty((rows, 6), np.int64)
            latentspace._native.knn(q[:rows], x, 6, 0, *expected, weights)
            latentspace._native.knn(q_odd[:rows], x_odd, 6, 0, *got, weights_odd)
            np.testing.assert_array_equal(got[1], expected[1])
            np.testing.assert_array_equal(got[0], expected[0])
    norms, norms_odd = np.empty(70, np.float32), np.empty(70, np.float32)
    assert latentspace._native.sq_norms(x, norms) == latentspace._native.sq_norms(x_odd, norms_odd) == -1
    np.testing.assert_array_equal(norms_odd, norms)
    np.testing.assert_array_equal(q_odd, q)
    np.testing.assert_array_equal(x_odd, x)


def test_misaligned_outputs_are_refused_by_name(rng):
    # An output cannot be swapped for an aligned copy (the results would not reach the caller's
    # array), so the bindings refuse it rather than write floats through a misaligned pointer.
    q, x = _normal(rng, 3, 5), _normal(rng, 20, 5)
    distances, indices = np.empty((3, 4), np.float32), np.empty((3, 4), np.int64)
    with pytest.raises(ValueError, match="distances: expected an aligned array"):
        latentspace._native.knn(q, x, 4, 0, _misaligned(distances), indices)
    with pytest.raises(ValueError, match="indices: expected an aligned array"):
        latentspace._native.knn(q, x, 4, 0, distances, _misaligned(indices))
    with pytest.raises(ValueError, match="out: expected an aligned array"):
        latentspace._native.sq_norms(x, _misaligned(np.empty(20, np.float32)))


def test_noncontiguous_torch_inputs(rng):
    q, x = _normal(rng, 8, 12), _normal(rng, 50, 12)
    D0, I0 = latentspace.knn(q, x, 5)
    qt = torch.from_numpy(np.ascontiguousarray(q.T)).t()  # transposed view
    xt = torch.from_numpy(np.repeat(x, 2, axis=1))[:, ::2]  # strided columns
    assert not qt.is_contiguous() and not xt.is_contiguous()
    D, I = latentspace.knn(qt, xt, 5)
    np.testing.assert_array_equal(D.numpy(), D0)
    np.testing.assert_array_equal(I.numpy(), I0)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16]
)
def test_other_numpy_dtypes_equal_float32(dtype, rng):
    if np.dtype(dtype).kind == "f":
        q = rng.standard_normal((7, 10)).astype(dtype)
        x = rng.standard_normal((40, 10)).astype(dtype)
    else:
        q = rng.integers(0, 5, (7, 10)).astype(dtype)
        x = rng.integers(0, 5, (40, 10)).astype(dtype)
    for metric in METRICS:
        D, I = latentspace.knn(q, x, 8, metric)
        D0, I0 = latentspace.knn(q.astype(np.float32), x.astype(np.float32), 8, metric)
        assert D.dtype == np.float32 and I.dtype == np.int64
        np.testing.assert_array_equal(D, D0)
        np.testing.assert_array_equal(I, I0)


def test_nested_lists_are_accepted(rng):
    q, x = _normal(rng, 2, 3), _normal(rng, 5, 3)
    D, I = latentspace.knn(q.tolist(), x.tolist(), 2)
    D0, I0 = latentspace.knn(q, x, 2)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(D, D0)


def test_ragged_lists_are_refused_by_name(good):
    q, x = good
    with pytest.raises(ValueError, match="queries: expected rows of equal length"):
        latentspace.knn([[1.0, 2.0], [1.0]], x, 2)
    with pytest.raises(ValueError, match="database: expected rows of equal length"):
        latentspace.knn(q, [list(row) for row in x[:-1]] + [[1.0]], 2)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8]
)
def test_other_torch_dtypes_equal_float32(dtype, rng):
    q = torch.from_numpy(rng.integers(0, 6, (6, 9)).astype(np.float32) / 2).to(dtype)
    x = torch.from_numpy(rng.integers(0, 6, (30, 9)).astype(np.float32) / 2).to(dtype)
    D, I = latentspace.knn(q, x, 4, "l2")
    D0, I0 = latentspace.knn(q.float().numpy(), x.float().numpy(), 4, "l2")
    assert isinstance(D, torch.Tensor) and D.dtype == torch.float32 and I.dtype == torch.int64
    np.testing.assert_array_equal(D.numpy(), D0)
    np.testing.assert_array_equal(I.numpy(), I0)


def test_torch_requires_grad(rng):
    q = torch.from_numpy(_normal(rng, 4, 6)).requires_grad_(True)
    x = torch.from_numpy(_normal(rng, 25, 6)).requires_grad_(True)
    D, I = latentspace.knn(q, x, 3, "ip")
    assert isinstance(D, torch.Tensor) and not D.requires_grad
    D0, I0 = latentspace.knn(q.detach().numpy(), x.detach().numpy(), 3, "ip")
    np.testing.assert_array_equal(D.numpy(), D0)
    np.testing.assert_array_equal(I.numpy(), I0)
    # bf16 + requires_grad, non-contiguous
    qb = torch.from_numpy(_normal(rng, 6, 4)).to(torch.bfloat16).t().requires_grad_(True)
    Db, Ib = latentspace.knn(qb, x.detach()[:, :6], 2)
    Db0, Ib0 = latentspace.knn(qb.detach().float().contiguous().numpy(), x.detach()[:, :6].numpy(), 2)
    np.testing.assert_array_equal(Db.numpy(), Db0)
    np.testing.assert_array_equal(Ib.numpy(), Ib0)


@pytest.mark.parametrize("metric", METRICS)
def test_zero_queries(metric, rng):
    x = _normal(rng, 10, 4)
    D, I = latentspace.knn(np.empty((0, 4), np.float32), x, 3, metric)
    assert isinstance(D, np.ndarray) and D.shape == (0, 3) and D.dtype == np.float32
    assert isinstance(I, np.ndarray) and I.shape == (0, 3) and I.dtype == np.int64
    Dt, It = latentspace.knn(torch.empty((0, 4)), torch.from_numpy(x), 12, metric)
    assert isinstance(Dt, torch.Tensor) and tuple(Dt.shape) == (0, 12) and Dt.dtype == torch.float32
    assert isinstance(It, torch.Tensor) and tuple(It.shape) == (0, 12) and It.dtype == torch.int64


def test_zero_queries_still_check_the_database():
    bad = np.array([[1.0, 2.0], [np.nan, 1.0]], np.float32)
    with pytest.raises(ValueError, match="database: row 1"):
        latentspace.knn(np.empty((0, 2), np.float32), bad, 1)


# --- threads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nq,n,dim,k",
    [
        (3, 20000, 40, 10),  # few queries, large database: threads split the database
        (3, 20000, 40, 300),  # same, with large heaps to merge
        (300, 3000, 24, 7),  # many queries: threads split the queries
        (5, 50, 16, 60),  # fewer queries than threads, tiny database, padding
    ],
)
@pytest.mark.parametrize("metric", METRICS)
def test_thread_counts_give_identical_results(simd_level, metric, nq, n, dim, k, num_threads, rng):
    queries, database = _normal(rng, nq, dim), _normal(rng, n, dim)
    results = {}
    for threads in (1, 2, 3, 8):
        num_threads(threads)
        assert latentspace.get_num_threads() == threads
        results[threads] = latentspace.knn(queries, database, k, metric)
    D1, I1 = results[1]
    assert_knn_matches(D1, I1, queries, database, k, metric)
    for threads, (D, I) in results.items():
        np.testing.assert_array_equal(I, I1, err_msg=f"{threads} threads")
        np.testing.assert_array_equal(D, D1, err_msg=f"{threads} threads")


@pytest.mark.parametrize("metric", METRICS)
def test_repeated_calls_identical(metric, rng):
    queries, database = _normal(rng, 40, 31), _normal(rng, 2000, 31)
    D0, I0 = latentspace.knn(queries, database, 12, metric)
    for _ in range(5):
        D, I = latentspace.knn(queries, database, 12, metric)
        np.testing.assert_array_equal(D, D0)
        np.testing.assert_array_equal(I, I0)


def test_simd_levels_agree(rng):
    queries, database = _normal(rng, 20, 50), _normal(rng, 500, 50)
    for metric in METRICS:
        results = {}
        for level in SUPPORTED_SIMD_LEVELS:
            latentspace.set_simd_level(level)
            results[level] = latentspace.knn(queries, database, 15, metric)
        for level, (D, I) in results.items():
            assert_knn_matches(D, I, queries, database, 15, metric)


def test_k_as_numpy_integer(rng):
    q, x = _normal(rng, 2, 3), _normal(rng, 9, 3)
    D, I = latentspace.knn(q, x, np.int64(4))
    assert D.shape == (2, 4)
    D2, I2 = latentspace.knn(q, x, np.uint8(4))
    np.testing.assert_array_equal(I2, I)


# ---------------------------------------------------------------------------------------
# Bad inputs


@pytest.fixture
def good(rng):
    return _normal(rng, 4, 6), _normal(rng, 20, 6)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 6), ()])
def test_wrong_rank_queries(good, shape):
    _, x = good
    with pytest.raises(ValueError, match="queries"):
        latentspace.knn(np.ones(shape, np.float32), x, 2)
    with pytest.raises(ValueError, match="queries"):
        latentspace.knn(torch.ones(shape), x, 2)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 6), ()])
def test_wrong_rank_database(good, shape):
    q, _ = good
    with pytest.raises(ValueError, match="database"):
        latentspace.knn(q, np.ones(shape, np.float32), 2)
    with pytest.raises(ValueError, match="database"):
        latentspace.knn(q, torch.ones(shape), 2)


def test_dimension_mismatch(good):
    q, x = good
    with pytest.raises(ValueError, match="database"):
        latentspace.knn(q, x[:, :5], 2)
    with pytest.raises(ValueError, match="database"):
        latentspace.knn(q[:, :5], x, 2)
    with pytest.raises(ValueError, match="database"):
        latentspace.knn(torch.from_numpy(q), torch.from_numpy(np.ones((3, 7), np.float32)), 2)


def test_zero_columns(good):
    _, x = good
    with pytest.raises(ValueError, match="queries"):
        latentspace.knn(np.ones((3, 0), np.float32), x, 2)
    with pytest.raises(ValueError, match="(queries|database)"):
        latentspace.knn(np.ones((3, 0), np.float32), np.ones((3, 0), np.float32), 2)


@pytest.mark.parametrize("k", [0, -1, -100])
def test_k_not_positive(good, k):
    q, x = good
    with pytest.raises(ValueError, match="k"):
        latentspace.knn(q, x, k)


@pytest.mark.parametrize("k", [2.5, 3.0, "3", True, False, None, np.bool_(True), [3]])
def test_k_wrong_type(good, k):
    q, x = good
    with pytest.raises(TypeError, match="k"):
        latentspace.knn(q, x, k)


@pytest.mark.parametrize("nq", [0, 1, 3])
@pytest.mark.parametrize("k", [2**61, 2**62, 2**63 - 1])
@pytest.mark.parametrize("as_torch", [False, True])
def test_k_too_large_to_address(good, nq, k, as_torch):
    """(Q, k) results larger than any address space: a ValueError naming k, not numpy's
    'array is too big' or torch's 'Storage size calculation overflowed'."""
    q, x = good
    queries = torch.from_numpy(q[:nq]) if as_torch else q[:nq]
    with pytest.raises(ValueError, match=f"k: .*{k}"):
        latentspace.knn(queries, x, k)
    index = latentspace.FlatIndex(q.shape[1])
    with pytest.raises(ValueError, match=f"k: .*{k}"):
        index.search(queries, k)


@pytest.mark.parametrize("as_torch", [False, True])
def test_k_too_large_for_memory(good, as_torch):
    """Results that fit in 64-bit sizes but exceed any address space in use (384 PiB): a
    MemoryError naming k (torch's CPU allocator raises a bare RuntimeError)."""
    q, x = good
    queries = torch.from_numpy(q[:1]) if as_torch else q[:1]
    with pytest.raises(MemoryError, match="k: "):
        latentspace.knn(queries, x, 2**55)


@pytest.mark.parametrize("nq", [1, 5])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, -1e30, 7e18])
@pytest.mark.parametrize("which", ["queries", "database"])
def test_non_finite_or_overflowing_values(simd_level, which, bad, nq, rng):
    q, x = _normal(rng, nq, 9), _normal(rng, 40, 9)
    target, row = (q, nq - 1) if which == "queries" else (x, 17)
    target[row, 4] = bad
    for metric in METRICS:
        with pytest.raises(ValueError, match=rf"{which}.*row {row}\b"):
            latentspace.knn(q, x, 3, metric)


@pytest.mark.parametrize("nq", [1, 2, 9])
def test_bad_value_in_large_database_names_row(simd_level, nq, num_threads, rng):
    # the multi-threaded database-split path must report the row too
    num_threads(2)
    q, x = _normal(rng, nq, 8), _normal(rng, 20000, 8)
    x[15000, 0] = np.nan
    with pytest.raises(ValueError, match=r"database.*row 15000\b"):
        latentspace.knn(q, x, 5)
    x[15000, 0] = 0.0
    x[3, 7] = -np.inf
    with pytest.raises(ValueError, match=r"database.*row 3\b"):
        latentspace.knn(q, x, 5)
    x[3, 7] = 0.0
    x[15000, 0] = 0.0
    q2 = _normal(rng, 300, 8)
    q2[250, 7] = np.inf
    with pytest.raises(ValueError, match=r"queries.*row 250\b"):
        latentspace.knn(q2, x[:3000], 5)


@pytest.mark.parametrize("nq", [1, 7, 20])
def test_two_bad_database_rows_name_the_first(simd_level, nq, num_threads, rng):
    # With threads splitting the database, a thread whose slice starts at a bad row used to
    # stop the others early: the message named row 10016 instead of row 320, at random.
    num_threads(2)
    q, x = _normal(rng, nq, 16), _normal(rng, 20000, 16)
    x[320, 0] = np.nan
    x[10016, 5] = np.inf
    for _ in range(10):
        with pytest.raises(ValueError, match=r"database: row 320\b"):
            latentspace.knn(q, x, 5)


_MANY_THREADS_MEMORY_SCRIPT = """
import resource
import numpy as np
import latentspace
latentspace.set_num_threads(64)
rng = np.random.default_rng(0)
x = rng.random((2000, 8), dtype=np.float32)
q = rng.random((640, 8), dtype=np.float32)
latentspace.knn(q[:64], x, 1)  # starts the 64 threads: their stacks are address space too
used = int(open("/proc/self/statm").read().split()[0]) * 4096
resource.setrlimit(resource.RLIMIT_AS, (used + (600 << 20), resource.RLIM_INFINITY))
D, I = latentspace.knn(q, x, 2000)  # 10 queries a thread; their results take 15 MB
print("ok", I.shape)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_many_threads_take_scratch_for_their_own_queries_only():
    # Threads splitting the queries each held heaps for min(all queries, 64 MiB / k): here
    # 64 x 640 x 2000 x 12 bytes = 983 MB for 10 queries a thread (MemoryError under the limit).
    result = subprocess.run([sys.executable, "-c", _MANY_THREADS_MEMORY_SCRIPT], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "(640,", "2000)"]


def test_large_but_usable_values_are_accepted(rng):
    # squared norm 3.6e37 is below the documented 4.2e37 limit
    x = np.zeros((3, 2), np.float32)
    x[1, 0] = 6e18
    D, I = latentspace.knn(np.zeros((1, 2), np.float32), x, 3, "l2")
    assert np.isfinite(D).all()
    assert list(I[0]) == [0, 2, 1]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float64_overflowing_float32_is_refused():
    q = np.ones((1, 3))
    x = np.ones((4, 3))
    x[2, 1] = 1e300  # becomes inf in float32
    with pytest.raises(ValueError, match=r"database.*row 2\b"):
        latentspace.knn(q, x, 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.astype(str),
        lambda a: a.astype(object),
        lambda a: a.astype(np.complex64),
        lambda a: a > 0,
        lambda a: a.astype("m8[s]"),
    ],
    ids=["str", "object", "complex", "bool", "timedelta"],
)
def test_non_numeric_dtypes(good, make):
    q, x = good
    with pytest.raises(TypeError, match="queries"):
        latentspace.knn(make(q), x, 2)
    with pytest.raises(TypeError, match="database"):
        latentspace.knn(q, make(x), 2)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_non_numeric_torch_dtypes(good, dtype):
    q, x = good
    with pytest.raises(TypeError, match="queries"):
        latentspace.knn(torch.from_numpy(q).to(dtype), x, 2)
    with pytest.raises(TypeError, match="database"):
        latentspace.knn(torch.from_numpy(q), torch.from_numpy(x).to(dtype), 2)


@pytest.mark.parametrize("layout", ["sparse", "sparse_csr", "nested"])
def test_non_dense_torch_tensors(good, layout):
    """Sparse and nested tensors: a TypeError naming the argument (torch's own errors, a
    RuntimeError or 'NestedTensorImpl doesn't support sizes', named nothing)."""
    q, x = good
    make = {"sparse": lambda t: t.to_sparse(), "sparse_csr": lambda t: t.to_sparse_csr(),
            "nested": lambda t: torch.nested.nested_tensor(list(t))}[layout]
    with pytest.warns(UserWarning) if layout != "sparse" else contextlib.nullcontext():  # beta / prototype
        bad_q, bad_x = make(torch.from_numpy(q)), make(torch.from_numpy(x))
    with pytest.raises(TypeError, match="queries: expected a dense tensor"):
        latentspace.knn(bad_q, x, 2)
    with pytest.raises(TypeError, match="database: expected a dense tensor"):
        latentspace.knn(q, bad_x, 2)
    index = latentspace.FlatIndex(q.shape[1])
    with pytest.raises(TypeError, match="x: expected a dense tensor"):
        index.add(bad_x)
    with pytest.raises(TypeError, match="queries: expected a dense tensor"):
        index.search(bad_q, 2)
    with pytest.raises(TypeError, match="weights: expected a dense tensor"):
        latentspace.knn(q, x, 2, "weighted_l2", weights=torch.ones(q.shape[1]).to_sparse())


@pytest.mark.parametrize("value", ["abc", b"abc", None])
def test_non_array_inputs(good, value):
    q, x = good
    with pytest.raises(TypeError, match="queries"):
        latentspace.knn(value, x, 2)
    with pytest.raises(TypeError, match="database"):
        latentspace.knn(q, value, 2)


def test_empty_database(good):
    q, _ = good
    with pytest.raises(ValueError, match="database"):
        latentspace.knn(q, np.empty((0, 6), np.float32), 2)
    with pytest.raises(ValueError, match="database"):
        latentspace.knn(torch.from_numpy(q), torch.empty((0, 6)), 2)


@pytest.mark.parametrize("metric", ["L2", "euclidean", "", "cos", None, 0])
def test_unknown_metric(good, metric):
    q, x = good
    with pytest.raises(ValueError, match="metric"):
        latentspace.knn(q, x, 2, metric)


def test_non_cpu_tensor_refused(good):
    # a "meta" tensor stands in for a CUDA one (no GPU here): refused, naming the argument
    q, x = good
    with pytest.raises(ValueError, match="queries.*CPU"):
        latentspace.knn(torch.empty((4, 6), device="meta"), x, 2)
    with pytest.raises(ValueError, match="database.*CPU"):
        latentspace.knn(q, torch.empty((20, 6), device="meta"), 2)


@pytest.mark.skip(reason="needs a CUDA tensor; no GPU on the test machine")
def test_cuda_tensor_refused():  # pragma: no cover
    pass


def test_unpickled_arrays_are_searched(rng):
    # An array that came through pickle (from another process: multiprocessing, joblib) has
    # a float32 dtype equal to numpy's but another object; the binding compared dtypes by
    # identity and refused it as "queries: expected dtype float32, got float32".
    import pickle

    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = pickle.loads(pickle.dumps(x))
    assert y.dtype == x.dtype and y.dtype is not x.dtype
    expected = latentspace.knn(x, x, 3)
    weights = pickle.loads(pickle.dumps(np.ones(6, np.float32)))
    for found in (latentspace.knn(y, y, 3), latentspace.knn(y, x, 3, metric="weighted_l2", weights=weights)):
        np.testing.assert_array_equal(found[1], expected[1])
    index = latentspace.FlatIndex(6)
    index.add(y)
    np.testing.assert_array_equal(index.search(y, 3)[1], expected[1])


@pytest.mark.parametrize("as_torch", [False, True])
def test_k_beyond_the_machines_memory_is_refused_before_the_search(good, as_torch, monkeypatch):
    """Results larger than the machine's memory: numpy's and torch's lazy allocation of the two
    (Q, k) arrays succeeds, and filling them got the process killed (k=2**31 on a 23 GiB
    machine). A MemoryError naming k, before anything is filled."""
    from latentspace import _arrays
    from latentspace._memory_limit import MemoryLimit

    monkeypatch.setattr(_arrays, "memory_limit", lambda: MemoryLimit(1 << 20))
    q, x = good
    queries = torch.from_numpy(q[:1]) if as_torch else q[:1]
    with pytest.raises(MemoryError, match="k: .*machine's"):
        latentspace.knn(queries, x, 1 << 17)  # 1.5 MiB of results
    index = latentspace.FlatIndex(q.shape[1])
    index.add(x)
    with pytest.raises(MemoryError, match="k: .*machine's"):
        index.search(queries, 1 << 17)
    assert latentspace.knn(queries, x, 1 << 15)[1].shape == (1, 1 << 15)  # 384 KiB: searched


def test_a_dimension_mismatch_says_the_queries_set_the_dimension():
    """Queries of 63 columns against a database of 64: the message named only the database,
    which is the right one when the queries are the wrong ones; it now says whose dimension
    it expected."""
    q, x = np.zeros((3, 63), np.float32), np.zeros((10, 64), np.float32)
    with pytest.raises(ValueError, match=r"^database: expected 63 columns \(the queries' dimension\), got shape "
                                         r"\(10, 64\)$"):
        latentspace.knn(q, x, 2)


# --- Which bad row is named: the first in row order, queries first, on every path ---------

_PLAIN_WORDS = ("contains NaN or Inf, or values so large that squared distances overflow float32 (squared norm "
                "above 4.2e37); clean or rescale the data")
_BAD_VALUES = (np.nan, np.inf, -np.inf, 1e30)


def _unweighted_paths(metric, monkeypatch):
    """name -> call(queries, database) naming a bad row, for every unweighted path reachable
    without a GPU (the GPU orchestration on the CPU stand-in: chunks of 52 rows, blocks of 7
    queries; a FlatIndex's add names its argument "x", so it is given the database as "x")."""
    from latentspace import _cuda_search

    def stand_in(q, x):
        return _cuda_search._knn(_cuda_search.CpuBackend(), q, x, 3, metric, workspace_bytes=None,
                                 gpu_memory_bytes=4000)

    def index_search(q, x):
        index = latentspace.FlatIndex(x.shape[1], metric)
        index._buffer, index._ntotal = x, x.shape[0]  # stored as is: add would refuse it
        return index.search(q, 3)

    def host_chunks_without_queries(q, x):
        monkeypatch.setattr(_cuda_search, "HOST_CHUNK_BYTES", 52 * x.shape[1] * 4)
        try:
            return stand_in(q[:0], x.astype(np.float64))
        finally:
            monkeypatch.undo()

    return {"knn": lambda q, x: latentspace.knn(q, x, 3, metric), "FlatIndex.search": index_search,
            "GPU entry (stand-in)": stand_in,
            "streamed, device queries": lambda q, x: _cuda_search.search_streamed(
                _cuda_search.CpuBackend(), torch.from_numpy(q), x, 3, metric, workspace_bytes=1 << 20,
                memory_bytes=4000, query_checks=latentspace._arrays.query_row_checks(torch.from_numpy(q))),
            "knn without queries": lambda q, x: latentspace.knn(q[:0], x, 3, metric),
            "GPU entry without queries, host chunks": host_chunks_without_queries,
            "without queries, device database": lambda q, x: _cuda_search.check_database_without_queries(
                torch.from_numpy(x), None),
            "FlatIndex.add": lambda q, x: latentspace.FlatIndex(x.shape[1], metric).add(x)}


def _spoil_two(rng, target, placement):
    """Two rows of target given bad values (NaN, Inf, overflow, at random): adjacent in one
    kernel panel, on either side of a 52-row chunk's boundary, or anywhere. Returns the first."""
    n = target.shape[0]
    if placement == "one panel":
        first = 32 * int(rng.integers(0, max(1, n // 32))) + 2 * int(rng.integers(0, min(15, (n - 2) // 2 + 1)))
        rows = (first, first + 1)
    elif placement == "chunk boundary":
        boundary = 52 * int(rng.integers(1, n // 52))
        rows = (boundary - 1, boundary)
    else:
        rows = tuple(sorted(int(r) for r in rng.choice(n, size=2, replace=False)))
    for row in rows:
        target[row, int(rng.integers(0, target.shape[1]))] = rng.choice(_BAD_VALUES)
    return rows[0]


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("placement", ["one panel", "chunk boundary", "anywhere"])
@pytest.mark.parametrize("which", ["database", "queries", "both"])
def test_every_path_names_the_first_bad_row_in_the_same_words(metric, placement, which, rng, monkeypatch):
    q, x = _normal(rng, 40, 5), _normal(rng, 3000, 5)
    row = None
    if which != "queries":
        row = _spoil_two(rng, x, placement)
    if which != "database":
        row = _spoil_two(rng, q, "anywhere" if placement == "chunk boundary" else placement)
    name = "database" if which == "database" else "queries"
    paths = _unweighted_paths(metric, monkeypatch)
    got = {}
    for path, call in paths.items():
        if name == "queries" and ("without queries" in path or path == "FlatIndex.add"):
            continue  # no queries searched
        with pytest.raises(ValueError) as error:
            call(q, x)
        got[path] = str(error.value)
    expected = f"{name}: row {row} {_PLAIN_WORDS}"
    got = {path: words.replace("x: row", "database: row", 1) if path == "FlatIndex.add" else words
           for path, words in got.items()}
    assert got == dict.fromkeys(got, expected)
