#!/usr/bin/env bash
# Builds, on the CPU machine, the wheel a GPU session's device call installs instead of
# building there (90-100 s of its 15 minutes of device time in runs 8-12): Python 3.12 and
# sm_90, as on the device image and the H100 / H200. Writes .prebuilt/ (ignored by git): the
# wheel and BUILD_INFO.json, the digest of the sources it was built from
# (benchmarks/prebuilt_wheel.py). Then the device call names the folder in `carry`:
#   run(command="GPU_RUN_DEADLINE_SECONDS=585 bash benchmarks/gpu_run.sh", carry=[".prebuilt"])
# and gpu_run.sh installs the wheel where its digest matches the tree sent (else it builds).
# Usage, from anywhere: bash benchmarks/gpu_prebuild.sh   (372 s on 2 cores from a clean build
# folder; later builds are incremental, in build/cp312-cp312-linux_x86_64)
# Settings: GPU_PREBUILD_PYTHON (a Python 3.12; default: python3.12, else pyenv's),
# GPU_PREBUILD_VENV (its build environment; default ~/.cache/latentspace-prebuild-py312),
# LATENTSPACE_CUDA_ARCHITECTURES (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${GPU_PREBUILD_PYTHON:-}
if [ -z "$python" ]; then
  if python3.12 -c "" 2>/dev/null; then
    python=python3.12
  else
    python=$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
  fi
fi
if [ -z "$python" ] || ! "$python" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then
  echo "gpu_prebuild: no Python 3.12 found (the device image's); name one in GPU_PREBUILD_PYTHON" >&2
  exit 1
fi

venv=${GPU_PREBUILD_VENV:-$HOME/.cache/latentspace-prebuild-py312}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q pybind11 scikit-build-core cmake ninja
fi

digest=$("$venv/bin/python" benchmarks/prebuilt_wheel.py digest)
rm -rf .prebuilt
mkdir .prebuilt
start=$(date +%s)
LATENTSPACE_CUDA_ARCHITECTURES="${LATENTSPACE_CUDA_ARCHITECTURES:-90}" \
  "$venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w .prebuilt .
"$venv/bin/python" benchmarks/prebuilt_wheel.py record .prebuilt --digest "$digest"
echo "gpu_prebuild: $(ls .prebuilt/*.whl) in $(( $(date +%s) - start )) s," \
  "$(du -m .prebuilt/*.whl | cut -f1) MiB (sources $digest)"
