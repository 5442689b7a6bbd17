"""Where the GPU kNN's time goes: a diagnostic run for docs/benchmarks.md, not a benchmark.

Run on a GPU machine from the repository root (benchmarks/gpu_run.sh runs it in its
"profile" stage):
  python3 benchmarks/profile_knn_cuda.py [out.json]

Questions the benchmark's totals cannot answer:
  1. A search of Q = 10,000 against N = 1,000,000 (D = 128, float32): how much of it is the
     fused scan, the merge of the splits, the sort? k = 10 against k = 1024 (torch.profiler's
     CUDA kernel times, one profiled search each after a warm-up), each also with the opt-in
     shared thresholds (LATENTSPACE_CUDA_SHARED_THRESHOLDS=1).
  2. One query (FlatIndex, N = 4,096 and 1,000,000, k = 10): the host's fixed cost per search,
     split into the steps FlatIndex.search takes (medians of timed repeats, each step ending
     with torch.cuda.synchronize()), and the kernels of one search.
  3. A streamed search's host copy into pinned memory: its rate with 1 to 8 threads.
Uses private helpers (latentspace._arrays, latentspace._cuda_search) on purpose: the steps
timed are those FlatIndex.search runs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import latentspace
from latentspace import _arrays, _cuda_search

DEVICE = None  # the current CUDA device, set by main()
REPEATS = 200


def median_ms(call, repeats: int = REPEATS) -> float:
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernel_times(call) -> list[tuple[str, int, float]]:
    """(kernel name, launches, total ms) of one call, from torch.profiler's CUDA activity."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us > 0:
            rows.append((event.key[:90], event.count, device_us / 1e3))
    return sorted(rows, key=lambda row: -row[2])


def big_search_breakdown(report: dict) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    x = torch.randn(1_000_000, 128, generator=g, device=DEVICE)
    q = torch.randn(10_000, 128, generator=g, device=DEVICE)
    for k in (10, 1024):
        for shared in ("0", "1"):  # LATENTSPACE_CUDA_SHARED_THRESHOLDS: the opt-in shared bound
            os.environ["LATENTSPACE_CUDA_SHARED_THRESHOLDS"] = shared
            try:
                rows = kernel_times(lambda: latentspace.knn(q, x, k))
            finally:
                del os.environ["LATENTSPACE_CUDA_SHARED_THRESHOLDS"]
            label = f"big k={k}" + (" shared thresholds" if shared == "1" else "")
            report[label] = rows
            print(f"\n== knn Q=10000 N=1000000 D=128 k={k}{' [shared thresholds]' if shared == '1' else ''}: "
                  "CUDA kernels of one search")
            for name, count, ms in rows[:8]:
                print(f"  {ms:9.2f} ms  x{count:<4d} {name}")


def q1_breakdown(report: dict) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(8)
    for n in (4096, 1_000_000):
        x = torch.randn(n, 128, generator=g, device=DEVICE)
        q = torch.randn(1, 128, generator=g, device=DEVICE)
        index = latentspace.FlatIndex(128, device=DEVICE)
        index.add(x)
        backend = _cuda_search.CudaBackend(index._device)
        database, norms = index._gpu_buffer[:n], index._gpu_norms
        norms = None if norms is None else norms[:n]
        workspace = _cuda_search.DEFAULT_WORKSPACE_BYTES
        steps = {
            "FlatIndex.search": lambda: index.search(q, 10),
            "knn (tensors)": lambda: latentspace.knn(q, x, 10),
            "query check (flag + .item())": lambda: _arrays.unusable_row_flag(q).item(),
            "search_resident (native call, its planning)": lambda: _cuda_search.search_resident(
                backend, q, database, 10, "l2", workspace, norms=norms),
            "workspace_of (native plan)": lambda: backend.workspace_of(1, n, 10),
            "CudaBackend()": lambda: _cuda_search.CudaBackend(index._device),
            "empty sync": lambda: None,
        }
        timings = {name: median_ms(call) for name, call in steps.items()}
        report[f"q1 N={n}"] = {"host_ms": timings, "kernels": kernel_times(lambda: index.search(q, 10))}
        print(f"\n== FlatIndex Q=1 N={n} D=128 k=10: medians of {REPEATS} calls, each + synchronize")
        for name, ms in timings.items():
            print(f"  {ms:8.3f} ms  {name}")
        print("  kernels of one FlatIndex.search:")
        for name, count, ms in report[f"q1 N={n}"]["kernels"][:10]:
            print(f"  {ms:8.3f} ms  x{count:<3d} {name}")


def host_copy_rates(report: dict) -> None:
    """The host side of a streamed search (_cuda_search._PinnedChunks.start): one thread's
    np.copyto of a 256 MiB chunk into pinned memory, against the same copy split over threads
    (np.copyto releases the GIL). The streamed cell spent about 50 ms beyond the upload and the
    search in GPU run 6; this says whether the single-threaded copy can be most of it."""
    from concurrent.futures import ThreadPoolExecutor

    rows = (256 << 20) // (128 * 4)
    source = torch.randn(rows, 128).numpy()
    pinned = torch.empty((rows, 128), dtype=torch.float32, pin_memory=True).numpy()
    rates = {}
    for threads in (1, 2, 4, 8):
        step = -(-rows // threads)
        with ThreadPoolExecutor(threads) as pool:
            def copy():
                list(pool.map(lambda i: np.copyto(pinned[i : i + step], source[i : i + step]), range(0, rows, step)))

            rates[threads] = source.nbytes / (median_ms(copy, repeats=10) / 1e3) / 1e9
    report["host copy GB/s by threads"] = rates
    print("\n== host copy of a 256 MiB chunk into pinned memory (GB/s read, by threads)")
    print("  " + "  ".join(f"{t}: {rate:.1f}" for t, rate in rates.items()))


def main() -> None:
    if not latentspace.cuda_available():
        sys.exit("no usable CUDA GPU")
    global DEVICE
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}")
    report: dict = {"device": torch.cuda.get_device_name(DEVICE)}
    q1_breakdown(report)
    big_search_breakdown(report)
    host_copy_rates(report)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
