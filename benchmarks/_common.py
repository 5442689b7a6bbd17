"""Timing and roof helpers shared by the bench_*.py files (plain functions; fixtures live in
conftest.py). pytest puts benchmarks/ on sys.path, so the benchmark files `import _common`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

import torch

# 1 thread and all cores: on this 2-core machine some peers are faster with 1.
THREAD_COUNTS = sorted({1, len(os.sched_getaffinity(0))})

# Timing: pedantic mode, one call per round. The verification call before timing is the
# warm-up; rounds are sized so each benchmark times about BUDGET_S seconds of calls, but
# never fewer than MIN_ROUNDS (kNN Q=1024 at N=1M is ~1-5 s per call, so it gets 3).
BUDGET_S = float(os.environ.get("LATENTSPACE_BENCH_BUDGET_S", "1.0"))
MIN_ROUNDS = 3
MAX_ROUNDS = 100


def rounds_for(seconds_per_call: float) -> int:
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(BUDGET_S / max(seconds_per_call, 1e-9)))))


# The CUDA kNN's settings a GPU benchmark peer's label may name in its brackets
# ("latentspace.FlatIndex[early norms]"), and the environment setting each makes
# (bench_knn_cuda.py sets them; report_knn_cuda.py compares such peers with the plain ones):
# the opt-ins still waiting to pay (early norms, warp cut-backs, float thresholds) and the
# opt-outs of the defaults GPU run 8 chose (docs/gpu-runs.md), so that each default keeps
# being measured against what it replaced, and the settings forced on for experiments (shared
# thresholds everywhere; the tree merge with no split rule, run 8's large-k peer).
CUDA_KNN_OPT_INS = {"early norms": ("LATENTSPACE_CUDA_EARLY_NORMS", "1"),
                    "warp cut-backs": ("LATENTSPACE_CUDA_WARP_CUT_BACKS", "1"),
                    "float thresholds": ("LATENTSPACE_CUDA_FLOAT_THRESHOLDS", "1"),
                    "no fused finish": ("LATENTSPACE_CUDA_FUSED_FINISH", "0"),
                    "thresholds per split": ("LATENTSPACE_CUDA_SHARED_THRESHOLDS", "0"),
                    "filling plan": ("LATENTSPACE_CUDA_FITTED_PLAN", "0"),
                    "no large-k plan": ("LATENTSPACE_CUDA_TREE_MERGE", "0"),
                    "shared thresholds": ("LATENTSPACE_CUDA_SHARED_THRESHOLDS", "1"),
                    "tree merge": ("LATENTSPACE_CUDA_TREE_MERGE", "1"),
                    "no split rule": ("LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "0"),
                    # one query: the row scan (4 rows a warp), the default until GPU run 10
                    # made the single-query scan (8 rows) the default
                    "row scan": ("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS", "4"),
                    # the row check on torch's ops, the default until GPU run 12 made
                    # latentspace's kernel (csrc/cuda/norms.cu) the default
                    "torch check": ("LATENTSPACE_CUDA_ROW_CHECK", "torch"),
                    # MmaTile, the tensor-core tile until GPU run 12 made the tile staged by
                    # cp.async (knn_deep_tile.cuh) the default where it applies
                    "mma tile": ("LATENTSPACE_CUDA_TENSOR_TILE", "mma"),
                    # the deep tile with the next tile's first step and norms in flight between
                    # tiles (knn_pipelined_tile.cuh; opt-in, where the opt-in family runs)
                    "pipelined tile": ("LATENTSPACE_CUDA_TENSOR_TILE", "pipelined"),
                    # that tile with the block's queries rounded once into shared memory
                    # (knn_resident_tile.cuh; opt-in; bf16 / fp16 up to D = 128)
                    "resident tile": ("LATENTSPACE_CUDA_TENSOR_TILE", "resident")}

# The defaults before GPU run 8, as CUDA_KNN_OPT_INS names them: each of run 8's defaults off.
BEFORE_RUN_8 = ("no fused finish", "thresholds per split", "filling plan", "no large-k plan")


def read_benchmark_json(path: str) -> tuple[dict | None, str]:
    """A pytest-benchmark JSON file's data, or None and why it holds no results. pytest-benchmark
    opens --benchmark-json as it starts and writes it at the end: a run stopped at its time
    limit (gpu_run.sh's parts) leaves an empty file, named as such."""
    text = ""
    try:
        text = Path(path).read_text()
        return json.loads(text), ""
    except (OSError, ValueError) as error:
        empty = isinstance(error, ValueError) and not text.strip()
        return None, "empty: its run ended before pytest-benchmark wrote it" if empty else str(error)


def read_benchmark_files(paths) -> tuple[list[dict], list[tuple[str, str]]]:
    """The data of each readable pytest-benchmark JSON file in `paths`, and the files that
    held no results, each with the reason (read_benchmark_json). gpu_run.sh runs a benchmark
    in parts: one that failed to start, or a pytest-benchmark before 5.3 that had nothing
    timed, leaves no file or an empty one beside the parts that finished, whose figures must
    still be reported. (A part stopped at its time limit gets SIGINT and writes the
    benchmarks it finished.)"""
    found, unread = [], []
    for path in paths:
        data, why_not = read_benchmark_json(path)
        if data is None:
            unread.append((path, why_not))
        else:
            found.append(data)
    return found, unread


def verified_median(bench: dict | None) -> float | None:
    """A peer's median in seconds; None where it did not run or its timed rounds were wrong
    (extra_info["verified"] False: the GPU reports' benchmarks check their last round)."""
    if bench is None or bench["extra_info"].get("verified") is False:
        return None
    return bench["stats"]["median"]


def fmt_median_ms(bench: dict | None) -> str:
    """A peer's median in milliseconds for a report's table: "—" where it did not run,
    "wrong" where its timed rounds were wrong."""
    if bench is None:
        return "—"
    if bench["extra_info"].get("verified") is False:
        return "wrong"
    return f"{bench['stats']['median'] * 1e3:.3f}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def speedup_verdict(subject: str, peer: str, cells: int, speedups: list[float]) -> str:
    """In how many of `cells` cells `subject` beat `peer`, from the speed-ups measured (the
    peer's time over the subject's; a cell without both times counts as not won)."""
    if not speedups:
        return f"{subject} against {peer}: not measured in any of the {cells} cells."
    wins = sum(1 for s in speedups if s > 1.0)
    mean = math.exp(sum(map(math.log, speedups)) / len(speedups))
    return (f"{subject} faster than {peer} in {wins} of {cells} cells (speed-up over the "
            f"{len(speedups)} measured: geometric mean {mean:.2f}x, least {min(speedups):.2f}x, "
            f"most {max(speedups):.2f}x).")


def split_label(peer: str) -> tuple[str, list[str], list[str]]:
    """A peer's label cut into its name, the opt-ins its brackets name (CUDA_KNN_OPT_INS, in
    the label's order) and its other bracket words, which describe the peer itself:
    "latentspace.FlatIndex[bf16 storage, no fused finish]" -> ("latentspace.FlatIndex",
    ["no fused finish"], ["bf16 storage"]); "torch.mm+topk" -> ("torch.mm+topk", [], [])."""
    if not peer.endswith("]") or "[" not in peer:
        return peer, [], []
    name, inside = peer[:-1].split("[", 1)
    parts = [part.strip() for part in inside.split(",")]
    return name, [p for p in parts if p in CUDA_KNN_OPT_INS], [p for p in parts if p not in CUDA_KNN_OPT_INS]


def names_opt_in(peer: str) -> bool:
    """Whether a peer's label names a setting: "latentspace.knn[no fused finish]" yes,
    "latentspace.FlatIndex[bf16 storage, wmma]" and "torch.mm+topk" no."""
    return bool(split_label(peer)[1])


@contextlib.contextmanager
def environment(**settings: str):
    """Environment variables set for the block's duration, then restored (the CUDA kNN reads
    its settings at every search)."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def timed_call(fn, *args):
    """One untimed-by-pytest call: returns its result and how long it took."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


# -- roofs -----------------------------------------------------------------------------------
SGEMM_SIZE = 4096  # 2 * 4096^3 = 137 GFLOP per call: ~1 s, large enough for peak BLAS rate
READ_BYTES = 1 << 30  # 1 GiB, 32x the L3: every byte comes from DRAM
SGEMM_LIBRARIES = ("torch.mm", "numpy.matmul")  # numpy's OpenBLAS beats torch's MKL on this AMD CPU
READ_LIBRARIES = ("torch.sum", "numpy.sum")
# Read-roof cases as (roof, library, threads). numpy sums on one thread whatever the setting.
READ_ROOFS = [("read", lib, t) for lib in READ_LIBRARIES for t in THREAD_COUNTS if lib == "torch.sum" or t == 1]


def again_after(roofs):
    """The roofs measured again after the cells: at all cores (the best case for both), plus
    numpy's; the memory bandwidth of this VM drifts with its neighbours, so reports use the higher."""
    return [r for r in roofs if r[2] == max(THREAD_COUNTS) or r[1] == "numpy.sum"]


def random_read_buffer(nbytes: int = READ_BYTES) -> np.ndarray:
    # Random values, not np.ones: pages of identical content could be merged (KSM) and then
    # read from cache. numpy memory is on transparent huge pages (numpy madvises them).
    return np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)


def _sgemm_call(library: str, threads: int):
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE), dtype=np.float32) for _ in range(2))
    c = np.empty_like(a)
    if library == "torch.mm":
        ta, tb, tc = (torch.from_numpy(m) for m in (a, b, c))
        return lambda: torch.mm(ta, tb, out=tc)
    # numpy's OpenBLAS ignores torch/faiss thread settings: limit it with threadpoolctl.
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def call():
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            np.matmul(a, b, out=c)

    return call


def _read_call(library: str):
    array = random_read_buffer()
    return torch.from_numpy(array).sum if library == "torch.sum" else array.sum


def measure_roof(benchmark, foreign_load, roof: str, library: str, threads: int, when: str):
    call = _sgemm_call(library, threads) if roof == "sgemm" else _read_call(library)
    _, seconds = timed_call(call)  # warm-up: BLAS buffers, thread pool
    work = {"flops": 2 * SGEMM_SIZE**3} if roof == "sgemm" else {"bytes": READ_BYTES}
    benchmark.group = f"roof {roof}"
    benchmark.extra_info.update(kind="roof", roof=roof, library=library, threads=threads, when=when, **work)
    with foreign_load:
        benchmark.pedantic(call, rounds=rounds_for(seconds), iterations=1, warmup_rounds=1 if seconds < 0.1 else 0)
    benchmark.extra_info["foreign_cpus"] = foreign_load.cpus


# Memory bandwidth on this VM drifts by tens of percent over seconds to minutes (the host's
# other tenants; nothing in /proc shows it). For memory-bound cells the read rate is also
# measured right before and after the timed rounds, and the reports hold the cell to the
# higher of that and the session's read roof.
NEARBY_READ_ROUNDS = 5


def read_rate_nearby(array: np.ndarray, set_threads, threads: int) -> float:
    """Best GB/s of a few all-core torch sums over `array`; restores `threads`."""
    set_threads(max(THREAD_COUNTS))  # torch.sum reads fastest on all cores (see the roofs)
    x = torch.from_numpy(array)
    best = min(timed_call(x.sum)[1] for _ in range(NEARBY_READ_ROUNDS))
    set_threads(threads)
    return array.nbytes / best / 1e9
