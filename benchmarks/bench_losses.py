"""Fused native losses: latentspace against torch eager, forward + backward, plus the memory
read roof, in one session.

Cells: kind in {mse, bce, bce_logits} on (8192, 784) float32 (an MNIST-sized VAE batch), mean
reduction. One timed call is a training step's loss part:

  recon.grad = None; loss = loss_fn(recon, target); loss.backward()

  latentspace  latentspace.losses.reconstruction_loss(recon, target, kind): the native forward
               computes the loss and writes the gradient in one pass; backward returns it
  torch        F.mse_loss / F.binary_cross_entropy / F.binary_cross_entropy_with_logits

Inputs: target uniform in [0, 1]; recon uniform in (0, 1) for bce, 3 * standard normal for
mse and bce_logits (logits). Plus one cell for kl_normal on (8192, 64) against torch's formula,
reported without a bar (its 8 MiB of traffic fits in the L3).

Both peers run at 1 thread and at all cores, the two of a pair back to back at the same
count. Before a peer is timed, its loss and gradient are checked against torch's; after, the
loss of every timed round and the last gradient are checked again. Minor page faults per
call are recorded (each call allocates its gradient: first-touch faults are part of the cost).

On this shared 2-core VM a busy neighbour wrecks 2-thread runs: each cell first waits (up to
LATENTSPACE_BENCH_QUIET_WAIT_S, default 30 s) for a quiet moment, and records the load during
its rounds, which the report flags.

Memory read bandwidth: the session's read roof (a sum over 1 GiB, before and after the cells)
and, since this VM's bandwidth jumps, the best of a few all-core sums over a 1 GiB buffer right
before and after every cell. benchmarks/report_losses.py turns the JSON into tables.
"""

from __future__ import annotations

import resource
from functools import lru_cache

import numpy as np
import pytest

import torch
import torch.nn.functional as F
from _common import (
    READ_ROOFS,
    THREAD_COUNTS,
    again_after,
    measure_roof,
    random_read_buffer,
    read_rate_nearby,
    rounds_for,
    timed_call,
)
from latentspace.losses import kl_normal, reconstruction_loss  # conftest.py imported it with retries

ROWS, COLS = 8192, 784
KL_ROWS, KL_COLS = 8192, 64
SEED = 20240611
KINDS = ("mse", "bce", "bce_logits")
PEERS = ("latentspace", "torch")
TORCH_LOSSES = {
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy,
    "bce_logits": F.binary_cross_entropy_with_logits,
}
# Loss: relative. Gradient: relative, plus an absolute floor of 1e-6 of the largest |gradient|
# (bce_logits' sigmoid(x) - t cancels where sigmoid(x) ~ t: both peers are ~1e-7 of the scale
# off the float64 value there, so elementwise relative agreement is meaningless).
RTOL = 1e-5
GRAD_ATOL_OF_MAX = 1e-6


# ============================================================================================
# Data
# ============================================================================================
@lru_cache(maxsize=None)
def loss_inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(recon, target) for a kind; recon requires grad. The same target for every kind."""
    target_rng, recon_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(SEED).spawn(2))
    target = target_rng.random((ROWS, COLS), dtype=np.float32)
    if kind == "bce":  # open interval: log(0) would only exercise the -100 clamp
        tiny = np.float32(2**-24)
        recon = np.clip(recon_rng.random((ROWS, COLS), dtype=np.float32), tiny, 1 - tiny)
    else:
        recon = recon_rng.standard_normal((ROWS, COLS), dtype=np.float32) * np.float32(3)
    return torch.from_numpy(recon).requires_grad_(), torch.from_numpy(target)


@lru_cache(maxsize=None)
def kl_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(SEED + 1)
    mu = rng.standard_normal((KL_ROWS, KL_COLS), dtype=np.float32)
    logvar = rng.standard_normal((KL_ROWS, KL_COLS), dtype=np.float32) * np.float32(0.5)
    return torch.from_numpy(mu).requires_grad_(), torch.from_numpy(logvar).requires_grad_()


@pytest.fixture(scope="module")
def read_buffer() -> np.ndarray:
    """1 GiB of random floats for the read rate measured beside each cell (32x the L3)."""
    return random_read_buffer()


# ============================================================================================
# Peers: one call = reset the gradient, forward, backward
# ============================================================================================
def loss_step(kind: str, peer: str):
    recon, target = loss_inputs(kind)
    fn = (lambda r, t: reconstruction_loss(r, t, kind)) if peer == "latentspace" else TORCH_LOSSES[kind]

    def step():
        recon.grad = None
        loss = fn(recon, target)
        loss.backward()
        return loss

    return step, lambda: (recon.grad,)


def torch_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the latent dims, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def kl_step(peer: str):
    mu, logvar = kl_inputs()
    fn = kl_normal if peer == "latentspace" else torch_kl

    def step():
        mu.grad = logvar.grad = None
        loss = fn(mu, logvar)
        loss.backward()
        return loss

    return step, lambda: (mu.grad, logvar.grad)


# ============================================================================================
# Is the answer right?
# ============================================================================================
@lru_cache(maxsize=None)
def reference(cell: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """torch eager's loss and gradients for a cell ("kl" or a kind), computed once."""
    step, grads = kl_step("torch") if cell == "kl" else loss_step(cell, "torch")
    loss = step().detach()
    return loss, tuple(g.clone() for g in grads())


def check(cell: str, loss: torch.Tensor, grads: tuple[torch.Tensor, ...]) -> None:
    """Raises AssertionError unless loss and gradients match torch eager's."""
    ref_loss, ref_grads = reference(cell)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=RTOL, atol=0.0, msg=lambda m: f"{cell} loss: {m}")
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert grad is not None, f"{cell}: gradient {i} is missing"
        atol = GRAD_ATOL_OF_MAX * float(ref.abs().max())
        torch.testing.assert_close(grad, ref, rtol=RTOL, atol=atol, msg=lambda m: f"{cell} gradient {i}: {m}")


# ============================================================================================
# Roofs before the cells
# ============================================================================================
@pytest.mark.parametrize("roof,library,threads", READ_ROOFS, ids=lambda v: f"{v}t" if isinstance(v, int) else v)
def test_roof_before(benchmark, roof, library, threads, set_threads, foreign_load):
    """Memory read bandwidth (a sum over 1 GiB): the roof of these memory-bound losses."""
    set_threads(threads)
    measure_roof(benchmark, foreign_load, roof, library, threads, "before")


# ============================================================================================
# The loss benchmarks
# ============================================================================================
def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_cell(benchmark, cell: str, step, grads, threads: int, set_threads, foreign_load, quiet, read_buffer,
             info: dict):
    set_threads(threads)
    loss, seconds = timed_call(step)  # also the warm-up
    check(cell, loss, grads())  # wrong before timing: fail, time nothing
    benchmark.extra_info.update(threads=threads, verified=False, **info)
    losses = []

    def step_and_keep():  # keeping a reference to the 0-d loss costs ~100 ns, the same for both
        losses.append(step())

    rounds = rounds_for(seconds)
    warmup = 1 if seconds < 0.1 else 0
    benchmark.extra_info["quiet_wait_s"] = quiet()
    read_before = read_rate_nearby(read_buffer, set_threads, threads)
    faults = _minor_faults()
    with foreign_load:
        benchmark.pedantic(step_and_keep, rounds=rounds, iterations=1, warmup_rounds=warmup)
    benchmark.extra_info["page_faults_per_call"] = (_minor_faults() - faults) / (rounds + warmup)
    benchmark.extra_info["foreign_cpus"] = foreign_load.cpus
    read_after = read_rate_nearby(read_buffer, set_threads, threads)
    benchmark.extra_info.update(read_gbs_before=read_before, read_gbs_after=read_after,
                                read_gbs_nearby=max(read_before, read_after))
    # A fast round that skipped work would flatter the peer: check every timed loss and the
    # last round's gradient too.
    ref_loss = reference(cell)[0]
    for timed_loss in losses:
        torch.testing.assert_close(timed_loss.detach(), ref_loss, rtol=RTOL, atol=0.0)
    check(cell, losses[-1], grads())
    benchmark.extra_info["verified"] = True


# Cell-major order: both peers of a (kind, threads) pair run back to back, so they see the
# same machine conditions as nearly as a sequential run allows.
LOSS_CASES = [
    pytest.param(kind, threads, peer, id=f"{kind}-{threads}t-{peer}")
    for kind in KINDS
    for threads in THREAD_COUNTS
    for peer in PEERS
]


@pytest.mark.parametrize("kind,threads,peer", LOSS_CASES)
def test_loss(benchmark, kind, threads, peer, set_threads, foreign_load, quiet, read_buffer):
    step, grads = loss_step(kind, peer)
    benchmark.group = f"loss {kind} {threads}t"
    elements = ROWS * COLS
    run_cell(
        benchmark, kind, step, grads, threads, set_threads, foreign_load, quiet, read_buffer,
        dict(kind="loss", loss=kind, peer=peer, rows=ROWS, cols=COLS,
             # recon and target read, the gradient written: the memory the step must move
             bytes=3 * elements * 4),
    )


KL_CASES = [pytest.param(threads, peer, id=f"{threads}t-{peer}") for threads in THREAD_COUNTS for peer in PEERS]


@pytest.mark.parametrize("threads,peer", KL_CASES)
def test_kl_normal(benchmark, threads, peer, set_threads, foreign_load, quiet, read_buffer):
    step, grads = kl_step(peer)
    benchmark.group = f"kl_normal {threads}t"
    run_cell(
        benchmark, "kl", step, grads, threads, set_threads, foreign_load, quiet, read_buffer,
        dict(kind="loss", loss="kl_normal", peer=peer, rows=KL_ROWS, cols=KL_COLS,
             # mu and logvar read, both gradients written
             bytes=4 * KL_ROWS * KL_COLS * 4),
    )


# ============================================================================================
# Roofs again, after the cells
# ============================================================================================
@pytest.mark.parametrize("roof,library,threads", again_after(READ_ROOFS),
                         ids=lambda v: f"{v}t" if isinstance(v, int) else v)
def test_roof_after(benchmark, roof, library, threads, set_threads, foreign_load):
    set_threads(threads)
    measure_roof(benchmark, foreign_load, roof, library, threads, "after")
