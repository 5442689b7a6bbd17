"""The `latentspace` command line (run as `python -m latentspace`, as a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import latentspace


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("LATENTSPACE_SIMD", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "latentspace", *args], capture_output=True,
                          text=True, timeout=180, env=full_env)


def test_info():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"latentspace {latentspace.__version__}" in out
    info = latentspace.build_info()
    assert info["hardware_simd_level"] in out
    assert "SIMD level" in out and "threads" in out.lower() and "CUDA" in out


def test_info_json():
    result = _cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    expected = latentspace.build_info()
    assert set(info) == set(expected)
    assert info["version"] == latentspace.__version__
    assert info["hardware_simd_level"] == expected["hardware_simd_level"]
    assert info["cuda_compiled"] == expected["cuda_compiled"]
    assert info["cuda_architectures"] == expected["cuda_architectures"]
    assert info["gpu_visible"] == expected["gpu_visible"]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


def test_info_json_reflects_environment():
    result = _cli("info", "--json", env={"LATENTSPACE_SIMD": "scalar", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["simd_level"] == "scalar"
    assert info["num_threads"] == 1


@pytest.mark.skipif(shutil.which("latentspace") is None, reason="console script not on PATH")
def test_console_script_info_json():
    result = subprocess.run(["latentspace", "info", "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == latentspace.__version__


def test_demo():
    result = _cli("demo", "--examples", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    match = re.search(r"(\d+)-NN label agreement in pixel space: ([0-9.]+)", out)
    assert match, out
    assert int(match.group(1)) == 10
    assert float(match.group(2)) > 0.9
    # one example digit with its neighbours and their labels
    queries = re.findall(r"digit #(\d+) \(label (\d)\) and its (\d+) nearest neighbours", out)
    assert len(queries) == 1, out
    neighbour_labels = re.findall(r"#\d+ label (\d)", out)
    assert len(neighbour_labels) == int(queries[0][2]) == 4
    assert all(0 <= int(label) <= 9 for label in neighbour_labels)
    assert "d=" in out
    assert "1,797" in out


def test_demo_options():
    result = _cli("demo", "--examples", "2", "-k", "3", "--show", "2", "--seed", "5",
                  "--threads", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"3-NN label agreement in pixel space: 0\.9\d\d", out), out
    assert "1 threads" in out
    assert len(re.findall(r"digit #\d+ \(label \d\)", out)) == 2
    assert len(re.findall(r"#\d+ label \d", out)) == 4


def test_demo_bad_threads_reports_error():
    result = _cli("demo", "--threads", "0")
    assert result.returncode == 2
    assert "error" in result.stderr and "n: expected an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors():
    result = _cli()
    assert result.returncode == 2
    assert "usage" in result.stderr.lower()
    result = _cli("frobnicate")
    assert result.returncode == 2
