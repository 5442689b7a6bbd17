"""Table and bars of a GPU kNN benchmark run (benchmarks/bench_knn_cuda.py's JSON).

  python benchmarks/report_knn_cuda.py knn_cuda.json [more.json ...]   (one session's files, merged)

Times are medians. Roofs come from the same run: GEMM rate per precision (torch.mm 8192^3),
read bandwidth (torch.sum over the big database), host-to-device bandwidth (pinned upload).
Bars (issue 6):
  fp32 cells (big, faiss3045 fp32): latentspace at least 2x the faster torch peer;
  tensor-core cells (tf32, bf16): latentspace within 1.5x of the roof time, 2*Q*N*D flops at
    the measured GEMM rate of that precision;
  q1: latentspace (knn and FlatIndex) within 1.5x of the time to read the database once.
  A bar with nothing to judge (no latentspace.knn or torch result in the cell: a wrong answer
  is never timed, a run stopped at its limit keeps only the cells it finished; no roof) says
  NO, "not measured". A file with no results (a gpu_run.sh part killed past its time limit
  leaves none, or an empty one) is named, and the exit status is 1.
Settings: each peer whose brackets name settings (_common.CUDA_KNN_OPT_INS: the opt-ins, and
the opt-outs of the defaults) against the same peer without them in the same cell, then per
set of settings the geometric mean, least and most of those speed-ups: the figures for
choosing the defaults. An opt-out below 1x means the default it turns off pays.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict

from _common import read_benchmark_files, split_label  # benchmarks/ is the script's folder, first on sys.path


def is_latentspace(peer: str) -> bool:
    """latentspace.knn, latentspace.FlatIndex and their variants ("latentspace.knn[wmma]", ...)."""
    return peer.startswith("latentspace.")


def without_opt_ins(peer: str) -> str:
    """The peer's label without its settings: "latentspace.FlatIndex[bf16 storage, no fused
    finish]" -> "latentspace.FlatIndex[bf16 storage]"; "latentspace.knn[no fused finish]" ->
    "latentspace.knn"."""
    name, opt_ins, kept = split_label(peer)
    if not opt_ins:
        return peer
    return f"{name}[{', '.join(kept)}]" if kept else name


def opt_ins_of(peer: str) -> str:
    """The opt-ins a peer's label names, in the label's order: "latentspace.FlatIndex[bf16
    storage, float thresholds, shared thresholds]" -> "float thresholds, shared thresholds"."""
    return ", ".join(split_label(peer)[1])


def opt_in_summary(rows) -> list[tuple[str, int, float, float, float]]:
    """Per set of opt-ins (as a label names them): (the set, cells, geometric mean, least and
    most speed-up over the same peer without them), from opt_in_rows: what choosing a default
    needs at a glance."""
    by_set: dict[str, list[float]] = defaultdict(list)
    for _, peer, median, _, base_median in rows:
        by_set[opt_ins_of(peer)].append(base_median / median)
    return [(name, len(speedups), math.exp(sum(map(math.log, speedups)) / len(speedups)), min(speedups),
             max(speedups)) for name, speedups in sorted(by_set.items())]


def opt_in_rows(cells) -> list[tuple[str, str, float, str, float]]:
    """(cell, opt-in peer, its median, peer without the opt-ins, its median) for every peer
    that names an opt-in and whose plain peer ran in the same cell."""
    rows = []
    for group in sorted(cells):
        peers = cells[group]
        for peer, (median, _) in sorted(peers.items()):
            base = without_opt_ins(peer)
            if base != peer and base in peers:
                rows.append((group, peer, median, base, peers[base][0]))
    return rows


def issue_cell(group: str) -> bool:
    """The issue's 2x cells (big and faiss3045 in fp32): not q1, streamed, large k or the row check."""
    return not group.startswith(("q1", "streamed", "large k", "row check"))


def unmeasured_bars(group: str, peers: dict, best_torch: float | None) -> list[tuple[str, bool, str]]:
    """The bars of a cell that had nothing to judge, failed: a peer whose answer was wrong
    never reaches the JSON (its check runs before it is timed), and a bar missing from the
    table would read as judged. The default's bar (latentspace.knn's) is due in every judged
    cell, whatever other latentspace peers ran: gpu_run.sh times the peers that name a
    setting apart, and a run stopped at its limit keeps only the cells it finished."""
    info = next(iter(peers.values()))[1]  # the cell's precision and work, the same for all its peers
    precision = info.get("precision", "fp32")
    if precision == "fp32" and issue_cell(group) and ("latentspace.knn" not in peers or not best_torch):
        missing = "latentspace.knn" if "latentspace.knn" not in peers else "torch peer"
        return [(f"{group}: at least 2x the faster torch peer", False, f"not measured: no {missing} result")]
    if "latentspace.knn" in peers:
        return []
    if precision != "fp32" and "flops" in info:
        return [(f"{group} latentspace.knn: within 1.5x of the {precision} roof", False,
                 "not measured: no latentspace.knn result")]
    if group.startswith("q1") and "bytes" in info:
        return [(f"{group} latentspace.knn: within 1.5x of one database read", False,
                 "not measured: no latentspace.knn result")]
    return []


def load(*paths: str):
    """The runs' roofs and cells, from one or more pytest-benchmark JSON files of one session
    (gpu_run.sh runs the large-k cells apart); the first file's machine info; and the files
    that hold no results, each with the reason."""
    found, unread = read_benchmark_files(paths)
    roofs, cells, first = {}, defaultdict(dict), (found[0] if found else None)
    for data in found:
        for bench in data["benchmarks"]:
            info, median = bench["extra_info"], bench["stats"]["median"]
            if info.get("kind") == "roof":
                roofs[info["roof"]] = (median, info)
            else:
                cells[bench["group"]][info["peer"]] = (median, info)
    return first or {}, roofs, cells, unread


def main(*paths: str) -> int:
    data, roofs, cells, unread = load(*paths)
    machine = data.get("machine_info", {})
    print(f"# GPU kNN benchmark ({', '.join(paths)}; python {machine.get('python_version', '?')})\n")
    for path, reason in unread:
        print(f"- {path}: no results ({reason}); its cells are missing below\n")
    print("| roof | median ms | rate |")
    print("|---|---:|---:|")
    rates = {}
    for name, (median, info) in sorted(roofs.items()):
        if "flops" in info:
            rates[name] = info["flops"] / median
            print(f"| {name} | {median * 1e3:.2f} | {rates[name] / 1e12:.1f} TFLOP/s |")
        else:
            rates[name] = info["bytes"] / median
            print(f"| {name} | {median * 1e3:.2f} | {rates[name] / 1e9:.0f} GB/s |")

    print("\n| cell | peer | median ms | rate | vs faster torch | vs roof |")
    print("|---|---|---:|---:|---:|---|")
    bars = []
    for group in sorted(cells):
        peers = cells[group]
        torch_times = [m for p, (m, _) in peers.items() if p.startswith("torch")]
        best_torch = min(torch_times) if torch_times else None
        for peer, (median, info) in sorted(peers.items()):
            precision = info.get("precision", "fp32")
            rate, roof_text = "", ""
            if "flops" in info:
                rate = f"{info['flops'] / median / 1e12:.1f} TFLOP/s"
                roof = rates.get(f"gemm {precision}")
                judged = is_latentspace(peer) and precision != "fp32"
                bar = f"{group} {peer}: within 1.5x of the {precision} roof"
                if roof:
                    roof_seconds = info["flops"] / roof
                    roof_text = f"{median / roof_seconds:.2f}x the {precision} GEMM time"
                    if judged:
                        bars.append((bar, median / roof_seconds <= 1.5, f"{median / roof_seconds:.2f}x"))
                elif judged:
                    bars.append((bar, False, f"not measured: no gemm {precision} roof"))
            elif "bytes" in info:
                rate = f"{info['bytes'] / median / 1e9:.0f} GB/s"
                roof_name = "h2d pinned" if group.startswith("streamed") else "read"
                roof = rates.get(roof_name)
                judged = is_latentspace(peer) and group.startswith("q1")
                bar = f"{group} {peer}: within 1.5x of one database read"
                if roof:
                    ratio = median / (info["bytes"] / roof)
                    roof_text = f"{ratio:.2f}x one {roof_name}"
                    if judged:
                        bars.append((bar, ratio <= 1.5, f"{ratio:.2f}x"))
                elif judged:
                    bars.append((bar, False, "not measured: no read roof"))
            speedup = f"{best_torch / median:.2f}x" if best_torch and is_latentspace(peer) else ""
            if peer == "latentspace.knn" and best_torch and precision == "fp32" and issue_cell(group):
                bars.append((f"{group}: at least 2x the faster torch peer", best_torch / median >= 2.0,
                             f"{best_torch / median:.3f}x"))  # 3 decimals: 1.996x must not read 2.00x
            print(f"| {group} | {peer} | {median * 1e3:.2f} | {rate} | {speedup} | {roof_text} |")
        bars += unmeasured_bars(group, peers, best_torch)

    print("\n| bar | passed | measured |")
    print("|---|:---:|---:|")
    for name, passed, measured in bars:
        print(f"| {name} | {'yes' if passed else 'NO'} | {measured} |")

    rows = opt_in_rows(cells)
    if rows:
        # An opt-out ("no fused finish", "thresholds per split", "filling plan", "no large-k
        # plan") names a default turned off: below 1x, the default pays.
        print("\nSettings against the defaults (an opt-out below 1x: the default it turns off pays)")
        print("\n| cell | with the settings | median ms | the defaults | median ms | speed-up |")
        print("|---|---|---:|---|---:|---:|")
        for group, peer, median, base, base_median in rows:
            print(f"| {group} | {peer} | {median * 1e3:.2f} | {base} | {base_median * 1e3:.2f} | "
                  f"{base_median / median:.3f}x |")
        print("\n| settings | cells | speed-up, geometric mean | least | most |")
        print("|---|---:|---:|---:|---:|")
        for name, count, mean, least, most in opt_in_summary(rows):
            print(f"| {name} | {count} | {mean:.3f}x | {least:.3f}x | {most:.3f}x |")
    return 1 if unread else 0  # a part's figures are missing


if __name__ == "__main__":
    sys.exit(main(*(sys.argv[1:] or ["knn_cuda.json"])))
