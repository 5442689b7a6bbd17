#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build, run the CUDA tests and the GPU
# benchmarks, and write everything to one log. Usage, from the repository root:
#   bash benchmarks/gpu_run.sh            # log in $OUT (device tool) or ./gpu_run.log
# The device image has no internet: build without isolation, with what it ships.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_run.log"
exec > >(tee "$LOG") 2>&1

echo "== gpu_run $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -1

echo "== build"
start=$(date +%s)
pip install --no-build-isolation --no-deps . 2>&1 | tail -3 || { echo "BUILD FAILED"; exit 1; }
echo "build seconds: $(( $(date +%s) - start ))"
python -m latentspace info

echo "== pytest -m cuda"
python -m pytest -m cuda -q -rs tests 2>&1 | tail -20
status=${PIPESTATUS[0]}

echo "== GPU benchmarks"
gpu_benchmarks=$(ls benchmarks/bench_*cuda*.py benchmarks/bench_*gpu*.py 2>/dev/null || true)
if [ -n "$gpu_benchmarks" ]; then
  python -m pytest $gpu_benchmarks -q --benchmark-json="${OUT:-.}/gpu_bench.json" 2>&1 | tail -40
else
  echo "no GPU benchmarks yet"
fi
echo "== done (pytest exit $status)"
exit "$status"
