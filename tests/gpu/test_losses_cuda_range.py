"""The CUDA loss kernels keep a float32 mean or row within float32's range finite when the
sum behind it passes that range, as the CPU kernels do (tests/test_losses.py has the CPU
twins): each lane's partial sum is a double (csrc/cuda/losses.cu). Marked "cuda": skipped
where torch sees no GPU."""

import pytest
import torch

from latentspace.losses import kl_normal, reconstruction_loss

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]


@pytest.fixture(autouse=True)
def native_cuda_losses(monkeypatch):
    monkeypatch.setenv("LATENTSPACE_CUDA_LOSSES", "native")


@pytest.mark.parametrize("kind, value", [("mse", 3e18), ("bce_logits", 1e36)])
def test_a_float32_mean_within_range_is_not_inf_when_its_sum_overflows(kind, value):
    """The CPU test's case (1000 elements of 9e36 or 1e36 a row) on the GPU: rows of one
    segment, whose lanes sum at most 32 elements each (2.9e38: within float32), then in
    double; the same answers as the CPU's."""
    recon = torch.full((1000, 1000), value, device="cuda")
    target = torch.zeros_like(recon)
    mean = reconstruction_loss(recon, target, kind, "mean")
    reference = reconstruction_loss(recon.double().cpu(), target.double().cpu(), kind, "mean")
    assert mean.device.type == "cuda" and mean.dtype == torch.float32
    assert torch.isfinite(mean)
    torch.testing.assert_close(mean.double().cpu(), reference, rtol=1e-6, atol=0)
    assert torch.isinf(reconstruction_loss(recon, target, kind, "sum")).item()  # 9e42: past float32 itself
    assert torch.isinf(reconstruction_loss(recon, target, kind, "none")).all().item()  # each row's 9e39
    x = recon.clone().requires_grad_()
    reconstruction_loss(x, target, kind, "mean").backward()
    assert torch.isfinite(x.grad).all().item()


def test_a_long_float32_row_whose_lane_partials_overflow_keeps_its_finite_mean():
    """One row of 70,001 elements of 1.2e37 (mse of 3.5e18; segments of 2,048, partial last):
    a lane's 64 elements sum to 7.8e38, past float32, while the mean (1.2e37) fits. With
    float32 partials this mean was inf."""
    recon = torch.full((1, 70_001), 3.5e18, device="cuda")
    target = torch.zeros_like(recon)
    mean = reconstruction_loss(recon, target, "mse", "mean")
    assert torch.isfinite(mean).item()
    torch.testing.assert_close(mean.double().cpu(), torch.tensor(3.5e18, dtype=torch.float64) ** 2,
                               rtol=1e-6, atol=0)


def test_a_float32_kl_within_range_is_not_inf_when_its_row_sum_overflows():
    """Two dimensions of mu = 1.5e19: each -2.25e38 term fits float32, their sum does not; the
    row's KL (2.25e38) does (the CPU test's case: summed in double across lanes here)."""
    mu = torch.full((4, 2), 1.5e19, device="cuda")
    logvar = torch.zeros_like(mu)
    rows = kl_normal(mu, logvar, "none")
    reference = kl_normal(mu.double().cpu(), logvar.double().cpu(), "none")
    assert rows.device.type == "cuda" and rows.dtype == torch.float32
    assert torch.isfinite(rows).all().item()
    torch.testing.assert_close(rows.double().cpu(), reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(kl_normal(mu, logvar, "mean").double().cpu(), reference.mean(), rtol=1e-6, atol=0)
    assert torch.isinf(kl_normal(mu, logvar, "sum")).item()  # 9e38: past float32 itself


@pytest.mark.parametrize("cols", [2, 5000])  # one segment; a row of several, the big element in the second
def test_an_element_whose_own_loss_passes_float32_keeps_its_finite_mean(cols):
    """mse of one element of 2e19 (4e38, past float32 by itself) beside zeros: float32 gives
    that element inf, so the segment is summed again with each element in double, as the CPU
    does; the mean over the row's elements fits."""
    recon = torch.zeros((3, cols), device="cuda")
    recon[1, cols - 1] = 2e19
    target = torch.zeros_like(recon)
    mean = reconstruction_loss(recon, target, "mse", "mean")
    cpu = reconstruction_loss(recon.cpu(), target.cpu(), "mse", "mean")
    assert torch.isfinite(mean).item() and torch.isfinite(cpu)
    torch.testing.assert_close(mean.double().cpu(), torch.tensor(4e38 / (3 * cols), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.cpu(), cpu, rtol=1e-6, atol=0)


def test_a_kl_term_past_float32_keeps_its_finite_row():
    """mu = 2e19: mu^2 (4e38) is inf in float32; the row's KL, 0.5 * 4e38 = 2e38, fits."""
    mu = torch.zeros((2, 3), device="cuda")
    mu[0, 1] = 2e19
    logvar = torch.zeros_like(mu)
    rows = kl_normal(mu, logvar, "none")
    assert torch.isfinite(rows).all().item()
    torch.testing.assert_close(rows.double().cpu(), torch.tensor([2e38, 0.0], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(rows.cpu(), kl_normal(mu.cpu(), logvar.cpu(), "none"), rtol=1e-6, atol=0)
