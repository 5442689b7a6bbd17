"""Batched MLP encoding: latentspace's native encoder against torch's CPU forward, plus the SGEMM
roof, in one session.

Cells: two encoders (nn.Sequential, Linear + ReLU, no activation after the last layer, torch's
default init under a fixed seed) on ROWS = 65,536 rows of uniform [0, 1) float32 inputs:

  784-512-256-32   1,081,344 flops per row (2 * sum of in * out)
  784-128-32         208,896 flops per row

Peers in each cell, at 1 thread and at all cores, back to back at the same thread count:

  latentspace fp32        the native encoder (weights exported once), output into a preallocated array
  latentspace bf16        the same with precision="bf16" (weights and layer inputs rounded to
                          bfloat16, float32 sums); only where the kernel is avx512_bf16
  torch one call          model(x) under torch.inference_mode()
  torch chunk C           model(x[i:i+C]) for C in CHUNKS, copied into a preallocated output

Answers: before a peer is timed, its full output is checked against the float64 forward of
tests/test_encode_kernels.py (fp32: rtol 1e-5, atol 1e-5 * max|ref|; bf16: against the same
forward with the kernel's bf16 rounding, at the unit test's 2e-3, and against the exact forward
within the documented BF16_* bounds). Every timed round writes into a NaN-poisoned output and a
sample of its rows is checked after it; the last round's output is checked in full. The error
against the exact float64 forward (relative Frobenius, max |error| / max |ref|) is recorded
for every peer.

Peak memory: each peer runs once more in a fresh process (this file run as a script), with
input and output allocated and touched and a small warm-up call made; VmHWM is reset
(/proc/self/clear_refs) and read after one full encode. working set = peak - RSS before. glibc's
mmap threshold is pinned there, so buffers of 128 KiB and more freed by the warm-up are not
silently reused; the kernel counts RSS in per-CPU batches (Linux 6.2+: ~128 KiB per CPU), so
working sets under ~0.25 MiB read as noise around zero.

The SGEMM roof (_common.py) is measured before and after the cells; benchmarks/report_encode.py
turns the JSON into tables and applies the issue's bars.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import latentspace
import torch
from _common import SGEMM_LIBRARIES, THREAD_COUNTS, again_after, measure_roof, rounds_for, timed_call
from torch import nn

ROWS = int(os.environ.get("LATENTSPACE_BENCH_ENCODE_ROWS", "65536"))
SHAPES = {"784-512-256-32": (784, 512, 256, 32), "784-128-32": (784, 128, 32)}
CHUNKS = (1024, 2048, 4096, 8192, 16384)
SEED = 20240611
WARMUP_ROWS = 256  # the peak-memory process's warm-up call: threads, BLAS state, no big buffers
MMAP_THRESHOLD = 128 << 10  # glibc's default, fixed (see peak_in_fresh_process)

# fp32 against the float64 forward: relative, with an absolute floor at the output's scale
# (outputs near zero come out of sums that cancel).
FP32_RTOL = 1e-5
# bf16 against the float64 forward with the kernel's rounding (only the summation order
# differs): the unit test's bound.
BF16_ROUNDED_RTOL = 2e-3
# bf16 against the exact float64 forward. bf16 keeps 8 significant bits: each weight and each
# layer input is off by up to 2^-9 relative, which over sums of 784 and 512 terms of mixed sign
# gives a few 1e-3 (measured: 2.5e-3 - 3.3e-3 relative Frobenius, 3e-3 - 5e-3 max error over
# max |ref|). The bounds leave room for other seeds, not for a broken kernel.
BF16_FROBENIUS_BOUND = 1e-2
BF16_MAX_ERROR_BOUND = 2e-2  # max |error| / max |ref|
SAMPLE_STRIDE = 61  # rows checked after each timed round


def has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


# ============================================================================================
# Models, data, reference
# ============================================================================================
@lru_cache(maxsize=None)
def make_model(shape: str) -> nn.Sequential:
    dims = SHAPES[shape]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    torch.random.set_rng_state(generator_state)
    return nn.Sequential(*layers).eval().requires_grad_(False)


@lru_cache(maxsize=1)
def make_input(rows: int = ROWS, dim: int = 784) -> np.ndarray:
    """(rows, 784) float32 uniform in [0, 1), C-contiguous; the same for every shape."""
    return np.random.default_rng(SEED).random((rows, dim), dtype=np.float32)


def layer_arrays(model: nn.Sequential):
    """(weights, biases, activations, activation_params) as the native encoder takes them:
    each Linear is a layer, a ReLU right after it becomes that layer's activation."""
    weights, biases, activations = [], [], []
    for module in model:
        if isinstance(module, nn.Linear):
            weights.append(np.ascontiguousarray(module.weight.detach().numpy(), dtype=np.float32))
            biases.append(None if module.bias is None else module.bias.detach().numpy().astype(np.float32))
            activations.append("identity")
        elif isinstance(module, nn.ReLU) and activations and activations[-1] == "identity":
            activations[-1] = "relu"
        else:
            raise TypeError(f"layer_arrays: unsupported module {module!r}")
    return weights, biases, activations, [0.0] * len(weights)


def _load_test_module():
    """The unit tests' float64 forward is the oracle here too (house style: a benchmark imports
    its reference from the test module)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "test_encode_kernels.py"
    spec = importlib.util.spec_from_file_location("_encode_test_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE_CHUNK = 8192  # the float64 forward chunk by chunk: ~100 MiB of temporaries, not 700


@lru_cache(maxsize=None)
def reference(shape: str, bf16_rounding: bool = False) -> np.ndarray:
    """(ROWS, out) float64 forward of the model; bf16_rounding rounds weights and layer inputs
    to bfloat16 first, as the bf16 kernel does."""
    forward = _load_test_module().reference
    layers = layer_arrays(make_model(shape))
    x = make_input()
    return np.concatenate([
        forward(x[i:i + REFERENCE_CHUNK], *layers, bf16=bf16_rounding) for i in range(0, len(x), REFERENCE_CHUNK)
    ])


@lru_cache(maxsize=None)
def reference_scale(shape: str) -> float:
    """max |ref|: the absolute tolerance is relative to it."""
    return float(np.abs(reference(shape)).max())


def error_vs_exact(shape: str, out: np.ndarray) -> dict:
    """Relative Frobenius error and max |error| / max |ref| against the exact float64 forward."""
    ref = reference(shape)
    error = out.astype(np.float64) - ref
    return {
        "rel_frobenius_error": float(np.linalg.norm(error) / np.linalg.norm(ref)),
        "max_error_of_max": float(np.abs(error).max() / reference_scale(shape)),
    }


def check(shape: str, precision: str, out: np.ndarray, rows=slice(None)) -> None:
    """Raises AssertionError unless out (or out[rows]) is right for the precision."""
    got = out[rows]
    assert np.isfinite(got).all(), f"{shape} {precision}: non-finite outputs"
    if precision == "fp32":
        ref, tolerance = reference(shape)[rows], FP32_RTOL
    else:
        ref, tolerance = reference(shape, bf16_rounding=True)[rows], BF16_ROUNDED_RTOL
    scale = reference_scale(shape)
    np.testing.assert_allclose(got, ref, rtol=tolerance, atol=tolerance * scale, err_msg=f"{shape} {precision}")
    if precision == "bf16" and rows == slice(None):
        errors = error_vs_exact(shape, out)
        assert errors["rel_frobenius_error"] <= BF16_FROBENIUS_BOUND, errors
        assert errors["max_error_of_max"] <= BF16_MAX_ERROR_BOUND, errors


# ============================================================================================
# Peers: each returns the (ROWS, out) float32 output of one call
# ============================================================================================
def latentspace_encode(model: nn.Module, x: np.ndarray, out: np.ndarray, precision: str) -> np.ndarray:
    """latentspace's peer: the public one-shot call, so each timed call includes exporting
    the weights (copy and pack, well under a millisecond here) as a user's call does."""
    return latentspace.encode(model, x, out=out, precision=precision)


def encoder_kernel(model: nn.Module, precision: str) -> str:
    """The native kernel latentspace.encode runs for this model and precision."""
    encoder = latentspace.Encoder(model, precision=precision)
    assert encoder.backend == "native", encoder.reason
    return encoder.kernel


def torch_forward(model: nn.Module, x: torch.Tensor, out: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """model(x) in one call (a new tensor), or chunk by chunk copied into out."""
    with torch.inference_mode():
        if chunk is None:
            return model(x)
        for start in range(0, x.shape[0], chunk):
            out[start:start + chunk].copy_(model(x[start:start + chunk]))
        return out


PEERS = {  # label -> (library, precision, chunk)
    "latentspace fp32": ("latentspace", "fp32", None),
    "latentspace bf16": ("latentspace", "bf16", None),
    "torch one call": ("torch", "fp32", None),
    **{f"torch chunk {c}": ("torch", "fp32", c) for c in CHUNKS},
}


def make_peer(shape: str, label: str, x: np.ndarray, out: np.ndarray):
    """A no-argument callable running one encode of x with the peer; returns its output (numpy)."""
    library, precision, chunk = PEERS[label]
    model = make_model(shape)
    if library == "latentspace":
        return lambda: latentspace_encode(model, x, out, precision)
    x_t, out_t = torch.from_numpy(x), torch.from_numpy(out)
    return lambda: torch_forward(model, x_t, out_t, chunk).numpy()


def skip_reason(label: str, shape: str) -> str | None:
    if PEERS[label][1] != "bf16":
        return None
    kernel = encoder_kernel(make_model(shape), "bf16")
    if kernel != "avx512_bf16":
        return (f"precision='bf16' runs on the '{kernel}' kernel here (the CPU has no AVX512_BF16, "
                f"/proc/cpuinfo flag: {has_avx512_bf16()}): same rounding, no speed-up to measure")
    return None


# ============================================================================================
# Peak memory, in a fresh process
# ============================================================================================
def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure_peak(shape: str, label: str, threads: int, rows: int) -> dict:
    """Run in a fresh process: one encode's peak RSS above the RSS before it (bytes)."""
    torch.set_num_threads(threads)
    latentspace.set_num_threads(threads)
    x = make_input(rows)  # written by the generator: touched
    out = np.zeros((rows, SHAPES[shape][-1]), np.float32)
    out.fill(1.0)  # np.zeros may map untouched zero pages: touch every one
    small_out = np.empty((WARMUP_ROWS, out.shape[1]), np.float32)
    make_peer(shape, label, x[:WARMUP_ROWS], small_out)()  # threads, exported weights, BLAS state
    run = make_peer(shape, label, x, out)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    assert result.shape == out.shape
    return {"rss_before_bytes": before * 1024, "peak_rss_bytes": peak * 1024,
            "working_set_bytes": (peak - before) * 1024}


def peak_in_fresh_process(shape: str, label: str, threads: int) -> dict:
    # A fixed mmap threshold turns off glibc's dynamic one: every block of 128 KiB or more is
    # mapped when allocated and unmapped when freed. Otherwise the warm-up call's freed buffers
    # stay in the heap (RSS before) and the measured call reuses them unseen.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run(
        [sys.executable, __file__, "--peak-memory", shape, label, str(threads), str(ROWS)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    if proc.returncode != 0:
        return {"peak_error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================================================
# Roofs before the cells
# ============================================================================================
SGEMM_ROOFS = [("sgemm", library, t) for library in SGEMM_LIBRARIES for t in THREAD_COUNTS]


@pytest.mark.parametrize("roof,library,threads", SGEMM_ROOFS, ids=lambda v: f"{v}t" if isinstance(v, int) else v)
def test_roof_before(benchmark, roof, library, threads, set_threads, foreign_load):
    """The SGEMM rate (4096^3): the roof of these compute-bound encoders."""
    set_threads(threads)
    measure_roof(benchmark, foreign_load, roof, library, threads, "before")


# ============================================================================================
# The encode benchmarks
# ============================================================================================
# Cell-major order: every peer of a (shape, threads) pair back to back, so they see the same
# machine conditions as nearly as a sequential run allows.
ENCODE_CASES = [
    pytest.param(shape, threads, label, id=f"{shape}-{threads}t-{label.replace(' ', '_')}")
    for shape in SHAPES
    for threads in THREAD_COUNTS
    for label in PEERS
]


@pytest.mark.parametrize("shape,threads,label", ENCODE_CASES)
def test_encode(benchmark, shape, threads, label, set_threads, foreign_load, quiet):
    reason = skip_reason(label, shape)
    if reason:
        pytest.skip(reason)
    library, precision, chunk = PEERS[label]
    dims = SHAPES[shape]
    x = make_input()
    out = np.full((ROWS, dims[-1]), np.nan, np.float32)
    call = make_peer(shape, label, x, out)
    flops_per_row = sum(2 * i * o for i, o in zip(dims[:-1], dims[1:]))
    benchmark.group = f"encode {shape} {threads}t"
    benchmark.extra_info.update(
        kind="encode", shape=shape, dims=list(dims), peer=label, library=library, precision=precision,
        chunk=chunk, threads=threads, rows=ROWS, flops=ROWS * flops_per_row,
        input_bytes=x.nbytes, output_bytes=out.nbytes, verified=False,
    )
    if library == "latentspace":
        benchmark.extra_info["kernel"] = encoder_kernel(make_model(shape), precision)

    set_threads(threads)
    result, seconds = timed_call(call)  # also the warm-up
    check(shape, precision, result)  # wrong before timing: fail, time nothing
    benchmark.extra_info.update(error_vs_exact(shape, result))

    last = [result]

    def poison():  # untimed: a round that writes nothing leaves NaN behind
        out.fill(np.nan)

    def run():
        last[0] = call()

    def check_round():  # untimed: a sample of every timed round's rows
        check(shape, precision, last[0], slice(None, None, SAMPLE_STRIDE))

    benchmark.extra_info["quiet_wait_s"] = quiet()
    with foreign_load:
        benchmark.pedantic(run, setup=poison, teardown=check_round, rounds=rounds_for(seconds), iterations=1,
                           warmup_rounds=1 if seconds < 0.1 else 0)
    benchmark.extra_info["foreign_cpus"] = foreign_load.cpus
    check(shape, precision, last[0])
    benchmark.extra_info["verified"] = True
    benchmark.extra_info.update(peak_in_fresh_process(shape, label, threads))


# ============================================================================================
# Roofs again, after the cells
# ============================================================================================
@pytest.mark.parametrize("roof,library,threads", again_after(SGEMM_ROOFS),
                         ids=lambda v: f"{v}t" if isinstance(v, int) else v)
def test_roof_after(benchmark, roof, library, threads, set_threads, foreign_load):
    set_threads(threads)
    measure_roof(benchmark, foreign_load, roof, library, threads, "after")


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--peak-memory":
    print(json.dumps(measure_peak(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
