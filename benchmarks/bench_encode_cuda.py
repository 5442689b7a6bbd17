"""The CUDA encoder on a GPU: latentspace's kernels (csrc/cuda/encode.cu, behind
latentspace.Encoder with LATENTSPACE_CUDA_ENCODER=native) against the same model's torch code on
the same GPU, CUDA tensors in and out (no host copy is timed).

Run on a GPU machine (benchmarks/gpu_run.sh runs it in its "encode" stage), from the
repository root:
  python -m pytest benchmarks/bench_encode_cuda.py -q --benchmark-json=encode_cuda.json
  python benchmarks/report_encode_cuda.py encode_cuda.json
Skipped where torch sees no CUDA GPU or latentspace.cuda_available() is False. Estimated at
20-40 s on one H100 (14 s on an H200 in GPU run 10): 33 benchmarks of about BUDGET_S of timed calls each, plus
torch's import, the CUDA context and the float64 references.

Cells (one group each, its peers back to back), each in precision fp32 and bf16:
  autoencoder 784-256-32      latentspace.Autoencoder(784, 32, hidden=(256,)), MNIST-like; 65,536 rows
  wide MLP 1024-1024-1024-128 latentspace.Autoencoder(1024, 128, hidden=(1024, 1024)); 65,536 rows
  PCA 784-16                  latentspace.PCA(16) fitted on random data; 65,536 rows. Memory-bound:
                              beside it the "read roof" (below)
  small 64-32-4               latentspace.Autoencoder(64, 4, hidden=(32,)), the digits default;
                              1,000 rows: launch-bound, the per-call overheads
Inputs uniform in [0, 1) (small: [0, 16), the digits' range), made on the GPU.

Peers (one timed call ends with torch.cuda.synchronize()):
  latentspace                 Encoder(model, device="cuda", precision=p) built with
                              LATENTSPACE_CUDA_ENCODER=native: encoder.encode(x), a new CUDA
                              tensor of codes; what a user gets, with its finiteness checks of
                              the rows and codes (one host sync a chunk) and its default chunks
                              (extra_info "chunks": the CPU's 65,536 rows, within 1 GiB of input,
                              activations and codes on the device: one chunk for each shape here)
  latentspace kernel          the same Encoder's kernels alone (its CudaEncoder.encode(x, out)
                              over all rows at once, into a kept output): what the checks and
                              chunks cost, by difference
  latentspace[torch backend]  Encoder built with LATENTSPACE_CUDA_ENCODER=torch: the library's
                              path on a GPU by default until GPU run 10 (the model's torch code
                              in chunks of 4,096 rows, each checked); the peer the switch replaced
  torch                       the strongest alternative a user has: the model's own forward
                              (model._encode, i.e. model.encoder(x) or (x - mean) @ components.T)
                              on the GPU under torch.no_grad(), all rows in one call; fp32 with
                              TF32 off (torch's default, set here explicitly), bf16 under
                              torch.autocast("cuda", dtype=torch.bfloat16): the codes stay
                              bfloat16 (no conversion timed: torch's best case)
  read roof                   one per input shape of the PCA cells: out.copy_(x) of the PCA
                              input; the bandwidth measured (2 x the bytes over the time) gives
                              the time to read the input once (extra_info "read_once_s"), the
                              floor of a memory-bound encode

Before a peer is timed, its codes are checked against the model's float64 forward on the GPU
(same weights and inputs): max |error| within TOLERANCE[precision] x max |reference| (fp32:
1e-4, which TF32 would miss; bf16: 3e-2, the bound of tests/gpu/test_encode_cuda.py). A wrong
peer fails its test and posts no time. After the timed rounds the last round's codes are
checked again. benchmarks/report_encode_cuda.py turns the JSON into the table.
"""

from __future__ import annotations

import contextlib
import copy
import math
from functools import lru_cache

import numpy as np
import pytest
from _common import environment, timed_call

import latentspace
import torch

if not torch.cuda.is_available() or not latentspace.cuda_available():
    pytest.skip("no usable CUDA GPU (torch.cuda.is_available(), latentspace.cuda_available())",
                allow_module_level=True)

DEVICE = torch.device("cuda", torch.cuda.current_device())
SEED = 20240611
BIG_ROWS, SMALL_ROWS = 65536, 1000
# name -> (widths, rows). Widths: input, hidden..., latent (PCA: input, components).
CELLS = {"autoencoder": ((784, 256, 32), BIG_ROWS),
         "wide MLP": ((1024, 1024, 1024, 128), BIG_ROWS),
         "PCA": ((784, 16), BIG_ROWS),
         "small": ((64, 32, 4), SMALL_ROWS)}
PCA_FIT_ROWS = 4096
PRECISIONS = ("fp32", "bf16")
NATIVE, KERNEL, TORCH_BACKEND, TORCH = "latentspace", "latentspace kernel", "latentspace[torch backend]", "torch"
PEERS = (NATIVE, KERNEL, TORCH_BACKEND, TORCH)
PEER_IDS = {NATIVE: "latentspace", KERNEL: "kernel", TORCH_BACKEND: "torch-backend", TORCH: "torch"}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # of max |reference|

# torch's default, set rather than assumed: TF32 would make the torch peer a different precision.
torch.backends.cuda.matmul.allow_tf32 = False

# Timing: pedantic rounds of one call each, about BUDGET_S seconds of them a benchmark (calls
# take about 0.05-20 ms: the file's timed part stays near 10 s), at least MIN_ROUNDS; one
# warm-up round after the check call (which is itself a first call: lazy kernel loading).
BUDGET_S = 0.2
MIN_ROUNDS, MAX_ROUNDS = 5, 200


def rounds_for(seconds: float) -> int:
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(BUDGET_S / max(seconds, 1e-6)))))


# ============================================================================================
# Models, inputs and references (maxsize=1 on the GPU ones: a cell's peers run back to back)
# ============================================================================================
@lru_cache(maxsize=None)
def make_model(cell: str) -> torch.nn.Module:
    """The cell's model on the CPU, in eval mode, its weights fixed by SEED."""
    widths, _ = CELLS[cell]
    torch.manual_seed(SEED)
    if cell == "PCA":
        data = np.random.default_rng(SEED).random((PCA_FIT_ROWS, widths[0]), dtype=np.float32)
        return latentspace.PCA(widths[1]).fit(data).eval()
    return latentspace.Autoencoder(widths[0], widths[-1], hidden=widths[1:-1]).eval()


@lru_cache(maxsize=1)
def inputs(cell: str) -> torch.Tensor:
    widths, rows = CELLS[cell]
    g = torch.Generator(device=DEVICE).manual_seed(SEED + list(CELLS).index(cell))
    x = torch.rand(rows, widths[0], generator=g, device=DEVICE)
    return x.mul_(16.0) if cell == "small" else x


@lru_cache(maxsize=1)
def reference(cell: str) -> torch.Tensor:
    """The codes in float64, computed on the GPU from the float32 weights and inputs."""
    model = copy.deepcopy(make_model(cell)).double().to(DEVICE)
    with torch.no_grad():
        return model._encode(inputs(cell).double())


def flops(cell: str) -> int:
    """2 x rows x the sum of each layer's inputs x outputs (PCA: its one product)."""
    widths, rows = CELLS[cell]
    return 2 * rows * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def moved_bytes(cell: str) -> int:
    """The float32 input read, the codes written and the weights read once."""
    widths, rows = CELLS[cell]
    return 4 * (rows * widths[0] + rows * widths[-1] + sum(a * b for a, b in zip(widths[:-1], widths[1:])))


def shape_name(cell: str) -> str:
    return "-".join(map(str, CELLS[cell][0]))


def check(cell: str, precision: str, peer: str, codes: torch.Tensor) -> float:
    """max |codes - reference| / max |reference|; AssertionError where it exceeds the tolerance
    (or the codes hold NaN / Inf, or have the wrong shape or device)."""
    ref = reference(cell)
    name = f"{cell} {precision} {peer}"
    assert codes.device == ref.device and tuple(codes.shape) == tuple(ref.shape), \
        f"{name}: codes of shape {tuple(codes.shape)} on {codes.device}, expected {tuple(ref.shape)} on {ref.device}"
    assert bool(torch.isfinite(codes).all()), f"{name}: codes hold NaN / Inf"
    scale = float(ref.abs().max())
    error = float((codes.double() - ref).abs().max()) / scale
    assert error <= TOLERANCE[precision], \
        f"{name}: max |error| is {error:.3g} of max |reference|, above {TOLERANCE[precision]}"
    return error


# ============================================================================================
# Peers: each returns (the timed call, which returns its codes; extra_info of its own)
# ============================================================================================
def encoder(cell: str, precision: str, backend: str) -> latentspace.Encoder:
    """An Encoder built with LATENTSPACE_CUDA_ENCODER=backend (read when it is built)."""
    with environment(LATENTSPACE_CUDA_ENCODER=backend):
        built = latentspace.Encoder(make_model(cell), device="cuda", precision=precision)
    # A silent fallback would post the other backend's time under this one's name.
    assert built.backend == backend, f"LATENTSPACE_CUDA_ENCODER={backend} built a {built.backend} Encoder"
    return built


def encoder_call(cell: str, precision: str, backend: str):
    built, x = encoder(cell, precision, backend), inputs(cell)

    def call():
        codes = built.encode(x)
        torch.cuda.synchronize()
        return codes

    chunks = math.ceil(CELLS[cell][1] / built.default_batch_size)
    return call, {"kernel": built.kernel, "batch_size": built.default_batch_size, "chunks": chunks}


def kernel_call(cell: str, precision: str):
    built, x = encoder(cell, precision, "native"), inputs(cell)
    out = torch.full((x.shape[0], built.latent_dim), float("nan"), device=DEVICE)  # poisoned for the check

    def call():
        built._native.encode(x, out)  # the CudaEncoder: the kernels and their workspace, no checks
        torch.cuda.synchronize()
        return out

    return call, {"kernel": built.kernel, "chunks": 1}


def torch_call(cell: str, precision: str):
    model, x = copy.deepcopy(make_model(cell)).to(DEVICE).eval(), inputs(cell)
    amp = (lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def call():
        with torch.no_grad(), amp():
            codes = model._encode(x)  # the forward itself, without model.encode's input checks
        torch.cuda.synchronize()
        return codes

    return call, {"chunks": 1}


def peer_call(cell: str, precision: str, peer: str):
    if peer == NATIVE:
        return encoder_call(cell, precision, "native")
    if peer == TORCH_BACKEND:
        return encoder_call(cell, precision, "torch")
    if peer == KERNEL:
        return kernel_call(cell, precision)
    return torch_call(cell, precision)


def common_info(rows: int) -> dict:
    return {"rows": rows, "device": torch.cuda.get_device_name(DEVICE), "torch": torch.__version__,
            "latentspace": latentspace.build_info()["version"],
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32}


# ============================================================================================
# The benchmarks
# ============================================================================================
def run_cell(benchmark, cell: str, precision: str, peer: str) -> None:
    widths, rows = CELLS[cell]
    benchmark.group = f"{cell} {shape_name(cell)} {precision}"
    benchmark.extra_info.update(kind="encode", cell=cell, shape=shape_name(cell), widths=list(widths),
                                precision=precision, peer=peer, flops=flops(cell), bytes=moved_bytes(cell),
                                verified=False, **common_info(rows))
    call, info = peer_call(cell, precision, peer)
    benchmark.extra_info.update(info)
    # Wrong before timing: fail, time nothing. (Also the first call: the kernels' lazy loading.)
    benchmark.extra_info["error_of_max"] = check(cell, precision, peer, call())
    _, seconds = timed_call(call)  # the rounds sized on a warm call
    last = []

    def call_and_keep():
        last[:] = [call()]

    benchmark.pedantic(call_and_keep, rounds=rounds_for(seconds), iterations=1, warmup_rounds=1)
    check(cell, precision, peer, last[0])  # the last timed round's codes
    benchmark.extra_info["verified"] = True


# Cell-major: a cell's peers back to back, so that they see the same GPU conditions.
CASES = [pytest.param(cell, precision, peer, id=f"{cell.replace(' ', '_')}-{precision}-{PEER_IDS[peer]}")
         for cell in CELLS for precision in PRECISIONS for peer in PEERS]


@pytest.mark.parametrize("cell,precision,peer", CASES)
def test_encode(benchmark, cell, precision, peer):
    run_cell(benchmark, cell, precision, peer)


ROOF_SHAPES = sorted({(CELLS["PCA"][1], CELLS["PCA"][0][0])})


@pytest.mark.parametrize("rows,cols", ROOF_SHAPES, ids=[f"{r}x{c}" for r, c in ROOF_SHAPES])
def test_read_roof(benchmark, rows, cols):
    """A copy of the PCA input: the time to read it once is half the copy's (it reads and writes
    the same bytes), at the bandwidth the copy reached."""
    x = inputs("PCA")
    assert tuple(x.shape) == (rows, cols)
    out = torch.empty_like(x)

    def call():
        out.copy_(x)
        torch.cuda.synchronize()

    call()
    assert torch.equal(out, x), "the read roof's copy differs from its input"
    _, seconds = timed_call(call)
    benchmark.group = f"read roof {rows}x{cols}"
    benchmark.extra_info.update(kind="roof", peer="copy", cols=cols, bytes=2 * x.numel() * 4,
                                input_bytes=x.numel() * 4, **common_info(rows))
    benchmark.pedantic(call, rounds=rounds_for(seconds), iterations=1, warmup_rounds=1)
    benchmark.extra_info["read_once_s"] = benchmark.stats.stats.median / 2
