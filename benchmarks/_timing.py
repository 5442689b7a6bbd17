"""Best-of timing for the stand-alone measurement scripts (the pytest-benchmark files time
with pytest-benchmark itself)."""

from __future__ import annotations

import time
from typing import Callable


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` wall-clock times of call(): the run least disturbed by the
    machine's other work."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best
