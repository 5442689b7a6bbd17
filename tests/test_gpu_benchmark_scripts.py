"""The GPU benchmark and profile scripts, run here where there is no GPU: benchmarks/conftest.py's
guards for the rare GPU run (an older pytest-benchmark under pytest 9.2, a run stopped at its
limit) and benchmarks/profile_knn_cuda.py's sections through thin fakes of torch.cuda and the
native plan. A crash or a wrong figure there costs a GPU run that cannot be repeated.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from test_benchmark_reports import _script

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _load_benchmarks_conftest():
    """benchmarks/conftest.py as a module of its own name (this suite has a conftest too)."""
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", BENCHMARKS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_nodes_keep_the_private_nodeid_older_pytest_benchmark_reads(request):
    """pytest-benchmark before 5.3.1 (5.3.0 included) reads node._nodeid, which pytest 9.2
    removed: every benchmark of a GPU image with that pair errors, and the losses, encoder
    and kNN stages bring back nothing. benchmarks/conftest.py supplies the alias."""
    _load_benchmarks_conftest()
    assert request.node._nodeid == request.node.nodeid


# A benchmark file for a run stopped by SIGINT: one cell that finishes, one whose timed round
# never ends (the interrupt lands inside benchmark.pedantic, before a single round is recorded),
# the second writing a marker first so that the signal is sent only then.
STOPPED_BENCHMARK = '''
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize("cell", ["done", "stopped"])
def test_cell(benchmark, cell):
    benchmark.group = cell
    benchmark.extra_info.update(kind="loss", peer="latentspace", verified=False)

    def call():
        if cell == "stopped":
            Path(MARKER).write_text("in the timed round")
            time.sleep(60)

    benchmark.pedantic(call, rounds=3, iterations=1)
    benchmark.extra_info["verified"] = True
'''

# The folder's conftest: benchmarks/conftest.py's hooks and fixtures, loaded by path.
LOADING_CONFTEST = f'''
import importlib.util

_spec = importlib.util.spec_from_file_location("benchmarks_conftest", {str(BENCHMARKS / "conftest.py")!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
globals().update({{name: value for name, value in vars(_module).items() if not name.startswith("__")}})
'''


def test_a_benchmark_run_stopped_by_sigint_writes_the_benchmarks_that_finished(tmp_path):
    """gpu_run.sh stops a benchmark run at its limit with SIGINT, so that pytest-benchmark
    still writes its JSON. An interrupt inside a timed round left that benchmark with no
    rounds, and writing the JSON then failed on it (min() of no data): every finished
    benchmark was lost with it. The interrupted benchmark is left out instead."""
    pytest.importorskip("pytest_benchmark")
    marker = tmp_path / "marker"
    (tmp_path / "bench_stopped.py").write_text(f"MARKER = {str(marker)!r}\n" + STOPPED_BENCHMARK)
    (tmp_path / "conftest.py").write_text(LOADING_CONFTEST)
    json_path = tmp_path / "out.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "bench_stopped.py"),
         f"--benchmark-json={json_path}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the stopped cell never started"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert json_path.exists(), output
    benchmarks = json.loads(json_path.read_text())["benchmarks"]
    assert [(b["group"], b["extra_info"]["verified"]) for b in benchmarks] == [("done", True)], output


# ============================================================================================
# benchmarks/profile_knn_cuda.py, its GPU calls faked: torch.cuda's synchronize and device
# queries, the native plan (its host arithmetic, _cuda_plan_for, for 132 multiprocessors), the
# profiler's kernels. The searches run on the CPU.
# ============================================================================================
@pytest.fixture
def profile(monkeypatch):
    import torch

    import latentspace
    from latentspace import _native

    if not latentspace.build_info()["cuda_compiled"]:
        pytest.skip("the native plan's host arithmetic (_cuda_plan_for) needs a CUDA build")
    module = _script("profile_knn_cuda")
    monkeypatch.setattr(module, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a fake GPU")
    monkeypatch.setattr(latentspace, "cuda_available", lambda: True)
    monkeypatch.setattr(_native, "_cuda_plan", lambda nq, nb, k, device, bound=None: _native._cuda_plan_for(
        nq, nb, k, 132, bound, nq * k * 8 + (1 << 20)))
    return module


def _scan_name(rows: int) -> str:
    """A row-scan kernel's name as torch.profiler gives it (demangled, 150 characters)."""
    queries, steps = (1, 1) if rows != 4 else (8, 2)
    return (f"void latentspace::cuda::row_scan_kernel<(latentspace::Metric)0, (latentspace::KnnStorage)0, "
            f"true, false, true, false, {queries}, {rows}, {steps}>(latentspace::cuda::ScanArgs)")


def test_kernel_times_keep_each_kernel_s_whole_name(profile, monkeypatch):
    """Names were cut at 90 characters, before the template arguments that tell the kernels of
    one family apart (the q1 sweep's 4-, 8- and 16-row scans read the same); the JSON keeps
    them whole (the printed lines are cut)."""
    import torch

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [types.SimpleNamespace(key=_scan_name(8), count=1, device_time_total=250.0),
                    types.SimpleNamespace(key="cpu op", count=3, device_time_total=0.0)]

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    assert profile.kernel_times(lambda: None) == [(_scan_name(8), 1, 0.25)]


def test_the_queuing_time_leaves_out_the_wait_for_the_device(profile, monkeypatch):
    """median_queue_ms splits a search's host cost from its device time (q1_breakdown): with a
    wait for the device of 20 ms and a call of 2 ms, it reads the call alone, where median_ms
    reads both."""
    import time

    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: time.sleep(0.02))
    call = lambda: time.sleep(0.002)  # noqa: E731
    queued = profile.median_queue_ms(call, repeats=5, warmup=1)
    waited = profile.median_ms(call, repeats=5, warmup=1)
    assert 1.5 <= queued < 15 <= waited, (queued, waited)


def test_the_q1_sweep_says_which_scan_ran_and_reads_the_rate_to_two_places(profile, monkeypatch, capsys):
    """Each setting's row says how many rows a warp read in the scan that ran (the kernel's
    kRows), and the line flags a setting whose scan was not the one asked for (the 8- and
    16-row scans take only aligned rows, and fall back to the 4-row one): the sweep would
    otherwise compare a setting with itself. The read rate of the database is printed to two
    places ("3 TB/s" said little against the scans' 2.05)."""
    def kernels(call):
        call()
        asked = os.environ.get("LATENTSPACE_CUDA_SINGLE_QUERY_ROWS") or "4"
        ran = 4 if asked == "16" else int(asked)  # the 16-row scan falls back here
        return [(_scan_name(ran), 1, 0.25), ("void latentspace::cuda::merge_kernel<...>", 1, 0.01)]

    monkeypatch.setattr(profile, "kernel_times", kernels)
    monkeypatch.setattr(profile, "Q1_SWEEP_N", 4096)
    monkeypatch.setattr(profile, "Q1_SWEEP_WAVES", (1,))
    monkeypatch.setattr(profile, "median_ms", lambda call, repeats=0, warmup=0: (call(), 0.5)[1])
    report = {}
    profile.q1_sweep(report)
    out = capsys.readouterr().out
    sweep = report["q1 sweep"]
    assert [(row["rows"], row["scan_rows"]) for row in sweep["rows"]] == [(4, 4), (4, 4), (8, 8), (8, 8), (16, 4), (16, 4)]
    assert f"{4096 * 128 * 4 / sweep['read_ms'] / 1e9:.2f} TB/s" in out.split("\n", 2)[1], out
    lines = [line for line in out.splitlines() if line.lstrip().startswith("rows")]
    assert len(lines) == 6 and all("not the 16-row scan" in line for line in lines[4:]), out
    assert not any("not the" in line for line in lines[:4]), out


def test_the_large_k_section_times_both_peers_and_prints_the_plan(profile, monkeypatch, capsys):
    """The "largek" section profiles latentspace.knn and torch's addmm + topk at each k, with
    the plan latentspace takes under the workspace bound it would get (here a fixed 1 GiB:
    the CPU has no free GPU memory to ask), and checks that both peers' calls run."""
    import torch

    from latentspace import _cuda_search

    ran = []

    def kernels(call):
        ran.append(call())
        return [("void latentspace::cuda::scan_kernel<...>", 1, 2.0)]

    class Backend:
        def __init__(self, device):
            self.dims = []

        def set_dim(self, dim):
            self.dims.append(dim)

    monkeypatch.setattr(profile, "kernel_times", kernels)
    monkeypatch.setattr(profile, "LARGE_K_N", 3000)
    monkeypatch.setattr(profile, "LARGE_K_QUERIES", 20)
    monkeypatch.setattr(profile, "LARGE_K_KS", (64, 300))
    monkeypatch.setattr(_cuda_search, "CudaBackend", Backend)
    monkeypatch.setattr(_cuda_search, "resident_workspace_bytes", lambda backend, nq, n, k: 1 << 30)
    monkeypatch.setattr(profile, "calls_and_first_plan", lambda nq, n, k, bound, dim: (
        [(0, nq, 1 << 20)], latentspace_plan(nq, n, k, bound)))
    report = {}
    profile.large_k_breakdown(report)
    out = capsys.readouterr().out
    assert sorted(report) == ["large k=300 latentspace.knn", "large k=300 torch addmm+topk",
                              "large k=64 latentspace.knn", "large k=64 torch addmm+topk"]
    assert "== Q=20 N=3000 D=128 k=64 latentspace.knn: CUDA kernels of one search (1 calls, the first: 1 x" in out, out
    assert "workspace bound 1.0 GiB)" in out and "k=300 torch addmm+topk: CUDA kernels of one search\n" in out, out
    # each peer's answer: latentspace's (distances, indices) and torch's topk, k columns each
    assert len(ran) == 4 and all(answer[1].shape == (20, k) for answer, k in zip(ran, (64, 64, 300, 300)))
    assert isinstance(ran[1], torch.return_types.topk)


def test_the_plan_sweep_sets_each_rows_settings_the_list_room_included(profile, monkeypatch, capsys):
    """Each configuration of the plan sweep runs under its own settings (the list's room beyond
    k only where the row names one: 1 otherwise), which its JSON row and printed line name."""
    import latentspace

    seen = []

    def search(q, x, k, workspace_bytes):
        seen.append({name: os.environ.get(name) for name in (
            "LATENTSPACE_CUDA_ROWS_PER_NEIGHBOUR", "LATENTSPACE_CUDA_LIST_ROOM", "LATENTSPACE_CUDA_SHARED_THRESHOLDS")})

    monkeypatch.setattr(latentspace, "knn", search)
    monkeypatch.setattr(profile, "SWEEP", {"tiny": (20, 3000, 8, 50, [(32, 1, "0", "1", "0"), (16, 2, "0", "0", "1", 3)])})
    monkeypatch.setattr(profile, "median_ms", lambda call, repeats=0, warmup=0: (call(), 1.5)[1])
    monkeypatch.setattr(profile, "calls_and_first_plan", lambda nq, n, k, bound, dim: (
        [(0, nq, 1 << 20)], latentspace_plan(nq, n, k, bound)))
    report = {}
    profile.plan_sweep(report)
    out = capsys.readouterr().out
    rows = report["plan sweep"]
    assert [(row["rule"], row["list_room"], row["shared_thresholds"]) for row in rows] == [(32, 1, True), (16, 3, False)]
    assert len(seen) == 4 and {tuple(entry.values()) for entry in seen[:2]} == {("32", "1", "1")}, seen
    assert {tuple(entry.values()) for entry in seen[2:]} == {("16", "3", "0")}, seen
    lines = [line for line in out.splitlines() if line.lstrip().startswith("tiny")]
    assert len(lines) == 2 and "list room" not in lines[0] and lines[1].endswith("list room 3 k"), out


def latentspace_plan(nq, n, k, bound):
    from latentspace import _native

    return _native._cuda_plan_for(nq, n, k, 132, bound, nq * k * 8 + (1 << 20), 128)


def test_a_profile_section_stopped_or_failing_keeps_what_it_measured(profile, monkeypatch, tmp_path):
    """A section's JSON was written only when it ended: stopped at the profile's limit (gpu_run.sh
    sends SIGINT) or failing midway (a CUDA error in its twelfth setting), it lost every row it
    had measured. Its rows so far are written, named as unfinished; a stop exits 130."""
    def section(report):
        report["rows"] = rows = [1, 2]
        rows.append(3)
        raise error

    monkeypatch.setitem(profile.SECTIONS, "fake", section)
    for error, code in ((KeyboardInterrupt(), 130), (RuntimeError("CUDA error: an illegal memory access"), None)):
        path = tmp_path / f"{type(error).__name__}.json"
        if code is None:
            with pytest.raises(RuntimeError):
                profile.main(["--section", "fake", str(path)])
        else:
            assert profile.main(["--section", "fake", str(path)]) == code
        written = json.loads(path.read_text())
        assert written["rows"] == [1, 2, 3] and written["device"] == "a fake GPU"
        assert written["unfinished"] == {"fake": f"{type(error).__name__}: {error}"}


def test_the_profile_merges_a_stopped_section_and_starts_no_other(profile, monkeypatch, tmp_path, capsys):
    """The parent merged a section's JSON only when it exited 0: a stopped section's rows were
    dropped, and the next section started, to be killed 10 s later by gpu_run.sh's timeout. Now
    its rows join the file, and the sections after it are named as not started."""
    started = []

    def run(args):
        name, part = args[-2], args[-1]
        started.append(name)
        stopped = len(started) == 2
        section = {name: "partial" if stopped else "done"}
        if stopped:
            section["unfinished"] = {name: "KeyboardInterrupt: "}
        Path(part).write_text(json.dumps(section))
        return types.SimpleNamespace(returncode=130 if stopped else 0)

    monkeypatch.setattr(profile.subprocess, "run", run)
    out = tmp_path / "profile.json"
    assert profile.main([str(out)]) == 1
    names = list(profile.SECTIONS)
    assert started == names[:2]
    assert json.loads(out.read_text()) == {names[0]: "done", names[1]: "partial",
                                           "unfinished": {names[1]: "KeyboardInterrupt: "}}
    assert f"not started: {', '.join(names[2:])}" in capsys.readouterr().out


# ============================================================================================
# bench_losses_cuda.py and bench_encode_cuda.py, run on the CPU (torch.cuda faked, their DEVICE
# the CPU): their checks, and the JSON their extra_info makes, read by their reports.
# ============================================================================================
class FakeBenchmark:
    """pytest-benchmark's fixture as the benchmarks use it: group, extra_info, pedantic (here a
    few rounds, timed), stats.stats.median."""

    def __init__(self):
        self.group, self.extra_info, self.has_error = None, {}, False

    def pedantic(self, target, rounds, iterations, warmup_rounds=0):
        assert rounds >= 1 and iterations == 1
        times = []
        for _ in range(warmup_rounds + min(rounds, 2)):
            start = time.perf_counter()
            target()
            times.append(time.perf_counter() - start)
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=sorted(times)[len(times) // 2]))

    def as_json(self, median: float) -> dict:
        """This benchmark as pytest-benchmark writes it, with the given median."""
        return {"group": self.group, "name": "test_x", "extra_info": self.extra_info,
                "stats": {"min": median, "median": median, "mean": median, "max": median, "rounds": 2}}


@pytest.fixture
def gpu_bench(monkeypatch):
    """Imports benchmarks/<name>.py as on a GPU machine (it skips itself without one), its
    DEVICE the CPU."""
    import torch

    import latentspace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a fake GPU")
    monkeypatch.setattr(latentspace, "cuda_available", lambda: True)
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_on_the_cpu", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.DEVICE = torch.device("cpu")
        return module

    return load


def _report(tmp_path, script: str, benchmarks: list[dict], capsys) -> str:
    path = tmp_path / f"{script}.json"
    path.write_text(json.dumps({"machine_info": {"python_version": "3.12"}, "benchmarks": benchmarks}))
    code = _script(script).main([str(path)])
    assert code == 0
    return capsys.readouterr().out


def test_the_losses_report_reads_what_the_losses_benchmark_writes(gpu_bench, tmp_path, capsys):
    """bench_losses_cuda.run_cell's own checks pass for right peers (the CPU's native kernels
    stand in for the GPU's), and the report turns the extra_info it writes into the row."""
    bench = gpu_bench("bench_losses_cuda")
    bench.NATIVE_ENTRY = {"loss": "reconstruction_loss", bench.KL: "kl_normal"}  # the CPU's kernels
    rows, cols = 512, 96
    medians = {"latentspace": 0.001, "torch": 0.003, "copy roof": 0.0005}
    written = []
    for peer, median in medians.items():
        benchmark = FakeBenchmark()
        bench.run_cell(benchmark, "bce", rows, cols, peer)
        assert benchmark.extra_info["verified"] is True and benchmark.group == f"bce {rows}x{cols}"
        written.append(benchmark.as_json(median))
    out = _report(tmp_path, "report_losses_cuda", written, capsys)
    moved = 3 * rows * cols * 4
    assert f"| bce {rows}x{cols} | 1.000 | — | 3.000 | 0.500 | 3.00x | — | 2.00x | {moved / 0.001 / 1e9:.0f} " \
           f"| {moved / 0.0005 / 1e9:.0f} |" in out, out
    assert "a fake GPU" in out


@pytest.mark.parametrize("loss", ["mse", "bce", "bce_logits", "kl_normal"])
def test_the_losses_check_refuses_a_loss_or_gradient_off_by_a_ten_thousandth(gpu_bench, loss):
    """The check before and after the timed rounds: the float64 reference's own values pass;
    a loss, or one gradient element, off by 1e-4 of itself fails (the tolerance is 1e-5)."""
    import torch

    bench = gpu_bench("bench_losses_cuda")
    cell = (loss, 256, 48)
    loss_value, grads = bench.reference(*cell)
    bench.check(cell, loss_value.float(), tuple(g.float() for g in grads))
    with pytest.raises(AssertionError, match="loss"):
        bench.check(cell, loss_value.float() * (1 + 1e-4), tuple(g.float() for g in grads))
    wrong = grads[-1].float().clone()
    position = int(torch.argmax(wrong.abs()))
    wrong.view(-1)[position] *= 1 + 1e-4
    with pytest.raises(AssertionError, match="gradient"):
        bench.check(cell, loss_value.float(), (*(g.float() for g in grads[:-1]), wrong))


@pytest.mark.parametrize("loss", ["mse", "bce", "bce_logits"])
def test_the_losses_reference_gradient_is_right_where_a_logit_is_exactly_zero(gpu_bench, loss):
    """The float64 reference's gradient against the closed forms, at r = 0 exactly (float32
    randn draws such zeros: GPU run 10's bce_logits cells failed every peer, torch's too, on 1
    and 9 of them while the reference took max(r, 0) and |r| through autograd) and beside it.
    bce keeps r inside (0, 1)."""
    import torch

    bench = gpu_bench("bench_losses_cuda")
    r = torch.tensor([0.0, 1e-3, -1e-3, 2.5, -40.0, 60.0], dtype=torch.float64)
    if loss == "bce":
        r = torch.tensor([0.5, 0.25, 0.75, 0.01, 0.99, 0.5], dtype=torch.float64)
    t = torch.tensor([0.3, 0.0, 1.0, 0.5, 0.7, 0.2], dtype=torch.float64)
    leaf = r.clone().requires_grad_()
    bench.reference_elementwise(loss, leaf, t).sum().backward()
    expected = {"mse": 2 * (r - t), "bce": (r - t) / (r * (1 - r)), "bce_logits": torch.sigmoid(r) - t}[loss]
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-15)


def test_the_encoder_report_reads_what_the_encoder_benchmark_writes(gpu_bench, monkeypatch, tmp_path, capsys):
    """bench_encode_cuda.run_cell's checks pass for the model's torch forward and the Encoder
    (its CPU kernels stand in for the GPU's), in fp32 and bf16; the read roof's extra_info
    gives the PCA cells their read-once time in the report."""
    import latentspace

    bench = gpu_bench("bench_encode_cuda")
    cpu_encoder = latentspace.Encoder
    monkeypatch.setattr(latentspace, "Encoder", lambda model, device=None, precision="fp32": cpu_encoder(
        model, device="cpu", precision=precision))
    written = []
    for precision in ("fp32", "bf16"):
        for peer, median in (("latentspace", 0.0002), ("torch", 0.0004)):
            benchmark = FakeBenchmark()
            bench.run_cell(benchmark, "PCA", precision, peer)
            assert benchmark.extra_info["verified"] is True
            assert benchmark.extra_info["error_of_max"] < bench.TOLERANCE[precision]
            written.append(benchmark.as_json(median))
    roof = FakeBenchmark()
    bench.test_read_roof(roof, *bench.ROOF_SHAPES[0])
    written.append(roof.as_json(0.0003))
    out = _report(tmp_path, "report_encode_cuda", written, capsys)
    flops = 2 * 65536 * 784 * 16
    for precision in ("fp32", "bf16"):
        row = f"| PCA 784-16 | {precision} | 65,536 | 0.200 | — | — | 0.400 | 2.00x | — | {flops / 0.0002 / 1e9:.0f} |"
        assert row in out and out.split(row, 1)[1].split("\n", 1)[0].endswith("| 0.150 |"), out


def test_the_encoder_check_refuses_codes_off_by_more_than_the_tolerance(gpu_bench):
    """fp32 codes off by 2e-4 of the largest |code| fail (tolerance 1e-4), codes of another
    shape or with a NaN fail; the reference itself passes."""
    bench = gpu_bench("bench_encode_cuda")
    reference = bench.reference("small")
    assert bench.check("small", "fp32", "test", reference.float()) < 1e-7
    off = reference.float().clone()
    off[0, 0] += 2e-4 * float(reference.abs().max())
    with pytest.raises(AssertionError, match="max \\|error\\|"):
        bench.check("small", "fp32", "test", off)
    with pytest.raises(AssertionError, match="shape"):
        bench.check("small", "fp32", "test", reference.float()[:-1])
    off[1, 1] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        bench.check("small", "fp32", "test", off)
