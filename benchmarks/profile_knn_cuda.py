"""Where the GPU kNN's time goes: a diagnostic run for docs/benchmarks.md, not a benchmark.

Run on a GPU machine from the repository root (benchmarks/gpu_run.sh runs it in its
"profile" stage):
  python3 benchmarks/profile_knn_cuda.py [out.json]            # every section, one process each
  python3 benchmarks/profile_knn_cuda.py --section sweep [out.json]   # one: tiles, q1, q1sweep, copy, big, sweep, defaults, largek

Questions the benchmark's totals cannot answer:
  1. A search of Q = 10,000 against N = 1,000,000 (D = 128, float32): how much of it is the
     fused scan, the merge of the splits, the sort? k = 10 against k = 1024 (torch.profiler's
     CUDA kernel times, one profiled search each after a warm-up), each also with a default
     turned off (the fused finish, shared thresholds; at k = 1024 the fitted plan) and with
     the warp cut-backs, an opt-in (BREAKDOWN_OPT_INS).
  2. One query (FlatIndex, N = 4,096 and 1,000,000, k = 10): the host's fixed cost per search,
     split into the steps FlatIndex.search takes (medians of timed repeats, each step ending
     with torch.cuda.synchronize()), and the kernels of one search.
  3. A streamed search's host copy into pinned memory: its rate with 1 thread and more.
  4. The split rule (LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR), the workspace bound, the tree
     merge, shared thresholds and the fitted plan against the search time at k = 1024,
     faiss #3045's shape and k = 16,384 (plan_sweep).
  5. The defaults against the large-k plan off and the defaults before GPU run 8, over shapes
     that place the large-k plan's threshold (defaults_check).
  6. One query over 1M rows: the rows a warp reads at once and the splits, against one read of
     the database (q1_sweep).
  7. Q = 1,000 over 1M rows at k = 4,096 and 16,384, where torch.mm+topk was 1.2-1.5x faster
     in GPU run 12: the kernels of one search under the defaults (the large-k plan, one call
     under the automatic workspace) and of torch's addmm + topk over the same rows
     (large_k_breakdown).
  8. The tensor-core tiles' scan kernels side by side: bf16 at Q = 10,000 x 1M x 128, k = 10,
     and at faiss #3045's shape, on the deep tile (the default), the pipelined and the
     resident-queries tiles (opt-ins, twenty-third session) and MmaTile, with the scan each
     search ran (tile_breakdown): the benchmark's cells time whole calls, this the kernels.
Uses private helpers (latentspace._arrays, latentspace._cuda_search) on purpose: the steps
timed are those FlatIndex.search runs. A section stopped (SIGINT: gpu_run.sh's limit) or
failing midway keeps what it had measured, named under "unfinished" in the JSON; after a stop
no other section starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _common import BEFORE_RUN_8, CUDA_KNN_OPT_INS, environment  # benchmarks/ is the script's folder, first on sys.path

import latentspace
from latentspace import _arrays, _cuda_chunks, _cuda_search, _host_copy, _native

DEVICE = None  # the current CUDA device, set by main()
REPEATS = 200


def median_ms(call, repeats: int = REPEATS, warmup: int = 5) -> float:
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def median_queue_ms(call, repeats: int = REPEATS, warmup: int = 5) -> float:
    """The host's time to queue call()'s work on an idle GPU: the call alone is timed, the
    wait for the device after it is not (median_ms times both)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e3 * statistics.median(times)


def calls_and_first_plan(nq: int, n: int, k: int, bound: int, dim: int = 0) -> tuple[list, dict]:
    """The native calls [(start, stop, workspace bytes)] a search of nq queries of dim
    dimensions takes under `bound` (the library's own chunking, plan_query_chunks) and the
    first call's plan."""
    calls = _cuda_chunks.plan_query_chunks(
        nq, k, lambda c: _native._cuda_plan(c, n, k, DEVICE.index, bound, dim)["workspace_bytes"], bound)
    return calls, _native._cuda_plan(calls[0][1] - calls[0][0], n, k, DEVICE.index, bound, dim)


def kernel_times(call) -> list[tuple[str, int, float]]:
    """(kernel name, launches, total ms) of one call, from torch.profiler's CUDA activity. The
    names whole: their template arguments tell a family's kernels apart (printed lines cut them)."""
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
            rows.append((event.key, event.count, device_us / 1e3))
    return sorted(rows, key=lambda row: -row[2])


def print_kernels(title: str, rows: list[tuple[str, int, float]]) -> None:
    """A search's 8 slowest kernels (kernel_times' rows) under a "== title" line."""
    print(f"\n== {title}")
    for name, count, ms in rows[:8]:
        print(f"  {ms:9.2f} ms  x{count:<4d} {name[:90]}")


# The settings whose kernels big_search_breakdown splits (_common.CUDA_KNN_OPT_INS names): the
# defaults, each default turned off (the defaults chosen in GPU run 8), and the opt-ins still
# waiting, each on its own.
BREAKDOWN_OPT_INS = {
    10: [(), ("no fused finish",), ("thresholds per split",), ("warp cut-backs",),
         ("float thresholds", "thresholds per split")],
    1024: [(), ("no fused finish",), ("thresholds per split",), ("filling plan",), ("warp cut-backs",),
           ("no fused finish", "thresholds per split", "filling plan")],
}


def big_search_breakdown(report: dict) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    x = torch.randn(1_000_000, 128, generator=g, device=DEVICE)
    q = torch.randn(10_000, 128, generator=g, device=DEVICE)
    for k in (10, 1024):
        for opt_ins in BREAKDOWN_OPT_INS[k]:
            settings = dict(CUDA_KNN_OPT_INS[name] for name in opt_ins)
            with environment(**settings):
                rows = kernel_times(lambda: latentspace.knn(q, x, k))
            label = f"big k={k}" + (f" [{', '.join(opt_ins)}]" if opt_ins else "")
            report[label] = rows
            print_kernels(f"knn Q=10000 N=1000000 D=128 {label[4:]}: CUDA kernels of one search", rows)


def q1_breakdown(report: dict) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(8)
    for n in (4096, 1_000_000):
        x = torch.randn(n, 128, generator=g, device=DEVICE)
        q = torch.randn(1, 128, generator=g, device=DEVICE)
        index = latentspace.FlatIndex(128, device=DEVICE)
        index.add(x)
        backend = _cuda_search.CudaBackend(index._device)
        backend.set_dim(128)  # (as FlatIndex.search does: the plan's split rule reads it)
        database, norms = index._gpu_buffer[:n], index._gpu_norms
        norms = None if norms is None else norms[:n]
        workspace = _cuda_chunks.DEFAULT_WORKSPACE_BYTES
        steps = {
            "FlatIndex.search": lambda: index.search(q, 10),
            "knn (tensors)": lambda: latentspace.knn(q, x, 10),
            "query check (flag + .item())": lambda: _arrays.unusable_row_flag(q).item(),
            "search_resident (native call, its planning)": lambda: _cuda_search.search_resident(
                backend, q, database, 10, "l2", workspace, norms=norms),
            "workspace_of (native plan)": lambda: backend.workspace_of(1, n, 10, workspace),
            "CudaBackend()": lambda: _cuda_search.CudaBackend(index._device),
            "empty sync": lambda: None,
        }
        timings = {name: median_ms(call) for name, call in steps.items()}
        # Where a search's time goes besides its kernels (run 12: the native call 0.348 ms, its
        # scan 0.217 and finish 0.052): the native call alone, on outputs and a workspace made
        # once, timed with its wait and without it (the host's cost of queuing its launches).
        distances = torch.empty((1, 10), device=DEVICE)
        indices = torch.empty((1, 10), dtype=torch.int64, device=DEVICE)
        bytes_needed = backend.workspace_of(1, n, 10, workspace)
        scratch = torch.empty(bytes_needed, dtype=torch.uint8, device=DEVICE)

        def native_call():
            backend.search(q, database, 10, _cuda_search.METRICS["l2"], distances, indices, scratch, norms)

        timings["native call alone (+ synchronize)"] = median_ms(native_call)
        timings["native call alone, queuing only (no wait)"] = median_queue_ms(native_call)
        report[f"q1 N={n}"] = {"host_ms": timings, "kernels": kernel_times(lambda: index.search(q, 10))}
        print(f"\n== FlatIndex Q=1 N={n} D=128 k=10: medians of {REPEATS} calls, each + synchronize")
        for name, ms in timings.items():
            print(f"  {ms:8.3f} ms  {name}")
        print("  kernels of one FlatIndex.search:")
        for name, count, ms in report[f"q1 N={n}"]["kernels"][:10]:
            print(f"  {ms:8.3f} ms  x{count:<3d} {name[:90]}")


# The scan of one query, against one read of the database (issue 6's Q = 1 bar: within 1.5x).
# GPU run 8 (H200): the row scan of FlatIndex's single query over 1M x 128 took 0.355 ms, 1.44
# TB/s. Its blocks hold 80 registers a thread (ptxas, sm_90: 3 resident blocks of 8 warps a
# multiprocessor), read 4 rows (2 KiB) a warp at a time, and the plan's 521 splits assume 2
# resident blocks (1.3 waves at 3). Two experiment settings say which limit binds: the rows a
# warp reads at once in the single-query scan (LATENTSPACE_CUDA_SINGLE_QUERY_ROWS: 4, the row
# scan; 8 or 16) and the splits of the call (LATENTSPACE_CUDA_FEW_QUERY_SPLITS: the plan's own,
# or whole waves of 1 to 8 blocks a multiprocessor).
Q1_SWEEP_ROWS = ("4", "8", "16")
Q1_SWEEP_WAVES = (1, 2, 3, 4, 6, 8)  # splits: this many times the multiprocessors
Q1_SWEEP_N = 1_000_000


def scan_rows(kernels: list[tuple[str, int, float]]) -> int | None:
    """The rows a warp reads at once in the row scan among one search's kernels: row_scan_kernel's
    kRows, its second-last template argument ("..., 1, 8, 1>"). None where no row scan ran or
    its name does not show its arguments. The 8- and 16-row scans take only rows that load in
    quads, and the 4-row scan runs otherwise: this says which one the times are of."""
    for name, _, _ in kernels:
        arguments = re.search(r"row_scan_kernel<([^<>]*)>", name)
        if arguments:
            value = arguments.group(1).split(",")[-2].strip().removeprefix("(int)")
            return int(value) if value.isdigit() else None
    return None


def q1_sweep(report: dict) -> None:
    """FlatIndex.search and knn of one query over 1M x 128 (float32, k = 10) under each
    Q1_SWEEP_ROWS x splits setting: medians of 50 calls (each + synchronize), the row scan's
    kernel time (torch.profiler, one search) and its read rate; beside a torch.sum over the
    database (the read the bar counts), in the same process."""
    g = torch.Generator(device=DEVICE).manual_seed(12)
    n = Q1_SWEEP_N
    x = torch.randn(n, 128, generator=g, device=DEVICE)
    q = torch.randn(1, 128, generator=g, device=DEVICE)
    index = latentspace.FlatIndex(128, device=DEVICE)
    index.add(x)
    multiprocessors = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    read_ms = median_ms(lambda: torch.sum(x), repeats=50)
    rows: list[dict] = []
    report["q1 sweep"] = {"read_ms": read_ms, "multiprocessors": multiprocessors, "rows": rows}
    print(f"\n== one query, N={n} D=128 k=10: rows a warp reads x splits (medians of 50; one read "
          f"of the database, torch.sum: {read_ms:.3f} ms, {x.numel() * 4 / read_ms / 1e9:.2f} TB/s)")
    for rows_setting in Q1_SWEEP_ROWS:
        for splits in ("", *(str(waves * multiprocessors) for waves in Q1_SWEEP_WAVES)):
            with environment(LATENTSPACE_CUDA_SINGLE_QUERY_ROWS=rows_setting,
                             LATENTSPACE_CUDA_FEW_QUERY_SPLITS=splits):
                index_ms = median_ms(lambda: index.search(q, 10), repeats=50)
                knn_ms = median_ms(lambda: latentspace.knn(q, x, 10), repeats=50)
                kernels = kernel_times(lambda: index.search(q, 10))
                plan = _native._cuda_plan(1, n, 10, DEVICE.index)
            scan_ms = sum(ms for name, _, ms in kernels if "row_scan_kernel" in name)
            ran = scan_rows(kernels)
            rows.append({"rows": int(rows_setting), "scan_rows": ran, "splits_set": splits, "splits": plan["splits"],
                         "flat_index_ms": index_ms, "knn_ms": knn_ms, "scan_ms": scan_ms, "kernels": kernels})
            which = ("" if ran == int(rows_setting) else "  (which scan ran: not in its kernel's name)" if ran is None
                     else f"  (not the {rows_setting}-row scan: the {ran}-row one ran)")
            print(f"  rows {rows_setting:>2s}  splits {plan['splits']:5d}{' (own)' if not splits else '      '}  "
                  f"FlatIndex {index_ms:6.3f} ms ({index_ms / read_ms:4.2f}x one read)  knn {knn_ms:6.3f} ms  "
                  f"scan {scan_ms:6.3f} ms ({x.numel() * 4 / scan_ms / 1e9 if scan_ms else 0:5.2f} TB/s){which}")


def host_copy_rates(report: dict) -> None:
    """The host side of a streamed search (_cuda_search._PinnedChunks.start): a 256 MiB chunk
    copied into pinned memory by _host_copy.copy_rows with 1 thread and with its pool's
    threads (np.copyto releases the GIL). The streamed cell spent about 50 ms beyond the upload
    and the search in GPU run 6, with one thread; this says whether threads pay there."""
    rows = (256 << 20) // (128 * 4)
    source = torch.randn(rows, 128).numpy()
    pinned = torch.empty((rows, 128), dtype=torch.float32, pin_memory=True).numpy()
    rates = {}
    for threads in sorted({1, 2, _host_copy.POOL_THREADS}):
        copy = lambda: _host_copy.copy_rows(pinned, source, threads)  # noqa: E731
        rates[threads] = source.nbytes / (median_ms(copy, repeats=10) / 1e3) / 1e9
    report["host copy GB/s by threads"] = rates
    print(f"\n== host copy of a 256 MiB chunk into pinned memory (GB/s read, by threads; the pool has "
          f"{_host_copy.POOL_THREADS})")
    print("  " + "  ".join(f"{t}: {rate:.1f}" for t, rate in rates.items()))


# The plan sweep: shape -> (Q, N, D, k, configurations), a configuration being (split rule,
# workspace GiB, tree merge, shared thresholds, fitted plan), each "0" or "1" for the last
# three (shared thresholds run the opt-in family's kernels, float thresholds included). Each
# configuration sets all three, so "0" rows are the plans of the defaults before GPU run 8
# (rule 32, 1 GiB, no tree, thresholds per split, the filling plan), whatever the defaults now;
# but every row runs today's fused finish (LATENTSPACE_CUDA_FUSED_FINISH is not set here; off
# before run 8), so their times are not run 4-8's sweep figures again. Rule
# 0: no rule (splits only to fill the GPU), the plan the tree merge is for. The fitted plan
# (LATENTSPACE_CUDA_FITTED_PLAN) changes only plans over their bound: at k = 1024 all 10,000
# queries in one call of fewer splits (computed); at k = 16,384 with no rule, one call of 2
# splits (16 blocks) instead of 8 calls of 521 blocks (computed), the case against it there.
SWEEP = {
    "Q=10000 N=1M D=128 k=1024": (10_000, 1_000_000, 128, 1024, [
        (32, 1, "0", "0", "0"), (32, 1, "0", "1", "0"), (32, 1, "0", "0", "1"), (32, 1, "0", "1", "1"),
        (8, 1, "0", "0", "0"), (8, 1, "0", "1", "0"), (16, 1, "0", "0", "0"), (16, 1, "0", "1", "0"),
        (64, 1, "0", "0", "0"), (32, 4, "0", "0", "0"), (32, 4, "0", "1", "0"), (16, 4, "0", "1", "0"),
        (32, 2, "0", "1", "1"), (0, 1, "1", "0", "0"), (0, 1, "1", "1", "0"),
        (32, 4, "0", "1", "0", 2), (32, 4, "0", "1", "0", 3)]),
    "faiss3045 Q=5000 N=8192 D=2048 k=32": (5000, 8192, 2048, 32, [
        (32, 1, "0", "0", "0"), (32, 1, "0", "1", "0"), (8, 1, "0", "0", "0"), (2, 1, "0", "0", "0"),
        (2, 1, "0", "1", "0"), (0, 1, "1", "0", "0"), (0, 1, "1", "1", "0")]),
    "Q=1000 N=1M D=128 k=16384": (1000, 1_000_000, 128, 16384, [
        (32, 1, "0", "0", "0"), (4, 1, "0", "0", "0"), (0, 1, "1", "0", "0"), (0, 8, "1", "0", "0"),
        (4, 8, "1", "0", "0"), (0, 1, "1", "0", "1")]),
}
SWEEP_SLOW_S = 3.0  # a configuration whose first call took longer is timed once


def plan_sweep(report: dict) -> None:
    """The split rule (LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR: splits at least rule * k rows long;
    0: none), the workspace bound (knn's workspace_bytes: how many queries a native call
    takes), the tree merge, shared thresholds, the fitted plan and, at k = 1024, the lists'
    room beyond k (LATENTSPACE_CUDA_LIST_ROOM: fewer cut-backs) against the search time,
    float32.
    The leads it serves (docs/benchmarks.md): k = 1024 (run 4's rule 32 ran 378 ms, rule 8
    595 ms; a larger workspace gives a call more query tiles, so more waves whose blocks start
    with a shared bound), a rule that scales with D (faiss #3045's shape ran 8.7 ms with 26
    splits, 9.7 ms with 8), and k past 1,024 (rule 32 leaves 8 blocks at k = 16,384,
    computed; no rule plus the tree merge fills the GPU). Times: medians of 3 calls after one
    warm-up (1 call where the warm-up took over SWEEP_SLOW_S), each ending with
    torch.cuda.synchronize(); the native calls are the library's own chunking of the queries
    (plan_query_chunks), the plan is the first call's."""
    g = torch.Generator(device=DEVICE).manual_seed(9)
    report["plan sweep"] = rows = []
    print("\n== plan sweep: split rule, workspace, tree merge, thresholds, fitted plan (float32; ms, median of 3)")
    for shape, (nq, n, dim, k, configurations) in SWEEP.items():
        x = torch.randn(n, dim, generator=g, device=DEVICE)
        q = torch.randn(nq, dim, generator=g, device=DEVICE)
        for rule, gib, tree, shared, fitted, *room in configurations:
            room = room[0] if room else 1  # (the list's room beyond k, in multiples of k)
            with environment(LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR=str(rule), LATENTSPACE_CUDA_TREE_MERGE=tree,
                             LATENTSPACE_CUDA_SHARED_THRESHOLDS=shared, LATENTSPACE_CUDA_FITTED_PLAN=fitted,
                             LATENTSPACE_CUDA_LIST_ROOM=str(room)):
                search = lambda: latentspace.knn(q, x, k, workspace_bytes=gib << 30)  # noqa: E731
                start = time.perf_counter()
                search()  # the warm-up
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                ms = 1e3 * first if first > SWEEP_SLOW_S else median_ms(search, repeats=3, warmup=0)
                calls, plan = calls_and_first_plan(nq, n, k, gib << 30, dim)
                first_queries = calls[0][1] - calls[0][0]
            rows.append({"shape": shape, "rule": rule, "workspace_gib": gib, "tree_merge": tree == "1",
                         "shared_thresholds": shared == "1", "fitted_plan": fitted == "1", "list_room": room,
                         "ms": ms, "plan": plan,
                         "native_calls": len(calls), "first_call_queries": first_queries})
            print(f"  {shape:36s} rule {rule:2d} {gib} GiB {'tree' if tree == '1' else '    '} "
                  f"{'shared' if shared == '1' else 'split '} {'fitted ' if fitted == '1' else 'filling'} "
                  f"{ms:9.2f} ms  {len(calls)} calls; the first: "
                  f"{first_queries} queries, {plan['query_tiles']} x {plan['splits']} blocks, "
                  f"{plan['split_length']} rows a split" + (f", list room {room} k" if room != 1 else ""))
        x = q = None  # this shape's tensors freed before the next one's are made


# The defaults GPU run 8 chose (docs/gpu-runs.md): shape -> (Q, N, D, k). Each is searched
# with the defaults, with the large-k plan off (LATENTSPACE_CUDA_TREE_MERGE=0), and with the
# defaults before run 8 (no fused finish, shared thresholds, fitted plan or large-k plan), to
# check the flips and place the large-k plan's threshold (knn_plan.cuh plan_for: the split rule's
# blocks under three quarters of the multiprocessors' count since run 9, which measured 7 to
# 90 blocks faster without the rule and 120 slower; run 8: 8 and 56 faster, 240 slower),
# float32, 1 GiB workspace.
DEFAULTS_SHAPES = {
    "Q=1 N=1M D=128 k=10": (1, 1_000_000, 128, 10),
    "Q=1 N=1M D=128 k=1024": (1, 1_000_000, 128, 1024),
    "Q=100 N=1M D=128 k=4096": (100, 1_000_000, 128, 4096),
    "Q=300 N=1M D=128 k=1024": (300, 1_000_000, 128, 1024),
    "Q=1000 N=1M D=128 k=1024": (1000, 1_000_000, 128, 1024),
    "Q=1000 N=1M D=128 k=2048": (1000, 1_000_000, 128, 2048),
    "Q=1000 N=1M D=128 k=4096": (1000, 1_000_000, 128, 4096),
    "Q=10000 N=1M D=128 k=100": (10_000, 1_000_000, 128, 100),
    "Q=10000 N=1M D=128 k=1024": (10_000, 1_000_000, 128, 1024),
}
DEFAULTS_CONFIGURATIONS = {
    "defaults": {},
    "no large-k plan": dict([CUDA_KNN_OPT_INS["no large-k plan"]]),
    "before run 8": dict(CUDA_KNN_OPT_INS[name] for name in BEFORE_RUN_8),
}


def defaults_check(report: dict) -> None:
    """Each DEFAULTS_SHAPES search under each DEFAULTS_CONFIGURATIONS (median ms of 5 after one
    warm-up, each call ending with torch.cuda.synchronize()), with the native calls under the
    defaults and the first one's plan (the library's own chunking, plan_query_chunks, under
    the default bound, resident_workspace_bytes)."""
    g = torch.Generator(device=DEVICE).manual_seed(11)
    report["defaults"] = rows = []
    print("\n== the defaults against the large-k plan off and the defaults before run 8 (float32; ms, median of 5)")
    for shape, (nq, n, dim, k) in DEFAULTS_SHAPES.items():
        x = torch.randn(n, dim, generator=g, device=DEVICE)
        q = torch.randn(nq, dim, generator=g, device=DEVICE)
        times = {}
        unset = {variable: "" for variable in DEFAULTS_CONFIGURATIONS["before run 8"]}  # the defaults
        for name, settings in DEFAULTS_CONFIGURATIONS.items():
            with environment(**{**unset, **settings}):
                times[name] = median_ms(lambda: latentspace.knn(q, x, k), repeats=5, warmup=1)
        backend = _cuda_search.CudaBackend(DEVICE)
        backend.set_dim(dim)
        bound = _cuda_search.resident_workspace_bytes(backend, nq, n, k)  # the default bound (since session 21)
        calls, plan = calls_and_first_plan(nq, n, k, bound, dim)
        rows.append({"shape": shape, "ms": times, "plan": plan, "native_calls": len(calls), "workspace_bound": bound})
        print(f"  {shape:28s} " + "  ".join(f"{name} {ms:8.2f}" for name, ms in times.items())
              + f"  | {len(calls)} calls, the first: {plan['query_tiles']} x {plan['splits']} blocks"
              + (" tree" if plan["tree"] else ""))
        x = q = None  # this shape's tensors freed before the next one's are made


LARGE_K_N = 1_000_000
LARGE_K_QUERIES = 1000
LARGE_K_KS = (4096, 16384)


def large_k_breakdown(report: dict) -> None:
    """The kernels of one search at a large k over 1,000 queries: latentspace.knn with the
    defaults (its plan printed), against torch's addmm of the scores and topk over them, all
    rows at once (4 GB of float32 scores), as torch.mm+topk's one block of the benchmark."""
    g = torch.Generator(device=DEVICE).manual_seed(12)
    x = torch.randn(LARGE_K_N, 128, generator=g, device=DEVICE)
    q = torch.randn(LARGE_K_QUERIES, 128, generator=g, device=DEVICE)
    norms = x.square().sum(1)
    backend = _cuda_search.CudaBackend(DEVICE)
    backend.set_dim(128)
    for k in LARGE_K_KS:
        bound = _cuda_search.resident_workspace_bytes(backend, LARGE_K_QUERIES, LARGE_K_N, k)
        calls, plan = calls_and_first_plan(LARGE_K_QUERIES, LARGE_K_N, k, bound, 128)
        peers = {"latentspace.knn": lambda: latentspace.knn(q, x, k),
                 "torch addmm+topk": lambda: torch.topk(torch.addmm(norms, q, x.T, alpha=-2.0), k, largest=False)}
        for peer, call in peers.items():
            rows = kernel_times(call)
            label = f"large k={k} {peer}"
            report[label] = rows
            where = (f" ({len(calls)} calls, the first: {plan['query_tiles']} x {plan['splits']} blocks"
                     f"{' tree' if plan['tree'] else ''}, workspace bound {bound / 2**30:.1f} GiB)"
                     if peer == "latentspace.knn" else "")
            print_kernels(f"Q={LARGE_K_QUERIES} N={LARGE_K_N} D=128 k={k} {peer}: CUDA kernels of one search{where}",
                          rows)


# The tensor-core tiles tile_breakdown times (LATENTSPACE_CUDA_TENSOR_TILE): the default, the
# opt-ins waiting for a GPU run, MmaTile (the default until run 12).
TILE_SETTINGS = ("deep", "pipelined", "resident", "mma")


def tile_breakdown(report: dict) -> None:
    """The kernels of one bf16 search on each tensor-core tile: Q = 10,000 x N = 1M x D = 128,
    k = 10, and faiss #3045's 5,000 x 8,192 x 2,048, k = 32 (both several splits a query: the
    opt-in family, where the pipelined tiles run; the resident tile only up to D = 128), and
    the scan each ran (a tile that fell back is named)."""
    g = torch.Generator(device=DEVICE).manual_seed(13)
    shapes = {"bf16 big": (10_000, 1_000_000, 128, 10), "bf16 faiss3045": (5_000, 8_192, 2_048, 32)}
    for name, (nq, n, d, k) in shapes.items():
        x = torch.randn(n, d, generator=g, device=DEVICE)
        q = torch.randn(nq, d, generator=g, device=DEVICE)
        for tile in TILE_SETTINGS:
            if tile == "resident" and d > 128:
                continue
            with environment(LATENTSPACE_CUDA_TENSOR_TILE=tile):
                rows = kernel_times(lambda: latentspace.knn(q, x, k, precision="bf16"))
                ran = _native._cuda_last_scan()
            label = f"{name} [{tile}]"
            report[label] = {"scan": ran, "kernels": rows}
            print_kernels(f"{label}, the {ran} scan: CUDA kernels of one search", rows)


# Each section runs in a process of its own, in this order: a never-run opt-in kernel that
# faults leaves its process's CUDA context unusable, and must not take the sections after it
# along (each section's JSON is written as it ends, so a time limit keeps the finished ones).
# tiles first: the newest experiment (the pipelined tiles), then q1sweep, before the sections
# earlier runs have timed.
SECTIONS = {"tiles": tile_breakdown, "q1": q1_breakdown, "q1sweep": q1_sweep, "copy": host_copy_rates, "big": big_search_breakdown,
            "sweep": plan_sweep, "defaults": defaults_check, "largek": large_k_breakdown}


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


INTERRUPTED = 130  # a section's exit status when SIGINT stopped it (as a shell reports one)


def run_section(name: str, path: str | None) -> int:
    """One section here; its JSON to `path`. Stopped (SIGINT: KeyboardInterrupt) or failing
    midway, what it had measured is written all the same, the section named under "unfinished"
    with why (a stop returns INTERRUPTED, an error is raised again)."""
    if not latentspace.cuda_available():
        sys.exit("no usable CUDA GPU")
    global DEVICE
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    report: dict = {"device": torch.cuda.get_device_name(DEVICE)}
    try:
        SECTIONS[name](report)
    except (Exception, KeyboardInterrupt) as error:
        report["unfinished"] = {name: f"{type(error).__name__}: {error}"[:300]}
        if path:
            write_json(path, report)
        if isinstance(error, KeyboardInterrupt):
            print(f"\n== section {name} stopped: what it measured is kept")
            return INTERRUPTED
        raise
    if path:
        write_json(path, report)
    return 0


def merge_section(merged: dict, section: dict) -> None:
    """A section's JSON into the merged one ("unfinished" gathers every section's entry)."""
    unfinished = {**merged.get("unfinished", {}), **section.pop("unfinished", {})}
    merged.update(section)
    if unfinished:
        merged["unfinished"] = unfinished


def run_all_sections(out: str | None) -> int:
    """Every section, each in its own process, merged into `out` as each ends (the file written
    again each time, so a time limit keeps the finished sections, in one file: the device tool
    brings back at most 8 files from a run), a stopped or failed section's rows included. After
    a stop (the section exits INTERRUPTED, or SIGINT reaches this process, which the sections
    get too: gpu_run.sh's timeout signals the process group) no other section starts: the
    timeout's SIGKILL would end it 10 s later."""
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}")
    merged: dict = {}
    failed = []
    stop: list[bool] = []
    # A handler that returns (not SIG_IGN): the sections' processes start with SIGINT's default,
    # and this one's waits for them are resumed, not broken off.
    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    try:
        with tempfile.TemporaryDirectory() as parts:
            names = list(SECTIONS)
            for position, name in enumerate(names):
                if stop:
                    print(f"\n== stopped (SIGINT); not started: {', '.join(names[position:])}")
                    break
                part = os.path.join(parts, f"{name}.json")
                code = subprocess.run([sys.executable, "-u", __file__, "--section", name, part]).returncode
                if os.path.exists(part):
                    with open(part) as f:
                        merge_section(merged, json.load(f))
                    if out:
                        write_json(out, merged)
                if code != 0:
                    failed.append(name)
                    print(f"\n== section {name} exited {code}")
                if code in (INTERRUPTED, -signal.SIGINT):
                    stop.append(True)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """profile_knn_cuda.py [out.json]: every section, each in its own process, merged into
    out.json; profile_knn_cuda.py --section NAME [out.json]: that section here."""
    if argv[:1] == ["--section"]:
        if len(argv) < 2 or argv[1] not in SECTIONS:
            sys.exit(f"--section: expected one of {', '.join(SECTIONS)}, got {argv[1:2]}")
        return run_section(argv[1], argv[2] if len(argv) > 2 else None)
    return run_all_sections(argv[0] if argv else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
