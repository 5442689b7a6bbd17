"""Markdown report of a batched-encoder benchmark run (pytest-benchmark JSON from benchmarks/bench_encode.py).

    python benchmarks/report_encode.py bench_encode.json [--stat min|median|mean]

Prints: machine info; the measured SGEMM roofs; one summary table per encoder shape, one row
per peer (latentspace fp32 and bf16, torch in one call and at every chunk size), each at its
best thread count: rows/s, GFLOP/s and % of the session's SGEMM roof, rows/s relative to torch
at its best chunk size and to torch's one-call forward at the same thread count, the peak
working set of one call (measured in a fresh process) beside the input and output sizes, and
the error against the float64 forward; the issue's bars, passed or failed; and every peer at
every thread count.
"""

from __future__ import annotations

import argparse
import sys

from report_knn import (
    Run,
    Verdict,
    bar_table,
    bars_mark,
    environment_lines,
    fmt_ms,
    load,
    mib,
    noise_mark,
    roof_rate,
    roof_table,
    roofs,
    unverified,
)

FP32, BF16, ONE_CALL = "latentspace fp32", "latentspace bf16", "torch one call"
CHUNK_PREFIX = "torch chunk "

# The bars, applied to latentspace fp32 (bf16 is opt-in and shown beside it).
BAR_VS_CHUNKED = 1.0  # no slower than torch at its best chunk size, same threads
BAR_VS_ONE_CALL = 1.3  # at least 1.3x torch's one-call forward, same threads
BAR_SGEMM = 0.85  # at least 85% of the SGEMM rate measured in the same run
# "Peak memory no more than input + output + a small fixed working set": the working set of
# one call must stay under a bound that depends on the model, not on the rows: the weights
# twice (latentspace.encode's export and the packed panels), 1 MiB per thread (a packed depth
# block and two 96-row activation buffers) and 1 MiB for the Python objects. The smallest
# buffer proportional to the rows, an output-sized (65,536 x 32 float32) array, is 8 MiB;
# one hidden layer's activations for all rows, what torch's one call holds, 128 MiB.
BAR_WORKING_SET_PER_THREAD = 1 << 20
BAR_WORKING_SET_SLACK = 1 << 20


def working_set_bar(shape: str, threads: int) -> int:
    """Bytes a fixed working set may take for a shape like "784-512-256-32"."""
    dims = [int(d) for d in shape.split("-")]
    weights = sum(4 * (i * o + o) for i, o in zip(dims[:-1], dims[1:]))
    return 2 * weights + threads * BAR_WORKING_SET_PER_THREAD + BAR_WORKING_SET_SLACK


def cells(runs: list[Run]) -> dict[str, dict[str, dict[int, Run]]]:
    """shape -> peer -> threads -> run, in the order the benchmark ran them (verified runs only)."""
    table: dict = {}
    for run in runs:
        if run.info["kind"] == "encode" and not unverified(run):
            table.setdefault(run.info["shape"], {}).setdefault(run.info["peer"], {})[run.threads] = run
    return table


def rows_per_s(run: Run) -> float:
    return run.info["rows"] / run.seconds


def gflops(run: Run) -> float:
    return run.info["flops"] / run.seconds / 1e9


def best(by_threads: dict[int, Run]) -> Run:
    return min(by_threads.values(), key=lambda r: r.seconds)


def best_chunk(peers: dict[str, dict[int, Run]], threads: int) -> Run | None:
    """torch at its best chunk size at this thread count."""
    chunked = [by_t[threads] for p, by_t in peers.items() if p.startswith(CHUNK_PREFIX) and threads in by_t]
    return min(chunked, key=lambda r: r.seconds, default=None)


def sgemm_at(runs: list[Run], threads: int) -> float:
    """The best SGEMM rate measured at this thread count (either library, before or after)."""
    rates = [roof_rate(r) for r in runs if r.info["kind"] == "roof" and r.info["roof"] == "sgemm"
             and r.threads == threads]
    return max(rates, default=float("nan"))


def fmt_rate(rows: float) -> str:
    return f"{rows / 1e3:,.0f}k" if rows < 1e7 else f"{rows / 1e6:,.1f}M"


def fmt_mib(nbytes) -> str:
    if nbytes is None:
        return "?"
    value = nbytes / (1 << 20)
    return f"{value:.2f} MiB" if value < 10 else f"{value:.0f} MiB"


def working_set(run: Run) -> str:
    if "working_set_bytes" not in run.info:
        return f"not measured ({run.info.get('peak_error', '?')})"
    return fmt_mib(run.info["working_set_bytes"])


def ratio(a: Run | None, b: Run | None) -> float:
    """How many times faster a is than b."""
    return b.seconds / a.seconds if a and b else float("nan")


def shape_summary(shape: str, peers, sgemm_roof: float, thread_counts: list[int], marks: str) -> list[str]:
    lines = [
        "| peer | rows/s (best threads) | GFLOP/s | % of SGEMM roof | vs torch best chunk (same threads) "
        "| vs torch one call (same threads) | peak working set | rel. Frobenius error | max error / max \\|ref\\| "
        "| bars |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    best_chunks = {t: best_chunk(peers, t) for t in thread_counts}
    for peer, by_threads in peers.items():
        b = best(by_threads)
        vs_chunk = " / ".join(
            f"{ratio(by_threads.get(t), best_chunks[t]):.2f}x ({t}t)" for t in thread_counts if t in by_threads
        )
        vs_one = " / ".join(
            f"{ratio(by_threads.get(t), peers.get(ONE_CALL, {}).get(t)):.2f}x ({t}t)"
            for t in thread_counts if t in by_threads
        )
        is_best_chunk = peer.startswith(CHUNK_PREFIX) and b is best_chunk(peers, b.threads) and all(
            best(peers[p]).seconds >= b.seconds for p in peers if p.startswith(CHUNK_PREFIX))
        name = f"**{peer}** (best chunk)" if is_best_chunk else peer
        lines.append(
            f"| {name} | {fmt_rate(rows_per_s(b))} ({b.threads}t){noise_mark(b)} | {gflops(b):.0f} "
            f"| {gflops(b) / sgemm_roof:.0%} | {vs_chunk} | {vs_one} | {working_set(b)} "
            f"| {b.info['rel_frobenius_error']:.1e} | {b.info['max_error_of_max']:.1e} "
            f"| {marks if peer == FP32 else ('opt-in, no bar' if peer == BF16 else '')} |"
        )
    return lines


def judge(table, sgemm_roof: float, thread_counts: list[int]) -> tuple[list[Verdict], dict[str, str]]:
    """The bars over every shape; and per shape, the summary's bars mark for latentspace fp32."""
    bars = {
        "chunked": Verdict("latentspace fp32 no slower than torch at its best chunk size, same threads",
                           "torch chunked", [], 0),
        "one_call": Verdict(f"latentspace fp32 at least {BAR_VS_ONE_CALL:g}x torch's one-call forward, "
                            "same threads", f"{BAR_VS_ONE_CALL:g}x one call", [], 0),
        "sgemm": Verdict(f"latentspace fp32 at its best thread count at least {BAR_SGEMM:.0%} of the "
                         "session's SGEMM roof", f"{BAR_SGEMM:.0%} sgemm", [], 0),
        "memory": Verdict("peak memory of one call at most input + output + a fixed working set: twice the "
                          "weights + 1 MiB per thread + 1 MiB (latentspace fp32, every thread count)",
                          "memory", [], 0),
    }

    marks = {}
    failed: list[str] = []

    def apply(key: str, value: float, threshold: float, text: str):
        bars[key].checked += 1
        if not value >= threshold:  # NaN (nothing verified, no roof) fails too
            bars[key].failures.append((value, text))
            failed.append(key)

    for shape, peers in table.items():
        failed.clear()
        ours = peers.get(FP32, {})
        for t in thread_counts:
            run = ours.get(t)
            noisy = noise_mark(run) if run else ""
            r = ratio(run, best_chunk(peers, t))
            apply("chunked", r, BAR_VS_CHUNKED - 1e-9, f"{shape} {t}t: {r:.2f}x{noisy}")
            r = ratio(run, peers.get(ONE_CALL, {}).get(t))
            apply("one_call", r, BAR_VS_ONE_CALL, f"{shape} {t}t: {r:.2f}x{noisy}")
            ws = run.info.get("working_set_bytes", float("nan")) if run else float("nan")
            # value: headroom under the limit, so the worst sorts first
            limit = working_set_bar(shape, t)
            apply("memory", limit - ws, 0,
                  f"{shape} {t}t: {fmt_mib(ws) if ws == ws else 'not measured'} (bound {fmt_mib(limit)})")
        fraction = gflops(best(ours)) / sgemm_roof if ours else float("nan")
        apply("sgemm", fraction, BAR_SGEMM,
              f"{shape} ({best(ours).threads if ours else '?'}t): {fraction:.0%}{noise_mark(best(ours)) if ours else ''}")
        marks[shape] = bars_mark(bars, failed)
    return list(bars.values()), marks


def detail_table(table, runs: list[Run]) -> list[str]:
    lines = [
        "| shape | threads | peer | min ms | median ms | median/min | rounds | rows/s | GFLOP/s "
        "| % of SGEMM at these threads | peak working set | other CPUs busy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, peers in table.items():
        thread_counts = sorted({t for by_t in peers.values() for t in by_t})
        for t in thread_counts:
            for peer, by_threads in peers.items():
                run = by_threads.get(t)
                if run is None:
                    continue
                lines.append(
                    f"| {shape} | {t} | {peer}{noise_mark(run)} | {fmt_ms(run.stats['min'])} "
                    f"| {fmt_ms(run.stats['median'])} | {run.spread:.2f} | {run.stats['rounds']} "
                    f"| {fmt_rate(rows_per_s(run))} | {gflops(run):.0f} | {gflops(run) / sgemm_at(runs, t):.0%} "
                    f"| {working_set(run)} | {run.foreign:.2f} |"
                )
    return lines


def data_line(table) -> str:
    infos = [next(iter(next(iter(peers.values())).values())).info for peers in table.values()]
    first = infos[0]
    shapes = ", ".join(f"{i['shape']} ({i['flops'] // i['rows']:,} flops per row)" for i in infos)
    return (f"{first['rows']:,} rows x {first['dims'][0]} float32, uniform in [0, 1) (input "
            f"{mib(first['input_bytes'])}, output {fmt_mib(first['output_bytes'])}); encoders {shapes}: "
            "nn.Sequential of Linear + ReLU (none after the last), torch's default init, fixed seed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="pytest-benchmark JSON written with --benchmark-json")
    parser.add_argument("--stat", default="min", choices=["min", "median", "mean"],
                        help="which statistic of the rounds to compare (default: min)")
    args = parser.parse_args(argv)

    data, runs = load(args.json, args.stat)
    runs = [r for r in runs if r.info["kind"] == "encode" or (r.info["kind"] == "roof" and r.info["roof"] == "sgemm")]
    table = cells(runs)
    if not table:
        print(f"{args.json}: no verified encode benchmarks found", file=sys.stderr)
        return 1
    thread_counts = sorted({r.threads for r in runs if r.info["kind"] == "encode"})
    roof = roofs(runs).get("sgemm")
    sgemm_roof = roof_rate(roof) if roof else float("nan")
    bf16_missing = not any(BF16 in peers for peers in table.values())
    verdicts, marks = judge(table, sgemm_roof, thread_counts)

    out = ["# latentspace batched encoder benchmark", "", *environment_lines(data, runs, args.stat, data_line(table)), ""]
    out += ["## SGEMM roof", "", *roof_table(runs, thread_counts), ""]
    if roof:
        out += [f"'X / Y': measured before / after the encode cells. Session SGEMM roof: {sgemm_roof:.1f} "
                f"GFLOP/s ({roof.info['library']}, {roof.threads}t).", ""]
    out += [
        "## Summary",
        "",
        "Each peer at its best thread count. GFLOP/s counts 2 * in * out per layer and row; % of "
        "the session's SGEMM roof. 'vs torch best chunk' / 'vs torch one call': the peer's rows/s "
        "over torch's at the same thread count (torch's best chunk size chosen per thread count). "
        "Peak working set: peak RSS of one call above the RSS before it, in a fresh process with "
        "input and output already allocated (torch's one call also allocates its output); the "
        "kernel counts RSS in per-CPU batches, so figures under about 0.25 MiB only say 'too small "
        "to see'. Errors: against the float64 forward of the same weights.",
        "",
    ]
    for shape, peers in table.items():
        info = next(iter(next(iter(peers.values())).values())).info
        out += [f"### {shape}: input {mib(info['input_bytes'])}, output {fmt_mib(info['output_bytes'])}", "",
                *shape_summary(shape, peers, sgemm_roof, thread_counts, marks[shape]), ""]
    if not bf16_missing:
        out += ["latentspace bf16's % of the SGEMM roof is over the float32 roof: its AVX512_BF16 dot "
                "product does two multiply-adds per float32 lane, so it can pass 100%.", ""]
    if bf16_missing:
        out += ["latentspace bf16: not measured (no AVX512_BF16 on this CPU; the benchmark skips it).", ""]
    out += [
        "## Performance bars",
        "",
        *bar_table(verdicts),
        "",
        "⚠: a run behind that figure had other processes busy on the CPUs (see the last table).",
        "",
        "## Every peer at every thread count",
        "",
        "% of SGEMM at these threads: over the best SGEMM rate measured at that thread count. Other "
        "CPUs busy: CPUs' worth of time used by other processes during the timed rounds.",
        "",
        *detail_table(table, runs),
    ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
