#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, run the CUDA tests, the GPU losses
# benchmark, the GPU encoder benchmark, the new losses' and the CUDA encoder's GPU tests
# again under compute-sanitizer (memcheck, racecheck), the GPU kNN profile and benchmarks,
# then the small GPU kNN tests under compute-sanitizer, and write everything to one log
# (sanitizer logs beside it). Usage, from the repository root:
#   bash benchmarks/gpu_run.sh            # log in $OUT (device tool) or ./gpu_run.log
# The device image has no internet: build without isolation, with what it ships; or, off the
# device's clock, the wheel benchmarks/gpu_prebuild.sh built on the CPU machine, carried in
# .prebuilt/ (installed only over the sources it was built from; GPU_RUN_BUILD below).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_run.log"
exec > >(tee "$LOG") 2>&1

# The whole call's deadline, in seconds from here (GPU_RUN_DEADLINE_SECONDS; set it a little
# under the device call's timeout_s). Every stage's own limit is capped by what is left of it,
# and a stage that cannot start in time is skipped with a line saying so: the stages' own
# limits add up to more than a 600 s call, and a call the device tool kills loses the summary
# lines below (docs/gpu-runs.md).
RUN_START=$(date +%s)
DEADLINE="${GPU_RUN_DEADLINE_SECONDS:-580}"
# within_deadline NAME LIMIT: sets $limit to LIMIT capped by the seconds left before the
# deadline (10 s kept for the lines after the stage); false, with a line, when under 15 s are left.
within_deadline() {
  local left=$(( DEADLINE - ($(date +%s) - RUN_START) - 10 ))
  if [ "$left" -lt 15 ]; then
    echo "== $1: skipped, ${left} s left before the call's ${DEADLINE} s deadline"
    return 1
  fi
  limit=$(( $2 < left ? $2 : left ))
  [ "$limit" -lt "$2" ] && echo "($1: limit cut from $2 s to $limit s by the call's deadline)"
  return 0
}

# Files this script writes to $OUT, 8 in a call of every stage (the device tool brings back at
# most 8: run 8's two calls brought back 7 and 8): gpu_run.log, pytest_cuda.log (tests),
# gpu_bench.log (every benchmark's output), gpu_bench_json.tar.gz (every benchmark's JSON),
# profile_knn_cuda.json (profile), sanitizer_memcheck.log, sanitizer_racecheck.log and
# ncu_knn.txt (ncu).
# The benchmarks' JSONs are written to a folder of this call's own (a warm machine's earlier
# call must not lend this one its figures) and archived into $OUT after each benchmark run, so
# that a call stopped later still brings back what finished.
BENCH_JSON=$(mktemp -d /tmp/gpu_bench_json.XXXXXX)
trap 'rm -rf "$BENCH_JSON"' EXIT  # its JSONs are in the archive
# Only JSONs with content: pytest-benchmark before 5.3 opens its --benchmark-json file while it
# parses the options, so a run with nothing timed (no GPU) or stopped at its limit leaves an
# empty file, which is not a result (the reports name it as such from its path).
archive_bench_json() {
  local found
  found=$(cd "$BENCH_JSON" && find . -maxdepth 1 -name '*.json' -size +0c | sort)
  [ -n "$found" ] || return 0
  (cd "$BENCH_JSON" && echo "$found" | tar -czf "${OUT:-.}/gpu_bench_json.tar.gz" -T -)
}

# A stage's pytest run is stopped at its limit by SIGINT (timeout -s INT), not SIGTERM: pytest
# then ends its session, which names the failures found so far (with -q they are only "F"s
# until the summary) and has pytest-benchmark write the JSON of the benchmarks that finished
# (benchmarks/conftest.py leaves the interrupted one out); SIGTERM ended it with neither. -k 10:
# SIGKILL where the interrupt is not taken within 10 s.
# run_gpu_benchmark NAME FILE JSON REPORT: one benchmark file (losses, encoder) in a pytest
# process of its own under $limit; its JSON into the archive, its output appended to
# gpu_bench.log, its summary lines here, then its report (which names a JSON with no results:
# pytest-benchmark writes none, or before 5.3 an empty one, where nothing was timed, no GPU, or
# the run was killed).
run_gpu_benchmark() {
  local name=$1 file=$2 json="$BENCH_JSON/$3" report=$4 log="$BENCH_JSON/$1.log" start code
  echo "== $name benchmark ($file, json: $3 in gpu_bench_json.tar.gz; full output: gpu_bench.log)"
  start=$(date +%s)
  timeout -s INT -k 10 "$limit" python3 -m pytest "$file" -q -rfEs --tb=short --benchmark-json="$json" > "$log" 2>&1
  code=$?
  archive_bench_json
  { echo "==== $name"; cat "$log"; } >> "${OUT:-.}/gpu_bench.log"
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|skipped|Error" "$log" | head -20
  echo "$name benchmark seconds: $(( $(date +%s) - start )) (exit $code; 124: timed out; full output: gpu_bench.log)"
  python3 "$report" "$json"
}

echo "== gpu_run $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# A misspelt stage in GPU_RUN_STAGES would be skipped without a word while the call spends its
# device time on the others: refused here, before the build (none: no stage, the preamble only).
for stage in ${GPU_RUN_STAGES:-}; do
  case "$stage" in
    tests|losses|encode|sanitizer|sanitizer_new|sanitizer_knn|profile|ncu|bench|none) ;;
    *)
      echo "GPU_RUN_STAGES: unknown stage '$stage'; expected some of tests losses encode sanitizer_new" \
        "profile ncu bench sanitizer_knn (sanitizer: both sanitizer parts; none: no stage)"
      echo "== done (exit 2)"
      exit 2
      ;;
  esac
done
# The device tool's copy of .git can lag the working tree it sends (run 7 printed run 6's
# commit): a non-empty line here means the code is that commit plus these changes.
echo "changed since that commit: $(git diff --shortstat HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -1

echo "== build"
# Only the machine's own architecture (sm_90 on the H100 / H200 lent here): half the CUDA
# compile time of the default "80;90"; every core for the C++ and CUDA translation units.
export LATENTSPACE_CUDA_ARCHITECTURES="${LATENTSPACE_CUDA_ARCHITECTURES:-90}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# Nothing rebuilds the package while the benchmarks run here: an import that fails fails at once
# (benchmarks/conftest.py would retry it for 90 s in every benchmark stage).
export LATENTSPACE_BENCH_IMPORT_RETRIES="${LATENTSPACE_BENCH_IMPORT_RETRIES:-0}"
start=$(date +%s)
installed_cuda_build() {
  python3 -c "import sys, latentspace; sys.exit(0 if latentspace.build_info()['cuda_compiled'] else 1)" 2>/dev/null
}
# GPU_RUN_BUILD: 1 (the default) installs the wheel benchmarks/gpu_prebuild.sh built on the CPU
# machine where it fits the tree sent (GPU_RUN_PREBUILT, default .prebuilt, named in the call's
# carry), else builds from source; "source" always builds; "wheel" installs that wheel or stops
# (no build); 0 keeps the installed package (a second call on a warm machine; on a fresh one, as 1).
PREBUILT="${GPU_RUN_PREBUILT:-.prebuilt}"
# install_prebuilt_wheel: true once the prebuilt wheel is installed and has code for this GPU;
# else false, with a line saying why (benchmarks/prebuilt_wheel.py: the same sources byte for
# byte, the same Python, the GPU's architecture among those compiled).
install_prebuilt_wheel() {
  local wheel
  wheel=$(python3 benchmarks/prebuilt_wheel.py pick "$PREBUILT") || return 1  # (its reason went to the log)
  if ! python3 -m pip install -q --no-index --no-deps --force-reinstall "$wheel" 2>&1 | tail -3; then
    echo "prebuilt wheel: pip could not install $wheel"
    return 1
  fi
  python3 benchmarks/prebuilt_wheel.py check-installed 2>&1 || return 1
  echo "installed the prebuilt wheel $wheel (built from these sources: $PREBUILT/BUILD_INFO.json)"
}
case "${GPU_RUN_BUILD:-1}" in
  0|1|source|wheel) ;;
  *) echo "GPU_RUN_BUILD: expected 1, 0, source or wheel, got '${GPU_RUN_BUILD}'"; echo "== done (exit 2)"; exit 2 ;;
esac
if [ "${GPU_RUN_BUILD:-1}" = 0 ] && installed_cuda_build; then
  # A second call on the same warm machine (the package the first call installed is kept):
  # the stages the first call's time did not reach, without building again. (A machine
  # handed back while idle comes fresh, with no build: then it builds after all.)
  echo "skipped (GPU_RUN_BUILD=0): the installed package"
elif [ "${GPU_RUN_BUILD:-1}" != source ] && install_prebuilt_wheel; then
  :
elif [ "${GPU_RUN_BUILD:-1}" = wheel ]; then
  echo "BUILD FAILED: no prebuilt wheel fits (GPU_RUN_BUILD=wheel builds nothing)"
  echo "== done (exit 1)"
  exit 1
else
  echo "building from source"
  python3 -m pip install --no-build-isolation --no-deps . 2>&1 | tail -3 || { echo "BUILD FAILED"; exit 1; }
fi
echo "build seconds: $(( $(date +%s) - start ))"
python3 -m latentspace info
python3 -c "import pybind11, torch; print('pybind11', pybind11.__version__, '| torch', torch.__version__)"
# pytest-benchmark before 5.3.1 (5.3.0 included) fails every benchmark under pytest 9.2
# ("'Function' object has no attribute '_nodeid'", seen on the CPU machine) unless
# benchmarks/conftest.py supplies that attribute: said here, before the benchmark stages.
python3 - <<'VERSIONS' || true
from importlib.metadata import PackageNotFoundError, version
try:
    pytest_version, plugin = version("pytest"), version("pytest-benchmark")
except PackageNotFoundError as missing:
    print(f"benchmarks: {missing.name} is not installed: the benchmark stages will report no results")
else:
    numbers = lambda text: tuple(int(part) for part in text.split(".")[:3] if part.isdigit())
    verdict = "ok"
    if numbers(pytest_version) >= (9, 2) and numbers(plugin) < (5, 3, 1):
        shimmed = "_pytest.nodes.Node._nodeid = property" in open("benchmarks/conftest.py").read()
        verdict = ("ok with benchmarks/conftest.py's node._nodeid (pytest-benchmark before 5.3.1 reads it, "
                   "pytest 9.2 removed it)" if shimmed else "WILL FAIL (pytest-benchmark >= 5.3.1 is needed "
                   "with pytest >= 9.2)")
    print(f"benchmarks: pytest {pytest_version}, pytest-benchmark {plugin}: {verdict}")
VERSIONS

# Smoke: native errors and a pybind11 class with torch loaded (a build sharing torch's pybind11
# internals crashed here once). On a crash, a native backtrace through cuda-gdb when present.
smoke='import torch, numpy as np, latentspace as ls
q = np.ones((3, 4), np.float32); q[1, 2] = np.nan
try:
    ls.knn(q, q, 1)
except ValueError as e:
    print("smoke: ValueError as expected:", str(e)[:60])
m = ls.Autoencoder(64, 4, hidden=(32,)).eval()
print("smoke: encoder backend", ls.Encoder(m, device="cpu").backend)'
python3 -c "$smoke"
code=$?
if [ "$code" -ne 0 ]; then
  echo "SMOKE FAILED (exit $code)"
  command -v cuda-gdb >/dev/null && timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 -c "$smoke" 2>&1 | tail -40
fi

# compute-sanitizer, in two stages: sanitizer_new (the newest kernels' tests: the row check's and
# the deep tile's, memcheck clean in run 12 as far as it reached; the fused losses' and the
# CUDA encoder's, clean in runs 10 and 12) and sanitizer_knn (the small GPU kNN tests, named
# "small"); each runs memcheck (out-of-bounds and misaligned accesses, API errors) and racecheck
# (shared-memory hazards) at once (separate processes on the one GPU: half the wall time),
# under its own limit, and both append to the same two logs (started afresh by the call's
# first sanitizer stage). torch's caching allocator is off so that memcheck sees every
# allocation's true bounds.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
# The losses' tests (csrc/cuda/losses.cu): memcheck every kernel instantiation (float32,
# float64, each kind, the KL) over the tests' shapes at one reduction (the kernels do the same
# work for every reduction: only the gradient's scale differs), the outputs poisoned with NaN,
# the grid-stride and finish loops, the out-of-range flag, a side stream, half inputs, the
# target's gradient and strided inputs: 71 tests; racecheck the finish kernel (the only shared
# memory) with several segments a row and with more rows than its block has threads.
# GPU_RUN_MEMCHECK_LOSS_TESTS: a -k selection instead; GPU_RUN_SANITIZER_LOSSES=0 leaves the
# losses out. tests/test_gpu_run_script.py checks what these collect.
MEMCHECK_LOSS_SELECTION="none or every_output_element_is_written or many_rows or outside_the_unit_interval or side_stream or half_inputs or target_gradient or non_contiguous"
RACECHECK_LOSS_TESTS=(
  "tests/gpu/test_losses_cuda.py::test_every_output_element_is_written[9000]"
  "tests/gpu/test_losses_cuda.py::test_many_rows_loop_over_the_grid_and_the_finish_block"
)
# After the losses, each tool runs some of the CUDA encoder's GPU tests
# (tests/gpu/test_encode_cuda_native.py; csrc/cuda/encode.cu), at most
# GPU_RUN_SANITIZER_ENCODER_SECONDS (default 60 s: a timeout under the tool, which then reports
# what it saw; exit 124, or 137 where pytest had to be killed), so that slow losses' runs still
# leave it time within the stage's limit. memcheck (--maxfail=3) the tests at the edges:
# depths, widths and rows around the tiles (both float32 tiles, loads of 4 and of 1, partial
# row and output tiles), six layers through the two hidden buffers, inputs off 16 bytes, every
# output written with vector stores and without (fp32, bf16), the LayerNorm kernel, PCA's mean,
# bf16's x - mean: 66 small tests, in the file's order. racecheck the narrow tile's
# double-buffered shared memory (encode_narrow_tile.cuh, new; the wide and bf16 tiles are the
# kNN scan's, raced in runs 5-7 without a hazard; the LayerNorm kernel has none): 257 rows (3
# row blocks), 64 inputs (4 staging steps) into 300 outputs (the wide tile) into 5 (the narrow
# one, 19 steps), then the six layers. GPU_RUN_MEMCHECK_ENCODER_TESTS,
# GPU_RUN_RACECHECK_ENCODER_TESTS: -k selections instead; GPU_RUN_SANITIZER_ENCODER=0 leaves
# them out. tests/test_gpu_run_script.py checks what these collect.
ENCODER_TESTS=tests/gpu/test_encode_cuda_native.py
MEMCHECK_ENCODER_SELECTION="depths_widths_and_rows or many_layers or off_16_bytes or every_output_element or layer_norms_to_the_last_bit or pca_subtracts or bf16_rounds_x_minus"
RACECHECK_ENCODER_TESTS=(
  "tests/gpu/test_encode_cuda_native.py::test_depths_widths_and_rows[257-64-300]"
  "tests/gpu/test_encode_cuda_native.py::test_many_layers"
)
# The kNN tests. racecheck is slow (2026-11-26: 16 tests in 160 s in run 6 on an H100; in run 7
# one mma.sync test on integer data in 70 s; in run 8, on an H200, 4 tests in 200 s), so it
# takes a list of tests of code not yet run under it, in order of need, since it reaches only
# the first few (pytest runs node ids in the order given): the single-query scan (the default
# for one query since run 10: the row scan's lists, more rows in flight), then the 5 tests
# run 8 did not reach (weighted_l2, the fused finish at k = 257, shared thresholds and the tree
# merge in the row scan, the mma.sync tile on integer data), then run 8's 4 (no hazard there:
# the warp cut-backs, the fused finish, shared thresholds and the tree merge at 130 queries),
# then the large-k plan in the tile scan (no hazard in run 10). Runs 5-7 ran the float32 tile and row scans, the selection and both
# tensor-core tiles without a hazard. tests/test_gpu_run_script.py checks that these ids exist.
# memcheck takes the "small" tests of the run-8 opt-ins, the large-k plan and the single-query
# scan's settings (their own tests, and the native-output test with each alone: about 300; run
# 8 got through about 170 in 200 s without an error); runs 6-7 found the kernels of run 7
# clean. GPU_RUN_MEMCHECK_TESTS=small takes all the small tests, GPU_RUN_RACECHECK_TESTS a -k
# selection instead of the list.
RACECHECK_TESTS=(
  "tests/gpu/test_knn_cuda.py::test_small_single_query_scan_equals_the_row_scan[128-fp32-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_weighted_l2_matches_the_cpu[9-20000-64-300]"
  "tests/gpu/test_knn_cuda.py::test_small_native_writes_every_output_and_nothing_else[fused-split-single-130-4099-16-257-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_shared_thresholds_equal_the_split_ones[3-20000-16-10-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_tree_merge_equals_the_single_one[3-20000-8-50-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_tensor_core_integer_data_is_exact[mma-300-1000-128-l2-bf16]"
  "tests/gpu/test_knn_cuda.py::test_small_warp_cut_backs_equal_the_block_ones[130-20000-16-100-fp32-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_native_writes_every_output_and_nothing_else[fused-split-single-3-20000-8-50-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_shared_thresholds_equal_the_split_ones[130-20000-16-100-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_tree_merge_equals_the_single_one[130-20000-16-100-l2]"
  "tests/gpu/test_knn_cuda.py::test_small_large_k_plan_equals_the_rule_plan[130-20000-16-1000-l2]"
)
MEMCHECK_SELECTION="small and (single_query_scan or few_query_splits or fused_finish_equals or early_norms_equal or shared_thresholds_equal or tree_merge_equals or warp_cut_backs_equal or float_thresholds_equal or fitted_plan or large_k_plan or opt_ins_on_integer or (native_writes and (fused or shared or tree) and not (fused and (shared or tree)) and not (shared and tree)))"

# The row check's kernel (csrc/cuda/norms.cu, the default since run 12;
# tests/gpu/test_row_check_cuda.py): memcheck runs its tests of the kernel itself (not those
# of the searches and the index over it) first in the new kernels' part, at most
# GPU_RUN_SANITIZER_ROW_CHECK_SECONDS (default 40 s); racecheck has nothing to check there
# (the kernel uses no shared memory). GPU_RUN_SANITIZER_ROW_CHECK=0 leaves it out.
ROW_CHECK_TESTS=tests/gpu/test_row_check_cuda.py
MEMCHECK_ROW_CHECK_SELECTION="not knn_refuses and not index_"

# DeepMmaTile (csrc/cuda/knn_deep_tile.cuh, the default tensor-core tile since run 12, whose
# racecheck reached one of these two; tests/gpu/test_knn_deep_tile.py): cp.async copies into a landing buffer and a
# double-buffered rounded tile in dynamic shared memory. memcheck runs some of its tests (the
# copies' sources, zero-filled edges, the dynamic shared memory's bounds) after the row
# check's; racecheck runs two first in the new kernels' part: float32 rows landed and rounded
# over two steps with a partial query tile, and 16-bit rows copied straight into the rounded
# tile. Each at most GPU_RUN_SANITIZER_DEEP_TILE_SECONDS (default 40 s);
# GPU_RUN_SANITIZER_DEEP_TILE=0 leaves them out. tests/test_gpu_run_script.py checks that these
# collect.
DEEP_TILE_TESTS=tests/gpu/test_knn_deep_tile.py
MEMCHECK_DEEP_TILE_SELECTION="128-4096-128-10 or 150-3000-40-9 or half_index or falls_back or opt_in_family"
RACECHECK_DEEP_TILE_TESTS=(
  "tests/gpu/test_knn_deep_tile.py::test_small_deep_tile_equals_mma_tile[130-3000-36-5-fp32-bf16]"
  "tests/gpu/test_knn_deep_tile.py::test_small_deep_tile_equals_mma_tile[300-5000-64-20-bf16-bf16]"
)

# The pipelined deep tile and the resident-queries tile (csrc/cuda/knn_pipelined_tile.cuh,
# knn_resident_tile.cuh; opt-in, new and not yet run on a GPU; tests/gpu/
# test_knn_pipelined_tile.py): the next tile's first step and norms copied by cp.async between
# tiles, into buffers the current tile has finished with (and the resident tile's queries
# loaded through the database's landing chunks before the first), so their hazards are the
# ones to look for. Both tools run it first in the new kernels' part: memcheck a
# selection (the copies' sources and zero-filled edges, the norm buffers, 16-bit rows, the
# fallbacks, integer data against the CPU), racecheck first four searches sized for it (one
# setting, 128 queries over one split of 9 tiles of 3 steps each, an odd count: the rounded
# buffers alternate across tiles; lists cut back every few tiles), each tile with bf16 rows
# copied straight into the rounded tile and with float32 rows landed and rounded, then larger ones
# if time is left (run 12's racecheck got through one deep tile test of 6 searches over
# 3,000 rows in its 40 s). Each at most
# GPU_RUN_SANITIZER_PIPELINED_TILE_SECONDS (default 60 s); GPU_RUN_SANITIZER_PIPELINED_TILE=0
# leaves it out. tests/test_gpu_run_script.py checks that these collect.
PIPELINED_TILE_TESTS=tests/gpu/test_knn_pipelined_tile.py
MEMCHECK_PIPELINED_TILE_SELECTION="integer_data or falls_back or 128-4096-128-10-fp32-bf16 or 140-6000-72-12-bf16-bf16 or short_and_long or half_index"
RACECHECK_PIPELINED_TILE_TESTS=(
  "tests/gpu/test_knn_pipelined_tile.py::test_small_pipelined_tile_integer_data_is_exact[pipelined-bf16-l2]"
  "tests/gpu/test_knn_pipelined_tile.py::test_small_pipelined_tile_integer_data_is_exact[resident-fp32-l2]"
  "tests/gpu/test_knn_pipelined_tile.py::test_small_pipelined_tile_integer_data_is_exact[pipelined-fp32-l2]"
  "tests/gpu/test_knn_pipelined_tile.py::test_small_pipelined_tile_integer_data_is_exact[resident-bf16-l2]"
  "tests/gpu/test_knn_pipelined_tile.py::test_small_pipelined_tile_equals_deep_tile[140-6000-72-12-bf16-bf16]"
  "tests/gpu/test_knn_pipelined_tile.py::test_small_pipelined_tile_equals_deep_tile[150-3000-40-9-fp32-bf16]"
  "tests/gpu/test_knn_pipelined_tile.py::test_small_pipelined_tile_cuts_lists_back_mid_split[1-bf16]"
)

# sanitizer_runs PART TOOL: sets $runs to PART's (new, knn) pytest runs under TOOL, each as
# NAME LIMIT COUNT ARGS... (LIMIT 0: none of its own, only the stage's), and $described to
# a line naming them.
sanitizer_runs() {
  local part=$1 tool=$2 args
  runs=() described=""
  if [ "$part" = new ] && [ "${GPU_RUN_SANITIZER_PIPELINED_TILE:-1}" != 0 ]; then
    if [ "$tool" = memcheck ]; then
      args=(-k "$MEMCHECK_PIPELINED_TILE_SELECTION" "$PIPELINED_TILE_TESTS")
    else
      args=("${RACECHECK_PIPELINED_TILE_TESTS[@]}")
    fi
    runs+=(pipelined-tile "${GPU_RUN_SANITIZER_PIPELINED_TILE_SECONDS:-60}" "${#args[@]}" "${args[@]}")
    described="pipelined tile: pytest ${args[*]}"
  fi
  if [ "$part" = new ] && [ "$tool" = memcheck ] && [ "${GPU_RUN_SANITIZER_ROW_CHECK:-1}" != 0 ]; then
    args=(-k "$MEMCHECK_ROW_CHECK_SELECTION" "$ROW_CHECK_TESTS")
    runs+=(row-check "${GPU_RUN_SANITIZER_ROW_CHECK_SECONDS:-40}" "${#args[@]}" "${args[@]}")
    described+="${described:+; then }row check: pytest ${args[*]}"
  fi
  if [ "$part" = new ] && [ "${GPU_RUN_SANITIZER_DEEP_TILE:-1}" != 0 ]; then
    if [ "$tool" = memcheck ]; then
      args=(-k "$MEMCHECK_DEEP_TILE_SELECTION" "$DEEP_TILE_TESTS")
    else
      args=("${RACECHECK_DEEP_TILE_TESTS[@]}")
    fi
    runs+=(deep-tile "${GPU_RUN_SANITIZER_DEEP_TILE_SECONDS:-40}" "${#args[@]}" "${args[@]}")
    described+="${described:+; then }deep tile: pytest ${args[*]}"
  fi
  if [ "$part" = new ] && [ "${GPU_RUN_SANITIZER_LOSSES:-1}" != 0 ]; then
    if [ "$tool" = memcheck ]; then
      args=(-k "${GPU_RUN_MEMCHECK_LOSS_TESTS:-$MEMCHECK_LOSS_SELECTION}" tests/gpu/test_losses_cuda.py)
    else
      args=("${RACECHECK_LOSS_TESTS[@]}")
    fi
    runs+=(losses 0 "${#args[@]}" "${args[@]}")
    described+="${described:+; then }losses: pytest ${args[*]}"
  fi
  if [ "$part" = new ] && [ "${GPU_RUN_SANITIZER_ENCODER:-1}" != 0 ]; then
    if [ ! -f "$ENCODER_TESTS" ]; then
      echo "($tool: $ENCODER_TESTS not found, the encoder's tests left out)"
      return
    elif [ "$tool" = memcheck ]; then
      args=(--maxfail=3 -k "${GPU_RUN_MEMCHECK_ENCODER_TESTS:-$MEMCHECK_ENCODER_SELECTION}" "$ENCODER_TESTS")
    elif [ -n "${GPU_RUN_RACECHECK_ENCODER_TESTS:-}" ]; then
      args=(-k "$GPU_RUN_RACECHECK_ENCODER_TESTS" "$ENCODER_TESTS")
    else
      args=("${RACECHECK_ENCODER_TESTS[@]}")
    fi
    runs+=(encoder "${GPU_RUN_SANITIZER_ENCODER_SECONDS:-60}" "${#args[@]}" "${args[@]}")
    described+="${described:+; then }encoder: pytest ${args[*]}"
  fi
  if [ "$part" = knn ]; then
    if [ "$tool" = memcheck ]; then
      args=(-k "${GPU_RUN_MEMCHECK_TESTS:-$MEMCHECK_SELECTION}" tests/gpu/test_knn_cuda.py)
    elif [ -n "${GPU_RUN_RACECHECK_TESTS:-}" ]; then
      args=(-k "$GPU_RUN_RACECHECK_TESTS" tests/gpu/test_knn_cuda.py)
    else
      args=("${RACECHECK_TESTS[@]}")
    fi
    runs+=(kNN 0 "${#args[@]}" "${args[@]}") described="kNN: pytest ${args[*]}"
  fi
}

# A tool's exit status over the call's sanitizer stages, as when they were one: its first
# sanitizer error (99), else its first other failure. Folded into the call's status at the end.
declare -A sanitizer_exit=([memcheck]=0 [racecheck]=0)
sanitizer_logs_started=0
worse_sanitizer_exit() {
  if [ "$1" -eq 99 ] || [ "$2" -eq 99 ]; then echo 99; elif [ "$1" -ne 0 ]; then echo "$1"; else echo "$2"; fi
}

# run_sanitizer PART LABEL LIMIT: PART's runs under both tools at once, within LIMIT (capped by
# the deadline). Each tool runs in its own session (setsid), and a watchdog kills the whole
# session at the limit: in runs 5 and 6 the stage outlived its limit until the device call's
# own time limit (timeout alone did not end it, cause not found), so nothing after it ran.
run_sanitizer() {
  local part=$1 label=$2 tool pid code start pids=() launched=()
  local -A from=()  # each log's length before this part: its summary lines are this part's
  if [ -z "$SANITIZER" ]; then
    echo "== compute-sanitizer ($label): not found, skipped"
    return
  fi
  within_deadline "compute-sanitizer ($label)" "$3" || return
  if [ "$sanitizer_logs_started" = 0 ]; then  # this call's logs, not an earlier call's
    for tool in memcheck racecheck; do : > "${OUT:-.}/sanitizer_$tool.log"; done
    sanitizer_logs_started=1
  fi
  start=$(date +%s)
  for tool in memcheck racecheck; do
    sanitizer_runs "$part" "$tool"
    if [ "${#runs[@]}" -eq 0 ]; then
      echo "== compute-sanitizer --tool $tool ($label): nothing to run"
      continue
    fi
    echo "== compute-sanitizer --tool $tool, $label part ($described), log: sanitizer_$tool.log"
    from[$tool]=$(wc -l < "${OUT:-.}/sanitizer_$tool.log")
    rm -f "/tmp/sanitizer_$tool.exit"
    # The runs one after another under the tool, each "NAME LIMIT COUNT ARGS..." (a LIMIT is a
    # timeout of the run's own); the exit file gets the first sanitizer error (99) of the
    # runs, else their first other failure.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 setsid bash -c 'sanitizer=$1 tool=$2 log=$3; shift 3
      run() {
        "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 "$@"
      }
      code=0
      {
        while [ "$#" -gt 0 ]; do
          name=$1 limit=$2 count=$3; shift 3
          if [ "$limit" -gt 0 ]; then
            echo "---- $name: pytest ${*:1:count} (at most $limit s)"
            # SIGINT first: pytest stops and prints its summary; the tool then exits with 124.
            run timeout -s INT -k 10 "$limit" python3 -m pytest -q -p no:cacheprovider -m cuda "${@:1:count}"
            exit_code=$?
            echo "---- $name exit $exit_code (124 or 137: stopped at its limit)"
          else
            echo "---- $name: pytest ${*:1:count}"
            run python3 -m pytest -q -p no:cacheprovider -m cuda "${@:1:count}"
            exit_code=$?
            echo "---- $name exit $exit_code"
          fi
          shift "$count"
          if [ "$exit_code" -eq 99 ]; then code=99; elif [ "$code" -eq 0 ]; then code=$exit_code; fi
        done
      } >> "$log" 2>&1
      echo "$code" > "/tmp/sanitizer_$tool.exit"' \
      _ "$SANITIZER" "$tool" "${OUT:-.}/sanitizer_$tool.log" "${runs[@]}" &
    pids+=("$!") launched+=("$tool")
  done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 1; done
    # setsid made the tool's process the leader of its own session: end all of that session.
    pkill -KILL -s "$pid" 2>/dev/null || kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  for tool in "${launched[@]}"; do
    code=$(cat "/tmp/sanitizer_$tool.exit" 2>/dev/null || echo 124)
    tail -n "+$(( ${from[$tool]} + 1 ))" "${OUT:-.}/sanitizer_$tool.log" \
      | grep -E "^---- (losses|encoder|kNN) exit|ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|error" | tail -16
    echo "$tool exit $code ($label; 0: clean; 99: sanitizer errors; 124: stopped at the ${limit} s limit)"
    sanitizer_exit[$tool]=$(worse_sanitizer_exit "${sanitizer_exit[$tool]}" "$code")
  done
  echo "sanitizer seconds ($label): $(( $(date +%s) - start ))"
}

# Stages, each under its own time limit so that one overrun cannot eat the session's device
# time, in the order of what a GPU run still owes (docs/gpu-runs.md, "Owed"): tests (the
# whole suite, under run 12's new defaults: the deep tile, the row check kernel); losses (the
# GPU losses benchmark: its small cells to time again); bench (the kNN benchmarks: the q1
# cells with one query's whole waves, the new defaults against "[mma tile]" and "[torch
# check]"); then sanitizer_knn (the kNN tests under compute-sanitizer: memcheck reached about
# 150 of its selection in run 12, racecheck 6 of its list), the stage issue 6 still needs
# most of; and what ran clean or complete in run 12 last: encode (the GPU encoder benchmark),
# sanitizer_new (the row check's and the deep tile's tests, then the losses' and the
# encoder's) and profile (every section); then ncu (Nsight Compute over the kNN scan at the
# missed bars' shapes, with the warps' stall reasons since run 12), with what is left.
# The stage blocks below are in that order: it is the order they run in, whatever
# GPU_RUN_STAGES's order.
# Measured on an H200 (2026-11-27, run 10, one call of 600 s, GPU_RUN_DEADLINE_SECONDS=585):
# build 101 s, tests 82 s (1427 tests, 6 xdist workers), losses 13 s, encode 14 s,
# sanitizer_new 37 s, profile 93 s, bench 126 s (four processes), sanitizer_knn the 82 s left;
# the machine's start and the transfers about 40 s more. In this order one such call gives
# sanitizer_knn its whole 150 s (about 325 s before it, 475 s after), then encode and
# sanitizer_new (about 525 s), and the profile what is left (about 50 s of its 150).
# Two calls on the same warm machine cover every stage with its whole limit, the second right
# after the first (an idle machine is handed back after about 30 s; docs/gpu-runs.md):
#   GPU_RUN_STAGES="tests losses bench sanitizer_knn" bash benchmarks/gpu_run.sh
#   GPU_RUN_BUILD=0 GPU_RUN_STAGES="encode sanitizer_new profile ncu" bash benchmarks/gpu_run.sh
# GPU_RUN_STAGES picks some stages; all eight by default; "sanitizer" (one stage before this
# split) names both sanitizer parts. Each stage's limit is also capped by the call's deadline
# (GPU_RUN_DEADLINE_SECONDS, above), so no limit need be fitted by hand.
STAGES="${GPU_RUN_STAGES:-tests losses bench sanitizer_knn encode sanitizer_new profile ncu}"
STAGES=" $STAGES "
STAGES="${STAGES// sanitizer / sanitizer_new sanitizer_knn }"
status=0

if [[ " $STAGES " == *" tests "* ]] && within_deadline tests "${GPU_RUN_TEST_SECONDS:-200}"; then
  # Every GPU test file marks its tests "cuda" (tests/gpu/, the CUDA encoder's
  # test_encode_cuda_native.py included: tests/test_gpu_run_script.py checks that -m cuda takes
  # all of that file).
  echo "== pytest -m cuda (full output: pytest_cuda.log)"
  start=$(date +%s)
  # pytest-xdist, where installed, spreads the tests' float64 CPU references over the cores.
  workers=""
  python3 -c "import xdist" 2>/dev/null && workers="-n ${GPU_RUN_WORKERS:-6}"
  timeout -s INT -k 10 "$limit" python3 -m pytest -m cuda -q -rfEs --tb=short $workers tests \
    > "${OUT:-.}/pytest_cuda.log" 2>&1
  status=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "${OUT:-.}/pytest_cuda.log" | head -40
  echo "pytest seconds: $(( $(date +%s) - start )) (exit $status; 124: timed out)"
fi

if [[ " $STAGES " == *" losses "* ]] && within_deadline "losses benchmark" "${GPU_RUN_LOSSES_BENCH_SECONDS:-90}"; then
  # The fused losses' kernels (csrc/cuda/losses.cu) against torch's ops and a copy of the same
  # bytes: benchmarks/bench_losses_cuda.py. (Until the fifteenth session its JSON went to $OUT
  # as losses_cuda.json; it is in gpu_bench_json.tar.gz now, which left room for the encoder's.)
  run_gpu_benchmark losses benchmarks/bench_losses_cuda.py losses_cuda.json benchmarks/report_losses_cuda.py
fi

if [[ " $STAGES " == *" bench "* ]]; then
  echo "== GPU benchmarks"
  # The kNN benchmarks (the losses and encoder benchmarks have their own stages, above, and reports).
  gpu_benchmarks=$(ls benchmarks/bench_*cuda*.py benchmarks/bench_*gpu*.py 2>/dev/null | grep -vE "bench_(losses|encode)_cuda.py" || true)
  if [ -n "$gpu_benchmarks" ]; then
    # Four runs, each with its own JSON (pytest-benchmark writes it as the run ends: a run
    # stopped at its limit writes its finished benchmarks, one killed none or an empty file,
    # which the report names and skips): the plain peers (torch's, the defaults', the roofs);
    # the peers that name a setting (an opt-in's kernel that faults would leave its
    # process's CUDA context unusable: apart, it cannot take the plain figures with it); the
    # large-k cells (the slowest), plain and with settings apart too. The JSONs go to this
    # call's folder and, after each run, into the archive in $OUT (above).
    started=()  # every part's JSON path, written or not: the report names one with no results
    for part in plain opt-ins large_k_plain large_k_opt-ins; do
      case $part in
        plain) selection="not large_k"; part_limit="${GPU_RUN_BENCH_SECONDS:-90}" ;;
        opt-ins) selection="not large_k"; part_limit="${GPU_RUN_OPT_IN_BENCH_SECONDS:-110}" ;;
        large_k_plain) selection="large_k"; part_limit="${GPU_RUN_LARGE_K_SECONDS:-45}" ;;  # (45 since k = 65,536 joined)
        large_k_opt-ins) selection="large_k"; part_limit="${GPU_RUN_LARGE_K_OPT_IN_SECONDS:-55}" ;;
      esac
      within_deadline "benchmark ($part)" "$part_limit" || continue
      started+=("$BENCH_JSON/gpu_bench_$part.json")
      bench_part=${part#large_k_}
      start=$(date +%s)
      # One log for the four parts: the device tool brings back at most 8 files from $OUT.
      echo "==== part $part" >> "${OUT:-.}/gpu_bench.log"
      LATENTSPACE_BENCH_PART=$bench_part timeout -s INT -k 10 "$limit" python3 -m pytest $gpu_benchmarks -q -rfE \
        --tb=short -k "$selection" --benchmark-json="$BENCH_JSON/gpu_bench_$part.json" > "/tmp/gpu_bench_$part.log" 2>&1
      code=$?
      archive_bench_json
      cat "/tmp/gpu_bench_$part.log" >> "${OUT:-.}/gpu_bench.log"
      grep -E "^(FAILED|ERROR)|passed|failed|Error" "/tmp/gpu_bench_$part.log" | head -20
      echo "benchmark ($part) seconds: $(( $(date +%s) - start )) (exit $code; 124: timed out; full output: gpu_bench.log)"
    done
    # Every part that started, not only the JSONs that exist: a part killed past its limit
    # writes none, and the report must not read as the whole run without it.
    [ "${#started[@]}" -gt 0 ] && python3 benchmarks/report_knn_cuda.py "${started[@]}"
  else
    echo "no GPU benchmarks yet"
  fi
fi

if [[ " $STAGES " == *" sanitizer_knn "* ]]; then
  # The small kNN tests under memcheck and racecheck, after the kNN benchmarks, under their
  # whole limit in one 600 s call (run 10 gave them the 82 s its deadline left).
  run_sanitizer knn kNN "${GPU_RUN_SANITIZER_SECONDS:-150}"
fi

if [[ " $STAGES " == *" encode "* ]] && within_deadline "encode benchmark" "${GPU_RUN_ENCODE_BENCH_SECONDS:-75}"; then
  # The CUDA encoder (csrc/cuda/encode.cu, Encoder with LATENTSPACE_CUDA_ENCODER=native)
  # against the model's torch code on the GPU, fp32 and bf16, and a copy of the PCA input:
  # benchmarks/bench_encode_cuda.py (33 benchmarks, estimated 20-40 s), its report the
  # figures that decide LATENTSPACE_CUDA_ENCODER's default. A stage of its own rather than a
  # second run in the losses stage: its own limit and deadline line, and either can run alone
  # (GPU_RUN_STAGES) on a call short of time.
  run_gpu_benchmark encode benchmarks/bench_encode_cuda.py encode_cuda.json benchmarks/report_encode_cuda.py
fi

if [[ " $STAGES " == *" sanitizer_new "* ]]; then
  # The losses' and the encoder's tests under memcheck and racecheck (clean in run 10: 0
  # errors, no hazard), before the profile: the losses' runs, then the encoder's under its own 60 s.
  run_sanitizer new "new kernels" "${GPU_RUN_SANITIZER_NEW_SECONDS:-120}"
fi

if [[ " $STAGES " == *" profile "* ]] && within_deadline profile "${GPU_RUN_PROFILE_SECONDS:-150}"; then
  # Where a search's time goes (scan / merge / sort kernels; a single query's host steps; the
  # split rule against the search time; the defaults against their opt-outs; one query's scan
  # against one read of the database): benchmarks/profile_knn_cuda.py, 93 s with every section
  # in run 10 (its "q1sweep", 21 settings of one query over 1M rows, included). One JSON,
  # rewritten as each section ends; last, with what the deadline leaves.
  echo "== profile (benchmarks/profile_knn_cuda.py, json: profile_knn_cuda.json)"
  start=$(date +%s)
  # (SIGINT: the section it stops keeps what it had measured, as the sections before it)
  timeout -s INT -k 10 "$limit" python3 -u benchmarks/profile_knn_cuda.py "${OUT:-.}/profile_knn_cuda.json"
  code=$?
  echo "profile seconds: $(( $(date +%s) - start )) (exit $code)"
fi

# Nsight Compute over the kNN scan at the shapes of issue 6's missed bars (benchmarks/
# ncu_knn_cuda.py: bf16 at Q = 10,000 x 1M x 128, k = 10, and faiss #3045's, each on the
# default tensor-core tile (staged by cp.async since GPU run 12), on the pipelined deep tile
# (opt-in; bf16 also on the resident-queries tile) and on MmaTile; fp32 at k = 10 and 1024: in that order, so that a stage cut short
# keeps the tensor-core shapes), one process
# each, the first scan launch of each: where the scan's time goes (throughput against the
# chip's, warp stalls, occupancy, pipes, spills), which torch.profiler's kernel times cannot
# say. First run in run 12: 61 s for the six shapes (--clock-control none: the card's clocks
# are left as they are). Diagnostic: its exit status is not the call's. GPU_RUN_NCU_SHAPES:
# other shapes, in order.
NCU_SECTIONS=(SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats ComputeWorkloadAnalysis
  MemoryWorkloadAnalysis)
# Why warps wait (cycles a warp is stalled for each reason, per instruction issued): run 12's
# sections printed the warp states' sums only (0.45-0.52 eligible warps a scheduler in the
# tensor-core scans), and PC sampling, which names the reasons in the source view, was not
# available on the lent machine.
NCU_STALL_METRICS='regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$'
if [[ " $STAGES " == *" ncu "* ]] && within_deadline ncu "${GPU_RUN_NCU_SECONDS:-150}"; then
  # (on PATH, else CUDA's, else the newest Nsight Compute installed)
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null ||
        ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$NCU" ]; then
    echo "== ncu: not found, skipped"
  else
    echo "== ncu ($NCU over benchmarks/ncu_knn_cuda.py's scans, report: ncu_knn.txt)"
    start=$(date +%s)
    : > "${OUT:-.}/ncu_knn.txt"
    # (the first scan launch of a shape, every section: both calls below take these)
    ncu_options=(--clock-control none --kernel-name-base function
      --kernel-name "regex:^(row_|pipelined_)?scan_kernel"
      --launch-count 1)
    for section in "${NCU_SECTIONS[@]}"; do ncu_options+=(--section "$section"); done
    for shape in ${GPU_RUN_NCU_SHAPES:-bf16 bf16_pipelined bf16_resident faiss3045 faiss3045_pipelined bf16_mma \
                   faiss3045_mma fp32 k1024}; do
      left=$(( limit - ($(date +%s) - start) ))
      if [ "$left" -lt 10 ]; then
        echo "ncu $shape: skipped, ${left} s of the stage's limit left"
        continue
      fi
      echo "---- ncu $shape" >> "${OUT:-.}/ncu_knn.txt"
      # (into the report as it comes, and a copy to look for a refusal of the metrics in)
      shape_log=$(mktemp)
      timeout -k 5 "$left" "$NCU" "${ncu_options[@]}" --metrics "$NCU_STALL_METRICS" \
        python3 -u benchmarks/ncu_knn_cuda.py "$shape" 2>&1 | tee -a "${OUT:-.}/ncu_knn.txt" > "$shape_log"
      code=${PIPESTATUS[0]}
      echo "ncu $shape exit $code (124 or 137: stopped at the stage's limit)"
      left=$(( limit - ($(date +%s) - start) ))
      if grep -qi "^==ERROR==.*metric" "$shape_log" && [ "$left" -ge 10 ]; then
        # (an ncu that refused the stall metrics: the sections alone, as run 12 had them; not
        # for other errors, the program's own failure or the counters' permission, which the
        # same call without the metrics would meet again)
        echo "---- ncu $shape, sections only" >> "${OUT:-.}/ncu_knn.txt"
        timeout -k 5 "$left" "$NCU" "${ncu_options[@]}" \
          python3 -u benchmarks/ncu_knn_cuda.py "$shape" >> "${OUT:-.}/ncu_knn.txt" 2>&1
        echo "ncu $shape, sections only, exit $?"
      fi
      rm -f "$shape_log"
    done
    echo "ncu seconds: $(( $(date +%s) - start ))"
  fi
fi

for tool in memcheck racecheck; do
  code=${sanitizer_exit[$tool]}
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
done
echo "== done (exit $status)"
exit "$status"
