"""Markdown report of benchmarks/bench_knn_more_peers.py's JSON: every peer's best time per
cell and latentspace's speed-up over each.

    python benchmarks/report_knn_more_peers.py more_peers.json [--stat min|median|mean]

Speed-up: the peer's best time divided by latentspace.knn's (and FlatIndex.search's) best
time (>1: latentspace is faster); each at its best thread count, only runs whose every timed
answer was checked right.
"""

from __future__ import annotations

import argparse
import sys

from report_knn import cells, environment_lines, fmt_ms, load, noise_mark, unverified

LATENTSPACE = ("latentspace.knn", "latentspace.FlatIndex")
OTHERS = ("faiss", "hnswlib.BFIndex", "sklearn.brute")


def best_verified(by_threads):
    """The fastest run whose answers were all right, None when none was."""
    runs = [run for run in by_threads.values() if not unverified(run)]
    return min(runs, key=lambda run: run.seconds) if runs else None


def speedup_text(peer_run, ours) -> str:
    if peer_run is None:
        return "—"
    return " / ".join("—" if run is None else f"{peer_run.seconds / run.seconds:.1f}x" for run in ours)


def summary(table) -> list[str]:
    head = ["metric", "Q", "k", "latentspace.knn", "FlatIndex.search", *OTHERS,
            *(f"speed-up vs {peer} (knn / Flat)" for peer in OTHERS)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for (metric, q, k), peers in table.items():
        bests = {peer: best_verified(peers.get(peer, {})) for peer in LATENTSPACE + OTHERS}
        times = [("—" if run is None else f"{fmt_ms(run.seconds)}{noise_mark(run)} ({run.threads}t)")
                 for run in bests.values()]
        ours = [bests[peer] for peer in LATENTSPACE]
        speedups = [speedup_text(bests[peer], ours) for peer in OTHERS]
        lines.append(f"| {metric} | {q} | {k} | " + " | ".join(times + speedups) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--stat", default="median", choices=("min", "median", "mean"))
    args = parser.parse_args(argv)
    data, runs = load(args.json, args.stat)
    knn_runs = [run for run in runs if run.info["kind"] == "knn"]
    if not knn_runs:
        print(f"{args.json}: no kNN runs", file=sys.stderr)
        return 1
    first = knn_runs[0].info
    data_line = f"N = {first['n']:,} x D = {first['d']}, float32 (bench_knn.py's Gaussian mixture)"
    lines = ["# latentspace against the other exact kNN searches", "",
             *environment_lines(data, knn_runs, args.stat, data_line), "",
             "Times in ms, each peer at its best thread count (`(Nt)`). Speed-up: the peer's time divided "
             "by latentspace's (>1: latentspace is faster). scikit-learn has no inner-product search.", "",
             *summary(cells(knn_runs))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
