"""Table of a GPU fused-loss benchmark run (benchmarks/bench_losses_cuda.py's JSON).

    python benchmarks/report_losses_cuda.py losses_cuda.json [more.json ...]

Times are medians of one forward + backward call each (ended by torch.cuda.synchronize()).
Per cell (loss, shape): every peer's median; the speed-up of latentspace (the native kernels,
LATENTSPACE_CUDA_LOSSES=native) over torch and over latentspace[torch ops] (the library's GPU
path by default until GPU run 10), each the other's time over latentspace's; latentspace's time over the
copy roof's (a torch op moving the same bytes: 1.00x is that memory roof, under 1x beats it);
and the bytes latentspace and the roof move per second. Then in how many cells the native
kernels beat the torch ops, the figure that decides LATENTSPACE_CUDA_LOSSES's default.
A peer whose answer was wrong never reaches the JSON (checked before it is timed), and one
whose timed rounds were found wrong after (verified false) is shown as "wrong", in no ratio:
either way its ratios read "—". A file with no results (a run killed past its time limit
writes none) is named, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys

# (benchmarks/ is the script's folder, first on sys.path)
from _common import fmt_median_ms, fmt_ratio, ratio, read_benchmark_files, speedup_verdict, verified_median

NATIVE, TORCH_OPS, TORCH, ROOF = "latentspace", "latentspace[torch ops]", "torch", "copy roof"
PEERS = (NATIVE, TORCH_OPS, TORCH, ROOF)
LOSSES = ("mse", "bce", "bce_logits", "kl_normal")  # the table's order, then the size


def load(paths: list[str]) -> tuple[dict, dict[str, dict[str, dict]], list[tuple[str, str]]]:
    """The first readable file's data, {group: {peer: benchmark}} over all files, and the
    files that held no results, each with the reason."""
    found, unread = read_benchmark_files(paths)
    first, cells = (found[0] if found else None), {}
    for data in found:
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if info.get("kind") == "loss":
                cells.setdefault(bench["group"], {})[info["peer"]] = bench
    return first or {}, cells, unread


def rate(bench: dict | None) -> str:
    seconds = verified_median(bench)
    return "—" if seconds is None else f"{bench['extra_info']['bytes'] / seconds / 1e9:.0f}"


def order(item: tuple[str, dict]) -> tuple:
    """mse, bce, bce_logits, kl_normal, each smaller shape first; unknown losses last."""
    info = next(iter(item[1].values()))["extra_info"]
    loss = info.get("loss", "")
    return (LOSSES.index(loss) if loss in LOSSES else len(LOSSES), info.get("rows", 0) * info.get("cols", 0), item[0])


def cell_rows(cells: dict[str, dict[str, dict]]) -> tuple[list[str], list[float]]:
    """The table's rows, and the speed-ups of the native kernels over the torch ops."""
    lines = ["| cell | latentspace ms | latentspace[torch ops] ms | torch ms | copy roof ms "
             "| speed-up over torch | speed-up over torch ops | time over the copy roof "
             "| latentspace GB/s | roof GB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    over_torch_ops = []
    for group, peers in sorted(cells.items(), key=order):
        ours = verified_median(peers.get(NATIVE))
        versus_ops = ratio(verified_median(peers.get(TORCH_OPS)), ours)
        if versus_ops is not None:
            over_torch_ops.append(versus_ops)
        times = " | ".join(fmt_median_ms(peers.get(peer)) for peer in PEERS)
        lines.append(f"| {group} | {times} | {fmt_ratio(ratio(verified_median(peers.get(TORCH)), ours))} "
                     f"| {fmt_ratio(versus_ops)} | {fmt_ratio(ratio(ours, verified_median(peers.get(ROOF))))} "
                     f"| {rate(peers.get(NATIVE))} | {rate(peers.get(ROOF))} |")
    return lines, over_torch_ops


def verdict(cells: dict, over_torch_ops: list[float]) -> str:
    """In how many cells the native kernels beat the torch ops."""
    return speedup_verdict("Native kernels", "the torch ops", len(cells), over_torch_ops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON written with --benchmark-json")
    args = parser.parse_args(argv)

    data, cells, unread = load(args.json)
    machine = data.get("machine_info", {})
    device = next((b["extra_info"].get("device") for peers in cells.values() for b in peers.values()), None)
    print(f"# GPU fused losses benchmark ({', '.join(args.json)}; {device or 'device unknown'}; "
          f"python {machine.get('python_version', '?')})\n")
    for path, reason in unread:
        print(f"- {path}: no results ({reason})\n")
    if not cells:
        print("No loss benchmarks found.")
        return 1
    print("float32, mean reduction; one call: reset the gradients, the loss, its backward, "
          "torch.cuda.synchronize(). Medians in ms. Speed-ups: the other peer's time over "
          "latentspace's. Time over the copy roof: latentspace's time over that of a torch op "
          "moving the same bytes (1.00x: at that roof). GB/s: bytes moved (inputs read, "
          "gradients written) over the time.\n")
    lines, over_torch_ops = cell_rows(cells)
    print("\n".join(lines))
    print(f"\n{verdict(cells, over_torch_ops)}")
    return 1 if unread else 0


if __name__ == "__main__":
    sys.exit(main())
