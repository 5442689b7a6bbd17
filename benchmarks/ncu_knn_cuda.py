"""One GPU kNN search at a shape of issue 6's missed bars, for Nsight Compute to read its scan.

benchmarks/gpu_run.sh's "ncu" stage runs each shape in a process of its own under ncu, which
profiles the first launch of the scan kernel (scan_kernel, row_scan_kernel or
pipelined_scan_kernel) only:

  ncu --clock-control none --kernel-name-base function --kernel-name regex:^(row_|pipelined_)?scan_kernel \
      --launch-count 1 --section SpeedOfLight ... python3 benchmarks/ncu_knn_cuda.py bf16

No warm-up search first: ncu replays the profiled launch once per pass with the caches
flushed, so a first launch measures as a later one would, and every search at these shapes
is one native call (one scan launch). Alone (`python3 benchmarks/ncu_knn_cuda.py SHAPE`) it
runs the search twice and prints the second one's time.

Shapes (docs/benchmarks.md, GPU run 10 on an H200):
  bf16       Q = 10,000 x N = 1M x D = 128, k = 10, precision "bf16": 11.2x the bf16
             tensor-core roofline (bar 1.5x); the scan, not the read, is the limit (a
             bf16-stored database was no faster)
  fp32       the same in float32: 2.22x torch (bar 2x, met): the reference for the others
  k1024      the same in float32 at k = 1024: 1.75x torch (bar 2x)
  faiss3045  Q = 5,000 x N = 8,192 x D = 2,048, k = 32, bf16: 19.7x the bf16 roofline
  bf16_mma, faiss3045_mma  bf16 and faiss3045 on MmaTile (LATENTSPACE_CUDA_TENSOR_TILE=mma,
             set in this process before the search), the tensor-core tile until GPU run 12
             made the tile staged by cp.async (csrc/cuda/knn_deep_tile.cuh) the default
  bf16_pipelined, faiss3045_pipelined  the same on the pipelined deep tile
             (LATENTSPACE_CUDA_TENSOR_TILE=pipelined, csrc/cuda/knn_pipelined_tile.cuh:
             pipelined_scan_kernel; both shapes search several splits a query, so the opt-in
             family it needs)
  bf16_resident  bf16 on the resident-queries tile (LATENTSPACE_CUDA_TENSOR_TILE=resident,
             csrc/cuda/knn_resident_tile.cuh; the same kernel; bf16 / fp16 up to D = 128 only)

GPU run 12 (H200, docs/benchmarks.md): both tensor-core tiles at their 128-register bound
(two blocks of 256 threads a multiprocessor, occupancy 25%) and spilling (192 million local
memory requests for MmaTile at bf16, 161 million for the deep tile), issue slots 32-35% busy;
the float32 scan 68% busy, no spills.
"""

from __future__ import annotations

import os
import sys
import time

SHAPES = {
    "bf16": {"nq": 10_000, "n": 1_000_000, "d": 128, "k": 10, "precision": "bf16"},
    "fp32": {"nq": 10_000, "n": 1_000_000, "d": 128, "k": 10, "precision": "fp32"},
    "k1024": {"nq": 10_000, "n": 1_000_000, "d": 128, "k": 1024, "precision": "fp32"},
    "faiss3045": {"nq": 5_000, "n": 8_192, "d": 2_048, "k": 32, "precision": "bf16"},
}
MMA_TILE = {"LATENTSPACE_CUDA_TENSOR_TILE": "mma"}
SHAPES["bf16_mma"] = {**SHAPES["bf16"], "env": MMA_TILE}
SHAPES["faiss3045_mma"] = {**SHAPES["faiss3045"], "env": MMA_TILE}
PIPELINED_TILE = {"LATENTSPACE_CUDA_TENSOR_TILE": "pipelined"}
SHAPES["bf16_pipelined"] = {**SHAPES["bf16"], "env": PIPELINED_TILE}
SHAPES["faiss3045_pipelined"] = {**SHAPES["faiss3045"], "env": PIPELINED_TILE}
SHAPES["bf16_resident"] = {**SHAPES["bf16"], "env": {"LATENTSPACE_CUDA_TENSOR_TILE": "resident"}}
SEED = 20261127
USAGE = f"usage: python3 benchmarks/ncu_knn_cuda.py SHAPE, SHAPE one of {', '.join(SHAPES)}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SHAPES:
        print(USAGE, file=sys.stderr)
        return 2
    import torch

    import latentspace

    if not latentspace.cuda_available():
        print("ncu_knn_cuda.py: no usable CUDA GPU here (latentspace.cuda_available() is False)", file=sys.stderr)
        return 1
    shape = SHAPES[argv[0]]
    os.environ.update(shape.get("env", {}))  # (the CUDA kNN reads its settings at every search)
    generator = torch.Generator(device="cuda").manual_seed(SEED)
    database = torch.randn(shape["n"], shape["d"], generator=generator, device="cuda")
    queries = torch.randn(shape["nq"], shape["d"], generator=generator, device="cuda")

    def search():
        result = latentspace.knn(queries, database, shape["k"], precision=shape["precision"])
        torch.cuda.synchronize()
        return result

    distances, _ = search()
    # (the two pipelined tiles share one kernel name: a setting that fell back must not be
    # profiled under its label)
    asked, ran = shape.get("env", {}).get("LATENTSPACE_CUDA_TENSOR_TILE"), latentspace._native._cuda_last_scan()
    if asked in ("pipelined", "resident") and ran != asked:
        print(f"ncu_knn_cuda.py: {argv[0]} asked for the {asked} tile, the search ran the {ran} scan", file=sys.stderr)
        return 1
    started = time.perf_counter()
    distances, _ = search()
    seconds = time.perf_counter() - started
    # (Under ncu the first search is the one profiled and replayed; the second runs unprofiled.)
    print(f"{argv[0]}: {shape}, the {ran} scan, second search {seconds * 1e3:.1f} ms; "
          f"mean best distance {distances[:, 0].mean().item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
