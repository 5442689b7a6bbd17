"""Table of a GPU encoder benchmark run (benchmarks/bench_encode_cuda.py's JSON), in markdown for
docs/benchmarks.md.

    python benchmarks/report_encode_cuda.py encode_cuda.json [more.json ...]

Times are medians of one call each (ended by torch.cuda.synchronize()), CUDA tensors in and
out. Per cell (model shape, precision): each peer's median: latentspace (Encoder with the CUDA
kernels, LATENTSPACE_CUDA_ENCODER=native, its checks and chunks included), latentspace kernel
(the same kernels alone), latentspace[torch backend] (the Encoder's path on a GPU by default
today) and torch (the model's own forward under no_grad; bf16: autocast); the speed-up of
latentspace over torch and over the torch backend (the other's time over latentspace's);
GFLOP/s of latentspace and torch (2 x rows x the layers' inputs x outputs, over the time);
latentspace's GB/s (input, codes and weights moved once); and, where the benchmark measured a
read roof for the cell's input (the PCA cells), the time to read the input once at the copy's
bandwidth. Then in how many cells latentspace beat each torch peer: the figures that decide
LATENTSPACE_CUDA_ENCODER's default (docs/gpu-runs.md). A peer whose codes were wrong never
reaches the JSON (checked before it is timed); one found wrong after its timed rounds (verified
false) is shown as "wrong", in no ratio: either way its ratios read "—". A file with no results
(a run killed past its time limit writes none) is named, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys

# (benchmarks/ is the script's folder, first on sys.path)
from _common import fmt_median_ms, fmt_ratio, ratio, read_benchmark_files, speedup_verdict, verified_median

NATIVE, KERNEL, TORCH_BACKEND, TORCH = "latentspace", "latentspace kernel", "latentspace[torch backend]", "torch"
PEERS = (NATIVE, KERNEL, TORCH_BACKEND, TORCH)
CELLS = ("autoencoder", "wide MLP", "PCA", "small")  # the table's order, each fp32 then bf16
PRECISIONS = ("fp32", "bf16")


def load(paths: list[str]) -> tuple[dict, dict[str, dict[str, dict]], dict[tuple[int, int], dict],
                                     list[tuple[str, str]]]:
    """The first readable file's data, {group: {peer: benchmark}} over all files, the read
    roofs by (rows, cols), and the files that held no results, each with the reason."""
    found, unread = read_benchmark_files(paths)
    cells: dict[str, dict[str, dict]] = {}
    roofs: dict[tuple[int, int], dict] = {}
    for data in found:
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if info.get("kind") == "encode":
                cells.setdefault(bench["group"], {})[info["peer"]] = bench
            elif info.get("kind") == "roof":
                roofs[(info["rows"], info["cols"])] = bench
    return (found[0] if found else {}), cells, roofs, unread


def per_second(bench: dict | None, key: str) -> str:
    """extra_info[key] (flops or bytes) over the median, in billions a second."""
    seconds = verified_median(bench)
    return "—" if seconds is None else f"{bench['extra_info'][key] / seconds / 1e9:.0f}"


def cell_info(peers: dict[str, dict]) -> dict:
    return next(iter(peers.values()))["extra_info"]


def order(item: tuple[str, dict]) -> tuple:
    """The benchmark's cells in its order, fp32 before bf16; unknown ones last, by name."""
    info = cell_info(item[1])
    cell, precision = info.get("cell", ""), info.get("precision", "")
    return (CELLS.index(cell) if cell in CELLS else len(CELLS),
            PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS), item[0])


def read_once(info: dict, roofs: dict[tuple[int, int], dict]) -> str:
    """The time to read the cell's input once, from a copy of the same bytes (half its time:
    it reads and writes them), where the benchmark measured one for this input shape."""
    widths = info.get("widths") or [0]
    roof = roofs.get((info.get("rows"), widths[0]))
    return "—" if roof is None else f"{roof['stats']['median'] / 2 * 1e3:.3f}"


def cell_rows(cells: dict[str, dict[str, dict]], roofs: dict) -> tuple[list[str], dict[str, list[float]]]:
    """The table's rows, and latentspace's speed-ups over each torch peer, cell by cell."""
    lines = ["| model | precision | rows | latentspace ms | latentspace kernel ms | latentspace[torch backend] ms "
             "| torch ms | speed-up over torch | speed-up over the torch backend | latentspace GFLOP/s "
             "| torch GFLOP/s | latentspace GB/s | read once ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    speedups: dict[str, list[float]] = {TORCH: [], TORCH_BACKEND: []}
    for _, peers in sorted(cells.items(), key=order):
        info = cell_info(peers)
        ours = verified_median(peers.get(NATIVE))
        ratios = {}
        for peer in speedups:
            ratios[peer] = ratio(verified_median(peers.get(peer)), ours)
            if ratios[peer] is not None:
                speedups[peer].append(ratios[peer])
        times = " | ".join(fmt_median_ms(peers.get(peer)) for peer in PEERS)
        lines.append(f"| {info.get('cell', '?')} {info.get('shape', '?')} | {info.get('precision', '?')} "
                     f"| {info.get('rows', '?'):,} | {times} | {fmt_ratio(ratios[TORCH])} "
                     f"| {fmt_ratio(ratios[TORCH_BACKEND])} | {per_second(peers.get(NATIVE), 'flops')} "
                     f"| {per_second(peers.get(TORCH), 'flops')} | {per_second(peers.get(NATIVE), 'bytes')} "
                     f"| {read_once(info, roofs)} |")
    return lines, speedups


def verdict(count: int, speedups: list[float], name: str) -> str:
    """In how many of the cells latentspace beat one torch peer."""
    return speedup_verdict("latentspace", name, count, speedups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON written with --benchmark-json")
    args = parser.parse_args(argv)

    data, cells, roofs, unread = load(args.json)
    machine = data.get("machine_info", {})
    info = next((cell_info(peers) for peers in cells.values()), {})
    print(f"# GPU encoder benchmark ({', '.join(args.json)}; {info.get('device') or 'device unknown'}; "
          f"torch {info.get('torch', '?')}; python {machine.get('python_version', '?')})\n")
    for path, reason in unread:
        print(f"- {path}: no results ({reason})\n")
    if not cells:
        print("No encoder benchmarks found.")
        return 1
    print("CUDA tensors in and out; one call ends with torch.cuda.synchronize(). Medians in ms. "
          "latentspace: Encoder(model, device=\"cuda\") with LATENTSPACE_CUDA_ENCODER=native, checks and "
          "default chunks included; latentspace kernel: its kernels alone, all rows at once; "
          "latentspace[torch backend]: the Encoder's GPU path by default until GPU run 10; torch: the model's "
          "forward under no_grad (fp32 with TF32 off; bf16 under autocast, bfloat16 codes). Speed-ups: "
          "the other peer's time over latentspace's. GFLOP/s: 2 x rows x the layers' inputs x outputs "
          "over the time. GB/s: input, codes and weights moved once. Read once: half a copy of the "
          "input's bytes (reads and writes them), the floor of a memory-bound encode.\n")
    lines, speedups = cell_rows(cells, roofs)
    print("\n".join(lines))
    print()
    print(verdict(len(cells), speedups[TORCH_BACKEND], "the Encoder's torch backend (today's default on a GPU)"))
    print(verdict(len(cells), speedups[TORCH], "torch (the model's own forward)"))
    return 1 if unread else 0


if __name__ == "__main__":
    sys.exit(main())
