"""Fused losses on a CUDA GPU: latentspace's kernels (csrc/cuda/losses.cu) against torch's own
ops on the same device, forward + backward, beside a copy that moves the same bytes.

Run on a GPU machine (benchmarks/gpu_run.sh runs it in its "losses" stage), from the
repository root:
  python -m pytest benchmarks/bench_losses_cuda.py -q --benchmark-json=losses_cuda.json
  python benchmarks/report_losses_cuda.py losses_cuda.json
Skipped where torch sees no CUDA GPU or latentspace.cuda_available() is False. Estimated at
30-60 s on one H100 (13 s on an H200 in GPU run 10): 32 benchmarks of about BUDGET_S of timed calls each, the
inputs made on the GPU, the float64 references computed there too.

Cells (float32, mean reduction; one cell a group, its peers back to back):
  loss {kind} R x C   kind in {mse, bce, bce_logits}, (R, C) in {(8192, 784), (65536, 1024)}
  kl_normal R x C     (R, C) in {(65536, 64), (65536, 1024)}
One timed call is a training step's loss part, ended by a synchronize:
  recon.grad = None; loss = fn(recon, target); loss.backward(); torch.cuda.synchronize()
  (kl_normal: mu.grad = logvar.grad = None; loss = fn(mu, logvar); ...)
Inputs, as tests/gpu/test_losses_cuda.py draws them: target uniform in [0, 1]; recon uniform
in [0.01, 0.99] for bce (so that the gradient check's floor, a millionth of the largest
|gradient|, stays far under a typical one), 3 * N(0, 1) for mse and bce_logits (logits);
mu N(0, 1), logvar 0.5 * N(0, 1).

Peers:
  latentspace             latentspace.losses.reconstruction_loss / kl_normal with
                          LATENTSPACE_CUDA_LOSSES=native for the cell (the fused kernels: the
                          loss and the gradient in one pass); checked to reach them
  latentspace[torch ops]  the same functions with LATENTSPACE_CUDA_LOSSES=torch: what the
                          library ran on a GPU by default until GPU run 10; checked not to
                          reach them
  torch                   F.mse_loss / F.binary_cross_entropy / F.binary_cross_entropy_with_logits;
                          kl: -0.5 * (1 + lv - mu^2 - exp(lv)).sum(1).mean()
  copy roof               torch ops that move the fused step's bytes and compute nothing: loss
                          cells torch.add(recon, target, out=buffer) (reads recon and target,
                          writes one tensor: the gradient's traffic); kl cells two copy_ (mu and
                          logvar read, two tensors written). Not checked: it computes no loss.

Before a peer is timed, its loss and gradients are checked against a float64 reference
computed on the GPU from the same float32 inputs (the library's formulas, autograd for the
gradients), with bench_losses.py's tolerances: the loss within RTOL, each gradient within RTOL
plus GRAD_ATOL_OF_MAX of its largest element. A wrong peer fails its test and posts no time.
After the timed rounds, every round's loss and the last gradient are checked again.
benchmarks/report_losses_cuda.py turns the JSON into the table.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import pytest
from _common import environment, timed_call

import latentspace
import torch
import torch.nn.functional as F
from latentspace import _native
from latentspace.losses import kl_normal, reconstruction_loss

if not torch.cuda.is_available() or not latentspace.cuda_available():
    pytest.skip("no usable CUDA GPU (torch.cuda.is_available(), latentspace.cuda_available())",
                allow_module_level=True)

DEVICE = torch.device("cuda", torch.cuda.current_device())
SEED = 20240611
KINDS = ("mse", "bce", "bce_logits")
LOSS_SHAPES = ((8192, 784), (65536, 1024))  # an MNIST-sized VAE batch; a large one (256 MiB a tensor)
KL_SHAPES = ((65536, 64), (65536, 1024))
KL = "kl_normal"

PEERS = ("latentspace", "latentspace[torch ops]", "torch", "copy roof")
PEER_IDS = {"latentspace": "latentspace", "latentspace[torch ops]": "latentspace-torch-ops", "torch": "torch",
            "copy roof": "copy-roof"}
# LATENTSPACE_CUDA_LOSSES for the latentspace peers (_cuda_losses.py reads it at every call),
# and the native entry point each must (native) or must not (torch ops) reach.
BACKENDS = {"latentspace": "native", "latentspace[torch ops]": "torch"}
NATIVE_ENTRY = {"loss": "reconstruction_loss_cuda", KL: "kl_normal_cuda"}
TORCH_LOSSES = {"mse": F.mse_loss, "bce": F.binary_cross_entropy, "bce_logits": F.binary_cross_entropy_with_logits}

# bench_losses.py's tolerances. Loss: relative. Gradient: relative, plus an absolute floor of
# 1e-6 of the largest |gradient| (bce_logits' sigmoid(x) - t cancels where sigmoid(x) ~ t).
RTOL = 1e-5
GRAD_ATOL_OF_MAX = 1e-6

# Timing: pedantic rounds of one call each, about BUDGET_S seconds of them a benchmark (GPU
# calls take 0.03-10 ms: the whole file stays near a minute), at least MIN_ROUNDS; cells under
# SMALL_CELL_S get warm-up calls too (clocks, caches, the kernels' lazy loading).
BUDGET_S = 0.25
MIN_ROUNDS, MAX_ROUNDS = 5, 500
SMALL_CELL_S, SMALL_CELL_WARMUP = 0.01, 10


def rounds_for(seconds: float) -> int:
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(BUDGET_S / max(seconds, 1e-6)))))


# ============================================================================================
# Data, made on the GPU. maxsize=1: the peers of a cell run back to back, and one cell's
# inputs and references (up to 2 GiB at 65536 x 1024) are let go when the next cell starts.
# ============================================================================================
def _generator(offset: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(SEED + offset)


@lru_cache(maxsize=1)
def loss_inputs(kind: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(recon, target) for a loss cell; recon requires grad."""
    g = _generator(KINDS.index(kind))
    target = torch.rand(rows, cols, generator=g, device=DEVICE)
    if kind == "bce":  # probabilities away from 0 and 1 (the -100 clamps are tested, not timed)
        recon = torch.rand(rows, cols, generator=g, device=DEVICE).mul_(0.98).add_(0.01)
    else:
        recon = torch.randn(rows, cols, generator=g, device=DEVICE).mul_(3.0)
    return recon.requires_grad_(), target


@lru_cache(maxsize=1)
def kl_inputs(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) for a kl_normal cell; both require grad."""
    g = _generator(len(KINDS))
    mu = torch.randn(rows, cols, generator=g, device=DEVICE)
    logvar = torch.randn(rows, cols, generator=g, device=DEVICE).mul_(0.5)
    return mu.requires_grad_(), logvar.requires_grad_()


def cell_inputs(loss: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kl_inputs(rows, cols) if loss == KL else loss_inputs(loss, rows, cols)


# ============================================================================================
# The float64 reference
# ============================================================================================
def reference_elementwise(kind: str, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The library's formulas (losses.py's docstring; tests/gpu/test_losses_cuda.py)."""
    if kind == "mse":
        return (r - t) ** 2
    if kind == "bce":
        return -(t * torch.clamp(torch.log(r), min=-100) + (1 - t) * torch.clamp(torch.log1p(-r), min=-100))
    # softplus(r) - r t: its autograd derivative is sigmoid(r) - t everywhere. The stable
    # max(r, 0) - r t + log1p(exp(-|r|)) has the same value, but autograd takes clamp's and
    # abs's derivatives at r = 0 as 1 and 0, which gives 1 - t instead of 0.5 - t there
    # (float32 randn draws exact zeros: GPU run 10's bce_logits cells hit 1 and 9 of them).
    # threshold=50: log1p(exp(r)) up to r = 50, well inside float64.
    return torch.nn.functional.softplus(r, threshold=50) - r * t


@lru_cache(maxsize=1)
def reference(loss: str, rows: int, cols: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The cell's loss (0-d) and gradients, in float64 on the GPU, from the float32 inputs."""
    first, second = (x.detach().double().requires_grad_() for x in cell_inputs(loss, rows, cols))
    if loss == KL:
        value = (-0.5 * (1 + second - first**2 - second.exp())).sum(dim=1).mean()
        wrt = (first, second)
    else:
        value = reference_elementwise(loss, first, second.detach()).mean()
        wrt = (first,)
    grads = torch.autograd.grad(value, wrt)
    return value.detach(), tuple(grads)


def check(cell: tuple[str, int, int], loss: torch.Tensor, grads: tuple[torch.Tensor | None, ...]) -> None:
    """Raises AssertionError unless the loss and gradients match the float64 reference."""
    ref_loss, ref_grads = reference(*cell)
    name = f"{cell[0]} {cell[1]}x{cell[2]}"
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=RTOL, atol=0.0,
                               msg=lambda m: f"{name} loss: {m}")
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert grad is not None, f"{name}: gradient {i} is missing"
        atol = GRAD_ATOL_OF_MAX * float(ref.abs().max())
        torch.testing.assert_close(grad.double(), ref, rtol=RTOL, atol=atol,
                                   msg=lambda m, i=i: f"{name} gradient {i}: {m}")


@contextlib.contextmanager
def counted_native_calls(name: str):
    """Counts the calls of _native.<name> in the block (_cuda_losses.py calls it through the
    module): the native peer must reach its kernel, the torch-ops peer must not. A dispatch
    that silently fell back to torch's ops would otherwise post torch's time as the kernel's."""
    original = getattr(_native, name)
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(_native, name, counted)
    try:
        yield calls
    finally:
        setattr(_native, name, original)


# ============================================================================================
# Peers: one call = reset the gradients, forward, backward, synchronize
# ============================================================================================
def torch_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the latent dims, averaged over the batch
    (the -0.5 on the mean: one elementwise pass fewer than on every element)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1).mean()


def loss_function(loss: str, peer: str):
    if loss == KL:
        return torch_kl if peer == "torch" else kl_normal
    if peer == "torch":
        return TORCH_LOSSES[loss]
    return lambda recon, target: reconstruction_loss(recon, target, loss)  # reduction "mean"


def step_of(loss: str, rows: int, cols: int, peer: str):
    """(the timed call, a function returning the gradients it leaves)."""
    first, second = cell_inputs(loss, rows, cols)
    fn = loss_function(loss, peer)
    inputs = (first, second) if loss == KL else (first,)

    def step():
        for x in inputs:
            x.grad = None
        value = fn(first, second)
        value.backward()
        torch.cuda.synchronize()
        return value

    return step, lambda: tuple(x.grad for x in inputs)


def roof_step(loss: str, rows: int, cols: int):
    """The copy roof's call: the fused step's bytes moved by torch's elementwise kernels."""
    first, second = (x.detach() for x in cell_inputs(loss, rows, cols))
    if loss == KL:
        out_mu, out_logvar = torch.empty_like(first), torch.empty_like(second)

        def step():
            out_mu.copy_(first)
            out_logvar.copy_(second)
            torch.cuda.synchronize()
    else:
        out = torch.empty_like(first)

        def step():
            torch.add(first, second, out=out)
            torch.cuda.synchronize()

    return step


def moved_bytes(loss: str, rows: int, cols: int) -> int:
    """Loss: recon and target read, the gradient written. KL: mu and logvar read, both gradients written."""
    return (4 if loss == KL else 3) * rows * cols * 4


# ============================================================================================
# The benchmark
# ============================================================================================
def run_cell(benchmark, loss: str, rows: int, cols: int, peer: str) -> None:
    cell = (loss, rows, cols)
    benchmark.group = f"{loss} {rows}x{cols}"
    benchmark.extra_info.update(kind="loss", loss=loss, peer=peer, rows=rows, cols=cols, dtype="float32",
                                reduction="mean", bytes=moved_bytes(*cell), device=torch.cuda.get_device_name(DEVICE),
                                verified=False)
    backend = BACKENDS.get(peer)
    with environment(LATENTSPACE_CUDA_LOSSES=backend) if backend else contextlib.nullcontext():
        if peer == "copy roof":
            call, grads = roof_step(*cell), None
            call()  # the warm-up
        else:
            call, grads = step_of(*cell, peer)
            entry = NATIVE_ENTRY[KL if loss == KL else "loss"]
            with counted_native_calls(entry) as calls:
                value = call()  # also the warm-up
            if peer == "latentspace":
                assert calls[0] > 0, f"LATENTSPACE_CUDA_LOSSES=native did not reach _native.{entry}"
            elif peer == "latentspace[torch ops]":
                assert calls[0] == 0, f"LATENTSPACE_CUDA_LOSSES=torch reached _native.{entry}"
            check(cell, value, grads())  # wrong before timing: fail, time nothing
            del value
        # The rounds are sized on a second call: the first of the file also starts CUDA and
        # loads the kernels, and would leave its cell a few rounds and no warm-up.
        _, seconds = timed_call(call)
        losses = []

        # Detached: a kept loss must not hold its graph (or a saved gradient). The detach and
        # append cost about a microsecond a round, paid by every peer but the roof.
        def call_and_keep():
            result = call()
            if result is not None:
                losses.append(result.detach())

        warmup = SMALL_CELL_WARMUP if seconds < SMALL_CELL_S else 0
        benchmark.pedantic(call_and_keep, rounds=rounds_for(seconds), iterations=1, warmup_rounds=warmup)
    if grads is not None:
        # A fast round that skipped work would flatter the peer: every timed loss, and the last
        # round's gradients, checked again.
        ref_loss = reference(*cell)[0]
        torch.testing.assert_close(torch.stack(losses).double(), ref_loss.expand(len(losses)), rtol=RTOL, atol=0.0,
                                   msg=lambda m: f"{loss} {rows}x{cols}, the timed rounds' losses: {m}")
        check(cell, losses[-1], grads())
    benchmark.extra_info["verified"] = True


# Cell-major order: a cell's peers back to back, so that they see the same GPU conditions.
CASES = [pytest.param(loss, rows, cols, peer, id=f"{loss}-{rows}x{cols}-{PEER_IDS[peer]}")
         for loss, shapes in [*((kind, LOSS_SHAPES) for kind in KINDS), (KL, KL_SHAPES)]
         for rows, cols in shapes
         for peer in PEERS]


@pytest.mark.parametrize("loss,rows,cols,peer", CASES)
def test_loss(benchmark, loss, rows, cols, peer):
    run_cell(benchmark, loss, rows, cols, peer)
