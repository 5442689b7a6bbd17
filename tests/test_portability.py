"""The wheel must run on any x86-64 CPU: no -march=native, and no AVX-512 or AVX2 code
reachable on a CPU without it (e.g. an inline function compiled in the AVX-512 translation
unit and picked by the linker for the portable path).

Checked by running the package under qemu-user emulating older CPUs (Nehalem: SSE4.2 only;
Haswell: AVX2 + FMA, no AVX-512). Skipped where qemu-x86_64 is not installed (.ci/run
installs it).
"""

import os
import shutil
import subprocess
import sys

import pytest

QEMU = shutil.which("qemu-x86_64")

SCRIPT = r"""
import numpy as np, latentspace as ls
print(ls.simd_level())
rng = np.random.default_rng(0)
x = rng.standard_normal((300, 37)).astype(np.float32)
for metric in ("l2", "ip", "cosine"):
    for q in (x[:1], x[:3], x[:40]):                      # row path and packed path
        d, i = ls.knn(q, x, 5, metric)
        if metric != "ip":
            assert (i[:, 0] == np.arange(len(q))).all(), (metric, i[:, 0])
index = ls.FlatIndex(37)
index.add(x)
d, i = index.search(x[:7], 3)
assert (i[:, 0] == np.arange(7)).all()
print("ok")
"""


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian package qemu-user) is not installed")
@pytest.mark.parametrize("cpu, expected_level", [("Nehalem", "scalar"), ("Haswell", "avx2")])
def test_runs_on_older_cpu(cpu, expected_level):
    # numpy's OpenBLAS detects its CPU itself, and under qemu-user (7.2, Debian 12) it takes
    # the Nehalem model for a Haswell and dies on an AVX2 instruction inside `import numpy`
    # (OPENBLAS_VERBOSE=2 says "Core: Haswell"), before latentspace is loaded: name the core.
    env = {**os.environ, "OPENBLAS_CORETYPE": cpu}
    result = subprocess.run(
        [QEMU, "-cpu", cpu, sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split()
    assert lines[0] == expected_level
    assert lines[-1] == "ok"
