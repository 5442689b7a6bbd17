"""benchmarks/gpu_run.sh, the one script a GPU session runs: checked here, where there is no GPU,
so that a renamed test or a shell error does not waste the session's few minutes of device time."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"


def _racecheck_tests() -> list[str]:
    text = SCRIPT.read_text()
    block = re.search(r"RACECHECK_TESTS=\(\n(.*?)\n\s*\)", text, re.S)
    assert block, "gpu_run.sh lost its RACECHECK_TESTS list"
    return re.findall(r'"([^"]+)"', block.group(1))


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
    for test in ("fused_finish_equals", "early_norms_equal", "shared_thresholds_equal", "tree_merge_equals",
                 "warp_cut_backs_equal", "fitted_plan_equals", "fitted_plan_fits", "opt_ins_on_integer"):
        assert any(test in node for node in collected), test
    assert 100 < len(collected) < 300  # about two minutes under memcheck, not all of them


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
