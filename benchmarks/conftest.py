"""Shared set-up for the latentspace benchmarks: data, thread control, noise meter, machine info.

Run (from the repository root), one JSON per benchmark file:
  python -m pytest benchmarks/bench_knn.py --benchmark-json=knn.json      # ~10-15 min on 2 cores
  python benchmarks/report_knn.py knn.json
  python -m pytest benchmarks/bench_losses.py --benchmark-json=losses.json  # ~1 min
  python benchmarks/report_losses.py losses.json
  python -m pytest benchmarks/bench_encode.py --benchmark-json=encode.json  # ~5 min
  python benchmarks/report_encode.py encode.json
Quick kNN run (~3 minutes): LATENTSPACE_BENCH_N=100000 python -m pytest benchmarks/bench_knn.py ...
Quick encode run: LATENTSPACE_BENCH_ENCODE_ROWS=8192 LATENTSPACE_BENCH_BUDGET_S=0.2 python -m pytest benchmarks/bench_encode.py ...
The project's own `pytest` run (testpaths = tests) does not collect these benchmarks.
Plain helpers shared by the bench_*.py files (rounds, roofs, nearby read rate) are in _common.py.

Environment:
  LATENTSPACE_BENCH_N         kNN database rows (default 1,000,000; e.g. 100000 for a quick run)
  LATENTSPACE_BENCH_ENCODE_ROWS  rows encoded per call in bench_encode.py (default 65,536)
  LATENTSPACE_BENCH_BUDGET_S  seconds of timed calls per benchmark (default 1.0; at least
                              MIN_ROUNDS rounds are always timed)
  LATENTSPACE_BENCH_QUIET_WAIT_S  longest wait for a quiet machine before a cell, in the
                              benchmarks that wait (bench_losses.py, bench_encode.py; default 30)
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import _pytest.nodes
import numpy as np
import pytest

import torch

try:  # bench_knn.py needs faiss; other benchmarks here (e.g. GPU ones) may run without it
    import faiss
except ImportError:
    faiss = None

# pytest-benchmark before 5.3.1 (5.3.0 included) reads node._nodeid, which pytest 9.2 removed:
# under that pair every benchmark errors ("'Function' object has no attribute '_nodeid'"), and
# a GPU image may ship either version. The alias keeps those versions working.
if not hasattr(_pytest.nodes.Node, "_nodeid"):
    _pytest.nodes.Node._nodeid = property(lambda node: node.nodeid)


@pytest.hookimpl(hookwrapper=True)  # (the old style: any pluggy a GPU image's pytest brings)
def pytest_runtest_call(item):
    """A benchmark interrupted (gpu_run.sh stops a run at its limit with SIGINT, so that
    pytest-benchmark writes the JSON of the benchmarks that finished) is left out of that
    JSON: stopped in its timed rounds it may hold none, on which pytest-benchmark's writing
    of the whole file fails; stopped in the checks after them, its time was never verified
    (and would read "wrong")."""
    outcome = yield
    error = outcome.excinfo[1] if outcome.excinfo else None
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if isinstance(error, KeyboardInterrupt) and fixture is not None:
        fixture.has_error = True  # pytest-benchmark writes no benchmark that has one


def _import_latentspace():
    """The installed package may be mid-rebuild (pip install in another shell): retry a while,
    LATENTSPACE_BENCH_IMPORT_RETRIES times 30 s (default 3; gpu_run.sh sets 0: nothing rebuilds
    there, and each benchmark stage would spend 90 s of its limit on an import that fails)."""
    retries = int(os.environ.get("LATENTSPACE_BENCH_IMPORT_RETRIES", "3"))
    for attempt in range(retries + 1):
        try:
            import latentspace

            return latentspace
        except ImportError:
            if attempt == retries:
                raise
            time.sleep(30)


latentspace = _import_latentspace()

# -- settings --------------------------------------------------------------------------------
N = int(os.environ.get("LATENTSPACE_BENCH_N", "1000000"))
D = 128
SEED = 20240611
N_CLUSTERS = 100
MAX_QUERIES = 1024  # the largest Q of any cell; smaller Q use a prefix of the same queries
CPUS = len(os.sched_getaffinity(0))


# -- data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    database: np.ndarray  # (N, D) float32, C-contiguous
    queries: np.ndarray  # (MAX_QUERIES, D) float32, drawn from the same mixture


def gaussian_mixture(rng: np.random.Generator, n: int, centres, scales, weights) -> np.ndarray:
    """n float32 points: pick a cluster by weight, add isotropic noise of that cluster's scale."""
    labels = rng.choice(len(centres), size=n, p=weights)
    x = rng.standard_normal((n, D), dtype=np.float32)
    x *= scales[labels, None]
    x += centres[labels]
    return x


def make_dataset(n: int) -> Dataset:
    """A 100-cluster Gaussian mixture in D=128.

    Centres are standard normal (pairwise distance ~16); each cluster's noise scale is in
    [0.2, 0.5] (within-cluster distances ~3-8), so a query's neighbours are the nearby members
    of its own cluster rather than an arbitrary draw from a featureless cloud. Cluster sizes
    vary (Dirichlet weights). Independent child seeds keep the centres and the queries the
    same whatever N is, so quick and full runs search for the same queries.
    """
    centre_rng, database_rng, query_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(SEED).spawn(3)
    )
    centres = centre_rng.standard_normal((N_CLUSTERS, D), dtype=np.float32)
    scales = centre_rng.uniform(0.2, 0.5, N_CLUSTERS).astype(np.float32)
    weights = centre_rng.dirichlet(np.full(N_CLUSTERS, 2.0))
    database = gaussian_mixture(database_rng, n, centres, scales, weights)
    queries = gaussian_mixture(query_rng, MAX_QUERIES, centres, scales, weights)
    return Dataset(database=database, queries=queries)


@pytest.fixture(scope="session")
def dataset() -> Dataset:
    return make_dataset(N)


# -- threads ---------------------------------------------------------------------------------
def use_threads(n: int) -> None:
    """Sets every library's thread count to n, not only the peer's about to run.

    faiss, torch and latentspace each bring or share an OpenMP runtime, and some of these
    setters change process-wide OpenMP state, so setting one library can change another's
    count: set them all, then check that each took.
    """
    torch.set_num_threads(n)
    latentspace.set_num_threads(n)
    got = {"torch": torch.get_num_threads(), "latentspace": latentspace.get_num_threads()}
    if faiss is not None:
        faiss.omp_set_num_threads(n)
        got["faiss"] = faiss.omp_get_max_threads()
    assert all(v == n for v in got.values()), f"asked for {n} threads, got {got}"


@pytest.fixture(scope="session")
def set_threads():
    return use_threads


# -- noise meter -----------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _busy_ticks_all_cpus() -> int:
    """CPU time spent busy on the machine (steal included: the hypervisor took it from us)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def _own_ticks() -> int:
    """CPU time of this process, all threads (utime + stime)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class ForeignLoad:
    """How many CPUs' worth of time other processes used while the block ran.

    The machine is shared and noisy; rather than silently trusting times measured next to a
    compiler, each benchmark records this so the report can flag cells measured under load.
    Resolution is one clock tick (10 ms) of CPU time, so short blocks read coarsely.
    """

    cpus: float = float("nan")

    def __enter__(self) -> "ForeignLoad":
        self._start = (time.monotonic(), _busy_ticks_all_cpus(), _own_ticks())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        wall = time.monotonic() - wall0
        foreign_ticks = (_busy_ticks_all_cpus() - busy0) - (_own_ticks() - own0)
        self.cpus = max(0.0, foreign_ticks / _CLOCK_TICKS / wall) if wall > 0 else 0.0


@pytest.fixture
def foreign_load() -> ForeignLoad:
    return ForeignLoad()


QUIET_WAIT_S = float(os.environ.get("LATENTSPACE_BENCH_QUIET_WAIT_S", "30"))
QUIET_CPUS = 0.1


def wait_for_quiet(max_wait_s: float = QUIET_WAIT_S, window_s: float = 0.5) -> float:
    """Waits (at most max_wait_s) until other processes leave the CPUs alone for one window;
    returns the seconds waited. On 2 cores, one busy neighbour ruins a 2-thread OpenMP run
    (a descheduled thread stalls every barrier), so cells start in a quiet moment if one comes."""
    start = time.monotonic()
    while True:
        with ForeignLoad() as load:
            time.sleep(window_s)
        waited = time.monotonic() - start
        if load.cpus < QUIET_CPUS or waited >= max_wait_s:
            return waited


@pytest.fixture(scope="session")
def quiet():
    return wait_for_quiet


# -- machine info, recorded in the benchmark JSON ----------------------------------------------
def _cpu_model() -> str:
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
        if not line.strip():
            break  # the first processor is enough
    return f"{info.get('model name', platform.processor())} (family {info.get('cpu family')}, model {info.get('model')})"


def _l3_bytes() -> int | None:
    """Size of the last-level cache, to tell when a 'memory-bound' cell actually fits in it."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if (index / "level").read_text().strip() == "3":
            size = (index / "size").read_text().strip()
            return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
    return None


def _native_library() -> dict:
    """Which latentspace binary ran: it may be rebuilt between runs, the version may not change."""
    path = next(Path(latentspace.__file__).parent.glob("_native*.so"), None)
    if path is None:
        return {}
    return {
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)),
    }


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent
        head = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def bench_machine_info() -> dict:
    build = latentspace.build_info()
    return {
        "cpu_model": _cpu_model(),
        "cpus": CPUS,
        "l3_bytes": _l3_bytes(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "simd_level": build["simd_level"],
        "hardware_simd_level": build["hardware_simd_level"],
        "latentspace": build["version"],
        "latentspace_native": _native_library(),
        "repo_commit": _git_commit(),
        "faiss": faiss.__version__ if faiss is not None else None,
        "torch": torch.__version__,
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "n": N,
        "d": D,
        "seed": SEED,
        "clusters": N_CLUSTERS,
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["latentspace_bench"] = bench_machine_info()


def pytest_report_header(config):
    info = bench_machine_info()
    return (
        f"latentspace bench: N={N} D={D} cpus={CPUS} cpu={info['cpu_model']} "
        f"simd={info['simd_level']} latentspace={info['latentspace']} faiss={info['faiss']} "
        f"torch={info['torch']} numpy={info['numpy']}"
    )
