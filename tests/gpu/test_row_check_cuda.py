"""The row check's CUDA kernel (csrc/cuda/norms.cu, through _cuda_row_check) against the CPU's
check, float64 norms and torch's ops; then the searches and the GPU index under it.

Every test forces the kernel (LATENTSPACE_CUDA_ROW_CHECK=native; the default since GPU run 12
verified it, docs/gpu-runs.md), except where torch's ops are the reference. Inputs are fresh
random values each run (the seed is printed); norms handed to the kernel are poisoned first, so
a row it forgets shows up as NaN. Marked "cuda": skipped where torch sees no GPU (run with
`pytest -m cuda`)."""

import numpy as np
import pytest
import torch

import latentspace as ls
from latentspace import _arrays, _cuda_row_check

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# one column; odd widths (element loads); multiples of 4 (4-element loads), one row a warp's
# single step (128) and several steps (1,024); 130: a multiple of 2 but not of 4
DIMS = (1, 3, 4, 5, 128, 130, 1024)
MAX_SQUARED_NORM = _arrays.MAX_SQUARED_NORM


@pytest.fixture(autouse=True)
def native_row_check(monkeypatch):
    monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "native")


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _on_gpu(array, dtype=torch.float32):
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to("cuda").to(dtype)


def _first_bad_float64(rows, weights=None) -> int:
    """The reference: the first row whose squared norm (or weighted one) in float64 is not
    finite or above MAX_SQUARED_NORM, of the rows as stored (rounded to their dtype)."""
    x = rows.double().cpu().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~(np.sum(x * x, axis=1) <= MAX_SQUARED_NORM)
        if weights is not None:
            bad |= ~((x * x) @ weights.astype(np.float64) <= MAX_SQUARED_NORM)
    found = np.flatnonzero(bad)
    return int(found[0]) if found.size else -1


def _check(rows, first_row=0, weights=None, norms=None) -> int:
    assert _cuda_row_check.takes(rows)
    return int(_cuda_row_check.first_unusable_row(rows, first_row, weights, norms).item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
def test_norms_match_float64_and_good_rows_pass(rng, dtype, dim):
    rows = _on_gpu(rng.standard_normal((777, dim)) * 3, dtype)
    norms = torch.full((777,), float("nan"), device="cuda")
    assert _check(rows, norms=norms) == -1
    expected = (rows.double() ** 2).sum(dim=1).cpu().numpy()
    np.testing.assert_allclose(norms.cpu().numpy(), expected, rtol=max(1e-5, dim * 6e-8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
def test_the_first_bad_row_is_found_wherever_it_is(rng, dtype, dim):
    n = 2000
    values = rng.standard_normal((n, dim))
    # 1e19: its square (1e38) is finite but above FLT_MAX / 8; float16 holds no such value, and
    # 7e4 is beyond its range (inf once stored). Each kind comes first in some draws.
    too_large = 7e4 if dtype == torch.float16 else 1e19
    kinds = rng.permutation(np.array([np.nan, np.inf, -np.inf, too_large], dtype=object)).tolist()
    bad = sorted(rng.choice(n, size=4, replace=False).tolist())
    for kind, row in zip(kinds, bad):
        values[row, rng.integers(dim)] = kind
    rows = _on_gpu(values, dtype)
    first_row = int(rng.integers(0, 10**9))
    assert _check(rows, first_row) == first_row + _first_bad_float64(rows) == first_row + bad[0]
    assert _check(rows[bad[-1] + 1 :].contiguous()) == -1


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("dim", (1, 4, 130))
def test_a_finite_norm_above_the_limit_is_refused(rng, dtype, dim):
    values = rng.standard_normal((3000, dim))
    row = int(rng.integers(3000))
    values[row, 0] = 1e19  # squared 1e38: finite, above FLT_MAX / 8 (4.25e37)
    rows = _on_gpu(values, dtype)
    assert torch.isfinite(rows).all()
    assert _check(rows) == row


@pytest.mark.parametrize("dim", (4, 5, 128))
def test_weighted_rows_too_large_only_when_weighted(rng, dim):
    weights = np.ones(dim, dtype=np.float32)
    weights[dim // 2] = 1e30
    values = rng.standard_normal((3000, dim))
    values[:, dim // 2] = 1e-3
    heavy = sorted(rng.choice(3000, size=3, replace=False).tolist())
    values[heavy, dim // 2] = [1e4, 1e5, 1e4]  # weighted 1e38 (finite) or 1e40 (inf): too large; plain: usable
    rows = _on_gpu(values)
    assert _check(rows) == -1
    assert _check(rows, weights=weights) == _first_bad_float64(rows, weights) == heavy[0]
    # a plain bad row before the first heavy one is the first, with or without weights
    values[heavy[0] // 2, 0] = np.nan
    rows = _on_gpu(values)
    assert _check(rows, weights=torch.from_numpy(weights).cuda()) == heavy[0] // 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned_weights", [True, False], ids=["aligned weights", "weights one past"])
def test_weighted_check_on_every_storage_agrees_with_torch_ops(rng, monkeypatch, dtype, aligned_weights):
    # Half storage widened before the weighted square; weights whose base is one float past a
    # 16-byte boundary (a slice) take the element loads: both as torch's ops and float64 find.
    dim, n = 12, 40_000
    weights = np.abs(rng.standard_normal(dim + 1)).astype(np.float32)
    weights[5] = 1e30  # 1e-3 squared weighs 1e24, usable; 1e4 (as float16 stores it) 1e38, too large
    on_gpu = torch.from_numpy(weights).cuda()
    w = on_gpu[1:] if not aligned_weights else on_gpu[:dim].clone()
    assert (w.data_ptr() % 16 == 0) is aligned_weights
    values = rng.standard_normal((n, dim))
    values[:, 4] = 1e-3  # weights[5] is column 4 of the sliced weights, column 5 of the aligned ones
    values[:, 5] = 1e-3
    heavy = sorted(rng.choice(n, size=2, replace=False).tolist())
    values[heavy, 4] = values[heavy, 5] = 1e4  # (bfloat16 keeps 9,984: 9.97e37 weighted, too large still)
    rows = _on_gpu(values, dtype)
    native = _check(rows, weights=w)
    expected = _first_bad_float64(rows, w.cpu().numpy())
    assert native == expected == heavy[0]
    monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "torch")
    assert int(_arrays.unusable_row_flag(rows, weights=w).item()) == native


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_not_aligned_for_four_element_loads(rng, dtype):
    flat = _on_gpu(rng.standard_normal(1 + 600 * 8), dtype)
    rows = flat[1:].view(600, 8)  # contiguous, one element past an aligned base
    assert rows.is_contiguous() and rows.data_ptr() % 16 != 0
    aligned = rows.clone()
    norms, aligned_norms = (torch.full((600,), float("nan"), device="cuda") for _ in range(2))
    assert _check(rows, norms=norms) == _check(aligned, norms=aligned_norms) == -1
    np.testing.assert_allclose(norms.cpu().numpy(), aligned_norms.cpu().numpy(), rtol=1e-6)
    rows[417, 3] = float("nan")
    assert _check(rows) == 417


def test_no_rows():
    assert _check(torch.empty((0, 16), device="cuda"), first_row=5) == -1


@pytest.mark.parametrize("dim, n", [(128, 600_000), (4, 17_000_000)])
def test_more_rows_than_one_launch_takes_at_once(rng, dim, n):
    # 2^16 blocks of 8 warps, a warp taking one row of 128 dimensions (524,288 rows a turn) or
    # 32 rows of 4 (16.8 M a turn): the rows past a turn are taken on the grid's next turn
    generator = torch.Generator(device="cuda").manual_seed(int(rng.integers(2**31)))
    rows = torch.randn(n, dim, device="cuda", generator=generator)
    norms = torch.full((n,), float("nan"), device="cuda")
    assert _check(rows, norms=norms) == -1
    assert not torch.isnan(norms).any()
    np.testing.assert_allclose(norms[-10:].cpu().numpy(), (rows[-10:].double() ** 2).sum(1).cpu().numpy(), rtol=1e-5)
    rows[n - 1, dim - 1] = float("inf")
    rows[n - 50_000, 1] = float("nan")
    assert _check(rows) == n - 50_000


@pytest.mark.parametrize("dim", (1, 2, 3, 8, 12, 20, 64, 96))
def test_narrow_rows_share_a_warp(rng, dim):
    # a group of 1 to 32 lanes a row: rows next to each other in one warp must not mix
    values = rng.standard_normal((5000, dim))
    row = int(rng.integers(5000))
    values[row, dim - 1] = np.nan
    rows = _on_gpu(values)
    norms = torch.full((5000,), float("nan"), device="cuda")
    assert _check(rows, norms=norms) == row
    expected = (rows.double() ** 2).sum(dim=1).cpu().numpy()
    got = norms.cpu().numpy()
    keep = np.arange(5000) != row
    np.testing.assert_allclose(got[keep], expected[keep], rtol=1e-5)
    assert np.isnan(got[row])


def test_agrees_with_torch_ops(rng, monkeypatch):
    for _ in range(5):
        # (above the host check's 16,384 elements whatever the width: the kernel runs)
        n, dim = int(rng.integers(_arrays._HOST_CHECK_ELEMENTS + 1, 40000)), int(rng.integers(1, 300))
        values = rng.standard_normal((n, dim))
        for row in rng.choice(n, size=int(rng.integers(0, 3)), replace=False):
            values[row, rng.integers(dim)] = rng.choice([np.nan, np.inf, 1e20])
        rows = _on_gpu(values)
        native = int(_arrays.unusable_row_flag(rows).item())
        monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "torch")
        assert int(_arrays.unusable_row_flag(rows).item()) == native
        monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "native")


def test_a_single_query_is_checked_on_the_gpu_under_the_kernel(rng, monkeypatch):
    # Under the kernel a tensor of a few elements is checked by one launch (its flag on the
    # GPU, read after the search is queued), not copied to the host first as under torch's ops.
    query = _on_gpu(rng.standard_normal((1, 128)))
    flag = _arrays.unusable_row_flag(query)
    assert flag.device.type == "cuda" and int(flag.item()) == -1
    query[0, 77] = float("nan")
    assert int(_arrays.unusable_row_flag(query, first_row=9).item()) == 9
    monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "torch")
    flag = _arrays.unusable_row_flag(query, first_row=9)
    assert flag.device.type == "cpu" and int(flag) == 9
    with pytest.raises(ValueError, match=r"queries: row 0 "):
        ls.knn(query, _on_gpu(rng.standard_normal((500, 128))), 5)
    monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "native")
    with pytest.raises(ValueError, match=r"queries: row 0 "):
        ls.knn(query, _on_gpu(rng.standard_normal((500, 128))), 5)


def test_queued_on_the_current_stream(rng):
    rows = _on_gpu(rng.standard_normal((200_000, 64)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rows.mul_(2.0)  # a full pass queued first on the side stream
        rows[199_000, 7] = float("nan")
        flag = _cuda_row_check.first_unusable_row(rows)
        assert int(flag.item()) == 199_000  # (read on the side stream: the default one does not wait for it)


def test_weights_of_the_wrong_length_are_refused(rng):
    rows = _on_gpu(rng.standard_normal((10, 6)))
    with pytest.raises(ValueError, match=r"weights: expected 6 values"):
        _cuda_row_check.first_unusable_row(rows, weights=np.ones(5, dtype=np.float32))


# ---- the searches and the GPU index under the kernel -------------------------------------


def test_knn_refuses_a_bad_database_row_in_the_same_words(rng, monkeypatch):
    queries = _on_gpu(rng.standard_normal((20, 32)))
    database = _on_gpu(rng.standard_normal((5000, 32)))
    database[3210, 5] = float("nan")
    with pytest.raises(ValueError) as native:
        ls.knn(queries, database, 5)
    monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "torch")
    with pytest.raises(ValueError) as torch_ops:
        ls.knn(queries, database, 5)
    assert str(native.value) == str(torch_ops.value)
    assert "3210" in str(native.value)


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16"])
def test_index_kept_norms_and_results_match_torch_ops(rng, monkeypatch, metric, storage):
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    q = rng.standard_normal((40, 48)).astype(np.float32)
    native = ls.FlatIndex(48, metric, device="cuda", storage=storage)
    native.add(x[:1000])
    native.add(x[1000:])
    monkeypatch.setenv(_cuda_row_check.BACKEND_VARIABLE, "torch")
    reference = ls.FlatIndex(48, metric, device="cuda", storage=storage)
    reference.add(x)
    if metric != "ip":
        # float32 sums of 48 squares in two orders: each within 47 ulps of the exact one
        np.testing.assert_allclose(native._gpu_norms.cpu().numpy(), reference._gpu_norms.cpu().numpy(), rtol=1e-5)
    d_native, i_native = native.search(q, 10)
    d_reference, i_reference = reference.search(q, 10)
    np.testing.assert_allclose(d_native, d_reference, rtol=1e-5, atol=1e-4)  # |x|^2 - 2 q.x + |q|^2 cancels
    assert (i_native == i_reference).mean() > 0.99  # ties within an ulp may order differently


def test_index_add_refuses_a_bad_row_in_the_same_words(rng):
    index = ls.FlatIndex(16, device="cuda")
    x = _on_gpu(rng.standard_normal((9000, 16)))
    x[8123, 0] = float("inf")
    with pytest.raises(ValueError, match=r"x: .*8123"):
        index.add(x)
    assert index.ntotal == 0
