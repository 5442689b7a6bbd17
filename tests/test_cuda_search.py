"""The Python side of GPU search, on the CPU: device resolution and every error path without
a GPU, the chunk planners, the top-k merge against the CPU kNN, and the whole chunked /
streamed orchestration run on CPU tensors (CpuBackend stands in for the CUDA kernel).

The GPU itself is tested in tests/gpu/test_knn_cuda.py (marked "cuda").
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import latentspace
from conftest import METRICS, assert_knn_matches
from latentspace import _arrays, _cuda_chunks, _cuda_device, _cuda_search, runtime
from latentspace._cuda_chunks import (MAX_ITEMS_PER_CALL, QUERY_TILE, plan_database_chunks, plan_host_stream,
                                      plan_query_chunks, even_chunk)
from latentspace._cuda_device import resolve_device
from latentspace._cuda_search import CpuBackend, merge_topk, search_resident, search_streamed

GPU_VISIBLE = latentspace.cuda_available()
needs_no_gpu = pytest.mark.skipif(GPU_VISIBLE, reason="a usable GPU is visible here")
PAD = {"l2": np.inf, "ip": -np.inf, "cosine": -np.inf}


def _integers(rng, *shape, high=2):
    """Small integers: float32 arithmetic is exact for l2 / ip, and exact ties abound."""
    return rng.integers(-high, high + 1, shape).astype(np.float32)


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------
# The device argument


@pytest.mark.parametrize("device", [None, "cpu", "cpu:0", torch.device("cpu"), torch.device("cpu", 0)])
def test_cpu_devices_resolve_to_none(device, rng):
    assert resolve_device(device) is None
    assert resolve_device(device, (_normal(rng, 2, 3), "queries"), (torch.zeros(4, 3), "database")) is None


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda 0", "", "mps", "meta",
                                    "cuda:\u0663", "cpu:", "cpu:x"])
def test_malformed_device_strings(device):
    with pytest.raises(ValueError, match=r"device: expected None, 'cpu', 'cuda', 'cuda:N' or a torch.device"):
        resolve_device(device)


@pytest.mark.parametrize("device", [0, 1.5, True, object(), ["cuda"]])
def test_device_of_the_wrong_type(device):
    with pytest.raises(TypeError, match=r"device: expected None, 'cpu', 'cuda', 'cuda:N' or a torch.device, got"):
        resolve_device(device)


def test_foreign_torch_device():
    with pytest.raises(ValueError, match="device: expected"):
        resolve_device(torch.device("meta"))


@needs_no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda"), torch.device("cuda", 1)])
def test_cuda_unavailable_names_every_reason(device):
    with pytest.raises(RuntimeError) as error:
        resolve_device(device)
    message = str(error.value)
    assert "asked for, but CUDA is unavailable here" in message
    assert "Use device='cpu'" in message
    for reason in _cuda_device.cuda_unavailable_reasons():
        assert reason in message
    info = latentspace.build_info()
    if not info["cuda_compiled"]:
        assert "built without CUDA" in message
    elif not info["gpu_visible"]:
        assert info["cuda_unavailable_reason"] in message
    if torch.version.cuda is None:
        assert f"torch {torch.__version__} has no CUDA support" in message


def _fake_build(monkeypatch, *, compiled: bool, visible: bool, reason: str = ""):
    info = dict(runtime.build_info(), cuda_compiled=compiled, gpu_visible=visible,
                cuda_unavailable_reason="" if visible else reason)
    monkeypatch.setattr(runtime, "build_info", lambda: info)


def _fake_torch(monkeypatch, *, cuda: str | None, available: bool, count: int = 0):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_reason_cpu_only_build(monkeypatch):
    _fake_build(monkeypatch, compiled=False, visible=False, reason="built without CUDA")
    _fake_torch(monkeypatch, cuda="12.4", available=True, count=1)
    assert _cuda_device.cuda_unavailable_reasons() == [
        "latentspace was built without CUDA (reinstall it where nvcc is found, or with "
        "-C cmake.define.LATENTSPACE_CUDA=ON)"
    ]
    with pytest.raises(RuntimeError, match="latentspace was built without CUDA"):
        latentspace.knn(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), 1, device="cuda")


def test_reason_no_gpu_for_latentspace(monkeypatch):
    _fake_build(monkeypatch, compiled=True, visible=False, reason="no CUDA-capable device is detected")
    _fake_torch(monkeypatch, cuda="12.4", available=True, count=1)
    with pytest.raises(RuntimeError, match=r"latentspace finds no usable CUDA GPU \(no CUDA-capable device is detected\)"):
        latentspace.FlatIndex(4, device="cuda")


def test_reason_torch_without_cuda(monkeypatch):
    _fake_build(monkeypatch, compiled=True, visible=True)
    _fake_torch(monkeypatch, cuda=None, available=False)
    reasons = _cuda_device.cuda_unavailable_reasons()
    assert len(reasons) == 1 and f"the installed torch {torch.__version__} has no CUDA support" in reasons[0]
    with pytest.raises(RuntimeError, match="has no CUDA support"):
        resolve_device("cuda:0")


def test_reason_torch_sees_no_gpu(monkeypatch):
    _fake_build(monkeypatch, compiled=True, visible=True)
    _fake_torch(monkeypatch, cuda="12.4", available=False)
    assert _cuda_device.cuda_unavailable_reasons() == ["torch sees no CUDA GPU"]


@pytest.mark.parametrize("architectures,capability,runs", [
    (["80", "90"], (8, 0), True), (["80", "90"], (8, 6), True), (["80", "90"], (9, 0), True),
    (["80", "90"], (7, 5), False),  # a T4: older than every entry
    (["80", "90"], (12, 0), True),  # newer: the driver compiles compute_90's PTX
    (["80-real", "90-real"], (12, 0), False), (["80-real"], (8, 9), True), (["86-real"], (8, 0), False),
    (["80-virtual"], (8, 0), True), (["80-virtual"], (7, 5), False), (["90a"], (9, 0), True), (["90a"], (10, 0), False), (["90a-virtual"], (9, 0), True),
    ([], (9, 0), False)])
def test_kernels_run_on_the_capabilities_cuda_allows(architectures, capability, runs):
    """CMake's architecture entries against a GPU's compute capability: machine code runs on
    its major version at a minor at least its own, PTX on anything newer, "90a" on sm_90 alone."""
    assert _cuda_device.kernels_run_on(architectures, capability) is runs


def test_a_gpu_older_than_the_build_is_refused_by_name(monkeypatch):
    """A GPU that none of the build's kernels run on (here a fake T4 against sm_80 / sm_90) is
    refused when a search asks for it, not at its first launch ("no kernel image")."""
    info = dict(runtime.build_info(), cuda_compiled=True, gpu_visible=True, cuda_architectures=["80", "90"],
                cuda_devices=[{"index": 0, "name": "Tesla T4", "compute_capability": (7, 5),
                               "total_memory_bytes": 16 << 30, "multiprocessors": 40}])
    monkeypatch.setattr(runtime, "build_info", lambda: info)
    _fake_torch(monkeypatch, cuda="12.4", available=True, count=1)
    with pytest.raises(RuntimeError, match=r"device: 'cuda:0' asked for, but Tesla T4 \(compute capability 7\.5\) "
                                           r"runs none of this build's kernels \(architectures 80;90\); reinstall "
                                           r"latentspace with LATENTSPACE_CUDA_ARCHITECTURES=75"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("value", [1 << 63, 1 << 64])
def test_a_budget_beyond_a_size_t_is_refused_by_name(value):
    """workspace_bytes and gpu_memory_bytes go to the native side as size_t: checked below
    2^63 by name (pybind's own error names neither)."""
    with pytest.raises(ValueError, match=r"workspace_bytes: expected an integer in \[1, 9223372036854775808\)"):
        _cuda_device.check_budget(value, "workspace_bytes")


def test_cuda_index_resolution(monkeypatch):
    _fake_build(monkeypatch, compiled=True, visible=True)
    _fake_torch(monkeypatch, cuda="12.4", available=True, count=2)
    assert _cuda_device.cuda_unavailable_reasons() == []
    assert resolve_device("cuda") == torch.device("cuda", 0)  # torch's current device
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device: 'cuda:2' asked for, but 2 CUDA GPUs are visible \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_cuda_available_agrees_with_the_reasons():
    assert latentspace.cuda_available() == (not _cuda_device.cuda_unavailable_reasons())


@needs_no_gpu
def test_public_api_refuses_cuda_cleanly(rng, tmp_path):
    q, x = _normal(rng, 3, 4), _normal(rng, 10, 4)
    assert latentspace.cuda_available() is False
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(RuntimeError, match="CUDA is unavailable here"):
            latentspace.knn(q, x, 2, device=device)
        with pytest.raises(RuntimeError, match="CUDA is unavailable here"):
            latentspace.FlatIndex(4, "ip", device=device)
    index = latentspace.FlatIndex(4)
    index.add(x)
    with pytest.raises(RuntimeError, match="CUDA is unavailable here"):
        index.to("cuda")
    index.save(tmp_path / "index.lsx")
    with pytest.raises(RuntimeError, match="CUDA is unavailable here"):
        latentspace.load_index(tmp_path / "index.lsx", device="cuda")
    # the device is checked before the file is read
    with pytest.raises(RuntimeError, match="CUDA is unavailable here"):
        latentspace.load_index(tmp_path / "missing.lsx", device="cuda")


def test_cpu_device_is_the_cpu_search(rng):
    q, x = _normal(rng, 6, 9), _normal(rng, 50, 9)
    D0, I0 = latentspace.knn(q, x, 4, "cosine")
    for device in ("cpu", torch.device("cpu")):
        D, I = latentspace.knn(q, x, 4, "cosine", device=device, workspace_bytes=1, gpu_memory_bytes=1)
        np.testing.assert_array_equal(D, D0)
        np.testing.assert_array_equal(I, I0)
    index = latentspace.FlatIndex(9, "cosine", device="cpu")
    index.add(x)
    assert index.device == "cpu" and "device" not in repr(index)
    D, I = index.search(q, 4, workspace_bytes=1)
    np.testing.assert_array_equal(I, I0)


@pytest.mark.parametrize("name", ["workspace_bytes", "gpu_memory_bytes"])
@pytest.mark.parametrize("value,error", [(0, ValueError), (-5, ValueError), ("1GB", TypeError),
                                         (True, TypeError), (1.5, TypeError), (1 << 63, ValueError)])
def test_byte_bounds_are_checked_on_the_cpu_too(name, value, error, rng):
    q, x = _normal(rng, 2, 3), _normal(rng, 5, 3)
    expected = rf"{name}: expected an integer in \[1, 9223372036854775808\)"
    with pytest.raises(error, match=expected):
        latentspace.knn(q, x, 1, **{name: value})
    if name == "workspace_bytes":
        index = latentspace.FlatIndex(3)
        index.add(x)
        with pytest.raises(error, match=expected):
            index.search(q, 1, workspace_bytes=value)


def test_search_on_numpy_keeps_torch_unloaded():
    code = ("import sys, numpy as np, latentspace as ls; x = np.ones((5, 3), np.float32); "
            "ls.knn(x, x, 2); ls.knn(x, x, 2, device='cpu', workspace_bytes=10); "
            "i = ls.FlatIndex(3, device=None); i.add(x); i.search(x, 1); assert i.device == 'cpu'; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------------------------------
# Input checks on tensors: the CPU's messages


def _bad_inputs():
    yield torch.zeros(5), "1-d"
    yield torch.zeros(2, 3, 4), "3-d"
    yield torch.zeros(4, 3, dtype=torch.bool), "bool"
    yield torch.zeros(4, 3, dtype=torch.complex64), "complex"
    yield torch.zeros(4, 0), "no columns"
    yield torch.zeros(4, 5), "wrong dimension"


@pytest.mark.parametrize("value,label", list(_bad_inputs()), ids=[label for _, label in _bad_inputs()])
def test_device_matrix_errors_equal_the_cpu_ones(value, label):
    with pytest.raises((TypeError, ValueError)) as cpu:
        _arrays.as_matrix(value, "queries", dim=3)
    with pytest.raises(type(cpu.value)) as device:
        _arrays.as_device_matrix(value, "queries", torch.device("cpu"), dim=3)
    assert str(device.value) == str(cpu.value)
    array = value.numpy()
    with pytest.raises((TypeError, ValueError)) as cpu:
        _arrays.as_matrix(array, "database", dim=3)
    with pytest.raises(type(cpu.value)) as host:
        _arrays.as_host_matrix(array, "database", dim=3)
    assert str(host.value) == str(cpu.value)


def test_device_matrix_copies_only_when_needed(rng):
    x = torch.from_numpy(_normal(rng, 6, 4))
    same, kind = _arrays.as_device_matrix(x, "x", torch.device("cpu"))
    assert kind == "torch" and same.data_ptr() == x.data_ptr()
    for other in (x.double(), x.half(), x.t().contiguous().t(), x[:, ::2]):
        converted, _ = _arrays.as_device_matrix(other, "x", torch.device("cpu"))
        assert converted.dtype == torch.float32 and converted.is_contiguous()
        np.testing.assert_array_equal(converted.numpy(), other.float().numpy())
    array = _normal(rng, 3, 4)
    array.flags.writeable = False  # a read-only memory map, say: no warning, no copy on the host
    tensor, kind = _arrays.as_device_matrix(array, "x", torch.device("cpu"))
    assert kind == "numpy"
    np.testing.assert_array_equal(tensor.numpy(), array)
    wide = rng.standard_normal((5, 3))  # float64 stays float64 on the host, for chunked conversion
    assert _arrays.as_host_matrix(wide, "x") is wide


@pytest.fixture(params=["device", "host"])
def row_check_path(request, monkeypatch):
    """unusable_row_flag's two paths: torch reductions on the tensor's device, or (small
    tensors, _HOST_CHECK_ELEMENTS) a copy to the host and the CPU's check."""
    monkeypatch.setattr(_arrays, "_HOST_CHECK_ELEMENTS", 0 if request.param == "device" else 1 << 14)
    return request.param


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf, 1e19, 3e38])
@pytest.mark.parametrize("bad_row", [0, 5, 12])
def test_device_row_check_equals_the_cpu_one(bad_value, bad_row, rng, monkeypatch, row_check_path):
    monkeypatch.setattr(_arrays, "_NORM_ROWS_PER_STEP", 4)  # several steps
    x = _normal(rng, 13, 1 if bad_value == 1e19 else 6)
    x[bad_row, 0] = bad_value
    x[12, -1] = np.nan  # a later bad row: the first is named
    with pytest.raises(ValueError) as cpu:
        _arrays.check_rows_usable(x, "database")
    flag = _arrays.unusable_row_flag(torch.from_numpy(x))
    assert flag.dtype == torch.int64 and int(flag) == bad_row
    with pytest.raises(ValueError) as device:
        _arrays.check_rows_usable_flags([flag], ["database"])
    assert str(device.value) == str(cpu.value)
    assert int(_arrays.unusable_row_flag(torch.from_numpy(x), first_row=100)) == 100 + bad_row


def test_device_row_check_agrees_with_the_cpu_at_the_limit(rng, row_check_path):
    """A row whose float32 sum of squares (4.2535296e37) lies just above the limit
    (4.2535293e37): the CPU refuses it, and so must the device check (its norm, squared again,
    rounded below the limit and let it through)."""
    x = _normal(rng, 10000, 2)
    x[7] = [6.498040602632913e18, -5.5746435247138406e17]
    assert _arrays.first_unusable_row(x) == 7
    assert int(_arrays.unusable_row_flag(torch.from_numpy(x))) == 7
    assert int(_arrays.unusable_row_flag(torch.from_numpy(x[:16]))) == 7  # the host path's size too


def test_device_row_check_passes_usable_rows(rng, row_check_path):
    x = _normal(rng, 9, 3)
    x[2] = 0.0
    x[4, 0] = np.sqrt(_arrays.MAX_SQUARED_NORM) * 0.999  # just below the limit
    _arrays.check_rows_usable(x, "x")
    assert int(_arrays.unusable_row_flag(torch.from_numpy(x))) == -1
    assert int(_arrays.unusable_row_flag(torch.zeros(0, 3))) == -1
    _arrays.check_rows_usable_flags([], [])


def test_row_checks_of_both_paths_are_read_together(rng, monkeypatch):
    """raise_unusable_rows reads host flags (small tensors) and device flags in one list, in
    order: the first check that found a bad row is the one named."""
    monkeypatch.setattr(_arrays, "_HOST_CHECK_ELEMENTS", 20)
    small, large = _normal(rng, 2, 4), _normal(rng, 50, 4)  # 8 elements: host; 200: torch
    large[7, 1] = np.inf
    checks = [(_arrays.unusable_row_flag(torch.from_numpy(small)), "queries", False),
              (_arrays.unusable_row_flag(torch.from_numpy(large)), "database", False)]
    with pytest.raises(ValueError, match="database: row 7 contains NaN or Inf"):
        _arrays.raise_unusable_rows(checks)
    small[1, 0] = np.nan
    checks[0] = (_arrays.unusable_row_flag(torch.from_numpy(small), first_row=40), "queries", False)
    with pytest.raises(ValueError, match="queries: row 41 contains NaN or Inf"):
        _arrays.raise_unusable_rows(checks)


# ---------------------------------------------------------------------------------------
# Planners


def knn_cu_workspace(num_queries: int, num_database: int, k: int, multiprocessors: int = 132) -> int:
    """A stand-in for the workspace size of csrc/cuda/knn_plan.cuh, with its shape but not its
    figures: fewer queries -> more database splits, so the bytes are not monotonic in the number
    of queries, which is what the Python planner must cope with. It is an older form of the
    plan (64-row tiles, lists of k + max(k, 256), no split rule; the kernel's plan now has
    128-row tiles, the split rule and the fitted and large-k plans): tests that need the real
    figures ask `_native._cuda_plan_for`."""
    if num_queries == 0:
        return 0

    def ceil_div(a, b):
        return -(-a // b)

    def aligned(n):
        return ceil_div(n, 256) * 256

    query_tiles = ceil_div(num_queries, 64)
    database_tiles = ceil_div(num_database, 64)
    wanted = ceil_div(2 * multiprocessors, max(query_tiles, 1))
    most = max(1, database_tiles // 4)
    splits = min(max(wanted, 1), min(most, 65535))
    split_length = ceil_div(database_tiles, splits) * 64
    splits = max(1, ceil_div(num_database, split_length))
    capacity = k + max(k, 4 * 64)
    cub = 2 * num_queries * k * 8 + 4096
    return (aligned(num_queries * 4) + aligned(num_database * 4) + aligned(num_queries * splits * capacity * 8)
            + aligned(num_queries * splits * 4) + 2 * aligned(num_queries * k * 8) + aligned((num_queries + 1) * 4)
            + aligned(cub))


def _check_query_plan(plan, num_queries, k, workspace_of, bound):
    if num_queries == 0:
        assert plan == []
        return
    assert [start for start, _, _ in plan] == [0] + [stop for _, stop, _ in plan[:-1]]
    assert (plan[-1][1] if plan else 0) == num_queries
    for start, stop, need in plan:
        assert stop > start
        assert (stop - start) * k <= MAX_ITEMS_PER_CALL
        assert need == workspace_of(stop - start) <= bound


@pytest.mark.parametrize("num_queries", [0, 1, 7, 63, 64, 65, 1000, 100_000])
@pytest.mark.parametrize("num_database", [1, 100, 100_003, 10_000_000])
@pytest.mark.parametrize("k", [1, 10, 1024, 16384])
def test_query_plan_meets_the_bound_with_the_kernels_workspace(num_queries, num_database, k):
    k = min(k, num_database)  # the searches cap k at the rows of the call
    bound = 1 << 30
    workspace_of = lambda n: knn_cu_workspace(n, num_database, k)  # noqa: E731
    plan = plan_query_chunks(num_queries, k, workspace_of, bound)
    _check_query_plan(plan, num_queries, k, workspace_of, bound)
    if num_queries and workspace_of(num_queries) <= bound:
        assert len(plan) == 1  # no splitting when it is not needed


def test_query_plan_handles_a_non_monotonic_workspace():
    # Chunks of 64 need more than chunks of 65 (as in knn.cu); the tail is sized by itself.
    workspace_of = lambda n: 10 * n if n != 64 else 10_000  # noqa: E731
    plan = plan_query_chunks(130, 1, workspace_of, 1000)
    _check_query_plan(plan, 130, 1, workspace_of, 1000)
    plan = plan_query_chunks(64, 1, workspace_of, 1000)
    _check_query_plan(plan, 64, 1, workspace_of, 1000)


def _tiles(sizes):
    return sum(-(-size // QUERY_TILE) for size in sizes)


def test_query_plan_calls_scan_the_fewest_query_tiles_in_as_many_calls():
    workspace_of = lambda n: 1000 * n  # noqa: E731
    # 300 fit a call: 1,000 queries in 4 calls either way; 256 a call scan 8 tiles, 300 10.
    plan = plan_query_chunks(1000, 1, workspace_of, 300_000)
    _check_query_plan(plan, 1000, 1, workspace_of, 300_000)
    assert [stop - start for start, stop, _ in plan] == [256, 256, 256, 232]
    # 5,000 fit: 10,000 in 2 calls (3 if cut to 4,992), 40 tiles each.
    assert [stop - start for start, stop, _ in plan_query_chunks(10_000, 1, workspace_of, 5_000_000)] == [5000, 5000]
    # Within one tile, and the whole rest in one call: as they fit.
    assert [stop - start for start, stop, _ in plan_query_chunks(1000, 1, workspace_of, 100_000)] == [100] * 10
    assert [stop - start for start, stop, _ in plan_query_chunks(300, 1, workspace_of, 300_000)] == [300]


def _full_calls_plan(num_queries, workspace_of, bound):
    """The planner before even_chunk (k = 1): each call as many queries as its search for a
    fitting count finds, the last the rest."""
    sizes, size, start = [], num_queries, 0
    while start < num_queries:
        count = min(size, num_queries - start)
        while workspace_of(count) > bound and count > 1:
            count = max(1, min(count // 2, count * bound // workspace_of(count)))
        sizes.append(count)
        start, size = start + count, count
    return sizes


@pytest.mark.parametrize("num_queries", [129, 1000, 3333, 10_000])
@pytest.mark.parametrize("fit", [100, 129, 200, 300, 1000, 1500])
def test_query_plan_never_takes_more_calls_or_tiles_than_full_calls(num_queries, fit):
    """Against calls of as many queries as fit: no more calls, no more query tiles."""
    workspace_of = lambda n: n  # noqa: E731
    sizes = [stop - start for start, stop, _ in plan_query_chunks(num_queries, 1, workspace_of, fit)]
    full = _full_calls_plan(num_queries, workspace_of, fit)
    assert sum(sizes) == num_queries and max(sizes) <= fit
    assert len(sizes) == len(full) and _tiles(sizes) <= _tiles(full)
    assert _tiles(sizes) < _tiles(full) or (num_queries, fit) not in {(1000, 300), (10_000, 1500), (3333, 300)}


def test_query_plan_keeps_a_last_call_that_fits():
    """A short last call can need more workspace than the long ones (fewer query tiles, more
    splits or the large-k plan): the calls are sized so that the last one fits too. Here a
    call of 700 to 799 queries needs more than the bound: 10,000 queries in calls of the 3,100
    that fit would leave 700 last, in calls of 3,072 (fewer tiles) 784, neither of which fits
    (the planner before even_chunk cut the 700 into calls of 2: 353 calls); 3 x 2,560 leave
    2,320."""
    workspace_of = lambda n: 10 ** 6 if 700 <= n < 800 else n  # noqa: E731
    plan = plan_query_chunks(10_000, 1, workspace_of, 3100)
    _check_query_plan(plan, 10_000, 1, workspace_of, 3100)
    assert [stop - start for start, stop, _ in plan] == [2560, 2560, 2560, 2320]
    assert len(_full_calls_plan(10_000, workspace_of, 3100)) == 353


def test_even_chunk_takes_only_sizes_that_fit():
    # 700 queries, 389 fit: 2 calls; 384 then 316 scan 6 tiles, 389 then 311 7, 350 and 350
    # 6. Sizes that need more than the bound are passed over.
    assert even_chunk(3 * QUERY_TILE + 5, 389, 700, lambda n: n, 10 ** 6) == (384, 384)
    assert even_chunk(3 * QUERY_TILE + 5, 389, 700, lambda n: 10 ** 9 if n == 384 else n, 10 ** 6) == (350, 350)
    assert even_chunk(3 * QUERY_TILE + 5, 389, 700, lambda n: 10 ** 9 if n in (384, 350) else n, 10 ** 6) == (389, 389)
    # No size leaves a last call that fits: the count as given.
    assert even_chunk(300, 7, 1000, lambda n: 10 ** 9 if n < 300 else n, 10 ** 6) == (300, 7)


def test_query_plan_respects_the_item_limit():
    plan = plan_query_chunks(5000, 1 << 20, lambda n: 0, 1)
    assert max(stop - start for start, stop, _ in plan) == MAX_ITEMS_PER_CALL // (1 << 20)
    _check_query_plan(plan, 5000, 1 << 20, lambda n: 0, 1)


def test_query_plan_refuses_a_bound_below_one_query():
    with pytest.raises(ValueError, match=r"workspace_bytes: one query with k=7 needs 500 bytes of GPU workspace "
                                         r"against this database, more than the bound of 499; pass "
                                         r"workspace_bytes=500 or more, or use a smaller k"):
        plan_query_chunks(10, 7, lambda n: 500 * n, 499)


def test_too_small_a_workspace_names_the_asked_k_and_a_bound_that_works():
    """The database is cut into pieces of rows_per_call(bound) rows, each searched for
    min(k, rows): the message still names the k asked for, and the bound it suggests works."""
    workspace_of = lambda nq, nb, k, bound: 64 * nq * k + 4 * nb  # noqa: E731
    with pytest.raises(ValueError, match=r"workspace_bytes: one query with k=256 needs (\d+) bytes") as refused:
        _cuda_chunks.check_one_query_fits(workspace_of, 50_000, 256, 1000)
    bound = int(re.search(r"needs (\d+) bytes", str(refused.value)).group(1))
    assert bound > 1000
    _cuda_chunks.check_one_query_fits(workspace_of, 50_000, 256, bound)  # enough, as promised
    _cuda_chunks.check_one_query_fits(workspace_of, 50_000, 256, 1 << 30)


@pytest.mark.parametrize("n,rows", [(1, 1), (10, 3), (10, 10), (10, 100), (100_003, 4096)])
def test_database_plan_covers_the_rows(n, rows):
    pieces = plan_database_chunks(n, rows)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(b[0] == a[1] for a, b in zip(pieces, pieces[1:]))
    assert all(0 < stop - start <= rows for start, stop in pieces)


@pytest.mark.parametrize("n,rows,first", [(1, 1, 1), (10, 3, 1), (10, 10, 10), (100, 64, 8), (1000, 64, 8),
                                          (1000, 64, 0), (1000, 64, 500), (100_003, 4096, 512)])
def test_stream_plan_starts_small_and_covers_the_rows(n, rows, first):
    pieces = _cuda_chunks.plan_stream_chunks(n, rows, first)
    sizes = [stop - start for start, stop in pieces]
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(b[0] == a[1] for a, b in zip(pieces, pieces[1:]))
    assert all(0 < size <= rows for size in sizes)
    assert sizes[0] == min(n, rows, max(1, first))
    # each chunk twice the one before it, up to `rows` (the last one may be cut short)
    assert all(b == min(rows, 2 * a) for a, b in zip(sizes[:-2], sizes[1:-1]))
    assert sizes[-1] <= min(rows, 2 * sizes[-2]) if len(sizes) > 1 else True


@pytest.mark.parametrize("rows,dim,expected", [
    (1 << 19, 128, 1 << 16),  # 256 MiB chunks (the largest): an eighth, 32 MiB
    (1 << 16, 128, 1 << 14),  # 32 MiB: the 8 MiB floor (16,384 rows of 512 bytes), not 4 MiB
    (1000, 128, 1000),        # a chunk below the floor: no smaller first chunk
    (64, 1 << 20, 8),         # rows of 4 MiB: an eighth
    (1, 1, 1),
])
def test_first_stream_chunk(rows, dim, expected):
    assert _cuda_chunks.first_stream_rows(rows, dim) == expected


def test_rows_per_call():
    assert _cuda_chunks.rows_per_call(1) == 1
    assert _cuda_chunks.rows_per_call(8000) == 1000
    assert _cuda_chunks.rows_per_call(1 << 40) == _cuda_chunks.MAX_ROWS_PER_CALL < 1 << 29  # knn.cu: k < 2^29


@pytest.mark.parametrize("num_queries", [1, 7, 10_000, 10_000_000])
@pytest.mark.parametrize("num_database", [1, 1000, 100_000_000])
@pytest.mark.parametrize("dim", [1, 128, 2048])
@pytest.mark.parametrize("k", [1, 100, 16384])
@pytest.mark.parametrize("memory_bytes", [1, 1 << 20, 2 << 30])
def test_host_stream_plan_fits_the_budget(num_queries, num_database, dim, k, memory_bytes):
    workspace_bytes = 1 << 30
    query_rows, rows = plan_host_stream(num_queries, num_database, dim, k, memory_bytes, workspace_bytes)
    assert 1 <= query_rows <= num_queries and 1 <= rows <= num_database
    assert rows <= max(1, _cuda_chunks.HOST_CHUNK_BYTES // (dim * 4))
    assert rows <= _cuda_chunks.rows_per_call(workspace_bytes)
    kept = min(k, num_database)
    used = query_rows * (dim * 4 + _cuda_chunks.RESULT_BYTES_PER_NEIGHBOUR * kept) + 2 * rows * dim * 4
    if query_rows > 1 or rows > 1:  # below one query and one row, the budget is exceeded, not refused
        assert used <= memory_bytes
    if used <= memory_bytes // 2 and query_rows == num_queries:
        assert rows == min(num_database, _cuda_chunks.HOST_CHUNK_BYTES // (dim * 4)) or rows > 1


# ---------------------------------------------------------------------------------------
# merge_topk against the CPU search


def _chunk_results(queries, database, k, metric, bounds):
    """latentspace.knn of each database chunk (k may exceed a chunk: -1 / inf padding)."""
    for start, stop in zip(bounds[:-1], bounds[1:]):
        D, I = latentspace.knn(queries, database[start:stop], k, metric)
        yield start, torch.from_numpy(D), torch.from_numpy(I)


def _merged(queries, database, k, metric, bounds):
    running = None
    for start, D, I in _chunk_results(queries, database, k, metric, bounds):
        running = merge_topk(running, (D, I), k, metric, offset=start)
    return running


def _random_bounds(rng, n, pieces):
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(pieces - 1, n - 1), replace=False)) if n > 1 else []
    return [0, *map(int, cuts), n]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k", [(1, 1), (1, 5), (40, 1), (40, 7), (40, 40), (40, 45), (300, 64), (300, 310)])
@pytest.mark.parametrize("pieces", [1, 2, 5, 40])
def test_merge_of_chunks_equals_knn_of_the_whole(metric, n, k, pieces, rng):
    queries, database = _integers(rng, 17, 5), _integers(rng, n, 5)  # exact arithmetic, many ties
    database[rng.integers(0, n, n // 4)] = 0.0  # zero rows: cosine ties at 0
    D, I = _merged(queries, database, k, metric, _random_bounds(rng, n, pieces))
    D0, I0 = latentspace.knn(queries, database, k, metric)
    assert D.shape == I.shape == (17, k) and D.dtype == torch.float32 and I.dtype == torch.int64
    if metric == "cosine":  # rounding differs between kernel paths: compare with the reference
        assert_knn_matches(D, I, queries, database, k, metric)
        np.testing.assert_allclose(D.numpy(), D0, atol=1e-6)
    else:
        np.testing.assert_array_equal(I.numpy(), I0)
        np.testing.assert_array_equal(D.numpy(), D0)


@pytest.mark.parametrize("metric", METRICS)
def test_merge_keeps_ties_on_the_lower_index_across_chunks(metric, rng):
    vector = _normal(rng, 1, 8)
    database = np.repeat(vector, 30, axis=0)
    queries = _normal(rng, 4, 8)
    for bounds in ([0, 30], [0, 1, 30], [0, 7, 8, 20, 30], list(range(31))):
        D, I = _merged(queries, database, 12, metric, bounds)
        np.testing.assert_array_equal(I.numpy(), np.tile(np.arange(12), (4, 1)))
        assert (D == D[:, :1]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_merge_pads_like_knn_when_k_exceeds_the_database(metric, rng):
    queries, database = _normal(rng, 3, 4), _normal(rng, 6, 4)
    D, I = _merged(queries, database, 10, metric, [0, 2, 3, 6])
    assert (I[:, 6:] == -1).all() and (D[:, 6:] == PAD[metric]).all()
    np.testing.assert_array_equal(np.sort(I[:, :6].numpy(), axis=1), np.tile(np.arange(6), (3, 1)))
    assert_knn_matches(D, I, queries, database, 10, metric)


def test_merge_offsets_indices_but_not_padding():
    chunk = (torch.tensor([[1.0, 2.0, np.inf]]), torch.tensor([[1, 0, -1]]))
    D, I = merge_topk(None, chunk, 3, "l2", offset=10)
    assert I.tolist() == [[11, 10, -1]] and D.tolist() == [[1.0, 2.0, np.inf]]
    D, I = merge_topk((D, I), (torch.tensor([[2.0, 0.5]]), torch.tensor([[0, 1]])), 4, "l2", offset=20)
    assert I.tolist() == [[21, 11, 10, 20]] and D.tolist() == [[0.5, 1.0, 2.0, 2.0]]
    D, I = merge_topk((torch.tensor([[3.0, -np.inf]]), torch.tensor([[4, -1]])),
                      (torch.tensor([[3.0, 5.0]]), torch.tensor([[0, 1]])), 3, "ip", offset=9)
    assert I.tolist() == [[10, 4, 9]] and D.tolist() == [[5.0, 3.0, 3.0]]


# ---------------------------------------------------------------------------------------
# The orchestration on CPU tensors (CpuBackend): query chunks, database chunks, streaming


def _exact(metric):
    return metric in ("l2", "ip")


def _assert_same_search(D, I, queries, database, k, metric):
    D0, I0 = latentspace.knn(np.asarray(queries, dtype=np.float32), np.asarray(database, dtype=np.float32), k, metric)
    D, I = (a.numpy() if hasattr(a, "numpy") else a for a in (D, I))
    if _exact(metric):
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(D, D0)
    else:
        assert_knn_matches(D, I, queries, database, k, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k", [(1, 1), (1, 3), (50, 1), (50, 8), (50, 50), (50, 57), (1000, 100)])
@pytest.mark.parametrize("memory_bytes", [1, 4000, 1 << 30])
@pytest.mark.parametrize("queries_as", ["numpy", "tensor"])
def test_streamed_search_equals_the_cpu_search(metric, n, k, memory_bytes, queries_as, rng):
    queries, database = _integers(rng, 23, 6), _integers(rng, n, 6)
    q = queries if queries_as == "numpy" else torch.from_numpy(queries)
    backend = CpuBackend()
    D, I = search_streamed(backend, q, database, k, metric, workspace_bytes=1 << 20, memory_bytes=memory_bytes)
    assert isinstance(D, np.ndarray) == (queries_as == "numpy")
    _assert_same_search(D, I, queries, database, k, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_streamed_search_with_tiny_chunks_and_query_chunks(metric, rng):
    # Every level of chunking at once: query blocks (budget), native calls per block
    # (workspace), database chunks; against the whole search.
    queries, database = _integers(rng, 40, 3), _integers(rng, 211, 3)
    calls = []

    def workspace_of(nq, nb, k, bound):
        calls.append((nq, nb, k, bound))
        return nq * 100

    backend = CpuBackend(workspace_of)
    D, I = search_streamed(backend, queries, database, 9, metric, workspace_bytes=700, memory_bytes=2500)
    _assert_same_search(D, I, queries, database, 9, metric)
    assert max(nb for _, nb, _, _ in calls) < 211 and max(nq for nq, _, _, _ in calls) <= 7
    assert {bound for _, _, _, bound in calls} == {700}  # the plan is asked with the caller's bound


@pytest.mark.parametrize("metric", METRICS)
def test_the_workspace_bound_reaches_the_plan(metric, rng):
    # A model of the fitted plan (LATENTSPACE_CUDA_FITTED_PLAN, knn_plan.cuh make_plan): the native
    # plan takes fewer splits, so less workspace per query, to fit its bound; all 40 queries
    # then fit one call, whose workspace is exactly what that plan needs.
    queries, database = _integers(rng, 40, 4), _integers(rng, 300, 4)
    asked, given = [], []

    def workspace_of(nq, nb, k, bound):
        asked.append(bound)
        splits = max(1, min(8, (bound - 100) // (nq * k * 8)))  # 8 splits would fill the "GPU"
        return 100 + nq * k * 8 * splits

    class Spy(CpuBackend):
        def search(self, q, x, k, code, distances, indices, workspace, norms=None):
            given.append((q.shape[0], workspace.numel()))
            super().search(q, x, k, code, distances, indices, workspace, norms)

    bound = 100 + 40 * 5 * 8 * 3  # three splits for all 40 queries
    D, I = search_resident(Spy(workspace_of), torch.from_numpy(queries), torch.from_numpy(database), 5, metric, bound)
    _assert_same_search(D, I, queries, database, 5, metric)
    assert set(asked) == {bound}
    assert given == [(40, bound)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("num_queries", [3, 40])
def test_streamed_search_starts_with_small_chunks(metric, num_queries, monkeypatch, rng):
    # With the floor lifted, a database of 1000 rows in chunks of at most 128 streams as
    # 16, 32, 64, 128, 128, ... rows; every block of queries sees the same chunks.
    monkeypatch.setattr(_cuda_chunks, "STREAM_FIRST_CHUNK_MIN_BYTES", 0)
    queries, database = _integers(rng, num_queries, 4), _integers(rng, 1000, 4)
    rows = []

    class Spy(CpuBackend):
        def search(self, queries, database, *args, **kwargs):
            rows.append(database.shape[0])
            super().search(queries, database, *args, **kwargs)

    # two chunks of 128 rows of 16 bytes, and blocks of at most 9 queries with their results
    memory_bytes = 2 * 128 * 16 + min(num_queries, 9) * (16 + _cuda_chunks.RESULT_BYTES_PER_NEIGHBOUR * 5)
    query_rows, largest = plan_host_stream(num_queries, 1000, 4, 5, memory_bytes, 1 << 20)
    assert largest == 128 and query_rows == min(num_queries, 9)
    D, I = search_streamed(Spy(), queries, database, 5, metric, workspace_bytes=1 << 20, memory_bytes=memory_bytes)
    _assert_same_search(D, I, queries, database, 5, metric)
    one_pass = [16, 32, 64] + [128] * 6 + [120]  # 112 rows, then 888 = 6 x 128 + 120
    assert rows == one_pass * -(-num_queries // query_rows)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int16, np.uint8, ">f4"])
def test_streamed_database_converts_chunk_by_chunk(dtype, rng):
    queries = _integers(rng, 5, 4)
    database = rng.integers(0, 3, (97, 4)).astype(dtype)
    D, I = search_streamed(CpuBackend(), queries, database, 6, "l2", workspace_bytes=1 << 20, memory_bytes=600)
    _assert_same_search(D, I, queries, database.astype(np.float32), 6, "l2")
    strided = np.repeat(database, 2, axis=1)[:, ::2]  # non-contiguous
    D2, I2 = search_streamed(CpuBackend(), queries, strided, 6, "l2", workspace_bytes=1 << 20, memory_bytes=600)
    np.testing.assert_array_equal(I2, I)


def test_streamed_memory_map(rng, tmp_path):
    database = _integers(rng, 300, 8)
    np.save(tmp_path / "x.npy", database)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    queries = _integers(rng, 9, 8)
    D, I = search_streamed(CpuBackend(), queries, mapped, 5, "ip", workspace_bytes=1 << 20, memory_bytes=3000)
    _assert_same_search(D, I, queries, database, 5, "ip")


@pytest.mark.parametrize("bad_row", [0, 77, 299])
def test_streamed_search_names_the_first_bad_database_row(bad_row, rng):
    queries, database = _normal(rng, 30, 8), _normal(rng, 300, 8)
    database[bad_row, 3] = np.nan
    database[299, 0] = np.inf
    with pytest.raises(ValueError) as cpu:
        latentspace.knn(queries, database, 3)
    with pytest.raises(ValueError) as streamed:
        search_streamed(CpuBackend(), queries, database, 3, "l2", workspace_bytes=1 << 20, memory_bytes=2000)
    assert str(streamed.value) == str(cpu.value)
    assert f"database: row {bad_row} contains NaN or Inf" in str(cpu.value)


def test_streamed_search_names_bad_queries_first(rng):
    queries, database = _normal(rng, 30, 8), _normal(rng, 300, 8)
    queries[21, 0] = np.inf  # in a later block of queries
    database[5, 5] = np.nan
    with pytest.raises(ValueError) as cpu:
        latentspace.knn(queries, database, 3)
    with pytest.raises(ValueError) as streamed:
        search_streamed(CpuBackend(), queries, database, 3, "l2", workspace_bytes=1 << 20, memory_bytes=2000)
    assert str(streamed.value) == str(cpu.value) and "queries: row 21" in str(cpu.value)


def test_streamed_float64_beyond_float32_is_refused(rng):
    queries, database = _normal(rng, 2, 3), rng.standard_normal((20, 3))
    database[11, 1] = 1e300  # inf in float32
    with pytest.raises(ValueError, match="database: row 11 contains NaN or Inf"):
        search_streamed(CpuBackend(), queries, database, 2, "l2", workspace_bytes=1 << 20, memory_bytes=100)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k", [(1, 2), (64, 5), (64, 64), (64, 70), (500, 33)])
@pytest.mark.parametrize("workspace_bytes", [100, 1000, 1 << 30])
def test_resident_search_chunks_queries_and_database(metric, n, k, workspace_bytes, rng):
    queries, database = _integers(rng, 19, 4), _integers(rng, n, 4)
    backend = CpuBackend(lambda nq, nb, k, bound: nq * 10 + nb // 4)
    if workspace_bytes < 10 + min(n, _cuda_chunks.rows_per_call(workspace_bytes)) // 4:
        with pytest.raises(ValueError, match="workspace_bytes: one query with"):
            search_resident(backend, torch.from_numpy(queries), torch.from_numpy(database), k, metric, workspace_bytes)
        return
    D, I = search_resident(backend, torch.from_numpy(queries), torch.from_numpy(database), k, metric,
                           workspace_bytes)
    _assert_same_search(D, I, queries, database, k, metric)


# --- the workspace bound of a search given none (default_workspace_bytes) ---------------

GIB = 1 << 30


@pytest.mark.parametrize("need, free, bound", [
    (GIB // 2, 0, GIB),                 # one call fits 1 GiB: 1 GiB, the free memory not asked
    (GIB, 0, GIB),
    (3 * GIB, 80 * GIB, 3 * GIB),       # what one call needs
    (20 * GIB, 140 * GIB, 8 * GIB),     # at most 8 GiB
    (3 * GIB, 16 * GIB, 2 * GIB),       # at most an eighth of the free memory
    (3 * GIB, 4 * GIB, GIB),            # never below 1 GiB
])
def test_default_workspace_bound(need, free, bound):
    asked = []

    def free_bytes():
        asked.append(True)
        return free

    assert _cuda_chunks.default_workspace_bytes(lambda: need, free_bytes) == bound
    assert bool(asked) == (need > GIB)


def test_default_workspace_bound_takes_one_call_where_memory_allows(rng):
    """A resident search whose queries need 4 GiB in one call (the stand-in's model) takes one
    call on a device with 80 GiB free, calls of 1 GiB on one with 4 GiB free, and calls of the
    bound it is given when given one; the results are the same. (knn and FlatIndex.search pass
    resident_workspace_bytes where workspace_bytes is None; on the stand-in, whose tensors are
    on the host, knn streams, so the resident search is called here directly.)"""
    queries, database = _integers(rng, 64, 4), _integers(rng, 500, 4)
    per_query = GIB // 16  # 64 queries: 4 GiB
    asked = []

    def workspace_of(nq, nb, k, bound):
        asked.append((nq, nb, k, bound))
        return nq * per_query

    def run(free, workspace_bytes=None):
        calls = []

        class Spy(CpuBackend):
            def search(self, q, x, k, code, distances, indices, workspace, norms=None):
                calls.append((q.shape[0], workspace.numel()))  # (a host tensor, its pages never touched)
                super().search(q, x, k, code, distances, indices, workspace, norms)

        backend = Spy(workspace_of, free=free)
        bound = workspace_bytes or _cuda_search.resident_workspace_bytes(backend, 64, 500, 5)
        D, I = _cuda_search.search_resident(backend, torch.from_numpy(queries), torch.from_numpy(database), 5, "l2",
                                            bound)
        _assert_same_search(D, I, queries, database, 5, "l2")
        return calls

    assert run(80 * GIB) == [(64, 4 * GIB)]
    assert (64, 500, 5, None) in asked  # the need of one call of all queries, asked without a bound
    assert [nq for nq, _ in run(4 * GIB)] == [16] * 4
    assert [nq for nq, _ in run(80 * GIB, GIB // 2)] == [8] * 8


def test_default_workspace_bound_asks_within_the_native_limits():
    """The one-call need is asked of sizes a native call takes: queries * k below 2^31, k at
    most the rows, rows at most one call's under the largest default bound."""
    asked = []
    backend = CpuBackend(lambda nq, nb, k, bound: asked.append((nq, nb, k, bound)) or 0)
    assert _cuda_search.resident_workspace_bytes(backend, 100_000_000, 50, 1000) == GIB
    assert _cuda_search.resident_workspace_bytes(backend, 0, 3_000_000_000, 1 << 20) == GIB
    rows = _cuda_chunks.rows_per_call(_cuda_chunks.MOST_DEFAULT_WORKSPACE_BYTES)
    assert asked == [(MAX_ITEMS_PER_CALL // 50, 50, 50, None), (1, rows, 1 << 20, None)]


# --- latentspace.knn's GPU entry on the stand-in: the CPU's checks, order and types -----


def _knn(queries, database, k, metric="l2", **bounds):
    bounds = {"workspace_bytes": None, "gpu_memory_bytes": None, **bounds}
    return _cuda_search._knn(CpuBackend(), queries, database, k, metric, **bounds)


def _bad_calls(rng):
    x = _normal(rng, 10, 4)
    yield "queries rank", (np.zeros(4, np.float32), x, 1)
    yield "queries dtype", (np.zeros((2, 4), bool), x, 1)
    yield "queries torch dtype", (torch.zeros(2, 4, dtype=torch.complex64), x, 1)
    yield "database columns", (_normal(rng, 2, 4), _normal(rng, 10, 5), 1)
    yield "database torch rank", (_normal(rng, 2, 4), torch.zeros(3, 4, 1), 1)
    yield "k zero", (_normal(rng, 2, 4), x, 0)
    yield "k float", (_normal(rng, 2, 4), x, 2.0)
    yield "metric", (_normal(rng, 2, 4), x, 1, "dot")
    yield "empty database", (_normal(rng, 2, 4), np.zeros((0, 4), np.float32), 1)
    nan = x.copy()
    nan[3, 1] = np.nan
    yield "nan database", (_normal(rng, 2, 4), nan, 1)
    yield "nan database, no queries", (np.zeros((0, 4), np.float32), nan, 1)
    yield "nan queries", (nan, x, 1)
    yield "bad k before a bad metric", (_normal(rng, 2, 4), x, -1, "dot")


@pytest.mark.parametrize("case", range(13))
def test_gpu_entry_raises_what_the_cpu_raises(case, rng):
    label, args = list(_bad_calls(rng))[case]
    with pytest.raises((TypeError, ValueError)) as cpu:
        latentspace.knn(*args)
    with pytest.raises(type(cpu.value)) as gpu:
        _knn(*args)
    assert str(gpu.value) == str(cpu.value), label


@pytest.mark.parametrize("queries_as", ["numpy", "torch"])
@pytest.mark.parametrize("database_as", ["numpy", "torch"])
def test_gpu_entry_returns_the_callers_type(queries_as, database_as, rng):
    queries, database = _integers(rng, 8, 5), _integers(rng, 40, 5)
    q = torch.from_numpy(queries) if queries_as == "torch" else queries
    x = torch.from_numpy(database) if database_as == "torch" else database
    D, I = _knn(q, x, 6, "ip", gpu_memory_bytes=3000)
    assert isinstance(D, np.ndarray) == (queries_as == "numpy")
    assert isinstance(I, np.ndarray) == (queries_as == "numpy")
    _assert_same_search(D, I, queries, database, 6, "ip")
    D, I = _knn(q[:0], x, 6)
    assert tuple(D.shape) == tuple(I.shape) == (0, 6)


# ---------------------------------------------------------------------------------------
# FlatIndex


def test_flat_index_device_and_to_on_the_cpu(rng, tmp_path):
    x = _normal(rng, 30, 6)
    index = latentspace.FlatIndex(6, "ip")
    assert index.device == "cpu"
    index.add(x)
    copy = index.to("cpu")
    assert copy is not index and copy.device == "cpu" and copy.metric == "ip" and copy.ntotal == 30
    np.testing.assert_array_equal(copy.vectors(), x)
    copy.add(x[:2])
    assert index.ntotal == 30  # a copy, not a view
    assert latentspace.FlatIndex(6).to(None).ntotal == 0
    index.save(tmp_path / "i.lsx")
    for mmap in (False, True):
        loaded = latentspace.load_index(tmp_path / "i.lsx", mmap=mmap, device="cpu")
        assert loaded.device == "cpu" and loaded.is_mmap == mmap
        np.testing.assert_array_equal(loaded.vectors(), x)
    in_memory = latentspace.load_index(tmp_path / "i.lsx", mmap=True).to("cpu")
    assert not in_memory.is_mmap
    in_memory.add(x[:1])


@needs_no_gpu
def test_flat_index_on_cuda_refused_cleanly_here():
    with pytest.raises(RuntimeError, match=r"device='cuda' asked for, but CUDA is unavailable here: .+\. "
                                           r"Use device='cpu'"):
        latentspace.FlatIndex(8, device="cuda")
    with pytest.raises(ValueError, match="device: expected"):
        latentspace.FlatIndex(8, device="tpu")




@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_tensor_core_precisions_are_refused_on_the_cpu(precision):
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=f"precision: '{precision}' runs on CUDA tensor cores only"):
        latentspace.knn(x, x, 1, precision=precision)
    index = latentspace.FlatIndex(4)
    index.add(x)
    with pytest.raises(ValueError, match="runs on CUDA tensor cores only"):
        index.search(x, 1, precision=precision)


@pytest.mark.parametrize("precision", ["FP32", "int8", None, 16])
def test_unknown_precision(precision):
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="precision: expected one of 'fp32', 'tf32', 'bf16', 'fp16'"):
        latentspace.knn(x, x, 1, precision=precision)


def test_fp32_precision_is_the_default(rng):
    x = rng.standard_normal((20, 5)).astype(np.float32)
    for a, b in zip(latentspace.knn(x, x, 3), latentspace.knn(x, x, 3, precision="fp32")):
        np.testing.assert_array_equal(a, b)


def test_weighted_l2_through_the_stand_in_backend(rng):
    """The GPU orchestration passes the weights down (the stand-in runs the CPU kernel)."""
    q = rng.standard_normal((7, 5)).astype(np.float32)
    x = rng.standard_normal((400, 5)).astype(np.float32)
    w = np.array([0, 1, 2, 0.5, 1], np.float32)
    D, I = _cuda_search._knn(CpuBackend(), q, x, 9, "weighted_l2", workspace_bytes=None, gpu_memory_bytes=1 << 14,
                             weights=w)
    D_cpu, I_cpu = latentspace.knn(q, x, 9, "weighted_l2", weights=w)
    np.testing.assert_array_equal(I, I_cpu)
    np.testing.assert_array_equal(D, D_cpu)


@pytest.mark.parametrize("nq", [1, 40])
def test_weighted_overflow_is_refused_through_the_stand_in(nq, rng):
    """Rows whose weighted squared norm overflows float32 are refused before any result is
    used, in the CPU search's words (the GPU kernel, like the stand-in, trusts its caller and
    would return NaN distances); the database is streamed in chunks, so row numbers are global."""
    x, q = rng.standard_normal((300, 5)).astype(np.float32), rng.standard_normal((nq, 5)).astype(np.float32)
    x[123] = 1e18  # plain squared norm 5e36: usable; weighted by 1e4, 5e40: not
    w = np.array([1e4, 1, 1, 1, 1], np.float32)

    def words(call):
        with pytest.raises(ValueError) as error:
            call()
        return str(error.value)

    def stand_in(queries, database):
        return _cuda_search._knn(CpuBackend(), queries, database, 3, "weighted_l2", workspace_bytes=None,
                                 gpu_memory_bytes=1 << 14, weights=w)

    expected = words(lambda: latentspace.knn(q, x, 3, "weighted_l2", weights=w))
    assert expected.startswith("database: row 123 ") and "lower the weights" in expected
    assert words(lambda: stand_in(q, x)) == expected
    q[nq - 1] = 1e18
    expected = words(lambda: latentspace.knn(q, x[:100], 3, "weighted_l2", weights=w))
    assert expected.startswith(f"queries: row {nq - 1} ") and "lower the weights" in expected
    assert words(lambda: stand_in(q, x[:100])) == expected
    q[nq - 1, 0] = np.nan  # unusable as it is: the same row, in the same (weighted) words, as on the CPU
    assert words(lambda: stand_in(q, x[:100])) == words(lambda: latentspace.knn(q, x[:100], 3, "weighted_l2",
                                                                                weights=w))


# Rows that weighted_l2's weights make unusable, in the streamed search and without queries.

_HEAVY = np.array([1e4, 1, 1, 1, 1], np.float32)  # 1e18 in dimension 0: plain 1e36, weighted 1e40


def _words(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


def _spoil(x, row, bad):
    """Row `row` of x made unusable: by the weights alone ("heavy": _HEAVY pushes its weighted
    squared norm past float32) or as it is ("nan")."""
    if bad == "heavy":
        x[row] = 1e18
    else:
        x[row, 2] = np.nan


@pytest.fixture
def check_ahead(monkeypatch):
    """The streamed weighted search's check ahead from any number of queries (it starts at
    CHECK_AHEAD_QUERIES): the shapes here stay small."""
    monkeypatch.setattr(_cuda_search, "CHECK_AHEAD_QUERIES", 0)


class _ChunkSpy(CpuBackend):
    """The stand-in, recording for each database chunk searched whether it held an unusable row
    (a squared norm past 1e30, or NaN: both fail the comparison)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.searched = []

    def search(self, queries, database, *args, **kwargs):
        self.searched.append(bool((~(database.float().square().sum(dim=1) < 1e30)).any()))
        super().search(queries, database, *args, **kwargs)


def _streamed(q, x, queries_as, backend=None):
    """search_streamed with _HEAVY as knn calls it (k=3, 4000 bytes: blocks of 7 queries, chunks
    of 52 rows): numpy queries checked block by block as they are uploaded, tensor queries (on
    the device) checked by the caller, the checks passed in."""
    backend = backend or CpuBackend(weights=_HEAVY)
    if queries_as == "numpy":
        return search_streamed(backend, q, x, 3, "weighted_l2", workspace_bytes=1 << 20, memory_bytes=4000)
    queries = torch.from_numpy(q)
    return search_streamed(backend, queries, x, 3, "weighted_l2", workspace_bytes=1 << 20, memory_bytes=4000,
                           query_checks=_arrays.query_row_checks(queries, _HEAVY))


@pytest.mark.parametrize("bad", ["heavy", "nan"])
@pytest.mark.parametrize("queries_as", ["numpy", "tensor"])
def test_streamed_weighted_search_refuses_a_row_before_its_chunk_is_searched(bad, queries_as, rng, check_ahead):
    """A row the weights make unusable (or NaN) was found on the device as its chunk landed and
    reported after the whole search (5 blocks of queries x 58 chunks here): its chunk is now never
    searched, and the words are the CPU search's."""
    x, q = _normal(rng, 3000, 5), _normal(rng, 30, 5)
    _spoil(x, 2345, bad)
    backend = _ChunkSpy(weights=_HEAVY)
    query_rows, rows = plan_host_stream(30, 3000, 5, 3, 4000, 1 << 20)
    assert (query_rows, rows) == (7, 52)
    expected = _words(lambda: latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY))
    assert expected.startswith("database: row 2345 ") and "lower the weights" in expected
    assert _words(lambda: _streamed(q, x, queries_as, backend)) == expected
    assert backend.searched and not any(backend.searched)  # the chunks before it only
    assert len(backend.searched) == 2345 // rows  # once each: no second block of queries began


@pytest.mark.parametrize("queries_as", ["numpy", "tensor"])
def test_few_queries_find_the_row_at_the_end_without_the_check_ahead(queries_as, rng):
    """Below CHECK_AHEAD_QUERIES the chunks are not read on the host first (a search of few
    queries costs about that read): the device's check names the row at the end, in the same
    words, after the chunks past it were searched too."""
    assert _cuda_search.CHECK_AHEAD_QUERIES == 2048
    x, q = _normal(rng, 3000, 5), _normal(rng, 30, 5)
    _spoil(x, 2345, "heavy")
    backend = _ChunkSpy(weights=_HEAVY)
    expected = _words(lambda: latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY))
    assert _words(lambda: _streamed(q, x, queries_as, backend)) == expected
    assert any(backend.searched)  # the row's chunk was searched: no check ahead


@pytest.mark.parametrize("queries_as", ["numpy", "tensor"])
@pytest.mark.parametrize("bad_query", ["heavy", "nan"])
def test_streamed_weighted_refusal_still_names_bad_queries_first(queries_as, bad_query, rng, check_ahead):
    """Refused before the search ends, the database row still comes after any bad query, as on
    the CPU: among them queries of blocks not yet uploaded (row 27 of 30, blocks of 7); among
    those, the first in row order, whichever its kind (a heavy query 3 before a NaN query 27)."""
    x, q = _normal(rng, 3000, 5), _normal(rng, 30, 5)
    _spoil(x, 400, "heavy")
    _spoil(q, 27, bad_query)
    if bad_query == "nan":
        _spoil(q, 3, "heavy")  # an earlier query that only the weights make unusable
    expected = _words(lambda: latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY))
    assert expected.startswith(f"queries: row {3 if bad_query == 'nan' else 27} ")
    assert _words(lambda: _streamed(q, x, queries_as)) == expected
    x[400] = 0  # the database usable: the queries are named at the end, in the same order
    assert _words(lambda: _streamed(q, x, queries_as)) == expected


def test_streamed_weighted_refusal_names_the_first_bad_row(rng, check_ahead):
    """A NaN row after a heavy one in the same chunk (rows 988-1039), and the next chunk's: the
    first is named. (Not within a few rows: the CPU kernel checks a panel of rows for NaN before
    it weighs any, so it would name the NaN row.)"""
    x, q = _normal(rng, 3000, 5), _normal(rng, 30, 5)
    _spoil(x, 1030, "nan")
    _spoil(x, 1000, "heavy")
    _spoil(x, 1100, "nan")
    expected = _words(lambda: latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY))
    assert expected.startswith("database: row 1000 ")
    assert _words(lambda: search_streamed(CpuBackend(weights=_HEAVY), q, x, 3, "weighted_l2",
                                          workspace_bytes=1 << 20, memory_bytes=4000)) == expected


def test_streamed_weighted_refusal_reads_the_device_checks_of_earlier_chunks(rng, monkeypatch, check_ahead):
    """The device's check of the chunks searched before (which sums in another order than the
    host's, so it may refuse a row within an ulp of the limit that the host check let through)
    still names its row first: here a stand-in flag for row 59, in the second chunk."""
    device_check = _cuda_search.database_row_check

    def disagreeing(rows, weights=None, first_row=0):
        flag, name, weighted = device_check(rows, weights, first_row)
        return (torch.tensor(59) if first_row == 52 else flag), name, weighted

    monkeypatch.setattr(_cuda_search, "database_row_check", disagreeing)
    x, q = _normal(rng, 3000, 5), _normal(rng, 30, 5)
    _spoil(x, 2345, "heavy")
    with pytest.raises(ValueError, match="^database: row 59 .*lower the weights$"):
        _streamed(q, x, "numpy")


def test_streamed_weighted_search_of_usable_rows_is_unchanged(rng, check_ahead):
    """A row near the limit that the weights keep usable: searched, as on the CPU (integer data,
    exact distances)."""
    x, q = _integers(rng, 3000, 5), _integers(rng, 30, 5)
    x[2345, 1] = 5e18  # plain squared norm 2.5e37: usable, and weighted by 1 too
    D, I = search_streamed(CpuBackend(weights=_HEAVY), q, x, 3, "weighted_l2", workspace_bytes=1 << 20,
                           memory_bytes=4000)
    D0, I0 = latentspace.knn(q, x, 3, "weighted_l2", weights=_HEAVY)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(D, D0)


@pytest.mark.parametrize("bad", ["heavy", "nan", "nan after heavy", "heavy after nan"])
@pytest.mark.parametrize("database_as", ["numpy", "torch", "float64", "float64 in chunks"])
def test_gpu_entry_checks_the_weighted_database_without_queries(bad, database_as, rng, monkeypatch):
    """No queries: the CPU checks the database against the weights (the first refused row in row
    order, whichever its kind); the GPU entry checked a host database plainly, so a heavy row
    passed. ("in chunks": a host database is checked a chunk at a time, never converted whole; a
    heavy row in an early chunk comes before a NaN row in a later one.)"""
    x = _normal(rng, 300, 5)
    first, second = (50, 200)
    kinds = {"heavy": ("heavy",), "nan": ("nan",), "nan after heavy": ("heavy", "nan"),
             "heavy after nan": ("nan", "heavy")}[bad]
    for row, kind in zip((first, second), kinds):
        _spoil(x, row, kind)
    if database_as == "float64 in chunks":
        monkeypatch.setattr(_cuda_search, "HOST_CHUNK_BYTES", 64 * 5 * 4)  # 5 chunks of 64 rows
    database = {"numpy": x, "torch": torch.from_numpy(x)}.get(database_as, x.astype(np.float64))
    no_queries = np.zeros((0, 5), np.float32)
    expected = _words(lambda: latentspace.knn(no_queries, x, 3, "weighted_l2", weights=_HEAVY))
    assert expected.startswith(f"database: row {first} ")
    assert _words(lambda: _knn(no_queries, database, 3, "weighted_l2", weights=_HEAVY)) == expected
    assert _words(lambda: _knn(torch.from_numpy(no_queries), database, 3, "weighted_l2", weights=_HEAVY)) == expected


@pytest.mark.parametrize("bad", ["heavy", "nan", "nan after heavy", "none"])
@pytest.mark.parametrize("weighted", [True, False])
def test_a_device_database_without_queries_is_checked_as_on_the_cpu(bad, weighted, rng, monkeypatch):
    """The check a resident (CUDA tensor) database gets without queries, on a CPU tensor: the
    CPU's row and words (the first refused row in row order; weighted: in the weighted words,
    whichever its kind, as the search's own check and the CPU kernel name it)."""
    x = _normal(rng, 300, 5)
    for row, kind in {"heavy": [(50, "heavy")], "nan": [(50, "nan")], "nan after heavy": [(50, "heavy"), (200, "nan")],
                      "none": []}[bad]:
        _spoil(x, row, kind)
    weights = _HEAVY if weighted else None
    metric = "weighted_l2" if weighted else "l2"
    for host_check in (0, 1 << 14):  # the flags' device path and (plain, small) host path
        monkeypatch.setattr(_arrays, "_HOST_CHECK_ELEMENTS", host_check)
        check = lambda: _cuda_search.check_database_without_queries(torch.from_numpy(x), weights)
        if bad == "none" or (bad == "heavy" and not weighted):
            check()
            latentspace.knn(x[:0], x, 3, metric, weights=weights)
            continue
        assert _words(check) == _words(lambda: latentspace.knn(x[:0], x, 3, metric, weights=weights))


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_half_storage_is_a_gpu_index_option(storage):
    with pytest.raises(ValueError, match=f"storage: '{storage}' is for an index on a GPU"):
        latentspace.FlatIndex(4, storage=storage)
    assert latentspace.FlatIndex(4, storage="fp32").storage == "fp32"


@pytest.mark.parametrize("storage", ["FP16", "int8", None])
def test_unknown_storage(storage):
    with pytest.raises(ValueError, match="storage: expected one of 'fp32', 'fp16', 'bf16'"):
        latentspace.FlatIndex(4, storage=storage)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_database_through_the_stand_in_backend(dtype, rng):
    """A float16 / bfloat16 database tensor is searched as stored (the stand-in widens it)."""
    q = rng.standard_normal((5, 6)).astype(np.float32)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    half = torch.from_numpy(x).to(getattr(torch, dtype))
    D, I = _cuda_search.search_resident(CpuBackend(), torch.from_numpy(q), half, 7, "l2", 1 << 20)
    D_ref, I_ref = latentspace.knn(q, half.float().numpy(), 7)
    np.testing.assert_array_equal(I.numpy(), I_ref)
    np.testing.assert_allclose(D.numpy(), D_ref, rtol=1e-6)


def test_cached_norms_are_sliced_with_the_database(rng, monkeypatch):
    """search_resident hands each database chunk its own slice of the kept norms."""
    x = rng.standard_normal((50, 4)).astype(np.float32)
    q = rng.standard_normal((3, 4)).astype(np.float32)
    norms = torch.from_numpy((x * x).sum(1))
    seen = []

    class Recording(CpuBackend):
        def search(self, queries, database, k, code, distances, indices, workspace, norms=None):
            seen.append((database.shape[0], None if norms is None else norms.shape[0]))
            super().search(queries, database, k, code, distances, indices, workspace, norms)

    monkeypatch.setattr(_cuda_search, "rows_per_call", lambda workspace_bytes: 16)  # force 4 database chunks
    D, I = search_resident(Recording(), torch.from_numpy(q), torch.from_numpy(x), 5, "l2", 1 << 20, norms=norms)
    assert [rows for rows, _ in seen] == [n for _, n in seen] and len(seen) == 4
    np.testing.assert_array_equal(I.numpy(), latentspace.knn(q, x, 5)[1])
    with pytest.raises(ValueError, match="norms: expected 50"):
        CpuBackend().search(torch.from_numpy(q), torch.from_numpy(x), 2, 0, torch.empty(3, 2), torch.empty(3, 2, dtype=torch.int64),
                            None, norms[:10])


# The CUDA search's environment settings, read by the native build at every search (and by
# these private readers): variable -> (reader, [(value set, value read)], a bad value).
CUDA_SETTINGS = {
    # csrc/cuda/knn_scan_launch.cuh, tensor_tile_setting: the cp.async-staged tile (since GPU
    # run 12) unless "mma", "wmma", "pipelined" or "resident" (opt-ins)
    "LATENTSPACE_CUDA_TENSOR_TILE": ("_cuda_tensor_tile",
                                     [(None, "deep"), ("", "deep"), ("mma", "mma"), ("wmma", "wmma"), ("deep", "deep"),
                                      ("pipelined", "pipelined"), ("resident", "resident")],
                                     "WMMA"),
    # csrc/cuda/knn.cu, use_fused_finish: the one-kernel finish unless "0"
    "LATENTSPACE_CUDA_FUSED_FINISH": ("_cuda_fused_finish", [(None, True), ("", True), ("0", False), ("1", True)],
                                      "yes"),
    # csrc/cuda/knn_scan_launch.cuh, use_early_norms: the row scan's norms loaded ahead only with "1"
    "LATENTSPACE_CUDA_EARLY_NORMS": ("_cuda_early_norms", [(None, False), ("", False), ("0", False), ("1", True)],
                                     "true"),
    # csrc/cuda/knn_plan.cuh, tree_merge_setting: "auto" (the large-k plan), "1" (past 8 splits), "0"
    "LATENTSPACE_CUDA_TREE_MERGE": ("_cuda_tree_merge", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("0", "0"),
                                                         ("1", "1")], "tree"),
    # csrc/cuda/knn_scan_launch.cuh, use_warp_cut_backs: the tile scan's cut-backs by warps only with "1"
    "LATENTSPACE_CUDA_WARP_CUT_BACKS": ("_cuda_warp_cut_backs", [(None, False), ("", False), ("0", False), ("1", True)],
                                        "warp"),
    # csrc/cuda/knn_scan_launch.cuh, use_float_thresholds: scores checked as floats first only with "1"
    "LATENTSPACE_CUDA_FLOAT_THRESHOLDS": ("_cuda_float_thresholds",
                                          [(None, False), ("", False), ("0", False), ("1", True)], "float"),
    # csrc/cuda/knn_plan.cuh, use_fitted_plan: a plan over its workspace bound takes fewer splits unless "0"
    "LATENTSPACE_CUDA_FITTED_PLAN": ("_cuda_fitted_plan", [(None, True), ("", True), ("0", False), ("1", True)],
                                     "fit"),
    # csrc/cuda/knn_scan_launch.cuh, shared_thresholds_setting: "auto" (several splits, the tile
    # scan), "1" (every search), "0" (none)
    "LATENTSPACE_CUDA_SHARED_THRESHOLDS": ("_cuda_shared_thresholds",
                                           [(None, "auto"), ("", "auto"), ("auto", "auto"), ("0", "0"), ("1", "1")],
                                           "on"),
}


def test_last_scan_reader_starts_at_none_on_each_thread():
    """_native._cuda_last_scan (the tests' record of the tile of a thread's last native GPU
    search call, csrc/cuda/knn_scan_launch.cuh last_scan_launched) reads "none" on a thread
    that has searched nothing; a CPU-only build refuses it."""
    import threading

    read = latentspace._native._cuda_last_scan
    if not latentspace.build_info()["cuda_compiled"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            read()
        return
    seen = []
    worker = threading.Thread(target=lambda: seen.append(read()))
    worker.start()
    worker.join()
    assert seen == ["none"]


@pytest.mark.parametrize("variable", sorted(CUDA_SETTINGS))
def test_cuda_settings(monkeypatch, variable):
    """Each setting's values and what they pick; a bad value (values are case-sensitive) is a
    ValueError naming the variable. A CPU-only build refuses to read them."""
    reader, cases, bad = CUDA_SETTINGS[variable]
    read = getattr(latentspace._native, reader)
    if not latentspace.build_info()["cuda_compiled"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            read()
        return
    for value, expected in cases:
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
        assert read() == expected and type(read()) is type(expected)
    monkeypatch.setenv(variable, bad)
    with pytest.raises(ValueError, match=f"{variable}: expected '.+' or '.+', got '{bad}'"):
        read()


# The CUDA search's whole-number settings (csrc/cuda/common.cuh, environment_integer):
# variable -> (reader, value when unset, least, most).
CUDA_INTEGER_SETTINGS = {
    # csrc/cuda/knn_plan.cuh, rows_per_neighbour: the split rule (splits at least this many times k
    # rows long; 0: no rule), for experiments
    "LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR": ("_cuda_rows_per_neighbour", 32, 0, 65536),
    # csrc/cuda/knn_plan.cuh, few_query_splits: the splits of a call of at most 8 queries (0: the
    # plan's own), for experiments
    "LATENTSPACE_CUDA_FEW_QUERY_SPLITS": ("_cuda_few_query_splits", 0, 0, 65535),
    # csrc/cuda/knn_plan.cuh, list_room: a list's room beyond k in multiples of k, for experiments
    "LATENTSPACE_CUDA_LIST_ROOM": ("_cuda_list_room", 1, 1, 64),
}


@pytest.mark.parametrize("variable", sorted(CUDA_INTEGER_SETTINGS))
def test_cuda_integer_settings(monkeypatch, variable):
    """Each whole-number setting: its default unless set to a whole number in its range;
    anything else is a ValueError naming the variable and the range."""
    reader, default, least, most = CUDA_INTEGER_SETTINGS[variable]
    read = getattr(latentspace._native, reader)
    if not latentspace.build_info()["cuda_compiled"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            read()
        return
    monkeypatch.delenv(variable, raising=False)
    assert read() == default
    for value, expected in [("", default), (str(least), least), ("1", 1), ("8", 8), ("0064", 64), (str(most), most)]:
        monkeypatch.setenv(variable, value)
        assert read() == expected
    for bad in ("-3", "+8", " 8", "8 ", str(most + 1), "8x", "eight", "1e3", "99999999999999999999"):
        monkeypatch.setenv(variable, bad)
        expected = f"{variable}: expected a whole number from {least} to {most}, got '{re.escape(bad)}'"
        with pytest.raises(ValueError, match=expected):
            read()


def test_cuda_single_query_rows_setting(monkeypatch):
    """LATENTSPACE_CUDA_SINGLE_QUERY_ROWS (csrc/cuda/knn_scan_launch.cuh, single_query_rows): the
    rows a warp reads at once in the scan of one query: 8 (the single-query scan, the default
    since GPU run 10) unless 16, or 4 (the row scan); any other value is a ValueError naming
    the variable."""
    variable, read = "LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", latentspace._native._cuda_single_query_rows
    if not latentspace.build_info()["cuda_compiled"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            read()
        return
    monkeypatch.delenv(variable, raising=False)
    assert read() == 8
    for value, expected in [("", 8), ("4", 4), ("8", 8), ("16", 16)]:
        monkeypatch.setenv(variable, value)
        assert read() == expected
    for bad in ("2", "32", "08", " 8", "0", "eight"):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(ValueError, match=f"{variable}: expected '4', '8' or '16', got '{re.escape(bad)}'"):
            read()


# ---------------------------------------------------------------------------------------
# The GPU plan's own logic (csrc/cuda/knn_plan.cuh plan_for), run on the host: _native._cuda_plan_for
# takes the multiprocessor count and CUB's temporary bytes a GPU would give (132: an H100 SXM
# or H200; CUB's size estimated: its sort of Q x k keys needs about one more copy of them).

needs_cuda_build = pytest.mark.skipif(not latentspace.build_info()["cuda_compiled"],
                                      reason="a CPU-only build has no GPU plan")
MULTIPROCESSORS = 132


def _plan(nq, nb, k, bound=None, dim=0):
    return latentspace._native._cuda_plan_for(nq, nb, k, MULTIPROCESSORS, bound, nq * k * 8 + (1 << 20), dim)


@pytest.fixture
def plan_settings(monkeypatch):
    """The plan's settings as a test sets them, none inherited from the environment."""
    for variable in ("LATENTSPACE_CUDA_FITTED_PLAN", "LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "LATENTSPACE_CUDA_TREE_MERGE",
                     "LATENTSPACE_CUDA_FEW_QUERY_SPLITS", "LATENTSPACE_CUDA_SINGLE_QUERY_ROWS",
                     "LATENTSPACE_CUDA_LIST_ROOM"):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def _rule_splits(nb, k):
    return max(1, -(-nb // 128) * 128 // (32 * k))  # splits at least 32 k rows long


@needs_cuda_build
@pytest.mark.parametrize("nq,nb,k", [(10_000, 1_000_000, 10), (10_000, 1_000_000, 1024), (1000, 1_000_000, 1024),
                                     (1000, 1_000_000, 2048), (1, 1_000_000, 10), (5000, 8192, 32),
                                     (20_000, 1_000_000, 16384)])
@pytest.mark.parametrize("tree", ["", "0"])
def test_plan_fills_the_gpu_within_the_split_rule(nq, nb, k, tree, plan_settings):
    """Where the split rule leaves blocks for at least three quarters of the multiprocessors
    (1000 queries at k = 2048: 120 blocks, where GPU run 8 measured the large-k plan 0.90x),
    and always with the large-k plan off (LATENTSPACE_CUDA_TREE_MERGE=0): the splits that
    fill the GPU within the rule, one merge block per query. (One query's single-query scan
    takes whole waves of its own blocks instead: test_one_query_takes_whole_waves_of_its_scan.)"""
    plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", tree)
    plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "4")
    plan = _plan(nq, nb, k)
    assert plan["query_tiles"] == -(-nq // 128) and plan["split_length"] % 128 == 0
    assert plan["splits"] * plan["split_length"] >= nb > (plan["splits"] - 1) * plan["split_length"]
    assert plan["capacity"] == min(k + max(k, 512), plan["split_length"])
    blocks = plan["query_tiles"] * plan["splits"]
    assert plan["splits"] <= _rule_splits(nb, k) and not plan["tree"]
    # two waves of the scan's two resident blocks per multiprocessor (splits rounded to whole
    # tiles: a few blocks fewer), unless the rule or the rows allow no more splits
    assert blocks >= 0.95 * 2 * 2 * MULTIPROCESSORS or plan["splits"] >= min(_rule_splits(nb, k), -(-nb // 128) // 2) - 1
    plan_settings.setenv("LATENTSPACE_CUDA_FITTED_PLAN", "0")
    assert _plan(nq, nb, k, bound=1) == plan  # the bound changes nothing without the fitted plan


@needs_cuda_build
@pytest.mark.parametrize("nq,nb,k,large_k", [
    (1, 4_096, 10, False), (50, 4_096, 10, False), (1, 20_000, 10, False),  # the rows bound the splits
    (3, 20_000, 100, True), (8, 30_000, 50, True), (130, 20_000, 1000, True),  # k does: many more without the rule
])
def test_large_k_plan_only_where_it_doubles_the_splits(nq, nb, k, large_k, plan_settings):
    """A small database leaves the GPU short of blocks whatever k is: the large-k plan (its
    tree merge and CUB sort: 15 launches where the fused finish takes one) is taken only where
    dropping the split rule at least doubles the splits (knn_plan.cuh plan_for); otherwise the
    rule's plan, with the fused finish. One query over 20,000 rows at k = 10 gets 53 splits
    either way."""
    plan = _plan(nq, nb, k)
    rule = _rule_splits(nb, k)
    assert 4 * plan["query_tiles"] * min(plan["splits"], rule) < 3 * MULTIPROCESSORS  # short of blocks either way
    plan_settings.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "0")
    unruled = _plan(nq, nb, k)["splits"]
    plan_settings.delenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR")
    assert plan["tree"] is large_k and (unruled >= 2 * min(rule, unruled)) is large_k, (plan, rule, unruled)
    if not large_k:
        plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
        assert _plan(nq, nb, k) == plan  # the rule's plan, as with the large-k plan off


@needs_cuda_build
@pytest.mark.parametrize("nq,nb,k", [(1, 1_000_000, 1024), (100, 1_000_000, 4096), (300, 1_000_000, 1024),
                                     (1000, 1_000_000, 4096), (1000, 1_000_000, 16384), (127, 1_000_000, 16384)])
def test_large_k_plan_fills_the_gpu_without_the_rule(nq, nb, k, plan_settings):
    """Where the split rule leaves fewer blocks than three quarters of the multiprocessors (a
    large k over few query tiles, knn_plan.cuh plan_for; GPU run 8 measured 1.5x to 10.7x at 7 to 90
    blocks): the splits that fill the GPU without the rule, merged as a tree;
    never fitted to a bound (its splits are its point); with LATENTSPACE_CUDA_TREE_MERGE=0 the
    rule's plan; with "1" the rule's plan too, merged as a tree past 8 splits. (One query's
    single-query scan takes whole waves of its own blocks instead: as with the row scan here.)"""
    plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "4")
    plan = _plan(nq, nb, k)
    assert 4 * plan["query_tiles"] * _rule_splits(nb, k) < 3 * MULTIPROCESSORS  # the case
    assert plan["tree"] and plan["splits"] > max(8, _rule_splits(nb, k))
    assert plan["query_tiles"] * plan["splits"] >= 0.95 * 2 * 2 * MULTIPROCESSORS
    plan_settings.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "0")
    assert {**_plan(nq, nb, k), "tree": True} == plan  # the plan without the rule, merged as a tree
    plan_settings.delenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR")
    # Taken where the bound holds the large-k plan of 64 queries (knn_plan.cuh kLargeKFewQueries;
    # planned with all nq queries' CUB bytes, estimated here as nq * k * 8 + 1 MiB), and then
    # never fitted: the caller gives fewer queries a call instead.
    few = min(nq, 64)
    few_need = _plan(few, nb, k)["workspace_bytes"] + (nq - few) * k * 8
    assert few_need <= plan["workspace_bytes"]
    for bound in (few_need + 256, few_need + 256 + (plan["workspace_bytes"] - few_need) // 2):
        assert _plan(nq, nb, k, bound=bound) == plan
    tight = _plan(nq, nb, k, bound=few_need - 256)  # the rule's plan, fitted
    assert not tight["tree"] and tight["splits"] <= _rule_splits(nb, k)
    plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    rule = _plan(nq, nb, k)
    assert rule["splits"] <= _rule_splits(nb, k) and not rule["tree"]
    plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", "1")
    assert _plan(nq, nb, k) == {**rule, "tree": rule["splits"] > 8}


@needs_cuda_build
@pytest.mark.parametrize("nq,nb,k", [(10_000, 1_000_000, 1024), (2000, 1_000_000, 1024), (300, 50_000, 1024),
                                     (5, 30_000, 2000), (260, 20_000, 100), (1, 1000, 1000), (1000, 1_000_000, 16384),
                                     (64, 100_000, 16384), (129, 700, 800)])
@pytest.mark.parametrize("rule", ["32", "4", "1", "0"])
@pytest.mark.parametrize("tree", ["", "0", "1"])
def test_fitted_plan_is_planned_again_the_same(nq, nb, k, rule, tree, plan_settings):
    """The search plans again with its workspace's size as the bound (knn_plan.cuh make_plan): it must
    get the plan that size was asked for, at every bound, fitting or not (the workspace is not
    monotonic in the splits: a list holds at most its split's rows), with the large-k plan
    (tree "", the default: taken or not by the bound) and without it."""
    plan_settings.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", rule)
    plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", tree)
    filling = _plan(nq, nb, k)
    plan_settings.setenv("LATENTSPACE_CUDA_FITTED_PLAN", "1")
    assert _plan(nq, nb, k) == filling
    for fraction in (1.0, 0.9, 0.6, 0.3, 0.1, 0.01, 0.0):
        bound = int(filling["workspace_bytes"] * fraction)
        plan = _plan(nq, nb, k, bound)
        # A plan over its bound is never searched (the caller gives fewer queries, or refuses a
        # query that does not fit alone), and with the large-k plan in play it may not be
        # planned the same again: the large-k plan, not taken under the bound, can fit the
        # size of the rule's plan that was over it.
        if plan["workspace_bytes"] <= bound or tree != "" or rule == "0":
            assert _plan(nq, nb, k, plan["workspace_bytes"]) == plan, (fraction, plan)
        assert plan["query_tiles"] == filling["query_tiles"]
        if plan["tree"] == filling["tree"]:  # a tighter bound may trade the large-k plan for the rule's
            assert plan["splits"] <= filling["splits"] and plan["workspace_bytes"] <= filling["workspace_bytes"]
        if fraction == 1.0:
            assert plan == filling  # it fits: nothing to fit


@needs_cuda_build
@pytest.mark.parametrize("nq,nb,k", [(1, 1_000_000, 10), (8, 1_000_000, 100), (1, 1_000_000, 1024), (3, 3000, 50),
                                     (1, 100, 10), (9, 1_000_000, 10), (200, 50_000, 10)])
def test_few_query_splits_set_the_plan_of_a_few_queries(nq, nb, k, plan_settings):
    """LATENTSPACE_CUDA_FEW_QUERY_SPLITS (an experiment, knn_plan.cuh few_query_splits) gives a call of
    at most 8 queries that many splits, cut in whole plan tiles of 128 rows (never more splits
    than tiles); the rest of its plan is the plan's own (a tree merge where that plan merges as
    a tree, past 8 splits); and a search planned again at the plan's size gets the same plan.
    Calls of more queries keep their own plans."""
    own = _plan(nq, nb, k)
    tiles = -(-nb // 128)
    for splits in (1, 7, 132, 396, 528, 1056, 65535):
        plan_settings.setenv("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", str(splits))
        plan = _plan(nq, nb, k)
        if nq > 8:
            assert plan == own
            continue
        length = -(-tiles // splits) * 128
        assert plan["split_length"] == length and plan["splits"] == -(-nb // length) <= min(splits, tiles)
        assert plan["capacity"] == min(k + max(k, 512), length) and plan["query_tiles"] == own["query_tiles"]
        assert plan["tree"] == (own["tree"] and plan["splits"] > 8), (plan, own)
        assert _plan(nq, nb, k, plan["workspace_bytes"]) == plan
    plan_settings.setenv("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", "0")
    assert _plan(nq, nb, k) == own


@needs_cuda_build
@pytest.mark.parametrize("nb,k,own_splits", [(1_000_000, 10, 521), (1_000_000, 1024, 521), (2_000_000, 10, 521),
                                             (250_000, 10, 489), (20_000, 10, 53), (4_096, 10, 11),
                                             (1_000_000, 16384, 521)])
@pytest.mark.parametrize("dim", [128, 0])
def test_one_query_takes_whole_waves_of_its_scan(nb, k, own_splits, dim, plan_settings):
    """One query's plan (knn_plan.cuh, single_query_wave): the splits the plan would take
    (own_splits, as with the row scan), rounded down to whole waves of the single-query scan's
    3 resident blocks a multiprocessor (396 on 132), then cut in whole plan tiles; fewer than
    a wave stay. GPU runs 10 and 12 timed one query over 1M x 128 in 391 splits (one wave) at
    0.165 / 0.163 ms of scan, against 0.216 / 0.218 ms in the plan's 521. Not with 4 or 16
    rows a warp (another kernel, another occupancy), for more queries, or for a dimension
    past the row scan's; an experiment's forced splits still win."""
    wave = 3 * MULTIPROCESSORS
    tiles = -(-nb // 128)
    plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "4")
    own = _plan(1, nb, k, dim=dim)
    assert own["splits"] == own_splits
    for rows in ("", "8"):
        plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", rows)
        plan = _plan(1, nb, k, dim=dim)
        requested = own_splits // wave * wave if own_splits > wave else own_splits
        length = -(-tiles // requested) * 128
        assert plan["split_length"] == length and plan["splits"] == -(-nb // length) <= requested
        assert plan["tree"] == own["tree"] and plan["capacity"] == min(k + max(k, 512), length)
        assert _plan(1, nb, k, plan["workspace_bytes"], dim) == plan  # planned again the same
        if (nb, k) == (1_000_000, 10):
            assert plan["splits"] == 391  # the sweeps' one wave
    plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "16")
    assert _plan(1, nb, k, dim=dim) == own
    plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "")
    plan_settings.setenv("LATENTSPACE_CUDA_FEW_QUERY_SPLITS", "521")
    assert _plan(1, nb, k, dim=dim)["splits"] == -(-nb // (-(-tiles // 521) * 128))


@needs_cuda_build
@pytest.mark.parametrize("nq,nb,k", [(10_000, 1_000_000, 1024), (10_000, 1_000_000, 10), (1000, 1_000_000, 16384),
                                     (1, 1_000_000, 1024), (300, 20_000, 1000)])
def test_list_room_sets_the_lists_capacity(nq, nb, k, plan_settings):
    """LATENTSPACE_CUDA_LIST_ROOM (an experiment, knn_plan.cuh list_room): a list holds k keys
    and room for `room` k more (at least 512, at most its split's rows); the splits are
    chosen as before, unless the workspace bound then calls for fewer (the fitted plan); a
    search planned again at the plan's size gets the same plan."""
    own = _plan(nq, nb, k, dim=128)
    assert own["capacity"] == min(k + max(k, 512), own["split_length"])
    for room in (2, 3, 64):
        plan_settings.setenv("LATENTSPACE_CUDA_LIST_ROOM", str(room))
        plan = _plan(nq, nb, k, dim=128)
        assert plan["capacity"] == min(k + max(room * k, 512), plan["split_length"])
        assert {**plan, "capacity": 0, "workspace_bytes": 0} == {**own, "capacity": 0, "workspace_bytes": 0}
        assert plan["workspace_bytes"] >= own["workspace_bytes"]
        assert _plan(nq, nb, k, plan["workspace_bytes"], 128) == plan
        fitted = _plan(nq, nb, k, own["workspace_bytes"], 128)  # the room's plan under the old need
        assert fitted["workspace_bytes"] <= own["workspace_bytes"] or fitted["tree"] or fitted["splits"] == 1


@needs_cuda_build
def test_list_room_keeps_the_capacity_an_int(plan_settings):
    """One split of 2^31 - 1 rows at k = 2^28 and room 7 asks for 2^31 keys a list: the
    capacity stays the largest int (found in a review: it wrapped to -2^31, and the workspace to
    2^64 - 2^31), so that the plan's workspace is what such a list needs, and too large."""
    plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    plan_settings.setenv("LATENTSPACE_CUDA_LIST_ROOM", "7")
    plan = latentspace._native._cuda_plan_for(1, 2**31 - 1, 2**28, MULTIPROCESSORS, None, 1 << 20, 128)
    assert plan["splits"] == 1 and plan["capacity"] == 2**31 - 1
    assert 8 * (2**31 - 1) <= plan["workspace_bytes"] < 2**40


@needs_cuda_build
def test_whole_waves_are_for_one_query_within_the_row_scans_dimensions(plan_settings):
    """Two queries (the row scan), and one query past the row scan's 44 KiB of queries in
    shared memory (11,264 float32 dimensions: the tile scan), keep the plan's own splits, more
    than a wave (396) here; one query of 11,264 dimensions takes whole waves."""
    plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "4")
    two, deep = _plan(2, 1_000_000, 10, dim=128), _plan(1, 1_000_000, 10, dim=12_000)
    widest = _plan(1, 1_000_000, 10, dim=11_264)
    assert min(two["splits"], deep["splits"], widest["splits"]) > 3 * MULTIPROCESSORS  # (the premise)
    plan_settings.setenv("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "")
    assert _plan(2, 1_000_000, 10, dim=128) == two and two["splits"] == 521
    assert _plan(1, 1_000_000, 10, dim=12_000) == deep
    assert _plan(1, 1_000_000, 10, dim=11_264)["splits"] <= 3 * MULTIPROCESSORS


@needs_cuda_build
@pytest.mark.parametrize("nq,nb,k,bound,most_calls", [
    (1, 1_000_000, 1024, 10 << 20, 1), (2000, 50_000, 256, 2 << 20, 50), (2000, 50_000, 256, 16 << 20, 2),
    (1, 1_000_000, 16384, 8 << 20, 1), (1000, 1_000_000, 16384, 1 << 30, 8)])
def test_large_k_plan_leaves_tight_bounds_their_plan(nq, nb, k, bound, most_calls, plan_settings):
    """Where the bound cannot hold the large-k plan of 64 queries, the rule's plan (fitted)
    stays: a search under a tight bound is neither refused nor cut into many more calls
    than without the large-k plan (found in a review: 1 query at k = 1024 over 1M rows under
    12 MiB was refused, 2,000 queries at k = 256 under 2 MiB took 2,000 calls, under 16 MiB
    100 calls instead of 2; since one query takes whole waves, its large-k plan needs 11.5 MB
    and fits 12 MiB, so 10 MiB is the tight bound here); at k = 16,384 over 1M rows a 1 GiB bound still takes the
    large-k plan, in 8 calls (GPU run 8: 69 ms, against 385 ms in the rule's one call)."""
    def calls():
        return plan_query_chunks(nq, k, lambda c: _plan(c, nb, k, bound)["workspace_bytes"], bound)

    chunks = calls()
    assert len(chunks) <= most_calls and all(need <= bound for _, _, need in chunks)
    first = _plan(chunks[0][1] - chunks[0][0], nb, k, bound)
    assert first["tree"] is (k == 16384 and bound == 1 << 30)  # the large-k plan where it fits
    plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0")
    assert len(chunks) <= max(len(calls()), most_calls)


@needs_cuda_build
@pytest.mark.parametrize("dim, rule", [(0, 32), (1, 32), (128, 32), (129, 31), (256, 16), (1000, 4), (2048, 2),
                                       (4096, 2), (100_000, 2)])
def test_split_rule_shrinks_past_128_dimensions(dim, rule, plan_settings):
    """32 rows a split per neighbour up to 128 dimensions (0: not given), 32 * 128 / dim past
    them, at least 2 (knn_plan.cuh default_rows_per_neighbour); the setting wins at any dim."""
    assert latentspace._native._cuda_rows_per_neighbour(dim) == rule
    plan_settings.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "7")
    assert latentspace._native._cuda_rows_per_neighbour(dim) == 7


@needs_cuda_build
def test_faiss_3045_shape_takes_more_splits_at_its_depth(plan_settings):
    """faiss #3045's shape (5,000 queries, 8,192 rows of 2,048, k = 32): 22 splits a query
    tile under the rule of 2,048 dimensions (2 rows per neighbour), the 8 of the rule of 32
    without the dimension (GPU run 10's plan sweep, H200: 6.41 ms against 7.67 ms with shared
    thresholds); at 128 dimensions the plan is the one without it. The workspace follows the
    plan, so a search's size must be asked with its dim (CudaBackend.set_dim)."""
    bound = _cuda_chunks.DEFAULT_WORKSPACE_BYTES
    deep, plain, shallow = (_plan(5000, 8192, 32, bound, dim) for dim in (2048, 0, 128))
    assert (deep["query_tiles"], deep["splits"]) == (40, 22)
    assert (plain["query_tiles"], plain["splits"]) == (40, 8) and shallow == plain
    assert deep["workspace_bytes"] > plain["workspace_bytes"]
    plan_settings.setenv("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "32")
    assert _plan(5000, 8192, 32, bound, 2048) == plain
    with pytest.raises(ValueError, match=r"dim: expected >= 0 \(0: not given\), got -1"):
        latentspace._native._cuda_plan_for(1, 10, 1, 132, None, 0, -1)
    with pytest.raises(ValueError, match=r"dim: expected >= 0"):
        latentspace._native._cuda_rows_per_neighbour(-5)


@needs_cuda_build
def test_query_tile_is_the_plans():
    """QUERY_TILE, the unit whole_query_tiles cuts calls to, is the query tile the native plan
    counts (SimtTile::kQueries)."""
    for nq in (1, QUERY_TILE - 1, QUERY_TILE, QUERY_TILE + 1, 10 * QUERY_TILE, 10 * QUERY_TILE + 1):
        assert _plan(nq, 1_000_000, 10)["query_tiles"] == -(-nq // QUERY_TILE)


@needs_cuda_build
def test_fitted_plan_searches_k_1024_in_one_call(plan_settings):
    """The case the fitted plan is for (docs/gpu.md): Q = 10,000 over 1M rows at k = 1024 with
    a 1 GiB bound (the default's floor). Filling: about 1,200 queries a call in 30 splits, 9 calls of 300
    blocks; fitted: all 10,000 queries in one call of 5 splits, 395 blocks."""
    def calls(fitted):
        plan_settings.setenv("LATENTSPACE_CUDA_FITTED_PLAN", fitted)
        # the plans before GPU run 8 without it (no large-k plan for the last call's 4 query tiles)
        plan_settings.setenv("LATENTSPACE_CUDA_TREE_MERGE", "0" if fitted == "0" else "")
        bound = _cuda_chunks.DEFAULT_WORKSPACE_BYTES
        chunks = plan_query_chunks(10_000, 1024, lambda c: _plan(c, 1_000_000, 1024, bound)["workspace_bytes"], bound)
        first = chunks[0][1] - chunks[0][0]
        return len(chunks), first, _plan(first, 1_000_000, 1024, bound)

    count, first, plan = calls("0")
    # 9 calls of 1,152 queries (9 query tiles, even_chunk), not 1,188 (10)
    assert (count, first, plan["splits"], plan["query_tiles"] * plan["splits"]) == (9, 1152, 30, 270)
    count, first, plan = calls("1")
    assert (count, first, plan["splits"], plan["query_tiles"] * plan["splits"]) == (1, 10_000, 5, 395)
    assert plan["workspace_bytes"] <= _cuda_chunks.DEFAULT_WORKSPACE_BYTES


# ---------------------------------------------------------------------------------------
# The GPU tests' premises, checked here: a GPU run is a few minutes a session, and a test whose
# shapes no longer reach the path it names passes there without testing it. The opt-ins'
# equality tests in tests/gpu/test_knn_cuda.py compare a setting off and on; each shape must
# reach, under the test's settings, the plan where the setting does something (plan_for's
# plans, 132 multiprocessors as on the H100 / H200 lent, CUB's size estimated as above).


def _gpu_knn_tests():
    """tests/gpu/test_knn_cuda.py as a module, for its shapes and settings (its tests skip
    here, without a GPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "gpu" / "test_knn_cuda.py"
    spec = importlib.util.spec_from_file_location("_gpu_knn_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan_under(monkeypatch, settings: dict, nq: int, n: int, k: int) -> dict:
    """The first native call's plan of a knn of nq queries over n rows at k (a 1 GiB bound, the
    default's floor; these shapes take one call) under exactly `settings` (no other CUDA setting)."""
    for variable in ("LATENTSPACE_CUDA_FITTED_PLAN", "LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "LATENTSPACE_CUDA_TREE_MERGE",
                     "LATENTSPACE_CUDA_FEW_QUERY_SPLITS", "LATENTSPACE_CUDA_SHARED_THRESHOLDS",
                     "LATENTSPACE_CUDA_WARP_CUT_BACKS", "LATENTSPACE_CUDA_FLOAT_THRESHOLDS"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in settings.items():
        monkeypatch.setenv(variable, value)
    return _plan(nq, n, min(k, n), _cuda_chunks.DEFAULT_WORKSPACE_BYTES)


def _cut_back_mid_split(plan: dict) -> bool:
    """Whether a split's list can fill its capacity before the split ends: cut back then, with
    a threshold the rest of the split compares rows with (capacity: k + max(k, 512), or the
    split's length, which the list cannot outgrow)."""
    return plan["split_length"] > plan["capacity"]


def _cut_back_at_the_end(plan: dict, k: int) -> bool:
    """Whether a split's list holds more than k keys at the split's end: cut back to k then
    (knn_scan.cuh finish_lists), which publishes a shared threshold."""
    return plan["split_length"] > k


def _shares_thresholds(plan: dict, nq: int, dim: int) -> bool:
    """knn.cu share_thresholds: "1", or "auto" (unset) where the tile scan runs over several
    splits; the search then runs the opt-in family's kernels (knn_scan_launch.cuh)."""
    setting = latentspace._native._cuda_shared_thresholds()
    row_scan = nq <= 8 and nq * dim * 4 <= 44 << 10  # knn_rows.cuh use_row_scan
    return setting == "1" or (setting == "auto" and plan["splits"] > 1 and not row_scan)


@needs_cuda_build
def test_gpu_warp_cut_back_test_reaches_cut_backs(monkeypatch):
    """test_small_warp_cut_backs_equal_the_block_ones: every shape with k < N cuts its lists
    back (at a split's end at least), and the k = 1024 and 700 ones mid-split, which is where
    the warps' select runs during the scan."""
    gpu = _gpu_knn_tests()
    for nq, n, _, k, _ in gpu.WARP_SHAPES:
        if k >= n:
            continue
        plan = _plan_under(monkeypatch, gpu.RULE_PLAN, nq, n, k)
        assert _cut_back_at_the_end(plan, k), ((nq, n, k), plan)
        assert _cut_back_mid_split(plan) or k < 100, ((nq, n, k), plan)


@needs_cuda_build
def test_gpu_float_threshold_test_compares_with_the_default_kernels(monkeypatch):
    """test_small_float_thresholds_equal_the_key_compare: with float thresholds off the search
    must run the default kernels (no shared thresholds, which run the opt-in family), and each
    shape with k < N must set a threshold mid-split, which later rows are compared with."""
    gpu = _gpu_knn_tests()
    for nq, n, dim, k, _ in gpu.FLOAT_SHAPES:
        plan = _plan_under(monkeypatch, gpu.FLOAT_PLAN, nq, n, k)
        assert not _shares_thresholds(plan, nq, dim), ((nq, n, k), plan)
        assert _cut_back_mid_split(plan) or k >= n, ((nq, n, k), plan)


@needs_cuda_build
def test_gpu_shared_threshold_test_publishes_bounds(monkeypatch):
    """test_small_shared_thresholds_equal_the_split_ones: each shape with k < N cuts its lists
    back (a bound to publish), one at k = 1024 shares it across several splits cut back
    mid-split; the shapes also searched in the default plan take the large-k plan there,
    with bounds published at the splits' ends and more blocks than one wave holds."""
    gpu = _gpu_knn_tests()
    shared_mid_split_at_1024 = False
    for nq, n, _, k in gpu.SHARED_SHAPES:
        plan = _plan_under(monkeypatch, gpu.RULE_PLAN, nq, n, k)
        assert _cut_back_at_the_end(plan, k) or k >= n, ((nq, n, k), plan)
        shared_mid_split_at_1024 |= k == 1024 and plan["splits"] > 1 and _cut_back_mid_split(plan)
    assert shared_mid_split_at_1024
    for nq, n, _, k in gpu.SHARED_LARGE_K_SHAPES:
        plan = _plan_under(monkeypatch, {}, nq, n, k)
        assert plan["tree"] and _cut_back_at_the_end(plan, k), plan
        # more blocks than one wave of the scan's 2 resident blocks a multiprocessor
        assert plan["query_tiles"] * plan["splits"] > 2 * MULTIPROCESSORS, plan


@needs_cuda_build
@pytest.mark.parametrize("opt_in", ["shared", "warp", "float", "shared+warp"])
def test_gpu_opt_in_integer_test_cuts_lists_back(opt_in, monkeypatch):
    """test_small_opt_ins_on_integer_data_equal_the_cpu: under each threshold or cut-back
    opt-in, k = 64 and 1500 cut the lists back mid-split (the ties the bounds and selects meet),
    for 3 queries (the row scan) and 200 (the tile scan); "float" alone runs the opt-in family
    where the default would not (thresholds per split)."""
    gpu = _gpu_knn_tests()
    for nq in (3, 200):
        for k in gpu.OPT_IN_INTEGER_KS:
            plan = _plan_under(monkeypatch, gpu.OPT_INS[opt_in], nq, gpu.OPT_IN_INTEGER_ROWS, k)
            assert _cut_back_mid_split(plan) or k < 64, (nq, k, plan)
            if opt_in == "float":
                assert not _shares_thresholds(plan, nq, 3), (nq, k, plan)


# ---------------------------------------------------------------------------------------
# search_then_check: a GPU FlatIndex queues its search before it reads the queries' checks


def _resident_search_and_checks(rng, *, bad_query=None, bad_row=None, workspace_bytes=1 << 20):
    queries, database = _normal(rng, 30, 8), _normal(rng, 5000, 8)
    if bad_query is not None:
        queries[bad_query, 3] = np.nan
    if bad_row is not None:
        database[bad_row, 2] = np.inf
    q, x = torch.from_numpy(queries), torch.from_numpy(database)
    backend = CpuBackend()
    checks = _arrays.query_row_checks(q) + [_arrays.database_row_check(x)]
    return (lambda: search_resident(backend, q, x, 4, "l2", workspace_bytes)), checks, backend, queries, database


def test_search_then_check_queues_the_search_before_reading_the_checks(rng, monkeypatch):
    search, checks, backend, queries, database = _resident_search_and_checks(rng)
    order = []
    native_search, read = backend.search, _cuda_search.raise_unusable_rows
    monkeypatch.setattr(backend, "search", lambda *a, **kw: (order.append("search"), native_search(*a, **kw))[1])
    monkeypatch.setattr(_cuda_search, "raise_unusable_rows", lambda c: (order.append("read"), read(c))[1])
    D, I = _cuda_search.search_then_check(search, checks)
    assert order == ["search", "read"]
    _assert_same_search(D.numpy(), I.numpy(), queries, database, 4, "l2")


@pytest.mark.parametrize("bad_query, bad_row, message", [
    (None, 4321, r"^database: row 4321 contains NaN or Inf"),
    (17, 4321, r"^queries: row 17 contains NaN or Inf"),  # queries first, as on the CPU
])
def test_search_then_check_raises_for_a_refused_row_after_the_search(rng, bad_query, bad_row, message):
    search, checks, *_ = _resident_search_and_checks(rng, bad_query=bad_query, bad_row=bad_row)
    with pytest.raises(ValueError, match=message):
        _cuda_search.search_then_check(search, checks)


def test_a_refused_row_outranks_the_searchs_own_error(rng):
    # As when the checks were read first: the data's error, not the workspace's, and without
    # the workspace's error shown as its context.
    search, checks, *_ = _resident_search_and_checks(rng, bad_row=4321, workspace_bytes=100)
    with pytest.raises(ValueError, match=r"^database: row 4321 contains NaN or Inf") as refused:
        _cuda_search.search_then_check(search, checks)
    assert refused.value.__suppress_context__
    search, checks, *_ = _resident_search_and_checks(rng, workspace_bytes=100)
    with pytest.raises(ValueError, match=r"^workspace_bytes: one query with k=4 needs"):
        _cuda_search.search_then_check(search, checks)


def test_other_errors_of_the_search_propagate_without_reading_the_checks(rng, monkeypatch):
    _, checks, *_ = _resident_search_and_checks(rng, bad_row=4321)
    monkeypatch.setattr(_cuda_search, "raise_unusable_rows", lambda c: pytest.fail("the checks were read"))

    def failing_search():
        raise RuntimeError("CUDA error in knn_cuda: an illegal memory access")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        _cuda_search.search_then_check(failing_search, checks)


def test_running_out_of_device_memory_comes_after_a_refused_row(rng):
    _, checks, *_ = _resident_search_and_checks(rng, bad_row=4321)

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    with pytest.raises(ValueError, match=r"^database: row 4321 contains NaN or Inf"):
        _cuda_search.search_then_check(out_of_memory, checks)
    _, checks, *_ = _resident_search_and_checks(rng)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _cuda_search.search_then_check(out_of_memory, checks)
