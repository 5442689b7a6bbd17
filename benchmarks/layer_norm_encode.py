"""The cost of nn.LayerNorm on the native encoder: 784-512-LN-256-LN-32 (Linear -> LayerNorm ->
ReLU twice, then Linear) natively against torch's eval forward of the same model, and against
the same chain without its norms natively, on 65,536 rows of uniform [0, 1) pixels, 1 thread and
all cores, side by side in one run. Times are the best of 5 calls after one warm-up.

    python benchmarks/layer_norm_encode.py
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

import latentspace

ROWS = 65536
REPEATS = 5


def best_seconds(call) -> float:
    call()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    with_norms = nn.Sequential(nn.Linear(784, 512), nn.LayerNorm(512), nn.ReLU(), nn.Linear(512, 256),
                               nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 32)).eval()
    without_norms = nn.Sequential(with_norms[0], nn.ReLU(), with_norms[3], nn.ReLU(), with_norms[6]).eval()
    x = np.random.default_rng(0).random((ROWS, 784), dtype=np.float32)
    encoder, plain = latentspace.Encoder(with_norms), latentspace.Encoder(without_norms)
    assert encoder.backend == "native", encoder.reason
    # Correct first: the codes against the model's float64 forward.
    with torch.no_grad():
        reference = with_norms.double()(torch.from_numpy(x[:2048]).double()).numpy()
        with_norms.float()
    error = np.abs(encoder.encode(x[:2048]).astype(np.float64) - reference).max() / np.abs(reference).max()
    print(f"kernel {encoder.kernel}; max |native - float64| / max |float64| = {error:.2g}")
    assert error < 1e-5
    out = np.empty((ROWS, 32), np.float32)
    inputs = torch.from_numpy(x)

    def torch_forward():
        with torch.no_grad():
            with_norms(inputs)

    print("| threads | native with LayerNorm | native without | torch eval forward | speed-up over torch |")
    print("|---:|---:|---:|---:|---:|")
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        latentspace.set_num_threads(threads)
        torch.set_num_threads(threads)
        native = best_seconds(lambda: encoder.encode(x, out=out))
        without = best_seconds(lambda: plain.encode(x, out=out))
        eager = best_seconds(torch_forward)
        print(f"| {threads} | {native * 1e3:.0f} ms | {without * 1e3:.0f} ms | {eager * 1e3:.0f} ms | "
              f"{eager / native:.2f}x |")


if __name__ == "__main__":
    main()
