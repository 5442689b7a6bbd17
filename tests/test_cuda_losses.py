"""The CUDA losses' host side, on any machine: which implementation CUDA tensors get, and the
native entry points' argument checks, which run before anything reaches a GPU. (The kernels
themselves: tests/gpu/test_losses_cuda.py, on a GPU.)"""

import pytest
import torch

import latentspace as ls
from latentspace import _cuda_losses, _native
from latentspace.losses import kl_normal, reconstruction_loss

CUDA_BUILT = ls.build_info()["cuda_compiled"]


@pytest.mark.parametrize("value, expected", [
    (None, _cuda_losses.DEFAULT_BACKEND), ("", _cuda_losses.DEFAULT_BACKEND),
    ("auto", _cuda_losses.DEFAULT_BACKEND), ("native", "native"), ("torch", "torch"),
])
def test_backend_setting(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(_cuda_losses.BACKEND_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(_cuda_losses.BACKEND_VARIABLE, value)
    assert _cuda_losses.backend() == expected


@pytest.mark.parametrize("value", ["Native", "1", "cuda", " native"])
def test_a_bad_backend_setting_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(_cuda_losses.BACKEND_VARIABLE, value)
    with pytest.raises(ValueError, match="LATENTSPACE_CUDA_LOSSES: expected 'auto', 'native' or 'torch'"):
        _cuda_losses.backend()


def test_the_setting_does_not_touch_cpu_tensors(monkeypatch):
    """CPU tensors always take the CPU kernels; the variable is read for CUDA tensors only."""
    monkeypatch.setenv(_cuda_losses.BACKEND_VARIABLE, "no such backend")
    recon, target = torch.rand(4, 6), torch.rand(4, 6)
    expected = torch.nn.functional.mse_loss(recon, target)
    torch.testing.assert_close(reconstruction_loss(recon, target), expected)
    assert torch.isfinite(kl_normal(recon, target))


needs_cuda_build = pytest.mark.skipif(not CUDA_BUILT, reason="a build without CUDA has only the stubs")


@needs_cuda_build
@pytest.mark.parametrize("rows, cols, expected", [
    (1, 1, 0), (5, 2048, 0), (5, 2049, 10), (3, 5000, 9), (2, 70_001, 2 * 35),
])
def test_workspace_holds_a_sum_per_segment_of_rows_longer_than_one(rows, cols, expected):
    assert _native.loss_cuda_workspace_doubles(rows, cols) == expected


def _reconstruction(**changes):
    """reconstruction_loss_cuda with arguments that pass every check, except `changes`."""
    arguments = dict(recon=8, target=8, rows=3, cols=4, kind=0, grad_scale=1.0, grad=0, row_losses=8, total=8,
                     out_of_range=0, workspace=0, stream=0, float64=False)
    arguments.update(changes)
    return _native.reconstruction_loss_cuda(**arguments)


@needs_cuda_build
@pytest.mark.parametrize("changes, match", [
    (dict(rows=0), "rows, cols: expected at least 1 each"),
    (dict(cols=0), "rows, cols: expected at least 1 each"),
    (dict(kind=3), "kind: expected 0 \\(mse\\), 1 \\(bce\\) or 2 \\(bce_logits\\)"),
    (dict(kind=-1), "kind: expected"),
    (dict(recon=0, target=0), "recon: expected a device pointer"),
    (dict(target=0), "target: expected a device pointer"),
    (dict(row_losses=0), "row_losses, total: expected device buffers"),
    (dict(total=0), "row_losses, total: expected device buffers"),
    (dict(kind=1), "out_of_range: kind='bce' needs a zeroed device flag"),
    (dict(cols=2049), "workspace: expected loss_cuda_workspace_doubles\\(3, 2049\\) doubles"),
])
def test_reconstruction_arguments_are_checked_before_any_launch(changes, match):
    with pytest.raises(ValueError, match=match):
        _reconstruction(**changes)


@needs_cuda_build
@pytest.mark.parametrize("changes, match", [
    (dict(rows=0), "rows, cols: expected at least 1 each"),
    (dict(mu=0), "mu: expected a device pointer"),
    (dict(logvar=0), "logvar: expected a device pointer"),
    (dict(total=0), "row_losses, total: expected device buffers"),
    (dict(cols=5000), "workspace: expected"),
])
def test_kl_arguments_are_checked_before_any_launch(changes, match):
    arguments = dict(mu=8, logvar=8, rows=3, cols=4, grad_scale=1.0, grad_mu=0, grad_logvar=0, row_losses=8,
                     total=8, workspace=0, stream=0, float64=True)
    arguments.update(changes)
    with pytest.raises(ValueError, match=match):
        _native.kl_normal_cuda(**arguments)


@pytest.mark.skipif(CUDA_BUILT, reason="the stubs exist only in a build without CUDA")
def test_a_build_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _native.loss_cuda_workspace_doubles(3, 4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_cuda_forward_contract_gives_the_same_losses(monkeypatch, reduction):
    """The CUDA forwards return the sum as a 0-d float64 device tensor and always the per-row
    sums (nothing is read back); the CPU ones return a float. Run the CPU kernels under the
    CUDA contract: the loss and the gradients the caller sees must not change."""
    from latentspace import losses

    generator = torch.Generator().manual_seed(7)
    recon = torch.rand(5, 3, 4, generator=generator, requires_grad=True)
    target = torch.rand(5, 3, 4, generator=generator, requires_grad=True)
    mu, logvar = (torch.randn(5, 6, generator=generator, requires_grad=True) for _ in range(2))

    def run():
        values = (reconstruction_loss(recon, target, "bce_logits", reduction), kl_normal(mu, logvar, reduction))
        grads = torch.autograd.grad(sum(v.sum() for v in values), (recon, target, mu, logvar))
        return values, grads

    expected_values, expected_grads = run()
    cpu_reconstruction, cpu_kl = losses._reconstruction_cpu, losses._kl_cpu

    def reconstruction_as_cuda(recon, target, kind, grad_scale, needs_grad, per_row):
        total, row_losses, grad = cpu_reconstruction(recon, target, kind, grad_scale, needs_grad, True)
        return torch.tensor(total, dtype=torch.float64), row_losses, grad

    def kl_as_cuda(mu, logvar, grad_scale, needs_mu, needs_logvar, per_row):
        total, row_losses, grad_mu, grad_logvar = cpu_kl(mu, logvar, grad_scale, needs_mu, needs_logvar, True)
        return torch.tensor(total, dtype=torch.float64), row_losses, grad_mu, grad_logvar

    monkeypatch.setattr(losses, "_reconstruction_cpu", reconstruction_as_cuda)
    monkeypatch.setattr(losses, "_kl_cpu", kl_as_cuda)
    values, grads = run()
    for value, expected in zip(values, expected_values):
        assert value.dtype == expected.dtype and value.shape == expected.shape
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)
