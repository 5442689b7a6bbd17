"""Shared helpers for the latentspace test suite.

* `reference_knn`: a float64 numpy reference with the package's exact conventions.
* `assert_knn_matches`: compares a (distances, indices) result with the reference, robust to
  float32 rounding near ties.
* fixtures: `simd_level` (every SIMD level this CPU supports), `single_threaded`, `rng` (a freshly seeded numpy
  Generator whose seed is printed, so a failure can be replayed with LATENTSPACE_TEST_SEED),
  and an autouse guard that restores the SIMD level and the thread count after every test.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import latentspace
from latentspace import _native

# ---------------------------------------------------------------------------------------
# Hypothesis: 40 examples per property test, no deadline (the first call of a kernel can be
# slow), print the reproduction blob on failure. Failing examples are also kept in the .hypothesis/ example database.
# HYPOTHESIS_PROFILE=thorough runs many more examples (for hunting bugs, not for CI).
settings.register_profile(
    "latentspace",
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("latentspace"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "latentspace"))

# ---------------------------------------------------------------------------------------
# nvcc, for the host-side checks of CUDA code (tests/cuda_host/*.cu); None where it is missing.
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc") if os.path.exists(p)), None
)
CUDA_HOST_CHECKS = Path(__file__).resolve().parent / "cuda_host"
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def build_cuda_host_check(name: str, directory: Path, include_first: Path | None = None) -> Path:
    """tests/cuda_host/NAME.cu (a host program over the real CUDA headers) compiled with nvcc
    into DIRECTORY/NAME; include_first: a folder searched before csrc/ (its headers then shadow
    the real ones)."""
    import subprocess

    program = directory / name
    includes = ([f"-I{include_first}"] if include_first is not None else []) + [f"-I{CSRC}"]
    source = CUDA_HOST_CHECKS / f"{name}.cu"
    subprocess.run([NVCC, "-std=c++17", "-O2", "-arch=sm_80", *includes, "-x", "cu", str(source), "-o", str(program)],
                   check=True, capture_output=True, text=True)
    return program


def run_cuda_host_check(name: str, directory: Path, *args: str):
    """build_cuda_host_check, then the program run with ARGS: its CompletedProcess (text)."""
    import subprocess

    program = build_cuda_host_check(name, directory)
    return subprocess.run([str(program), *args], capture_output=True, text=True, timeout=300)

# ---------------------------------------------------------------------------------------
# SIMD levels

SIMD_ORDER = ("scalar", "avx2", "avx512")
HARDWARE_SIMD_LEVEL = latentspace.build_info()["hardware_simd_level"]
SUPPORTED_SIMD_LEVELS = SIMD_ORDER[: SIMD_ORDER.index(HARDWARE_SIMD_LEVEL) + 1]
METRICS = ("l2", "ip", "cosine")


@pytest.fixture(params=SUPPORTED_SIMD_LEVELS)
def simd_level(request):
    """Runs the test once per SIMD level this CPU supports, restoring the level after."""
    previous = latentspace.simd_level()
    latentspace.set_simd_level(request.param)
    assert latentspace.simd_level() == request.param
    try:
        yield request.param
    finally:
        latentspace.set_simd_level(previous)


@pytest.fixture(autouse=True)
def _restore_runtime_state():
    """Safety net: no test may leak a SIMD level, thread count or row / packed cut-off into
    the next one."""
    level, threads = latentspace.simd_level(), latentspace.get_num_threads()
    yield
    latentspace.set_simd_level(level)
    latentspace.set_num_threads(threads)
    _native._set_row_query_limit(-1)


ROW_QUERY_LIMITS = {"default cut-off": -1, "rows up to 8": 8, "all packed": 0}


@pytest.fixture(params=list(ROW_QUERY_LIMITS))
def row_query_limit(request):
    """Runs the test with the CPU kNN's row / packed cut-off at its default, with every batch
    of up to 8 queries on the row path, and with every batch packed
    (latentspace._native._set_row_query_limit; restored after)."""
    _native._set_row_query_limit(ROW_QUERY_LIMITS[request.param])
    yield request.param
    _native._set_row_query_limit(-1)


@pytest.fixture
def single_threaded():
    """torch and latentspace on one thread for the test (restored after): the models trained
    in tests are tiny, and a team of two threads slows down many times over when another
    process shares the 2 CPU cores, where one thread does not."""
    import torch

    previous = latentspace.get_num_threads(), torch.get_num_threads()
    torch.set_num_threads(1)
    latentspace.set_num_threads(1)
    yield
    latentspace.set_num_threads(previous[0])
    torch.set_num_threads(previous[1])


@pytest.fixture
def num_threads():
    """Returns a setter for the thread count; the previous count is restored afterwards."""
    previous = latentspace.get_num_threads()
    yield latentspace.set_num_threads
    latentspace.set_num_threads(previous)


# ---------------------------------------------------------------------------------------
# Randomness: fresh per test, reproducible via the printed seed.


@pytest.fixture
def rng(request):
    env = os.environ.get("LATENTSPACE_TEST_SEED")
    seed = int(env) if env else secrets.randbits(64)
    # Printed (shown by pytest for a failing test) and attached to the report.
    print(f"\n[{request.node.nodeid}] numpy seed: {seed} (replay: LATENTSPACE_TEST_SEED={seed})")
    request.node.user_properties.append(("numpy_seed", seed))
    return np.random.default_rng(seed)


@pytest.fixture
def gen(rng):
    """A torch generator on the GPU seeded from the test's numpy seed (printed on failure): for
    the GPU tests (tests/gpu), which skip before fixtures are set up where there is no GPU."""
    import torch

    return torch.Generator(device="cuda").manual_seed(int(rng.integers(0, 2**63)))


def pytest_runtest_makereport(item, call):
    """Puts the numpy seed of a failing test into its report header section too."""
    if call.when == "call" and call.excinfo is not None:
        for name, value in getattr(item, "user_properties", []):
            if name == "numpy_seed":
                item.add_report_section("call", "seed", f"LATENTSPACE_TEST_SEED={value}")


# ---------------------------------------------------------------------------------------
# Reference implementation


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_float32(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def reference_scores(queries, database, metric: str) -> np.ndarray:
    """(Q, N) float64 scores: squared L2 distance, inner product or cosine similarity
    (a zero vector has similarity 0 with everything)."""
    q, x = _as_float64(queries), _as_float64(database)
    if metric == "l2":
        scores = (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * (q @ x.T)
        return np.maximum(scores, 0.0)
    if metric == "ip":
        return q @ x.T
    if metric == "cosine":
        qn, xn = np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1)
        qs = np.divide(1.0, qn, out=np.zeros_like(qn), where=qn > 0)
        xs = np.divide(1.0, xn, out=np.zeros_like(xn), where=xn > 0)
        return (q @ x.T) * qs[:, None] * xs[None, :]
    raise ValueError(metric)


def reference_knn(queries, database, k: int, metric: str = "l2"):
    """Exact kNN in float64 with latentspace's conventions.

    Returns (scores, order), each (Q, k): best first (l2 ascending, ip / cosine descending),
    ties to the lower index (stable sort), padding -1 and +inf (l2) / -inf (ip, cosine)
    when k > N. scores is float64, order int64.
    """
    all_scores = reference_scores(queries, database, metric)
    nq, n = all_scores.shape
    key = all_scores if metric == "l2" else -all_scores
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(all_scores, order, axis=1)
    kept = min(k, n)
    out_scores = np.full((nq, k), np.inf if metric == "l2" else -np.inf)
    out_order = np.full((nq, k), -1, dtype=np.int64)
    out_scores[:, :kept] = scores[:, :kept]
    out_order[:, :kept] = order[:, :kept]
    return out_scores, out_order


def knn_tolerance(queries, database, metric: str) -> float:
    """Absolute tolerance for float32 results, scaled to the data."""
    q, x = _as_float64(queries), _as_float64(database)
    if q.size == 0 or x.size == 0:
        return 1e-12
    q_sq = (q * q).sum(1).max()
    x_sq = (x * x).sum(1).max()
    if metric == "l2":
        return 1e-5 * (q_sq + x_sq) + 1e-12
    if metric == "ip":
        return 1e-5 * np.sqrt(q_sq) * np.sqrt(x_sq) + 1e-12
    # cosine: accumulation error grows like sqrt(dim)
    return 2e-6 * max(1.0, np.sqrt(q.shape[1]) / 8.0)


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def assert_knn_matches(D, I, queries, database, k: int, metric: str, *, exact: bool = False):
    """Checks a knn result against the float64 reference.

    (a) distances equal the reference's sorted scores within tolerance;
    (b) each returned index's true score equals the reference score at that rank;
    (c) indices in each row are distinct and valid;
    (d) padding (k > N) is exactly -1 with +inf (l2) / -inf (ip, cosine);
    (e) rows are sorted best first, and equal distances list the lower index first;
    (f) among bit-identical database rows, the lower indices are returned, in order;
    (g) l2 distances are >= 0, cosine similarities lie in [-1, 1].
    exact=True additionally requires indices and distances to equal the reference exactly
    (for data whose float32 arithmetic is exact, e.g. small integers with l2 / ip).
    """
    D, I = _to_numpy(D), _to_numpy(I)
    q64, x64 = _as_float64(queries), _as_float64(database)
    nq, n = q64.shape[0], x64.shape[0]
    assert D.shape == (nq, k), D.shape
    assert I.shape == (nq, k), I.shape
    assert D.dtype == np.float32, D.dtype
    assert I.dtype == np.int64, I.dtype
    if nq == 0:
        return
    ref_scores, ref_order = reference_knn(q64, x64, k, metric)
    atol = knn_tolerance(q64, x64, metric)
    kept = min(k, n)
    pad = np.inf if metric == "l2" else -np.inf

    # (d) padding
    if k > n:
        assert (I[:, kept:] == -1).all(), f"padding indices must be -1:\n{I[:, kept:]}"
        assert (D[:, kept:] == pad).all(), f"padding distances must be {pad}:\n{D[:, kept:]}"
    Ik, Dk = I[:, :kept], D[:, :kept].astype(np.float64)

    # (c) valid, distinct
    assert ((Ik >= 0) & (Ik < n)).all(), f"indices out of range [0, {n}):\n{Ik}"
    srt = np.sort(Ik, axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all(), f"duplicate indices in a row:\n{Ik}"
    assert np.isfinite(Dk).all(), f"non-finite distances:\n{Dk}"

    # (g) ranges
    if metric == "l2":
        assert (Dk >= 0).all()
    elif metric == "cosine":
        assert (Dk >= -1.0).all() and (Dk <= 1.0).all(), "cosine similarity outside [-1, 1]"

    # (a) distances vs reference sorted scores
    diff = np.abs(Dk - ref_scores[:, :kept])
    assert (diff <= atol).all(), (
        f"distances differ from the reference by up to {diff.max():.3g} (atol {atol:.3g}) "
        f"at {np.unravel_index(diff.argmax(), diff.shape)}"
    )
    # (b) true score of each returned index vs reference score at that rank
    all_scores = reference_scores(q64, x64, metric)
    true = np.take_along_axis(all_scores, Ik, axis=1)
    diff = np.abs(true - ref_scores[:, :kept])
    assert (diff <= atol).all(), (
        f"a returned index's true score differs from the reference score at its rank by "
        f"{diff.max():.3g} (atol {atol:.3g}) at {np.unravel_index(diff.argmax(), diff.shape)}"
    )

    # (e) sorted best first; equal distances: lower index first
    if kept > 1:
        a, b = D[:, : kept - 1], D[:, 1:kept]
        better = a < b if metric == "l2" else a > b
        assert (better | (a == b)).all(), f"row not sorted best first:\n{D}"
        tie = a == b
        assert (I[:, : kept - 1][tie] < I[:, 1:kept][tie]).all(), (
            "equal distances must list the lower index first"
        )

    # (f) bit-identical database rows: the lower ones first
    x32 = _as_float32(database)
    if n > 1:
        _, group = np.unique(x32.view(np.uint8).reshape(n, -1), axis=0, return_inverse=True)
        group = group.reshape(-1)
        if len(np.unique(group)) < n:
            members = {g: np.flatnonzero(group == g) for g in np.unique(group)}
            for r in range(nq):
                seen: dict[int, list[int]] = {}
                for idx in Ik[r]:
                    seen.setdefault(int(group[idx]), []).append(int(idx))
                for g, got in seen.items():
                    want = list(members[g][: len(got)])
                    assert got == want, (
                        f"query {r}: identical database rows must be returned lowest index "
                        f"first; got {got}, expected {want}"
                    )

    if exact:
        np.testing.assert_array_equal(I, ref_order)
        np.testing.assert_array_equal(D[:, :kept].astype(np.float64), ref_scores[:, :kept])


# ---------------------------------------------------------------------------------------
# Training: a small slice of the digits and a short, reproducible fit (test_training.py,
# test_metric_learning.py).


@pytest.fixture(scope="module")
def digits_400():
    x, y = latentspace.datasets.load_digits()
    return x[:400], y[:400]


def fit_briefly(model, x, **kwargs):
    settings = dict(epochs=3, batch_size=64, lr=3e-3, seed=0, progress=False, device="cpu")
    settings.update(kwargs)
    return latentspace.train(model, x, **settings)


# The CLI in this process (tests of its refusals and outputs): the cheapest demo that trains
# something (a refusal must come before its "... epochs in"), and main() on one thread with
# torch's thread count put back after.
CHEAP_DEMO = ["demo", "--models", "autoencoder", "--epochs", "1", "--no-metric-learning", "--examples", "0"]


def run_cli_main(capsys, *args: str) -> tuple[int, str, str]:
    """latentspace.cli.main(args + --threads 1): its exit code, stdout and stderr."""
    import torch

    from latentspace.cli import main

    previous = torch.get_num_threads()
    try:
        code = main(list(args) + ["--threads", "1"])
    finally:
        torch.set_num_threads(previous)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
