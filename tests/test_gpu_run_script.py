"""benchmarks/gpu_run.sh, the one script a GPU session runs: checked here, where there is no GPU,
so that a renamed test or a shell error does not waste the session's few minutes of device time."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
ENCODER_TESTS = "tests/gpu/test_encode_cuda_native.py"  # the CUDA encoder's GPU tests
# By what a GPU run owes (docs/gpu-runs.md, "Owed"): the tests, the losses' and the kNN
# benchmarks and the kNN sanitizer part first, then what ran clean or complete in run 10 (the
# encoder's benchmark, the new kernels' sanitizer part, the profile).
DEFAULT_STAGES = ["tests", "losses", "bench", "sanitizer_knn", "encode", "sanitizer_new", "profile", "ncu"]


def _racecheck_tests(name: str = "RACECHECK_TESTS") -> list[str]:
    text = SCRIPT.read_text()
    block = re.search(rf"\b{name}=\(\n(.*?)\n\s*\)", text, re.S)
    assert block, f"gpu_run.sh lost its {name} list"
    return re.findall(r'"([^"]+)"', block.group(1))


@functools.lru_cache(maxsize=None)
def _benchmark_common():
    """benchmarks/_common.py, as the benchmark scripts import it (their folder on sys.path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return _common


@functools.lru_cache(maxsize=None)
def _collected(*args: str) -> list[str]:
    """Node ids pytest collects for these arguments (the GPU tests are collected everywhere and
    skipped without a GPU)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", *args],
                            cwd=ROOT, capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_racecheck_tests_exist_in_the_order_given():
    wanted = _racecheck_tests()
    assert len(wanted) >= 5 and len(set(wanted)) == len(wanted)
    assert _collected(*wanted) == wanted


def test_memcheck_selection_takes_every_opt_in():
    text = SCRIPT.read_text()
    selection = re.search(r'MEMCHECK_SELECTION="([^"]+)"', text).group(1)
    collected = _collected("-k", selection, "tests/gpu/test_knn_cuda.py")
    for test in ("single_query_scan_equals", "few_query_splits_change", "fused_finish_equals", "early_norms_equal", "shared_thresholds_equal", "tree_merge_equals",
                 "warp_cut_backs_equal", "float_thresholds_equal", "fitted_plan_equals", "fitted_plan_fits", "opt_ins_on_integer"):
        assert any(test in node for node in collected), test
    assert 100 < len(collected) < 320  # a few minutes under memcheck, not all of them


@pytest.mark.parametrize("opt_in", ["shared", "shared+warp", "tree", "fused"])
def test_memcheck_selection_takes_the_native_output_test_with_each_opt_in_alone(opt_in):
    text = SCRIPT.read_text()
    selection = re.search(r'MEMCHECK_SELECTION="([^"]+)"', text).group(1)
    collected = _collected("-k", selection, "tests/gpu/test_knn_cuda.py")
    native = [node for node in collected if "native_writes_every_output" in node]
    variants = {re.search(r"\[(\w+)-([\w+]+)-(\w+)-", node).groups() for node in native}
    alone = {"shared": ("separate", "shared", "single"), "shared+warp": ("separate", "shared+warp", "single"),
             "tree": ("separate", "split", "tree"), "fused": ("fused", "split", "single")}[opt_in]
    assert alone in variants


def _bench(group, peer, median, **info):
    return {"group": group, "stats": {"median": median}, "extra_info": {"peer": peer, **info}}


def test_the_report_merges_the_benchmark_runs(tmp_path):
    """gpu_run.sh runs the plain peers, the opt-in peers and the large-k cells apart (three
    JSON files): the report reads them all, roofs from the first, and compares each opt-in peer
    with its plain one across the files."""
    roof = {"group": "roof", "stats": {"median": 0.02},
            "extra_info": {"kind": "roof", "roof": "gemm fp32", "flops": 2 * 8192**3}}
    big = "big Q=10000 N=1000000 D=128 k=1024"
    plain = {"machine_info": {"python_version": "3.12"}, "benchmarks": [
        roof, _bench(big, "latentspace.knn", 0.4, flops=2.56e15), _bench(big, "torch.mm+topk", 0.2, flops=2.56e15)]}
    opt_ins = {"machine_info": {}, "benchmarks": [
        _bench(big, "latentspace.knn[filling plan, warp cut-backs]", 0.1, flops=2.56e15)]}
    large = "large k Q=1000 N=1000000 D=128 k=16384"
    large_k = {"machine_info": {}, "benchmarks": [
        _bench(large, "latentspace.knn", 3.0, flops=2.56e14),
        _bench(large, "latentspace.knn[shared thresholds, warp cut-backs]", 1.5, flops=2.56e14)]}
    paths = []
    for name, data in (("gpu_bench_plain.json", plain), ("gpu_bench_opt-ins.json", opt_ins),
                       ("gpu_bench_large_k.json", large_k)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report_knn_cuda.py"), *paths],
                            capture_output=True, text=True, check=True)
    out = result.stdout
    assert "gemm fp32" in out and "python 3.12" in out
    assert f"| {big} | latentspace.knn[filling plan, warp cut-backs] | 100.00 | latentspace.knn | 400.00 | 4.000x |" in out
    assert f"| {large} | latentspace.knn[shared thresholds, warp cut-backs] | 1500.00 | latentspace.knn | 3000.00 | 2.000x |" in out
    assert f"{big}: at least 2x the faster torch peer | NO | 0.500x" in out
    assert "| filling plan, warp cut-backs | 1 | 4.000x | 4.000x | 4.000x |" in out
    assert "| shared thresholds, warp cut-backs | 1 | 2.000x | 2.000x | 2.000x |" in out


def test_the_report_summarises_each_set_of_opt_ins(tmp_path):
    """Per set of opt-ins: the geometric mean, least and most of its speed-ups over the same
    peers without it, across cells and across the peers it was added to."""
    cells = []
    for cell, plain, fast in (("big k=10", 0.4, 0.2), ("big k=100", 0.4, 0.8)):
        cells += [_bench(cell, "latentspace.knn", plain), _bench(cell, "latentspace.knn[no fused finish]", fast),
                  _bench(cell, "latentspace.FlatIndex[bf16 storage]", 1.0),
                  _bench(cell, "latentspace.FlatIndex[bf16 storage, no fused finish]", 0.5)]
    (tmp_path / "a.json").write_text(json.dumps({"machine_info": {}, "benchmarks": cells}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report_knn_cuda.py"), str(tmp_path / "a.json")],
                         capture_output=True, text=True, check=True).stdout
    # speed-ups 2, 0.5 (knn) and 2, 2 (FlatIndex): geometric mean 2^(2/4) = 1.414
    assert "| no fused finish | 4 | 1.414x | 0.500x | 2.000x |" in out


def test_the_script_runs_its_preamble_without_stages(tmp_path):
    """The part every call runs (machine info, the installed package's info and the smoke
    test), with no build and no stage: what a second call (GPU_RUN_BUILD=0) starts with."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "GPU_RUN_BUILD": "0", "GPU_RUN_STAGES": "none",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "gpu_run.log").read_text()
    assert result.returncode == 0, log
    assert "skipped (GPU_RUN_BUILD=0)" in log and "smoke: ValueError as expected" in log
    assert "SMOKE FAILED" not in log and log.rstrip().endswith("== done (exit 0)")


@pytest.mark.parametrize("stages", ["sanitizer-new", "tests benchmark", "Tests"])
def test_an_unknown_stage_is_refused_before_the_build(tmp_path, stages):
    """A misspelt stage ran nothing it named, without a word, while the call spent its device
    time on the other stages: now the call stops at once, naming it, before any build."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "GPU_RUN_STAGES": stages,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "gpu_run.log").read_text()
    assert result.returncode == 2, log
    bad = next(stage for stage in stages.split() if stage not in ("tests",))
    assert f"GPU_RUN_STAGES: unknown stage '{bad}'" in log and "== build" not in log
    assert log.rstrip().endswith("== done (exit 2)")


def _run_script(tmp_path, path_first: Path | None = None, **settings: str) -> str:
    """Runs gpu_run.sh on the installed package (no build) and returns its log; path_first:
    a folder searched for commands before all others (a stand-in compute-sanitizer). Without
    GPU_RUN_STAGES in settings, the default stages."""
    import os

    folders = [str(path_first)] if path_first else []
    folders += [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    env = {key: value for key, value in os.environ.items() if key != "GPU_RUN_STAGES"}
    env = {**env, "OUT": str(tmp_path), "GPU_RUN_BUILD": "0", **settings, "PATH": os.pathsep.join(folders)}
    subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return (tmp_path / "gpu_run.log").read_text()


def test_stages_past_the_calls_deadline_are_skipped_and_the_summary_still_printed(tmp_path):
    # The stages' own limits add up to more than one 600 s device call: with the deadline
    # spent by the preamble, each default stage says it was skipped and the run still ends.
    log = _run_script(tmp_path, _fake_sanitizer(tmp_path), GPU_RUN_DEADLINE_SECONDS="20")
    stages = ("tests", "losses benchmark", "benchmark (plain)", "benchmark (large_k_opt-ins)",
              "compute-sanitizer (kNN)", "encode benchmark", "compute-sanitizer (new kernels)", "profile", "ncu")
    for stage in stages:
        assert f"== {stage}: skipped" in log, log
    # in the default list's order: what a GPU run owes first, the profile last
    positions = [log.index(f"== {stage}: skipped") for stage in stages]
    assert positions == sorted(positions), log
    assert "pytest seconds" not in log and "profile seconds" not in log and "benchmark seconds" not in log
    assert "sanitizer seconds" not in log and not list(tmp_path.glob("sanitizer_*.log"))
    assert log.rstrip().endswith("== done (exit 0)"), log


def test_a_stage_limit_is_cut_to_what_the_deadline_leaves(tmp_path):
    log = _run_script(tmp_path, GPU_RUN_STAGES="bench", GPU_RUN_DEADLINE_SECONDS="60")
    cut = re.search(r"\(benchmark \(plain\): limit cut from 90 s to (\d+) s by the call's deadline\)", log)
    assert cut and 15 <= int(cut.group(1)) < 50, log
    assert "benchmark (plain) seconds" in log and log.rstrip().endswith("== done (exit 0)"), log


def test_every_benchmark_label_names_settings_the_benchmark_knows():
    """A peer's brackets name the opt-in settings its call sets (_common.CUDA_KNN_OPT_INS) or
    the benchmark's own variants: a misspelt setting would time the default and call it the
    opt-in. Read from the source: the module skips itself where there is no GPU."""
    import ast

    split_label = _benchmark_common().split_label
    tree = ast.parse((ROOT / "benchmarks" / "bench_knn_cuda.py").read_text())
    groups = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id.endswith("_PEERS")}
    assert {"BIG_PEERS", "TENSOR_PEERS", "Q1_PEERS", "LARGE_K_PEERS"} <= set(groups)
    for peers in groups.values():
        for peer in peers:
            _, opt_ins, others = split_label(peer)
            assert all(word in ("wmma", "bf16 storage") for word in others), peer


@pytest.mark.parametrize("peer,opt_in", [
    ("latentspace.knn", False), ("torch.mm+topk", False), ("latentspace.knn[wmma]", False),
    ("latentspace.FlatIndex[bf16 storage, wmma]", False), ("latentspace.knn[no fused finish]", True),
    ("latentspace.FlatIndex[bf16 storage, float thresholds]", True), ("latentspace.knn[tree merge, no split rule]", True),
    ("latentspace.knn[no large-k plan]", True), ("latentspace.FlatIndex[bf16 storage, thresholds per split]", True),
    ("latentspace.knn[mma tile]", True), ("latentspace.FlatIndex[bf16 storage, mma tile]", True),
    ("latentspace.check[torch check]", True),
    ("latentspace.knn(numpy, device='cuda')", False)])
def test_which_peers_the_opt_in_benchmark_process_takes(peer, opt_in):
    """gpu_run.sh's opt-in process (LATENTSPACE_BENCH_PART=opt-ins) takes the peers whose
    labels name an opt-in setting; the plain process all others."""
    assert _benchmark_common().names_opt_in(peer) is opt_in


def test_the_profile_takes_known_sections_only():
    """benchmarks/profile_knn_cuda.py runs each section in its own process (a faulting opt-in
    kernel must not take the sections after it along): a section it does not know is refused
    by name, and without a GPU every section says so and the run fails."""
    script = str(ROOT / "benchmarks" / "profile_knn_cuda.py")
    bad = subprocess.run([sys.executable, script, "--section", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and \
        "--section: expected one of tiles, q1, q1sweep, copy, big, sweep, defaults, largek, got ['nope']" in bad.stderr
    if not __import__("latentspace").cuda_available():
        run = subprocess.run([sys.executable, script], capture_output=True, text=True)
        assert run.returncode == 1 and run.stdout.count("exited 1") == 8  # (one a section)


def test_every_stage_is_in_the_default_list_in_the_order_it_runs():
    """A stage missing from the default GPU_RUN_STAGES would silently never run."""
    text = SCRIPT.read_text()
    default = re.search(r'STAGES="\$\{GPU_RUN_STAGES:-([^}]+)\}"', text).group(1).split()
    assert default == DEFAULT_STAGES
    tested = re.findall(r'\$STAGES " == \*" (\w+) "\*', text)
    assert tested == default


def test_the_two_call_split_covers_every_stage_in_order():
    """The script's comment gives the split for two calls on one warm machine (the second with
    GPU_RUN_BUILD=0): together they must run every default stage, each once, in order."""
    calls = re.findall(r'^#\s+(GPU_RUN_BUILD=0 )?GPU_RUN_STAGES="([^"]+)" bash benchmarks/gpu_run.sh$',
                       SCRIPT.read_text(), re.M)
    assert [bool(build) for build, _ in calls] == [False, True], calls
    assert [stage for _, stages in calls for stage in stages.split()] == DEFAULT_STAGES


def test_the_script_writes_at_most_8_files_to_out():
    """The device tool brings back at most 8 files from $OUT: every path the script writes
    there, as the comment near its top lists them."""
    text = SCRIPT.read_text()
    names = set()
    for name in re.findall(r'\$\{OUT:-\.\}/([\w.$-]+)', text):
        names |= {name.replace("$tool", tool) for tool in ("memcheck", "racecheck")}
    assert names == {"gpu_run.log", "pytest_cuda.log", "gpu_bench.log", "gpu_bench_json.tar.gz",
                     "profile_knn_cuda.json", "sanitizer_memcheck.log", "sanitizer_racecheck.log", "ncu_knn.txt"}, names
    assert 'LOG="${OUT:-.}/gpu_run.log"' in text


def test_the_cuda_encoder_gpu_tests_are_all_selected_by_the_cuda_marker():
    """The tests stage runs `pytest -m cuda tests`, and the sanitizer `-m cuda` over the file:
    a test of it without the marker would never run on a GPU."""
    assert (ROOT / ENCODER_TESTS).exists(), f"{ENCODER_TESTS}: gpu_run.sh runs it, and it is missing"
    everything = _collected(ENCODER_TESTS)
    assert everything and _collected("-m", "cuda", ENCODER_TESTS) == everything


@pytest.mark.parametrize("own_stage", ["bench_losses_cuda.py", "bench_encode_cuda.py"])
def test_the_knn_benchmark_stage_leaves_the_new_kernels_benchmarks_to_their_own_stages(own_stage):
    """bench_losses_cuda.py and bench_encode_cuda.py match the kNN stage's bench_*cuda*.py: run
    there too, each would run once per kNN part (with their -k selections) and mix its cells
    into the kNN report."""
    line = re.search(r"^\s*gpu_benchmarks=(\$\(.*\))$", SCRIPT.read_text(), re.M).group(1)
    listed = subprocess.run(["bash", "-c", f"echo {line}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert "benchmarks/bench_knn_cuda.py" in listed
    assert f"benchmarks/{own_stage}" not in listed and (ROOT / "benchmarks" / own_stage).exists()


@pytest.mark.parametrize("stage,name,limit", [("losses", "losses", 90), ("encode", "encode", 75)])
def test_a_new_kernels_stage_runs_its_benchmark_and_report_within_the_deadline(tmp_path, stage, name, limit):
    """Without a GPU the benchmark skips itself and writes no JSON: the stage says so through
    the report and the run still ends in order; its limit is cut by the deadline like the others'."""
    log = _run_script(tmp_path, GPU_RUN_STAGES=stage, GPU_RUN_DEADLINE_SECONDS="60")
    cut = re.search(rf"\({name} benchmark: limit cut from {limit} s to (\d+) s by the call's deadline\)", log)
    assert cut and 15 <= int(cut.group(1)) < 50, log
    if importlib.util.find_spec("pytest_benchmark") is not None:  # (the "bench" extra; the GPU image has it)
        # the module skips itself (no GPU here): pytest collected nothing, exit 5
        assert re.search(rf"{name} benchmark seconds: \d+ \(exit [05];", log), log
        assert f"SKIPPED [1] benchmarks/bench_{name}_cuda.py" in log and "no usable CUDA GPU" in log, log
    else:  # pytest refuses --benchmark-json: the stage still ends, and the report says why
        assert re.search(rf"{name} benchmark seconds: \d+ \(exit 4;", log), log
    # the JSON's path is in this call's own folder (archived into $OUT where it holds results)
    assert re.search(rf"/tmp/gpu_bench_json\.\w+/{name}_cuda\.json: no results", log), log
    assert f"==== {name}" in (tmp_path / "gpu_bench.log").read_text()
    assert not (tmp_path / "gpu_bench_json.tar.gz").exists()  # nothing to archive
    assert log.rstrip().endswith("== done (exit 0)"), log


def test_memcheck_takes_every_kernel_of_the_losses():
    text = SCRIPT.read_text()
    selection = re.search(r'MEMCHECK_LOSS_SELECTION="([^"]+)"', text).group(1)
    collected = _collected("-m", "cuda", "-k", selection, "tests/gpu/test_losses_cuda.py")
    names = [node.split("::", 1)[1] for node in collected]
    # each dtype (dtype0 float32, dtype1 float64) and kind of the reconstruction kernels, and the KL's
    for dtype in ("dtype0", "dtype1"):
        for kind in ("mse", "bce", "bce_logits"):
            assert any(name.startswith(f"test_loss_and_gradient_match_float64[{dtype}-{kind}-") for name in names)
        assert any(name.startswith(f"test_kl_matches_float64[{dtype}-") for name in names)
    for test in ("every_output_element_is_written[9000]", "many_rows", "outside_the_unit_interval",
                 "side_stream", "half_inputs", "target_gradient", "non_contiguous"):
        assert any(test in name for name in names), test
    assert 40 < len(collected) < 100  # under a minute of memcheck before the kNN tests


def test_racecheck_encoder_tests_exist_in_the_order_given():
    wanted = _racecheck_tests("RACECHECK_ENCODER_TESTS")
    assert wanted and len(set(wanted)) == len(wanted)
    assert _collected(*wanted) == wanted


def test_memcheck_takes_the_encoder_tests_at_the_edges():
    """Every kernel and path of the CUDA encoder (both float32 tiles and the bf16 one, loads of
    4 and of 1, the LayerNorm kernel, PCA's mean, vector stores and not), in about a minute."""
    selection = re.search(r'MEMCHECK_ENCODER_SELECTION="([^"]+)"', SCRIPT.read_text()).group(1)
    collected = _collected("-m", "cuda", "-k", selection, ENCODER_TESTS)
    names = [node.split("::", 1)[1] for node in collected]
    for test in ("test_depths_widths_and_rows[257-64-300]", "test_depths_widths_and_rows[1-1001-7]",
                 "test_many_layers", "test_a_cuda_input_that_starts_off_16_bytes",
                 "test_every_output_element_is_written[bf16-5]", "test_every_output_element_is_written[fp32-8]",
                 "test_layer_norms_to_the_last_bit", "test_pca_subtracts_the_mean_before_the_products",
                 "test_bf16_rounds_x_minus_the_mean"):
        assert any(name.startswith(test) for name in names), test
    assert 30 < len(collected) < 90


def test_racecheck_loss_tests_exist_in_the_order_given():
    wanted = _racecheck_tests("RACECHECK_LOSS_TESTS")
    assert wanted and len(set(wanted)) == len(wanted)
    assert _collected(*wanted) == wanted


FAKE_BENCHMARK_PYTHON = """#!/bin/sh
# python3's stand-in: a pytest run of a benchmark file given --benchmark-json=PATH writes one
# synthetic result there (as a GPU would) and passes; everything else runs the real python.
for arg in "$@"; do
  case "$arg" in --benchmark-json=*) json="${arg#--benchmark-json=}" ;; esac
done
case "$*" in
  *benchmarks/bench_*_cuda.py*) if [ -n "$json" ]; then cp "$FAKE_JSON" "$json"; echo "1 passed"; exit 0; fi ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def test_the_new_kernels_stages_archive_their_json_and_report_it(tmp_path):
    """With results (a stand-in for the GPU's pytest run), the losses and encode stages put
    their JSONs into $OUT/gpu_bench_json.tar.gz, whose files come back, and print their reports."""
    import os
    import tarfile

    folder = tmp_path / "bin"
    folder.mkdir()
    fake = folder / "python3"
    fake.write_text(FAKE_BENCHMARK_PYTHON)
    fake.chmod(0o755)
    info = {"kind": "encode", "cell": "small", "shape": "64-32-4", "widths": [64, 32, 4], "precision": "fp32",
            "rows": 1000, "flops": 2 * 1000 * (64 * 32 + 32 * 4), "bytes": 1, "device": "a GPU", "verified": True}
    benchmarks = [{"group": "small 64-32-4 fp32", "extra_info": {**info, "peer": peer}, "stats": {"median": median}}
                  for peer, median in (("latentspace", 0.0001), ("torch", 0.0002))]
    (tmp_path / "fake.json").write_text(json.dumps({"machine_info": {}, "benchmarks": benchmarks}))
    out = tmp_path / "out"
    out.mkdir()
    log = _run_script(out, folder, GPU_RUN_STAGES="losses encode", FAKE_JSON=str(tmp_path / "fake.json"),
                      REAL_PYTHON=sys.executable)
    with tarfile.open(out / "gpu_bench_json.tar.gz") as archive:
        assert sorted(os.path.basename(name) for name in archive.getnames()) == ["encode_cuda.json", "losses_cuda.json"]
    assert "| small 64-32-4 | fp32 | 1,000 | 0.100 | — | — | 0.200 | 2.00x |" in log, log
    assert "No loss benchmarks found." in log, log  # the losses' report reads only its own kind
    assert sorted(path.name for path in out.iterdir()) == ["gpu_bench.log", "gpu_bench_json.tar.gz", "gpu_run.log"]


FAKE_SANITIZER = """#!/bin/sh
# compute-sanitizer's stand-in: drops "--tool T --error-exitcode 99 --print-limit 20", runs the
# rest, and fails the losses', the encoder's or the kNN run with FAKE_LOSSES_EXIT /
# FAKE_ENCODER_EXIT / FAKE_KNN_EXIT where set.
echo "fake sanitizer $2"
shift 6
"$@"
code=$?
case "$*" in *test_losses_cuda*) [ -n "$FAKE_LOSSES_EXIT" ] && exit "$FAKE_LOSSES_EXIT" ;; esac
case "$*" in *test_encode_cuda_native*) [ -n "$FAKE_ENCODER_EXIT" ] && exit "$FAKE_ENCODER_EXIT" ;; esac
case "$*" in *test_knn_cuda*) [ -n "$FAKE_KNN_EXIT" ] && exit "$FAKE_KNN_EXIT" ;; esac
exit $code
"""


def _fake_sanitizer(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    fake = folder / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    return folder


@pytest.mark.parametrize("losses", ["failing", "left out"])
def test_the_sanitizer_runs_the_knn_tests_before_the_losses_ones(tmp_path, losses):
    """Under each tool, the kNN tests then the losses' ones (the stages' order since run 10),
    in one log; a failure of the losses' run is the tool's exit status (and the run's) even
    where the kNN run before it passed."""
    settings = {"FAKE_LOSSES_EXIT": "99"} if losses == "failing" else {"GPU_RUN_SANITIZER_LOSSES": "0"}
    log = _run_script(tmp_path, _fake_sanitizer(tmp_path), GPU_RUN_STAGES="sanitizer", GPU_RUN_SANITIZER_ENCODER="0",
                      **settings)
    for tool in ("memcheck", "racecheck"):
        tool_log = (tmp_path / f"sanitizer_{tool}.log").read_text()
        assert "---- kNN exit 0" in tool_log and "test_knn_cuda.py" in tool_log, tool_log
        assert "---- encoder" not in tool_log, tool_log
        if losses == "failing":
            assert tool_log.index("---- kNN exit 0") < tool_log.index("---- losses exit 99"), tool_log
            assert f"{tool} exit 99" in log, log
        else:
            assert "---- losses" not in tool_log and f"{tool} exit 0" in log, log
    assert log.rstrip().endswith(f"== done (exit {99 if losses == 'failing' else 0})"), log


@pytest.mark.skipif(not (ROOT / ENCODER_TESTS).exists(), reason=f"{ENCODER_TESTS} missing (a test above fails for it)")
@pytest.mark.parametrize("encoder", ["failing", "stopped at its limit", "passing"])
def test_the_sanitizer_runs_the_encoder_tests_after_the_knn_and_the_losses_ones(tmp_path, encoder):
    """Each tool runs the encoder's GPU tests after the kNN ones and the losses', under a
    timeout of their own. A sanitizer error there (99) is the tool's exit status even where an
    earlier run passed; one stopped at its limit says 124."""
    settings = {"failing": {"FAKE_ENCODER_EXIT": "99"}, "passing": {},
                "stopped at its limit": {"GPU_RUN_SANITIZER_ENCODER_SECONDS": "1",
                                         "GPU_RUN_MEMCHECK_ENCODER_TESTS": "nothing_at_all or true"}}[encoder]
    folder = _fake_sanitizer(tmp_path)
    if encoder == "stopped at its limit":  # a python3 first on PATH that sleeps where it runs the encoder's tests
        slow = folder / "python3"
        slow.write_text(f'#!/bin/sh\ncase "$*" in *test_encode_cuda_native*) sleep 30 ;; esac\n'
                        f'exec {sys.executable} "$@"\n')
        slow.chmod(0o755)
    log = _run_script(tmp_path, folder, GPU_RUN_STAGES="sanitizer", **settings)
    expected = {"failing": 99, "stopped at its limit": 124, "passing": 0}[encoder]
    for tool in ("memcheck", "racecheck"):
        tool_log = (tmp_path / f"sanitizer_{tool}.log").read_text()
        parts = ("---- kNN: pytest", "---- losses: pytest", "---- encoder: pytest")
        positions = [tool_log.index(part) for part in parts]
        assert positions == sorted(positions), tool_log
        encoder_line = tool_log[positions[2]:].split("\n", 1)[0]
        if tool == "memcheck":
            assert encoder_line.startswith("---- encoder: pytest --maxfail=3 -k ") and ENCODER_TESTS in encoder_line
        else:
            assert encoder_line.startswith(f"---- encoder: pytest {_racecheck_tests('RACECHECK_ENCODER_TESTS')[0]}")
        assert "---- kNN exit 0" in tool_log, tool_log
        if encoder == "stopped at its limit" and tool == "memcheck":
            assert "-k nothing_at_all or true" in tool_log and "(at most 1 s)" in tool_log, tool_log
        assert f"---- encoder exit {expected} " in tool_log, tool_log
        assert f"{tool} exit {expected} " in log, log
    assert log.rstrip().endswith(f"== done (exit {expected})"), log


@pytest.mark.parametrize("stages,parts,limits", [
    ("sanitizer_new", ["losses", "encoder"], [120]),
    ("sanitizer_knn", ["kNN"], [150]),
    ("sanitizer", ["kNN", "losses", "encoder"], [150, 120]),  # the one stage it was: both parts
    ("sanitizer_new sanitizer_knn", ["kNN", "losses", "encoder"], [150, 120]),  # the script's order, not the list's
])
def test_the_sanitizer_parts_run_alone_or_together_into_the_same_two_logs(tmp_path, stages, parts, limits):
    """sanitizer_new (the losses' and the encoder's tests, clean under both tools in run 10) and
    sanitizer_knn (the kNN tests) each start under their own limit, capped by the deadline;
    together they write one log per tool, the kNN part first. A log left in $OUT
    by an earlier call is replaced, not appended to."""
    for tool in ("memcheck", "racecheck"):
        (tmp_path / f"sanitizer_{tool}.log").write_text("---- kNN: pytest stale\n")
    log = _run_script(tmp_path, _fake_sanitizer(tmp_path), GPU_RUN_STAGES=stages, GPU_RUN_DEADLINE_SECONDS="110")
    cuts = [int(limit) for limit in re.findall(r"\(compute-sanitizer \((?:new kernels|kNN)\): limit cut from (\d+) s", log)]
    assert cuts == limits, log
    for tool in ("memcheck", "racecheck"):
        tool_log = (tmp_path / f"sanitizer_{tool}.log").read_text()
        assert "stale" not in tool_log, tool_log
        started = re.findall(r"^---- (losses|encoder|kNN): pytest", tool_log, re.M)
        assert started == parts, tool_log
        for part in parts:
            assert f"---- {part} exit 0" in tool_log, tool_log
        assert log.count(f"{tool} exit 0 ") == len(limits), log
    assert log.rstrip().endswith("== done (exit 0)"), log


def test_a_sanitizer_error_in_the_knn_part_outranks_another_failure_in_the_new_kernels_part(tmp_path):
    """As when the two parts were one stage: under each tool the first sanitizer error (99)
    of its runs is the tool's exit status, else their first other failure; the call's exit
    status is the first failing tool's."""
    log = _run_script(tmp_path, _fake_sanitizer(tmp_path), GPU_RUN_STAGES="sanitizer", FAKE_ENCODER_EXIT="1",
                      FAKE_KNN_EXIT="99")
    for tool in ("memcheck", "racecheck"):
        tool_log = (tmp_path / f"sanitizer_{tool}.log").read_text()
        assert "---- encoder exit 1 " in tool_log and "---- kNN exit 99" in tool_log, tool_log
        assert f"{tool} exit 1 " in log and f"{tool} exit 99 " in log, log
    assert log.rstrip().endswith("== done (exit 99)"), log


def test_the_preamble_says_whether_the_benchmarks_can_run(tmp_path):
    """pytest-benchmark before 5.3 fails every benchmark under pytest 9.2: the log says so
    before any stage, from the versions installed (here: this interpreter's)."""
    from importlib.metadata import PackageNotFoundError, version

    log = _run_script(tmp_path, GPU_RUN_STAGES="none")
    try:
        pytest_version, plugin = version("pytest"), version("pytest-benchmark")
    except PackageNotFoundError:
        assert "benchmarks: pytest-benchmark is not installed" in log, log
        return

    def numbers(text):
        return tuple(int(part) for part in text.split(".")[:3])

    needs_alias = numbers(pytest_version) >= (9, 2) and numbers(plugin) < (5, 3, 1)
    verdict = "ok with benchmarks/conftest.py's node._nodeid" if needs_alias else "ok\n"
    assert f"benchmarks: pytest {pytest_version}, pytest-benchmark {plugin}: {verdict}" in log, log


@pytest.mark.parametrize("plugin", ["5.2.3", "5.3.0"])
def test_the_preamble_names_the_older_pytest_benchmarks_that_need_the_alias(tmp_path, plugin):
    """pytest-benchmark 5.3.0 reads node._nodeid too (5.3.1 fixed it): under pytest 9.2 the
    preamble called it "ok" while every benchmark would fail. Both need benchmarks/conftest.py's
    alias, which the line names. (A stand-in distribution first on the path gives the version.)"""
    from importlib.metadata import version

    if tuple(int(part) for part in version("pytest").split(".")[:2]) < (9, 2):
        pytest.skip("pytest before 9.2 still has node._nodeid")
    site = tmp_path / "site"
    (site / f"pytest_benchmark-{plugin}.dist-info").mkdir(parents=True)
    (site / f"pytest_benchmark-{plugin}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: pytest-benchmark\nVersion: {plugin}\n")
    out = tmp_path / "out"
    out.mkdir()
    log = _run_script(out, GPU_RUN_STAGES="none", PYTHONPATH=str(site))
    assert f"pytest-benchmark {plugin}: ok with benchmarks/conftest.py's node._nodeid (pytest-benchmark before " \
           "5.3.1 reads it, pytest 9.2 removed it)" in log, log


# python3's stand-in for the stages' pytest runs (a Python script, run by this interpreter):
# the arguments FAKE_SWAP maps ({"tests": path, ...}, JSON) are replaced, then the real python
# runs; with FAKE_KNN_JSON set, the kNN benchmark's "plain" part writes that file as its JSON
# and the other parts write none (as a part killed past its limit leaves none).
SWAPPING_PYTHON = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
if args[:2] == ["-m", "pytest"]:
    swap = json.loads(os.environ.get("FAKE_SWAP", "{{}}"))
    args = [swap.get(arg, arg) for arg in args]
    if "benchmarks/bench_knn_cuda.py" in args and os.environ.get("FAKE_KNN_JSON"):
        out = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--benchmark-json="))
        if os.environ.get("LATENTSPACE_BENCH_PART") == "plain" and "not large_k" in args:
            shutil.copy(os.environ["FAKE_KNN_JSON"], out)
        print("1 passed")
        sys.exit(0)
os.execv(sys.executable, [sys.executable, *args])
"""


def _swapping_python(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    fake = folder / "python3"
    fake.write_text(SWAPPING_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    return folder


STOPPED_TESTS = """import time
import pytest

pytestmark = pytest.mark.cuda


def test_fails():
    assert 1 == 2, "a failure found before the limit"


def test_outlives_the_limit():
    time.sleep(120)
"""

# A losses benchmark whose first cell finishes and whose second outlives the stage's limit in
# its timed round; the folder's conftest loads benchmarks/conftest.py (as the real file's folder has it).
STOPPED_LOSSES = """import time
import pytest


@pytest.mark.parametrize("peer", ["latentspace", "torch"])
def test_loss(benchmark, peer):
    benchmark.group = "mse 8192x784"
    benchmark.extra_info.update(kind="loss", loss="mse", peer=peer, rows=8192, cols=784, bytes=3 * 8192 * 784 * 4,
                                device="a GPU", verified=False)
    benchmark.pedantic(lambda: time.sleep(0.001 if peer == "latentspace" else 120), rounds=3, iterations=1)
    benchmark.extra_info["verified"] = True
"""

LOADING_CONFTEST = f'''import importlib.util

_spec = importlib.util.spec_from_file_location("benchmarks_conftest", {str(ROOT / "benchmarks" / "conftest.py")!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
globals().update({{name: value for name, value in vars(_module).items() if not name.startswith("__")}})
'''


def test_a_stage_stopped_at_its_limit_keeps_what_it_had_found(tmp_path):
    """A stage's pytest run stopped at its limit by SIGTERM printed no summary (the tests
    stage's failures so far unnamed: with -q they are only 'F's until the end) and wrote no
    benchmark JSON (pytest-benchmark writes it as the session ends: 5.3 wrote none, 5.2 an
    empty file), so the finished cells of a long stage were lost. Stopped by SIGINT, pytest
    ends its session: the failures are named and the finished benchmarks written."""
    import tarfile

    pytest.importorskip("pytest_benchmark")
    (tmp_path / "stopped_tests.py").write_text(STOPPED_TESTS)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_stopped_losses.py").write_text(STOPPED_LOSSES)
    (bench / "conftest.py").write_text(LOADING_CONFTEST)
    out = tmp_path / "out"
    out.mkdir()
    swap = {"tests": str(tmp_path / "stopped_tests.py"), "benchmarks/bench_losses_cuda.py": str(bench / "bench_stopped_losses.py")}
    log = _run_script(out, _swapping_python(tmp_path), GPU_RUN_STAGES="tests losses", GPU_RUN_TEST_SECONDS="15",
                      GPU_RUN_LOSSES_BENCH_SECONDS="30", FAKE_SWAP=json.dumps(swap))
    assert "pytest seconds" in log and "(exit 124;" in log, log
    assert "FAILED" in log and "a failure found before the limit" in (out / "pytest_cuda.log").read_text(), log
    with tarfile.open(out / "gpu_bench_json.tar.gz") as archive:
        data = json.load(archive.extractfile("./losses_cuda.json"))
    assert [b["extra_info"]["peer"] for b in data["benchmarks"]] == ["latentspace"], data
    assert re.search(r"\| mse 8192x784 \| [\d.]+ \| — \|", log), log  # the report's row: latentspace timed, torch not
    assert log.rstrip().endswith("== done (exit 124)"), log


def test_the_knn_report_names_each_benchmark_part_that_left_no_json(tmp_path):
    """The kNN report was given the JSONs that exist: a part killed past its limit (or one
    pytest-benchmark 5.3 wrote nothing for) left none, and the report then read as the whole
    run, exit 0. Every part that started is handed to it, and one without results is named."""
    cell = "big Q=10000 N=1000000 D=128 k=10"
    runs = [{"group": cell, "extra_info": {"peer": peer, "flops": 2.56e15}, "stats": {"median": median}}
            for peer, median in (("latentspace.knn", 0.08), ("torch.mm+topk", 0.17))]
    (tmp_path / "plain.json").write_text(json.dumps({"machine_info": {}, "benchmarks": runs}))
    log = _run_script(tmp_path, _swapping_python(tmp_path), GPU_RUN_STAGES="bench",
                      FAKE_KNN_JSON=str(tmp_path / "plain.json"))
    assert f"{cell}: at least 2x the faster torch peer | yes |" in log, log
    for part in ("opt-ins", "large_k_plain", "large_k_opt-ins"):
        assert re.search(rf"gpu_bench_{part}\.json: no results", log), log
    assert "gpu_bench_plain.json: no results" not in log, log


@pytest.mark.parametrize("row_check", ["on", "left out"])
def test_memcheck_runs_the_row_check_tests_first_in_the_new_kernels_part(tmp_path, row_check):
    """The row check's kernel (csrc/cuda/norms.cu): memcheck runs its GPU tests of the kernel
    itself first in the new kernels' part after the pipelined tile's (left out here), under a
    limit of its own; racecheck does not (the kernel has no shared memory).
    GPU_RUN_SANITIZER_ROW_CHECK=0 leaves it out."""
    settings = {"GPU_RUN_SANITIZER_ROW_CHECK": "0"} if row_check == "left out" else {}
    log = _run_script(tmp_path, _fake_sanitizer(tmp_path), GPU_RUN_STAGES="sanitizer_new",
                      GPU_RUN_SANITIZER_ENCODER="0", GPU_RUN_SANITIZER_DEEP_TILE="0",
                      GPU_RUN_SANITIZER_PIPELINED_TILE="0", **settings)
    memcheck = (tmp_path / "sanitizer_memcheck.log").read_text()
    racecheck = (tmp_path / "sanitizer_racecheck.log").read_text()
    assert "row-check" not in racecheck and "test_row_check_cuda" not in racecheck, racecheck
    if row_check == "left out":
        assert "row-check" not in memcheck, memcheck
    else:
        assert (ROOT / "tests/gpu/test_row_check_cuda.py").exists()
        selection = "-k not knn_refuses and not index_ tests/gpu/test_row_check_cuda.py"
        assert f"---- row-check: pytest {selection} (at most 40 s)" in memcheck, memcheck
        assert "---- row-check exit 0" in memcheck, memcheck
        assert memcheck.index("---- row-check: pytest") < memcheck.index("---- losses: pytest"), memcheck
        assert f"== compute-sanitizer --tool memcheck, new kernels part (row check: pytest {selection}; then losses: " \
            "pytest" in log, log
    assert "---- losses exit 0" in memcheck and "---- losses exit 0" in racecheck



@pytest.mark.parametrize("deep_tile", ["on", "left out"])
def test_both_tools_run_the_deep_tile_tests_in_the_new_kernels_part(tmp_path, deep_tile):
    """DeepMmaTile (csrc/cuda/knn_deep_tile.cuh) is new: memcheck runs a selection of its GPU
    tests after the row check's, racecheck two of them first, each under a limit of its own.
    GPU_RUN_SANITIZER_DEEP_TILE=0 leaves them out."""
    settings = {"GPU_RUN_SANITIZER_DEEP_TILE": "0"} if deep_tile == "left out" else {}
    log = _run_script(tmp_path, _fake_sanitizer(tmp_path), GPU_RUN_STAGES="sanitizer_new",
                      GPU_RUN_SANITIZER_ENCODER="0", GPU_RUN_SANITIZER_PIPELINED_TILE="0", **settings)
    memcheck = (tmp_path / "sanitizer_memcheck.log").read_text()
    racecheck = (tmp_path / "sanitizer_racecheck.log").read_text()
    if deep_tile == "left out":
        assert "deep-tile" not in memcheck and "deep-tile" not in racecheck, memcheck + racecheck
        return
    selection = "-k 128-4096-128-10 or 150-3000-40-9 or half_index or falls_back or opt_in_family"
    assert f"---- deep-tile: pytest {selection} tests/gpu/test_knn_deep_tile.py (at most 40 s)" in memcheck, memcheck
    assert memcheck.index("---- row-check: pytest") < memcheck.index("---- deep-tile: pytest") \
        < memcheck.index("---- losses: pytest"), memcheck
    assert racecheck.index("---- deep-tile: pytest tests/gpu/test_knn_deep_tile.py::") \
        < racecheck.index("---- losses: pytest"), racecheck
    assert "---- deep-tile exit 0" in memcheck and "---- deep-tile exit 0" in racecheck
    assert "memcheck exit 0 (new kernels" in log and "racecheck exit 0 (new kernels" in log, log


@pytest.mark.parametrize("pipelined_tile", ["on", "left out"])
def test_both_tools_run_the_pipelined_tile_tests_first_in_the_new_kernels_part(tmp_path, pipelined_tile):
    """The pipelined deep tile (csrc/cuda/knn_pipelined_tile.cuh) is the newest and not yet run
    on a GPU: memcheck runs a selection of its GPU tests first in the new kernels' part,
    racecheck seven of them first, each under a limit of its own.
    GPU_RUN_SANITIZER_PIPELINED_TILE=0 leaves them out."""
    settings = {"GPU_RUN_SANITIZER_PIPELINED_TILE": "0"} if pipelined_tile == "left out" else {}
    log = _run_script(tmp_path, _fake_sanitizer(tmp_path), GPU_RUN_STAGES="sanitizer_new",
                      GPU_RUN_SANITIZER_ENCODER="0", GPU_RUN_SANITIZER_LOSSES="0", **settings)
    memcheck = (tmp_path / "sanitizer_memcheck.log").read_text()
    racecheck = (tmp_path / "sanitizer_racecheck.log").read_text()
    if pipelined_tile == "left out":
        assert "pipelined-tile" not in memcheck + racecheck, memcheck + racecheck
        return
    selection = "-k integer_data or falls_back or 128-4096-128-10-fp32-bf16 or 140-6000-72-12-bf16-bf16 or short_and_long " \
        "or half_index"
    assert f"---- pipelined-tile: pytest {selection} tests/gpu/test_knn_pipelined_tile.py (at most 60 s)" \
        in memcheck, memcheck
    assert memcheck.index("---- pipelined-tile: pytest") < memcheck.index("---- row-check: pytest") \
        < memcheck.index("---- deep-tile: pytest"), memcheck
    assert racecheck.index("---- pipelined-tile: pytest tests/gpu/test_knn_pipelined_tile.py::") \
        < racecheck.index("---- deep-tile: pytest"), racecheck
    assert "---- pipelined-tile exit 0" in memcheck and "---- pipelined-tile exit 0" in racecheck
    assert f"new kernels part (pipelined tile: pytest {selection} tests/gpu/test_knn_pipelined_tile.py; then " \
        "row check: pytest" in log, log


@pytest.mark.parametrize("tile", ["DEEP_TILE", "PIPELINED_TILE"])
def test_the_tile_sanitizer_selections_collect(tile):
    """Each tile's memcheck selection and racecheck ids name tests that exist (collected here
    without a GPU: the module's tests are collected, then skipped)."""
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    selection = re.search(rf'^MEMCHECK_{tile}_SELECTION="([^"]+)"', script, re.M).group(1)
    ids = re.search(rf"^RACECHECK_{tile}_TESTS=\(\n(.*?)\n\)", script, re.M | re.S).group(1)
    ids = [line.strip().strip('"') for line in ids.splitlines()]
    tests = re.search(rf"^{tile}_TESTS=(\S+)$", script, re.M).group(1)
    def collect(*args):
        run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                             capture_output=True, text=True, cwd=ROOT)
        return [line for line in run.stdout.splitlines() if "::" in line], run.stdout

    named, output = collect(*ids)
    assert named == ids, output
    selected, output = collect("-k", selection, tests)
    assert len(selected) >= 20 and any("falls_back" in name for name in selected), output


FAKE_NCU = """#!/bin/sh
# a stand-in Nsight Compute: names its arguments, then runs the program it was given
echo "fake ncu $*"
while [ "$#" -gt 0 ] && [ "$1" != python3 ]; do shift; done
"$@"
"""


def _fake_ncu(tmp_path, script: str):
    """A folder holding an executable `ncu` with this text, to put first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "ncu").write_text(script)
    (folder / "ncu").chmod(0o755)
    return folder


def test_the_ncu_stage_profiles_each_shape_in_its_own_process(tmp_path):
    """ncu (found on PATH) runs benchmarks/ncu_knn_cuda.py once a shape, the first scan launch
    only, the card's clocks left alone, every section named, all into ncu_knn.txt; each run's
    exit status is logged (without a GPU the driver says so and exits 1)."""
    log = _run_script(tmp_path, _fake_ncu(tmp_path, FAKE_NCU), GPU_RUN_STAGES="ncu", GPU_RUN_NCU_SHAPES="bf16 k1024")
    report = (tmp_path / "ncu_knn.txt").read_text()
    assert re.findall(r"^---- ncu (\w+)$", report, re.M) == ["bf16", "k1024"], report
    calls = re.findall(r"^fake ncu (.*)$", report, re.M)
    assert len(calls) == 2, report
    for call, shape in zip(calls, ("bf16", "k1024")):
        assert call.startswith("--clock-control none --kernel-name-base function "
                               "--kernel-name regex:^(row_|pipelined_)?scan_kernel --launch-count 1 "
                               "--section SpeedOfLight"), call
        assert call.endswith(f"python3 -u benchmarks/ncu_knn_cuda.py {shape}"), call
        assert "--section WarpStateStats" in call and "--section MemoryWorkloadAnalysis" in call
        assert "--metrics regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio$ " in call, call
    gpu_visible = _installed_latentspace_sees_a_gpu()
    expected = 0 if gpu_visible else 1
    assert f"ncu bf16 exit {expected} " in log and f"ncu k1024 exit {expected} " in log, log
    if not gpu_visible:
        assert "no usable CUDA GPU here" in report, report
    assert "sections only" not in report and "sections only" not in log  # ncu took the metrics
    assert log.rstrip().endswith("== done (exit 0)"), log  # diagnostic: not the call's status


FAKE_NCU_WITHOUT_METRICS = """#!/bin/sh
# a stand-in Nsight Compute that refuses --metrics, as an ncu without those metrics would
echo "fake ncu $*"
case "$*" in *--metrics*) echo "==ERROR== Failed to find metric regex"; exit 1;; esac
while [ "$#" -gt 0 ] && [ "$1" != python3 ]; do shift; done
"$@"
"""


FAKE_NCU_WITHOUT_COUNTERS = """#!/bin/sh
# a stand-in Nsight Compute on a machine whose counters it may not read
echo "fake ncu $*"
echo "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters"
exit 1
"""


def test_the_ncu_stage_runs_a_shape_once_where_ncu_fails_for_another_reason(tmp_path):
    """An ncu error that is not about the metrics (here the counters' permission) would meet
    the sections-only call too: each shape runs once, its error in the report."""
    log = _run_script(tmp_path, _fake_ncu(tmp_path, FAKE_NCU_WITHOUT_COUNTERS), GPU_RUN_STAGES="ncu",
                      GPU_RUN_NCU_SHAPES="bf16 fp32")
    report = (tmp_path / "ncu_knn.txt").read_text()
    assert len(re.findall(r"^fake ncu ", report, re.M)) == 2 and "sections only" not in report + log, report
    assert report.count("ERR_NVGPUCTRPERM") == 2 and "ncu bf16 exit 1 " in log and "ncu fp32 exit 1 " in log, log
    assert log.rstrip().endswith("== done (exit 0)"), log


def test_the_ncu_stage_falls_back_to_the_sections_where_ncu_refuses_the_metrics(tmp_path):
    """An ncu that refuses the stall metrics (==ERROR==) profiles the shape again with the
    sections alone, so that the stage still reports what run 12's did."""
    log = _run_script(tmp_path, _fake_ncu(tmp_path, FAKE_NCU_WITHOUT_METRICS), GPU_RUN_STAGES="ncu",
                      GPU_RUN_NCU_SHAPES="bf16")
    report = (tmp_path / "ncu_knn.txt").read_text()
    calls = re.findall(r"^fake ncu (.*)$", report, re.M)
    assert len(calls) == 2 and "--metrics" in calls[0] and "--metrics" not in calls[1], report
    assert "---- ncu bf16, sections only" in report and "ncu bf16, sections only, exit" in log, log
    assert log.rstrip().endswith("== done (exit 0)"), log


def test_the_ncu_stage_without_ncu_says_so(tmp_path):
    import glob
    import shutil

    if shutil.which("ncu") or glob.glob("/usr/local/cuda/bin/ncu") or glob.glob("/opt/nvidia/nsight-compute/*/ncu"):
        pytest.skip("an ncu is installed on this machine")
    log = _run_script(tmp_path, GPU_RUN_STAGES="ncu")
    assert "== ncu: not found, skipped" in log, log
    assert not (tmp_path / "ncu_knn.txt").exists()
    assert log.rstrip().endswith("== done (exit 0)"), log


def test_the_ncu_driver_refuses_an_unknown_shape():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ncu_knn_cuda.py"), "fp64"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "SHAPE one of bf16, fp32, k1024, faiss3045" in result.stderr


def _installed_latentspace_sees_a_gpu() -> bool:
    import latentspace

    return latentspace.cuda_available()
