"""Shared machinery of the one-query read-rate experiments (q1_buffer_alignment.py,
q1_simd_levels.py): this VM's memory bandwidth jumps between ~33 and ~60 GB/s within minutes, so
each search is timed between two torch.sum passes over the same buffer, blocks during which other
processes used the CPUs are dropped, and results are grouped by bandwidth window.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from typing import Callable

import numpy as np
import torch

import latentspace

N, D = 1_000_000, 128
NBYTES = N * D * 4
FAST_GBS, SLOW_GBS = 45.0, 40.0  # 2 threads: fast window when both sums reach 45, slow below 40


def best_rate(fn: Callable[[], object], repeats: int = 5) -> float:
    """GB/s of the best of `repeats` calls, counting one read of the N x D buffer."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return NBYTES / best / 1e9


def busy_seconds() -> float:
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def timed_block(buffer: np.ndarray, searches: "Searches") -> list[dict] | None:
    """Times each search between torch.sums over `buffer` (the sum after one search is the sum
    before the next). Returns one record per search (its fields plus search, roof_before and
    roof_after in GB/s), or None when other processes used the CPUs meanwhile."""
    tensor = torch.from_numpy(buffer)
    busy0, own0, block = busy_seconds(), own_seconds(), []
    roof = best_rate(lambda: torch.sum(tensor))
    for fields, search in searches:
        rate = best_rate(search)
        roof_after = best_rate(lambda: torch.sum(tensor))
        block.append(dict(fields, search=rate, roof_before=roof, roof_after=roof_after))
        roof = roof_after
    if (busy_seconds() - busy0) - (own_seconds() - own0) < 0.04:
        return block
    return None


Searches = list[tuple[dict, Callable[[], object]]]


def alternate(rounds: int, variants: list[str],
              block_for: Callable[[int, str, int], tuple[np.ndarray, Searches]]) -> list[dict]:
    """Per round, in a shuffled variant order, at 2 and then 1 threads (latentspace and torch
    alike): one timed_block of block_for(round, variant, threads) = (buffer, searches)."""
    records, dropped = [], 0
    for r in range(rounds):
        order = list(variants)
        random.Random(r).shuffle(order)
        for variant in order:
            for threads in (2, 1):
                torch.set_num_threads(threads)
                latentspace.set_num_threads(threads)
                block = timed_block(*block_for(r, variant, threads))
                if block is None:
                    dropped += 1
                else:
                    records.extend(block)
    print(f"records {len(records)}, blocks dropped (other processes on the CPUs) {dropped}")
    return records


def summarise(records: list[dict], by: str, variant: str) -> None:
    """Prints the median search / higher adjacent roof per (threads, `by`, window, `variant`)."""
    groups = collections.defaultdict(list)
    for x in records:
        roof = max(x["roof_before"], x["roof_after"])
        if x["threads"] == 1:
            window = "any"
        else:
            low = min(x["roof_before"], x["roof_after"])
            window = "fast" if low >= FAST_GBS else ("slow" if roof < SLOW_GBS else "mid")
        groups[(x["threads"], x[by], window, x[variant])].append((x["search"], roof, x["search"] / roof))
    print(f'{"threads":>7} {by:>4} {"window":6} {variant:8} {"n":>3} {"search GB/s":>11} {"roof GB/s":>9} '
          f'{"ratio":>6} {"p25-p75":>11}')
    for key in sorted(groups):
        a = np.array(groups[key])
        print(f"{key[0]:7d} {key[1]:4d} {key[2]:6} {key[3]:8} {len(a):3d} {np.median(a[:, 0]):11.1f} "
              f"{np.median(a[:, 1]):9.1f} {np.median(a[:, 2]):6.3f} "
              f"{np.percentile(a[:, 2], 25):.3f}-{np.percentile(a[:, 2], 75):.3f}")


def report(records: list[dict], json_path: str | None, by: str, variant: str) -> None:
    """Writes the raw records to `json_path` (when given) and prints the summary."""
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(records, handle)
    summarise(records, by, variant)
