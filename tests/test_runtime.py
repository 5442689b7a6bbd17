"""Build information, thread count, SIMD level (also via environment variables), datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import latentspace
from conftest import HARDWARE_SIMD_LEVEL, SIMD_ORDER, SUPPORTED_SIMD_LEVELS


def _run_python(code: str, **env_overrides: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("LATENTSPACE_SIMD", "OMP_NUM_THREADS"):
        env.pop(name, None)
    for name, value in env_overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


# ---------------------------------------------------------------------------------------
# build_info


def test_build_info_keys_and_types():
    info = latentspace.build_info()
    assert isinstance(info, dict)
    assert isinstance(info["version"], str) and info["version"]
    assert info["version"] == latentspace.__version__
    assert info["simd_level"] in SIMD_ORDER
    assert info["hardware_simd_level"] in SIMD_ORDER
    assert SIMD_ORDER.index(info["simd_level"]) <= SIMD_ORDER.index(info["hardware_simd_level"])
    assert info["simd_level"] == latentspace.simd_level()
    assert type(info["num_threads"]) is int and info["num_threads"] >= 1
    assert info["num_threads"] == latentspace.get_num_threads()
    assert type(info["cuda_compiled"]) is bool
    assert isinstance(info["cuda_architectures"], list)
    assert all(isinstance(a, str) and a for a in info["cuda_architectures"])
    if not info["cuda_compiled"]:
        assert info["cuda_architectures"] == []
    assert type(info["gpu_visible"]) is bool
    assert isinstance(info["cuda_devices"], list)
    assert info["gpu_visible"] == bool(info["cuda_devices"])
    assert isinstance(info["cuda_unavailable_reason"], str)
    if not info["gpu_visible"]:
        assert info["cuda_unavailable_reason"], "an invisible GPU needs a reason"
    assert info["cuda_losses"] in ("native", "torch") and info["cuda_encoder"] in ("native", "torch")
    assert info["cuda_row_check"] in ("native", "torch")
    json.dumps(info)  # JSON-serialisable (the CLI prints it)


def test_build_info_reflects_current_settings(num_threads):
    num_threads(1)
    assert latentspace.build_info()["num_threads"] == 1
    latentspace.set_simd_level("scalar")
    assert latentspace.build_info()["simd_level"] == "scalar"
    assert latentspace.build_info()["hardware_simd_level"] == HARDWARE_SIMD_LEVEL


@pytest.mark.parametrize("key, variable", [("cuda_losses", "LATENTSPACE_CUDA_LOSSES"),
                                           ("cuda_encoder", "LATENTSPACE_CUDA_ENCODER"),
                                           ("cuda_row_check", "LATENTSPACE_CUDA_ROW_CHECK")])
@pytest.mark.parametrize("value, expected", [("native", "native"), ("torch", "torch"), ("Native", "invalid")])
def test_build_info_reports_the_cuda_kernel_settings(monkeypatch, key, variable, value, expected):
    monkeypatch.setenv(variable, value)
    reported = latentspace.build_info()[key]
    assert reported.startswith(expected)
    if expected == "invalid":
        assert f"{variable}: expected 'auto', 'native' or 'torch'" in reported


def test_cuda_available_consistent_with_build_info():
    info = latentspace.build_info()
    assert isinstance(latentspace.cuda_available(), bool)
    assert latentspace.cuda_available() == (info["cuda_compiled"] and info["gpu_visible"])
    if not info["gpu_visible"]:
        assert latentspace.cuda_available() is False


# ---------------------------------------------------------------------------------------
# Threads


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, np.int32(4)])
def test_set_get_num_threads_round_trip(n, num_threads):
    num_threads(n)
    assert latentspace.get_num_threads() == int(n)
    assert type(latentspace.get_num_threads()) is int


@pytest.mark.parametrize("n", [0, -1, -64])
def test_set_num_threads_value_errors(n):
    before = latentspace.get_num_threads()
    with pytest.raises(ValueError, match="n"):
        latentspace.set_num_threads(n)
    assert latentspace.get_num_threads() == before


@pytest.mark.parametrize("n", [2**31, 2**40, np.uint64(2**63)])
def test_set_num_threads_beyond_int32(n):
    before = latentspace.get_num_threads()
    with pytest.raises(ValueError, match="n: expected an integer <= 2147483647"):
        latentspace.set_num_threads(n)
    assert latentspace.get_num_threads() == before


@pytest.mark.parametrize("n", [1.5, 2.0, True, False, "2", None])
def test_set_num_threads_type_errors(n):
    before = latentspace.get_num_threads()
    with pytest.raises(TypeError, match="n"):
        latentspace.set_num_threads(n)
    assert latentspace.get_num_threads() == before


_SEARCH_IN_FORKED_CHILD = """
import faulthandler, os, sys
import numpy as np
import latentspace
latentspace.set_num_threads(2)
rng = np.random.default_rng(0)
x = rng.standard_normal((20000, 16)).astype(np.float32)
q = rng.standard_normal((300, 16)).astype(np.float32)
expected = latentspace.knn(q, x, 5)[1]  # the parent runs a team of 2 threads
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(60, exit=True)  # a hang becomes exit status 1
    threads = latentspace.get_num_threads()
    same = np.array_equal(latentspace.knn(q, x, 5)[1], expected)
    print("child", threads, same, flush=True)
    os._exit(0 if same else 3)
_, status = os.waitpid(pid, 0)
print("parent", latentspace.get_num_threads(), os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_search_in_a_forked_child_does_not_hang():
    # GNU OpenMP cannot start threads in a child forked after the parent ran a team: the search
    # waited forever for the parent's workers (multiprocessing's default start method on Linux).
    # A forked child now starts with one thread; the parent keeps its count.
    result = _run_python(_SEARCH_IN_FORKED_CHILD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["child", "1", "True", "parent", "2", "0"], result.stdout + result.stderr


def test_omp_num_threads_sets_default():
    for value in ("1", "3"):
        result = _run_python("import latentspace; print(latentspace.get_num_threads())",
                             OMP_NUM_THREADS=value)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == value


_THREADS_AFTER_TORCH_SET_ONE = ("import torch; torch.set_num_threads(1); import latentspace; "
                                "print(latentspace.get_num_threads())")


@pytest.mark.parametrize("omp_num_threads, expected", [
    ("3", 3), (" 4 ", 4), ("3,2", 3), (None, len(os.sched_getaffinity(0))),
    ("abc", len(os.sched_getaffinity(0))), ("0", len(os.sched_getaffinity(0))),
    ("+3", 3), ("4,abc", len(os.sched_getaffinity(0))), ("4,", len(os.sched_getaffinity(0))),
    ("-2", len(os.sched_getaffinity(0))),
])
def test_torch_set_num_threads_before_first_use_leaves_openmps_default(omp_num_threads, expected):
    # torch shares our libgomp: a torch.set_num_threads(1) at the top of a script became
    # latentspace's default too (and overrode OMP_NUM_THREADS) when it came before our first use.
    result = _run_python(_THREADS_AFTER_TORCH_SET_ONE, OMP_NUM_THREADS=omp_num_threads)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)


_FIRST_USE_FROM_A_PINNED_THREAD = """
import os, threading
import latentspace
def pinned():  # Linux: sched_setaffinity(0, ...) pins the calling thread only
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    latentspace.get_num_threads()
worker = threading.Thread(target=pinned)
worker.start()
worker.join()
print(latentspace.get_num_threads(), len(os.sched_getaffinity(0)))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two processors to pin a thread to one")
def test_default_thread_count_is_the_processes_even_when_a_pinned_thread_asks_first():
    # A worker thread pinned to one CPU (a pool that pins its threads) that made the first
    # latentspace call set every later call in the process to one thread; before e2bd3bd
    # (omp_get_max_threads(): the count libgomp fixed at load) it did not.
    result = _run_python(_FIRST_USE_FROM_A_PINNED_THREAD)
    assert result.returncode == 0, result.stderr
    threads, processors = result.stdout.split()
    assert threads == processors


_SEARCH_WITH_FEWER_THREADS_THAN_ASKED = """
import numpy as np
import latentspace
rng = np.random.default_rng(0)
latentspace.set_num_threads(4)
for queries, rows in ((512, 20_000), (8, 200_000)):  # threads split the queries; the database
    q = rng.standard_normal((queries, 16), dtype=np.float32)
    x = rng.standard_normal((rows, 16), dtype=np.float32)
    _, found = latentspace.knn(q, x, 1)
    exact = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    print(int((found[:, 0] != exact).sum()))
"""


@pytest.mark.parametrize("environment", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true", "OMP_THREAD_LIMIT": "2"}])
def test_a_search_is_complete_when_openmp_starts_fewer_threads_than_asked(environment):
    # OMP_THREAD_LIMIT (a batch scheduler's cap) gives a team fewer threads than
    # set_num_threads asked for: the rows of the threads never started were left unwritten.
    result = _run_python(_SEARCH_WITH_FEWER_THREADS_THAN_ASKED, **environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0"], result.stdout


# ---------------------------------------------------------------------------------------
# SIMD level


@pytest.mark.parametrize("level", SUPPORTED_SIMD_LEVELS)
def test_set_simd_level_round_trip(level):
    latentspace.set_simd_level(level)
    assert latentspace.simd_level() == level


@pytest.mark.parametrize("level", ["sse", "AVX2", "", "avx-512", "neon"])
def test_set_simd_level_unknown_name(level):
    before = latentspace.simd_level()
    with pytest.raises(ValueError, match="level"):
        latentspace.set_simd_level(level)
    assert latentspace.simd_level() == before


@pytest.mark.parametrize("level", [None, 2, b"avx2"])
def test_set_simd_level_wrong_type(level):
    with pytest.raises(TypeError, match="level"):
        latentspace.set_simd_level(level)


@pytest.mark.skipif(HARDWARE_SIMD_LEVEL == "avx512", reason="every level is supported here")
def test_set_simd_level_above_hardware():  # pragma: no cover - depends on the CPU
    above = SIMD_ORDER[SIMD_ORDER.index(HARDWARE_SIMD_LEVEL) + 1 :]
    for level in above:
        with pytest.raises(ValueError, match="level"):
            latentspace.set_simd_level(level)
        assert latentspace.simd_level() == HARDWARE_SIMD_LEVEL


_PRINT_LEVEL = "import latentspace; print(latentspace.simd_level())"


def test_default_simd_level_is_hardware_level():
    result = _run_python(_PRINT_LEVEL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == HARDWARE_SIMD_LEVEL
    assert "RuntimeWarning" not in result.stderr


@pytest.mark.parametrize("level", SIMD_ORDER)
def test_simd_env_var_caps_level(level):
    result = _run_python(_PRINT_LEVEL, LATENTSPACE_SIMD=level)
    assert result.returncode == 0, result.stderr
    expected = SIMD_ORDER[min(SIMD_ORDER.index(level), SIMD_ORDER.index(HARDWARE_SIMD_LEVEL))]
    assert result.stdout.strip() == expected
    assert "Warning" not in result.stderr


def test_simd_env_var_cap_can_be_raised_explicitly():
    # the environment variable sets the starting level; set_simd_level may still go up to
    # the hardware's level
    code = (f"import latentspace; latentspace.set_simd_level({HARDWARE_SIMD_LEVEL!r}); "
            "print(latentspace.simd_level())")
    result = _run_python(code, LATENTSPACE_SIMD="scalar")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == HARDWARE_SIMD_LEVEL


@pytest.mark.parametrize("value", ["bogus", "AVX2", ""])
def test_invalid_simd_env_var_warns_and_falls_back(value):
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import latentspace\n"
        "print(latentspace.simd_level())\n"
        "print([(w.category.__name__, str(w.message)) for w in caught])\n"
    )
    result = _run_python(code, LATENTSPACE_SIMD=value)
    assert result.returncode == 0, result.stderr
    level, warnings_line = result.stdout.strip().splitlines()
    assert level == HARDWARE_SIMD_LEVEL
    caught = eval(warnings_line)  # a list of (category, message) tuples printed above
    relevant = [m for c, m in caught if c == "RuntimeWarning" and "LATENTSPACE_SIMD" in m]
    assert relevant, caught


def test_knn_works_at_every_level_in_subprocess_env():
    code = ("import numpy as np, latentspace; "
            "D, I = latentspace.knn(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1); "
            "print(latentspace.simd_level(), I.ravel().tolist())")
    for level in SUPPORTED_SIMD_LEVELS:
        result = _run_python(code, LATENTSPACE_SIMD=level)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{level} [0, 1, 2]"


# ---------------------------------------------------------------------------------------
# Datasets


def test_load_digits():
    images, labels = latentspace.datasets.load_digits()
    assert isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
    assert images.shape == (1797, 64) and images.dtype == np.float32
    assert images.flags.c_contiguous
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.max() == 1.0  # intensities 0..16 divided by 16
    np.testing.assert_array_equal(np.unique(np.round(images * 16)), np.unique(images * 16))
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_public_api():
    for name in latentspace.__all__:
        assert hasattr(latentspace, name), name
    assert isinstance(latentspace.__version__, str)


# ---------------------------------------------------------------------------------------
# pybind11 internals


def test_the_extension_keeps_private_pybind11_internals():
    """_native looks up its pybind11 internals under a key no other module uses: it never
    joins the internals of another extension's pybind11 build (torch's)."""
    from latentspace import _native

    with open(_native.__file__, "rb") as handle:
        binary = handle.read()
    keys = {binary[start : binary.index(b"__", start + 22) + 2]
            for start in _all_offsets(binary, b"__pybind11_internals_v")}
    assert keys and all(b"latentspace" in key for key in keys), keys


def test_native_errors_after_torch_is_imported():
    """A native error message with numbers in it (built in C++), raised with torch loaded
    first, becomes a Python ValueError (on the GPU machine's image this once segfaulted
    inside iostream number formatting)."""
    code = ("import torch, numpy as np, latentspace as ls\n"
            "q = np.ones((3, 4), np.float32); q[1, 2] = np.nan\n"
            "try:\n    ls.knn(q, q, 1)\nexcept ValueError as e:\n    print('ValueError', e)\n")
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ValueError queries: row 1 contains NaN or Inf")


def _all_offsets(data: bytes, needle: bytes):
    start = data.find(needle)
    while start != -1:
        yield start
        start = data.find(needle, start + 1)


def test_cuda_asked_for_where_it_cannot_run_is_one_error_type_everywhere():
    """Search said RuntimeError and encode / train / load_model ValueError for the same cause;
    one CudaUnavailableError, both a RuntimeError and a ValueError, so that either except
    clause a caller wrote still catches it."""
    import numpy as np
    import torch

    import latentspace as ls

    if ls.cuda_available():
        pytest.skip("CUDA runs here")
    assert issubclass(ls.CudaUnavailableError, RuntimeError) and issubclass(ls.CudaUnavailableError, ValueError)
    x = np.zeros((4, 3), np.float32)
    calls = {
        "knn": lambda: ls.knn(x, x, 1, device="cuda"),
        "FlatIndex": lambda: ls.FlatIndex(3, device="cuda"),
        "Encoder": lambda: ls.Encoder(torch.nn.Linear(3, 2), device="cuda"),
        "encode": lambda: ls.encode(torch.nn.Linear(3, 2), x, device="cuda"),
        "train": lambda: ls.train(ls.Autoencoder(3, 2, hidden=(4,)), x, epochs=1, device="cuda"),
    }
    for name, call in calls.items():
        with pytest.raises(ls.CudaUnavailableError, match="cuda"):
            call()
